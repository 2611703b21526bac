"""The offline bundle: `harness data export DIR` writes one, `harness data check [DIR]` verifies one.

A bundle is the folder layout of ../shared/data: the evaluation and calibration files the harness reads (`GROUPS`),
OPT's tokenizer, and `MANIFEST.tsv` (tab-separated, no header: path, source, size in bytes, sha256). Export reads
from whatever source is available: a bundle (`--data-dir`, `HARNESS_DATA_DIR`, a checkout's ../shared/data: its
verified files are copied), else the Hugging Face hub through `datasets` (each file is written from the hub split
it is a copy of, `harness.data.HUB`, in the bundle's own layout, so the harness's readers and the offline lm-eval
tasks read it exactly as they read ../shared/data). BookCorpus, C4 and CB are never bundled (hub only).
"""
from __future__ import annotations

import bz2
import json
import shutil
from dataclasses import dataclass, field
from datetime import datetime, timezone
from pathlib import Path

from harness.data import HUB, MANIFEST, OPT_TOKENIZER_ID, TOKENIZER_FILES, DataDir, HubData, sha256_file
from harness.errors import HarnessError

#: the bundle's files by group (what `--only` names)
GROUPS: dict[str, tuple[str, ...]] = {
    "wikitext-2": ("wikitext-2/wiki.test.raw", "wikitext-2/wiki.test.tokens", "wikitext-2/wiki.valid.tokens"),
    "ptb": ("ptb/ptb.test.txt", "ptb/ptb.valid.txt"),
    "lambada": ("lambada/lambada_test.jsonl",),
    "piqa": ("piqa/valid.jsonl", "piqa/valid-labels.lst"),
    "copa": ("copa/val.jsonl",),
    "openbookqa": ("openbookqa/test.tsv", "openbookqa/dev.tsv"),
    "winogrande": ("winogrande/dev.jsonl", "winogrande/dev-labels.lst"),
    "rte": ("rte/val.jsonl",),
    "hellaswag": ("hellaswag/hellaswag_val_full.txt.bz2",),
    "arc_easy": ("arc_easy/test.llm_adapters_format.json",),
    "tokenizer": TOKENIZER_FILES,
}
NOT_LISTED = {MANIFEST, "README.md", "README.txt"}  # a bundle's files that the manifest does not list


def groups(only: list[str] | None) -> list[str]:
    if not only:
        return list(GROUPS)
    unknown = [name for name in only if name not in GROUPS]
    if unknown:
        raise HarnessError(f"unknown data group(s) {', '.join(unknown)}; valid: {', '.join(GROUPS)}")
    return list(dict.fromkeys(only))


# -- writing each file from the hub rows (the Hugging Face schema) ----------------------------------------
def _lines(rows) -> bytes:
    return "".join(rows).encode("utf-8")


def _jsonl(rows: list[dict]) -> bytes:
    return "".join(json.dumps(row, ensure_ascii=False) + "\n" for row in rows).encode("utf-8")


def _one_line(text: str) -> str:
    return " ".join(str(text).split("\t")).replace("\n", " ")


def _wikitext(rows: list[dict]) -> bytes:
    # a row is a line with its newline, "" for a blank line (the Hugging Face builder's rows): the file again, whose
    # blank lines are a single space (WikiText's own files)
    return _lines(row["text"] if row["text"].strip() else " \n" for row in rows)


def _ptb(rows: list[dict]) -> bytes:
    return _lines(f" {row['sentence'].strip()} \n" for row in rows if row["sentence"].strip())


def _openbookqa(rows: list[dict]) -> bytes:
    out = ["ID\tQuestion Stem\tChoices\tComplete Question\tAnswer Key\n"]
    for row in rows:
        letters = [chr(ord("A") + i) for i in range(len(row["choices"]["text"]))]
        choices = " ".join(f"({letter}) {_one_line(text)}" for letter, text in zip(letters, row["choices"]["text"]))
        answer = letters[row["choices"]["label"].index(row["answerKey"])]
        stem = _one_line(row["question_stem"])
        out.append(f"{row['id']}\t{stem}\t{choices}\t{stem} {choices}\t{answer}\n")
    return "".join(out).encode("utf-8")


def _hellaswag(rows: list[dict]) -> bytes:
    lines = []
    for row in rows:
        lines += [f"{row['activity_label']}: {row['ctx']}", str(row["label"]), *row["endings"]]
    return bz2.compress(("\n".join(_one_line(line) for line in lines) + "\n").encode("utf-8"))


def _arc(rows: list[dict]) -> bytes:
    items = []
    for row in rows:
        texts = row["choices"]["text"]
        gold = row["choices"]["label"].index(row["answerKey"]) + 1
        choices = " ".join(f"Answer{i + 1}: {text}" for i, text in enumerate(texts))
        fmt = "/".join(f"answer{i + 1}" for i in range(len(texts)))
        items.append({"instruction": f"Please choose the correct answer to the question: {row['question']}\n\n"
                                     f"{choices}\n\nAnswer format: {fmt}",
                      "input": "", "output": f"the correct answer is answer{gold}", "answer": f"answer{gold}"})
    return json.dumps(items, ensure_ascii=False, indent=2).encode("utf-8")


_RTE_LABELS = {0: "entailment", 1: "not_entailment"}
WRITERS = {
    "wikitext-2/wiki.test.raw": _wikitext,
    "wikitext-2/wiki.test.tokens": _wikitext,
    "wikitext-2/wiki.valid.tokens": _wikitext,
    "ptb/ptb.test.txt": _ptb,
    "ptb/ptb.valid.txt": _ptb,
    "lambada/lambada_test.jsonl": lambda rows: _jsonl([{"text": row["text"]} for row in rows]),
    "piqa/valid.jsonl": lambda rows: _jsonl([{"goal": r["goal"], "sol1": r["sol1"], "sol2": r["sol2"]} for r in rows]),
    "piqa/valid-labels.lst": lambda rows: _lines(f"{row['label']}\n" for row in rows),
    "copa/val.jsonl": lambda rows: _jsonl([{k: r[k] for k in ("premise", "choice1", "choice2", "question", "idx",
                                                                "label")} for r in rows]),
    "openbookqa/test.tsv": _openbookqa,
    "openbookqa/dev.tsv": _openbookqa,
    "winogrande/dev.jsonl": lambda rows: _jsonl([{"sentence": r["sentence"], "option1": r["option1"],
                                                  "option2": r["option2"]} for r in rows]),
    "winogrande/dev-labels.lst": lambda rows: _lines(f"{row['answer']}\n" for row in rows),
    "rte/val.jsonl": lambda rows: _jsonl([{"premise": r["sentence1"], "hypothesis": r["sentence2"],
                                           "label": _RTE_LABELS[int(r["label"])], "idx": r["idx"]} for r in rows]),
    "hellaswag/hellaswag_val_full.txt.bz2": _hellaswag,
    "arc_easy/test.llm_adapters_format.json": _arc,
}


# -- export -----------------------------------------------------------------------------------------------
@dataclass
class Exported:
    root: Path
    source: str
    files: list[tuple[str, str, int, str]] = field(default_factory=list)  # manifest lines


def _manifest_sources(data: DataDir) -> dict[str, str]:
    table = data.root / MANIFEST
    if not table.exists():
        return {}
    out = {}
    for line in table.read_text().splitlines():
        fields = line.split("\t")
        if len(fields) >= 4:
            out[fields[0]] = fields[1]
    return out


def export(dest: str | Path, data, only: list[str] | None = None, log=print) -> Exported:
    """Write the bundle into `dest` (an empty or new folder) from `data` (a DataDir or HubData)."""
    dest = Path(dest)
    if dest.exists() and (not dest.is_dir() or any(dest.iterdir())):
        raise HarnessError(f"{dest} is {'a file' if not dest.is_dir() else 'not empty'}; export writes a new bundle "
                           "into an empty or new folder")
    if isinstance(data, DataDir) and dest.resolve() == data.root.resolve():
        raise HarnessError(f"{dest} is the bundle being exported; choose another folder")
    chosen = groups(only)
    files = [rel for name in chosen for rel in GROUPS[name]]
    if isinstance(data, HubData):
        data.check([rel for rel in files if rel not in TOKENIZER_FILES])  # offline and not cached: exit 2, before writing
    else:
        data.check(files)
    out = Exported(dest, data.describe())
    staging = dest.parent / f".{dest.name}.partial"
    if staging.exists():
        shutil.rmtree(staging)
    staging.mkdir(parents=True)
    try:
        sources = _manifest_sources(data) if isinstance(data, DataDir) else {}
        for name in chosen:
            log(f"export {name} from {data.describe()}")
            if name == "tokenizer":
                out.files += _export_tokenizer(staging, data, sources)
                continue
            for rel in GROUPS[name]:
                target = staging / rel
                target.parent.mkdir(parents=True, exist_ok=True)
                if isinstance(data, DataDir):
                    shutil.copyfile(data.path(rel), target)
                    source = sources.get(rel, f"copied from {data.root}")
                else:
                    split = HUB[rel]
                    target.write_bytes(WRITERS[rel](data.rows(rel)))
                    source = f"hub:{split.path}" + (f"/{split.name}" if split.name else "") + f":{split.split}" + (
                        f"@{split.revision}" if split.revision else "") + " (written by harness data export)"
                out.files.append((rel, source, target.stat().st_size, sha256_file(target)))
        lines = sorted(out.files)
        (staging / MANIFEST).write_text("".join(f"{rel}\t{source}\t{size}\t{sha}\n" for rel, source, size, sha in lines))
        (staging / "README.md").write_text(
            f"# Offline data bundle for sparsity-harness\n\nWritten by `harness data export` from {data.describe()} on "
            f"{datetime.now(timezone.utc).isoformat(timespec='seconds')}; groups: {', '.join(chosen)}. "
            "`MANIFEST.tsv` lists every file (path, source, size, sha256). Use it with `--data-dir DIR` or "
            "`HARNESS_DATA_DIR=DIR`; check it with `harness data check DIR`.\n")
        if dest.exists():
            dest.rmdir()
        staging.rename(dest)
    except BaseException:
        shutil.rmtree(staging, ignore_errors=True)
        raise
    return out


def _export_tokenizer(staging: Path, data, sources: dict) -> list[tuple]:
    from harness.models import hub_tokenizer

    folder = staging / "tokenizer" / "opt"
    folder.mkdir(parents=True, exist_ok=True)
    if isinstance(data, DataDir):
        origin, names = data.root / "tokenizer" / "opt", [Path(rel).name for rel in TOKENIZER_FILES]
        label = lambda name: sources.get(f"tokenizer/opt/{name}", f"copied from {data.root}")  # noqa: E731
    else:
        origin = hub_tokenizer(OPT_TOKENIZER_ID, "harness data export")
        names = sorted({Path(rel).name for rel in TOKENIZER_FILES} | {p.name for p in origin.glob("special_tokens_map.json")})
        label = lambda name: f"hub:{OPT_TOKENIZER_ID}:{name} (written by harness data export)"  # noqa: E731
    written = []
    for name in names:
        source = origin / name
        if not source.exists():
            raise HarnessError(f"the OPT tokenizer in {origin} has no {name}")
        shutil.copyfile(source, folder / name)
        rel = f"tokenizer/opt/{name}"
        written.append((rel, label(name), (folder / name).stat().st_size, sha256_file(folder / name)))
    return written


# -- check ------------------------------------------------------------------------------------------------
@dataclass
class Checked:
    root: Path
    ok: list[str] = field(default_factory=list)
    problems: list[str] = field(default_factory=list)  # missing, wrong size or sha256
    unlisted: list[str] = field(default_factory=list)  # files the manifest does not list (never read)
    groups: dict[str, bool] = field(default_factory=dict)  # group -> all its files listed and intact


def check(root: str | Path) -> Checked:
    """Every file MANIFEST.tsv lists exists with its size and sha256; which groups are complete; what is unlisted."""
    root = Path(root)
    if not root.is_dir():
        raise HarnessError(f"{root} is not a folder; name an offline bundle (a folder with {MANIFEST})")
    table = root / MANIFEST
    if not table.exists():
        raise HarnessError(f"{root} has no {MANIFEST}, so it is not a bundle (`harness data export DIR` writes one)")
    out = Checked(root)
    listed = set()
    for number, line in enumerate(table.read_text().splitlines(), 1):
        if not line.strip():
            continue
        fields = line.split("\t")
        if len(fields) < 4:
            out.problems.append(f"{MANIFEST}:{number}: expected path, source, size, sha256 (tab-separated)")
            continue
        rel, _source, size, sha = fields[0], fields[1], fields[2].strip(), fields[3].strip()
        listed.add(rel)
        path = root / rel
        if not path.is_file():
            out.problems.append(f"{rel}: missing")
        elif size.isdigit() and path.stat().st_size != int(size):
            out.problems.append(f"{rel}: {path.stat().st_size} bytes, the manifest says {size}")
        elif sha256_file(path) != sha:
            out.problems.append(f"{rel}: sha256 {sha256_file(path)[:12]}… != {sha[:12]}… in the manifest")
        else:
            out.ok.append(rel)
    for path in sorted(p for p in root.rglob("*") if p.is_file()):
        rel = str(path.relative_to(root))
        docs = rel in NOT_LISTED or Path(rel).name.startswith("README")
        if rel not in listed and not docs and not any(part.startswith(".") for part in Path(rel).parts):
            out.unlisted.append(rel)
    good = set(out.ok)
    out.groups = {name: all(rel in good for rel in files) for name, files in GROUPS.items()}
    return out
