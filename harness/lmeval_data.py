"""Local copies of the zero-shot data sets, converted back into the schema of the Hugging Face data sets
that lm-eval's own task definitions load, so that lm-eval's own templates and functions build the prompts.

Each `rows_<task>(root)` returns the evaluation split as a list of dicts with the original fields (in
the original order); `load(task, data_dir)` wraps them in a `datasets.DatasetDict` under the split name
lm-eval's task uses. The offline task files in `suites/lm_eval_tasks/` call these loaders through their
`custom_dataset` hook; the data directory comes from the task manager's metadata (`data_dir`).

How faithful each conversion is (see FIDELITY): `exact` when the local file is the file the Hugging Face
data set was built from (same bytes, or proven equal by sha256), `reconstructed` when fields are parsed
back from another layout (lossless as far as can be checked offline, but not provable byte for byte),
`approximate` when the local copy has lost information that lm-eval's processing needs.
"""
from __future__ import annotations

import bz2
import hashlib
import json
import re
from pathlib import Path

FIDELITY = {
    "piqa": ("exact", "local valid.jsonl + valid-labels.lst are the files the HF data set is built from"),
    "copa": ("exact", "local val.jsonl has the sha256 of SuperGLUE COPA val.jsonl"),
    "winogrande": ("exact", "local dev.jsonl (xl dev) has the sha256 of the original WinoGrande dev.jsonl"),
    "lambada_openai": ("exact", "local lambada_test.jsonl has the sha256 of lm-eval's pinned file"),
    "openbookqa": ("reconstructed", "choices parsed back from OpenCompass's TSV '(A) … (B) …' string; "
                                    "choice labels and whitespace cannot be checked against the HF data set offline"),
    "arc_easy": ("reconstructed", "question and choices parsed back from the LLM-Adapters instruction text; "
                                  "original choice labels (A-D or 1-4) are lost (only the gold index matters to lm-eval)"),
    "rte": ("reconstructed", "SuperGLUE RTE validation (premise/hypothesis) mapped onto GLUE RTE's fields "
                             "(sentence1/sentence2, 0=entailment); lm-eval's rte loads GLUE RTE validation, "
                             "the same 277 pairs, not checked byte for byte"),
    "hellaswag": ("approximate", "the local copy stores lm-eval-style preprocessed 'activity: ctx' without the "
                                 "ctx_a/ctx_b split; lm-eval capitalises ctx_b (first letter up, rest lowered), so "
                                 "ctx_b is recovered heuristically (trailing lower-case fragment after the last "
                                 "sentence end); contexts can differ in letter case"),
    "wikitext": ("reconstructed", "WikiText-2 raw test rebuilt from a raw copy plus the tokenized file's blank-line "
                                  "layout (see MANIFEST.tsv); pages split with the wikitext_document_level script's rule"),
}


def _jsonl(path: Path) -> list[dict]:
    with open(path, encoding="utf-8") as handle:
        return [json.loads(line) for line in handle if line.strip()]


def _labels(path: Path) -> list[str]:
    with open(path, encoding="utf-8") as handle:
        return [line.strip() for line in handle if line.strip()]


# -- one converter per task ------------------------------------------------------------------------
def rows_piqa(root: Path) -> list[dict]:
    """HF piqa (baber/piqa) validation: goal, sol1, sol2, label (int)."""
    rows = _jsonl(root / "piqa/valid.jsonl")
    labels = _labels(root / "piqa/valid-labels.lst")
    if len(rows) != len(labels):
        raise ValueError(f"piqa: {len(rows)} rows but {len(labels)} labels")
    return [{"goal": r["goal"], "sol1": r["sol1"], "sol2": r["sol2"], "label": int(label)} for r, label in zip(rows, labels)]


def rows_copa(root: Path) -> list[dict]:
    """super_glue copa validation: premise, choice1, choice2, question, idx, label."""
    return [{"premise": r["premise"], "choice1": r["choice1"], "choice2": r["choice2"], "question": r["question"],
             "idx": r["idx"], "label": int(r["label"])} for r in _jsonl(root / "copa/val.jsonl")]


def rows_winogrande(root: Path) -> list[dict]:
    """winogrande_xl validation: sentence, option1, option2, answer ("1"/"2")."""
    rows = _jsonl(root / "winogrande/dev.jsonl")
    labels = _labels(root / "winogrande/dev-labels.lst")
    if len(rows) != len(labels):
        raise ValueError(f"winogrande: {len(rows)} rows but {len(labels)} labels")
    return [{"sentence": r["sentence"], "option1": r["option1"], "option2": r["option2"], "answer": str(label)}
            for r, label in zip(rows, labels)]


def rows_rte(root: Path) -> list[dict]:
    """GLUE rte validation: sentence1, sentence2, label (0 entailment, 1 not_entailment), idx."""
    names = {"entailment": 0, "not_entailment": 1}
    return [{"sentence1": r["premise"], "sentence2": r["hypothesis"], "label": names[r["label"]], "idx": r["idx"]}
            for r in _jsonl(root / "rte/val.jsonl")]


def rows_lambada_openai(root: Path) -> list[dict]:
    """EleutherAI/lambada_openai default test: text."""
    return [{"text": r["text"]} for r in _jsonl(root / "lambada/lambada_test.jsonl")]


_OBQA_CHOICE = re.compile(r"\(([A-Z])\) ")


def rows_openbookqa(root: Path, split: str = "test") -> list[dict]:
    """allenai/openbookqa main: id, question_stem, choices {text, label}, answerKey."""
    path = root / "openbookqa" / ("test.tsv" if split == "test" else "dev.tsv")
    out = []
    with open(path, encoding="utf-8") as handle:
        header = handle.readline().rstrip("\n").split("\t")
        for line in handle:
            if not line.strip():
                continue
            fields = dict(zip(header, line.rstrip("\n").split("\t")))
            text = fields["Choices"]
            marks = list(_OBQA_CHOICE.finditer(text))
            expected = [chr(ord("A") + i) for i in range(len(marks))]
            if [m.group(1) for m in marks] != expected or (marks and marks[0].start() != 0):
                raise ValueError(f"openbookqa {fields['ID']}: cannot parse choices {text!r}")
            labels, texts = [], []
            for i, mark in enumerate(marks):
                end = marks[i + 1].start() - 1 if i + 1 < len(marks) else len(text)  # one space before "(B)"
                labels.append(mark.group(1))
                texts.append(text[mark.end():end])
            out.append({"id": fields["ID"], "question_stem": fields["Question Stem"],
                        "choices": {"text": texts, "label": labels}, "answerKey": fields["Answer Key"]})
    return out


_ARC = re.compile(r"\APlease choose the correct answer to the question: (?P<question>.*)\n\n(?P<choices>Answer1: .*)\n\n"
                  r"Answer format: (?P<format>answer\d+(?:/answer\d+)*)\Z", re.S)


def rows_arc_easy(root: Path) -> list[dict]:
    """allenai/ai2_arc ARC-Easy test: id, question, choices {text, label}, answerKey (labels A, B, … rebuilt)."""
    items = json.loads((root / "arc_easy/test.llm_adapters_format.json").read_text(encoding="utf-8"))
    out = []
    for index, item in enumerate(items):
        match = _ARC.match(item["instruction"])
        if match is None:
            raise ValueError(f"arc_easy item {index}: unexpected instruction layout")
        count = len(match.group("format").split("/"))
        parts = re.split(r"(?:\A| )Answer(\d+): ", match.group("choices"))
        numbers, texts = parts[1::2], parts[2::2]
        if parts[0] != "" or numbers != [str(i + 1) for i in range(count)]:
            raise ValueError(f"arc_easy item {index}: cannot split {count} choices")
        gold = int(item["answer"].removeprefix("answer")) - 1
        labels = [chr(ord("A") + i) for i in range(count)]
        out.append({"id": f"arc_easy_test_{index}", "question": match.group("question"),
                    "choices": {"text": texts, "label": labels}, "answerKey": labels[gold]})
    return out


_SENTENCE_END = re.compile(r"[.!?] ")


def split_hellaswag_ctx(ctx: str) -> tuple[str, str]:
    """(ctx_a, ctx_b) from a joined context: ctx_b is the trailing fragment after the last sentence end when
    it starts with a lower-case letter (ActivityNet's incomplete noun phrase), else empty (WikiHow)."""
    ends = list(_SENTENCE_END.finditer(ctx))
    if not ends:
        return ctx, ""
    cut = ends[-1].end()
    tail = ctx[cut:]
    if tail and tail[0].islower():
        return ctx[: cut - 1], tail
    return ctx, ""


def rows_hellaswag(root: Path) -> list[dict]:
    """Rowan/hellaswag validation: ind, activity_label, ctx_a, ctx_b, ctx, endings, label (str)."""
    with bz2.open(root / "hellaswag/hellaswag_val_full.txt.bz2", "rt", encoding="utf-8") as handle:
        lines = handle.read().split("\n")
    if lines and lines[-1] == "":
        lines.pop()
    if len(lines) % 6:
        raise ValueError(f"hellaswag: {len(lines)} lines is not a multiple of 6")
    out = []
    for index in range(0, len(lines), 6):
        head, label, endings = lines[index], lines[index + 1], lines[index + 2: index + 6]
        activity, sep, ctx = head.partition(": ")
        if not sep:
            raise ValueError(f"hellaswag item {index // 6}: no 'activity: ' prefix")
        ctx_a, ctx_b = split_hellaswag_ctx(ctx)
        out.append({"ind": index // 6, "activity_label": activity, "ctx_a": ctx_a, "ctx_b": ctx_b,
                    "ctx": f"{ctx_a} {ctx_b}" if ctx_b else ctx_a, "endings": endings, "label": label.strip()})
    return out


def rows_wikitext(root: Path) -> list[dict]:
    """EleutherAI/wikitext_document_level wikitext-2-raw-v1 test: page (the dataset script's page split)."""
    data = (root / "wikitext-2/wiki.test.raw").read_text(encoding="utf-8").split("\n")
    pages, current = [], []
    for line in data:
        heading = line.replace("= = =", "===").replace("= =", "==").strip()
        if heading.startswith("= ") and heading.endswith(" ="):
            page = "\n".join(current)
            if page.strip():
                pages.append({"page": page})
            current = []
        current.append(line)
    pages.append({"page": "\n".join(current)})
    return pages


CONVERTERS = {
    "piqa": (rows_piqa, "validation"),
    "copa": (rows_copa, "validation"),
    "winogrande": (rows_winogrande, "validation"),
    "rte": (rows_rte, "validation"),
    "lambada_openai": (rows_lambada_openai, "test"),
    "openbookqa": (rows_openbookqa, "test"),
    "arc_easy": (rows_arc_easy, "test"),
    "hellaswag": (rows_hellaswag, "validation"),
    "wikitext": (rows_wikitext, "test"),
}

# -- calibration documents of the offline copies ------------------------------------------------------------
#: ShadowLLM's calibration examples (harness/fewshot.py) are drawn from splits that are never evaluated. Offline:
#: OpenBookQA has its dev split (CALIBRATION_SPLITS). The tasks whose only local split is the evaluated one lend
#: this many documents to calibration (HOLDOUT) and their offline evaluation leaves exactly those out, for every
#: method alike; COPA (100 documents) and RTE (277) are too small to split and give no calibration offline.
CALIBRATION_SPLITS = {"openbookqa": (lambda root: rows_openbookqa(root, "dev"), "dev")}
HOLDOUT = {"piqa": 400, "winogrande": 300, "arc_easy": 500, "hellaswag": 1500}


def _fingerprint(row: dict) -> str:
    return hashlib.sha256(json.dumps(row, sort_keys=True, ensure_ascii=False).encode("utf-8")).hexdigest()


def held_out(task: str, all_rows: list[dict]) -> list[int]:
    """Indices (in file order) of the documents `task` lends to calibration: the HOLDOUT[task] documents with
    the smallest sha256 of their content (deterministic, independent of the file's order); [] for other tasks."""
    count = HOLDOUT.get(task, 0)
    ranked = sorted(range(len(all_rows)), key=lambda i: (_fingerprint(all_rows[i]), i))
    return sorted(ranked[:count])


_CACHE: dict = {}


def rows(task: str, data_dir) -> list[dict]:
    """Every document of the task's local evaluation split (the converted file, nothing left out)."""
    key = (task, str(data_dir))
    if key not in _CACHE:
        convert, _ = CONVERTERS[task]
        _CACHE[key] = convert(Path(data_dir))
    return _CACHE[key]


def evaluation_rows(task: str, data_dir) -> list[dict]:
    """The documents the offline task evaluates: `rows` without the ones lent to calibration."""
    all_rows = rows(task, data_dir)
    lent = set(held_out(task, all_rows))
    return [row for i, row in enumerate(all_rows) if i not in lent]


def calibration_rows(task: str, data_dir) -> tuple[list[dict], str] | None:
    """(documents, where they come from) for calibration from the local copy, or None when it has none."""
    if task in CALIBRATION_SPLITS:
        convert, split = CALIBRATION_SPLITS[task]
        return convert(Path(data_dir)), f"{split} split, not evaluated"
    if task in HOLDOUT:
        all_rows = rows(task, data_dir)
        return ([all_rows[i] for i in held_out(task, all_rows)],
                f"{HOLDOUT[task]} of the {len(all_rows)} {CONVERTERS[task][1]} documents, left out of the offline "
                "evaluation")
    return None


def holdout_note(task: str, data_dir) -> str | None:
    """What an offline evaluation record says about the documents it leaves out, or None."""
    if task not in HOLDOUT:
        return None
    total = len(rows(task, data_dir))
    return (f"{total - HOLDOUT[task]} of the {total} documents evaluated: the other {HOLDOUT[task]} are calibration "
            "documents (harness/fewshot.py)")


def load(task: str, data_dir=None, **_ignored):
    """A `datasets.DatasetDict` holding the task's evaluation split without its calibration documents (for
    lm-eval's `custom_dataset`)."""
    import datasets

    if not data_dir:
        raise ValueError(f"{task}: the offline task needs `data_dir` in the task manager's metadata")
    _, split = CONVERTERS[task]
    return datasets.DatasetDict({split: datasets.Dataset.from_list(evaluation_rows(task, data_dir))})
