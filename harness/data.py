"""Where evaluation and calibration data come from, in this order:

1. an offline bundle: `--data-dir`, else `HARNESS_DATA_DIR`, else (in a source checkout only) `../shared/data`
   beside the repository. A bundle is a folder of data files with a `MANIFEST.tsv` (path, source, size, sha256);
   every file a run reads is checked against its sha256 (`DataDir`). `harness data export DIR` writes one,
   `harness data check DIR` verifies one (harness/bundle.py).
2. otherwise the Hugging Face hub through `datasets` (`HubData`): the data sets the papers' loaders read
   (`HUB`), cached by `datasets` in the usual Hugging Face cache.
3. zero-shot tasks run lm-eval's own task definitions on lm-eval's own data sets (harness/lmeval.py); with a bundle,
   the offline copies of those tasks read the bundle when lm-eval's data set is not in the local cache.

Offline (HF_HUB_OFFLINE / HF_DATASETS_OFFLINE) with no bundle and a data set that is not cached, a run stops before
any work with exit 2 and names both ways to get data. BookCorpus and C4 come from the hub in either case.
"""
from __future__ import annotations

import hashlib
import json
import os
from dataclasses import dataclass
from functools import cached_property
from pathlib import Path

from harness.errors import HarnessError
from harness.resources import PACKAGE_PARENT, source_checkout

REPO_ROOT = PACKAGE_PARENT  # the folder above harness/ (a checkout's root; site-packages when installed)
#: the bundle a source checkout uses by default (our machines and CI keep one there); unused when installed
DEFAULT_DATA_DIR = REPO_ROOT.parent / "shared" / "data"
_VERIFIED: dict[tuple, str] = {}  # (path, size, mtime_ns) -> the sha256 it was found to match


def sha256_file(path: Path, chunk: int = 1 << 20) -> str:
    digest = hashlib.sha256()
    with open(path, "rb") as handle:
        for block in iter(lambda: handle.read(chunk), b""):
            digest.update(block)
    return digest.hexdigest()


CALIBRATION_FILES = {"wikitext2-valid": "wikitext-2/wiki.valid.tokens", "ptb-valid": "ptb/ptb.valid.txt",
                     # the reference model's held-out tail of WikiText-2 valid and PTB valid (harness/reference_model.py)
                     "reference-holdout": "wikitext-2/wiki.valid.tokens"}
TOKENIZER_FILES = ("tokenizer/opt/vocab.json", "tokenizer/opt/merges.txt", "tokenizer/opt/tokenizer_config.json")
MANIFEST = "MANIFEST.tsv"


class DataDir:
    """A data bundle and its manifest; `path(rel)` checks existence and sha256 on first use.

    `verify=False` (`--no-verify`) uses the files unchecked: the directory may lack MANIFEST.tsv, and the
    records of such a run say `data_verified: false`."""

    kind = "bundle"

    def __init__(self, root: Path, source: str, verify: bool = True):
        self.root = Path(root)
        self.source = source  # which setting chose it, for error messages
        self.verify = verify

    @classmethod
    def resolve(cls, explicit: str | Path | None = None, verify: bool = True) -> "DataDir":
        """The bundle named by --data-dir, else HARNESS_DATA_DIR, else the checkout's default ../shared/data."""
        if explicit:
            root, source = Path(explicit), "--data-dir"
        elif os.environ.get("HARNESS_DATA_DIR"):
            root, source = Path(os.environ["HARNESS_DATA_DIR"]), "the HARNESS_DATA_DIR environment variable"
        else:
            root, source = DEFAULT_DATA_DIR, f"the default ({DEFAULT_DATA_DIR})"
        if not root.is_dir():
            raise HarnessError(
                f"data directory {root} does not exist (chosen by {source}); point --data-dir or HARNESS_DATA_DIR at "
                "an offline bundle (a folder with MANIFEST.tsv; `harness data export DIR` writes one), or give "
                "neither to read the data from the Hugging Face hub"
            )
        return cls(root.resolve(), source, verify)

    def spec(self) -> dict:
        """What a worker process needs to open the same source (harness.executors)."""
        return {"kind": "bundle", "root": str(self.root), "verify": self.verify}

    def describe(self) -> str:
        return f"bundle {self.root}" + ("" if self.verify else " (not verified)")

    @cached_property
    def manifest(self) -> dict[str, str]:
        """path -> sha256 from MANIFEST.tsv (tab-separated: path, source, size, sha256)."""
        table = self.root / MANIFEST
        if not table.exists():
            if self.verify:
                raise HarnessError(
                    f"data directory {self.root} (chosen by {self.source}) has no {MANIFEST}, so its files cannot be "
                    f"checked against their sha256; add the manifest (one line per file: path, source, size, sha256, "
                    "tab-separated), or pass --no-verify to use the files unchecked (records then say "
                    "data_verified: false)")
            return {}
        entries = {}
        for line in table.read_text().splitlines():
            fields = line.split("\t")
            if len(fields) >= 4:
                entries[fields[0]] = fields[3].strip()
        return entries

    @cached_property
    def fingerprint(self) -> str:
        """A content id of the directory, used in cache keys instead of its path: the hash of its manifest;
        unverified (`--no-verify`): of every file's path, size and mtime, so a changed file changes it too."""
        if self.verify:
            self.manifest  # noqa: B018 - refuses a directory without one
            return hashlib.sha256((self.root / MANIFEST).read_bytes()).hexdigest()[:16]
        digest = hashlib.sha256()
        for path in sorted(p for p in self.root.rglob("*") if p.is_file()):
            stat = path.stat()
            digest.update(f"{path.relative_to(self.root)}\t{stat.st_size}\t{stat.st_mtime_ns}\n".encode())
        return "unverified-" + digest.hexdigest()[:16]

    def path(self, rel: str) -> Path:
        """The file `rel` inside the data directory, verified against the manifest the first time."""
        full = self.root / rel
        if not full.exists():
            raise HarnessError(
                f"missing data file {full} (data directory chosen by {self.source}); "
                "set --data-dir or HARNESS_DATA_DIR to a directory that holds it"
            )
        if not self.verify:
            return full
        expected = self.manifest.get(rel)
        if expected is None:
            raise HarnessError(
                f"data file {full} is not listed in {self.root / MANIFEST}, so its sha256 cannot be checked; add its "
                "line to the manifest, or pass --no-verify to use the files unchecked")
        stat = full.stat()
        key = (full, stat.st_size, stat.st_mtime_ns)  # a file changed since it was checked is checked again
        if _VERIFIED.get(key) != expected:
            actual = sha256_file(full)
            if actual != expected:
                raise HarnessError(
                    f"data file {full} does not match MANIFEST.tsv (sha256 {actual[:12]}… != {expected[:12]}…); "
                    "restore the original file"
                )
            _VERIFIED[key] = expected
        return full

    def check(self, files) -> None:
        for rel in files:
            self.path(rel)

    # -- texts ---------------------------------------------------------------------------------
    def wikitext2_test(self) -> str:
        """WikiText-2 raw test as the Hugging Face dataset rows joined with "\\n\\n" (SparseGPT/Wanda).

        The HF `wikitext-2-raw-v1` rows are the file's lines (newline kept), blank lines as "".
        """
        return _hf_wikitext_join(self.path("wikitext-2/wiki.test.raw"))

    def ptb_test(self) -> str:
        """PTB test as `ptb_text_only` sentences (stripped lines) joined with a space (GPTQ/SparseGPT `ptb_new`)."""
        return _ptb_join(self.path("ptb/ptb.test.txt"))

    def ptb_valid_sparsegpt(self) -> str:
        """PTB validation as `ptb_text_only` sentences joined with "\n\n" (GPTQ/SparseGPT `ptb`: their loader
        evaluates the validation split)."""
        return "\n\n".join(_ptb_sentences(self.path("ptb/ptb.valid.txt")))

    def calibration_text(self, name: str = "wikitext2-valid") -> str:
        """Text for calibration and predictor training; never the evaluation splits."""
        path = self.path(calibration_file(name))
        if name in CALIBRATION_TEXTS:  # registered by the module that derives it (harness.reference_model)
            return CALIBRATION_TEXTS[name](self)
        return _hf_wikitext_join(path) if name == "wikitext2-valid" else _ptb_join(path)


#: calibration texts derived from the bundle by other modules, by name: name -> text_of(data). harness.reference_model
#: registers `reference-holdout` (the runner imports it), so this module imports nothing above it
CALIBRATION_TEXTS: dict = {}


def calibration_file(name: str) -> str:
    """The data file a calibration set is read from."""
    if name not in CALIBRATION_FILES:
        raise HarnessError(f"unknown calibration data {name!r}; valid: {', '.join(sorted(CALIBRATION_FILES))}")
    return CALIBRATION_FILES[name]


def wikitext_join(rows) -> str:
    """WikiText rows (a line with its newline, "" for a blank line) joined with "\n\n", as SparseGPT/Wanda's
    loader joins the Hugging Face data set's `text` column."""
    return "\n\n".join(row if row.strip() else "" for row in rows)


def _hf_wikitext_join(path: Path) -> str:
    """The file's lines are the Hugging Face `wikitext` rows (its builder yields each line, blank ones as "")."""
    with open(path, encoding="utf-8") as handle:
        return wikitext_join(list(handle))


def ptb_sentences(rows) -> list[str]:
    """`ptb_text_only` sentences: stripped lines, blank ones left out."""
    return [row.strip() for row in rows if row.strip()]


def _ptb_sentences(path: Path) -> list[str]:
    with open(path, encoding="utf-8") as handle:
        return ptb_sentences(handle)


def _ptb_join(path: Path) -> str:
    return " ".join(_ptb_sentences(path))


# -- data sets read from the Hugging Face hub ---------------------------------------------------------------
_TRUE = ("1", "true", "yes", "on")


def hub_offline() -> bool:
    """Whether the Hugging Face hub is switched off (HF_HUB_OFFLINE or HF_DATASETS_OFFLINE)."""
    return any(os.environ.get(name, "").strip().lower() in _TRUE for name in ("HF_HUB_OFFLINE", "HF_DATASETS_OFFLINE"))


def hf_dataset_cached(path: str) -> bool:
    """Whether the Hugging Face data set `path` (owner/name) is in the local hub or datasets cache."""
    home = Path(os.environ.get("HF_HOME", Path.home() / ".cache" / "huggingface"))
    hub = Path(os.environ.get("HF_HUB_CACHE", os.environ.get("HUGGINGFACE_HUB_CACHE", home / "hub")))
    datasets_cache = Path(os.environ.get("HF_DATASETS_CACHE", home / "datasets"))
    return (hub / f"datasets--{path.replace('/', '--')}").is_dir() or (datasets_cache / path.replace("/", "___")).is_dir()


BOTH_WAYS = ("Two ways to get the data: (1) an offline bundle: --data-dir DIR or HARNESS_DATA_DIR=DIR (write one with "
             "`harness data export DIR` on a machine that reaches the hub, and copy it over); (2) the hub: unset "
             "HF_HUB_OFFLINE / HF_DATASETS_OFFLINE on a machine with a network (`huggingface-cli login` first for gated "
             "data sets), and `datasets` downloads it into the Hugging Face cache")


def check_hub(path: str, task: str, streaming: bool = False, bundled: bool = False) -> None:
    """Exit-2 error when `task` needs the hub data set `path` and cannot have it: the hub is off and the data set
    is not cached (a streamed data set always needs the hub). `bundled`: an offline bundle could serve it instead
    (the message then names both ways)."""
    if hub_offline() and (streaming or not hf_dataset_cached(path)):
        where = "it is streamed from the hub" if streaming else "it is not in the local Hugging Face cache"
        if bundled:
            raise HarnessError(
                f"{task} reads the Hugging Face data set {path} through `datasets` (no offline bundle was given), but "
                f"the hub is switched off (HF_HUB_OFFLINE / HF_DATASETS_OFFLINE) and {where}. {BOTH_WAYS}")
        raise HarnessError(
            f"task {task} reads the Hugging Face data set {path} through `datasets` (the data directory has no copy), "
            f"but the hub is switched off (HF_HUB_OFFLINE / HF_DATASETS_OFFLINE) and {where}: run it on a machine "
            "with access to the hub, or leave the task out"
        )


def load_hub(path: str, *, task: str, streaming: bool = False, bundled: bool = False, **kwargs):
    """`datasets.load_dataset(path, **kwargs)` for `task`, with a message that names the data set on failure."""
    try:
        import datasets
    except ImportError:  # pragma: no cover - a dependency of the package
        raise HarnessError(f"{task} reads {path} from the Hugging Face hub through `datasets`, which is not "
                           "installed: pip install datasets") from None

    check_hub(path, task, streaming, bundled)
    try:
        return datasets.load_dataset(path, streaming=streaming, **kwargs)
    except Exception as exc:  # network, authentication, a changed data set: say which one
        hint = f" {BOTH_WAYS}" if bundled else ""
        raise HarnessError(f"{task}: loading the Hugging Face data set {path} {kwargs} failed: "
                           f"{type(exc).__name__}: {exc}.{hint}") from exc


@dataclass(frozen=True)
class HubSplit:
    """One split of a Hugging Face data set, as `datasets.load_dataset(path, name, split=…, revision=…)` reads it."""

    path: str
    name: str | None
    split: str
    revision: str | None = None  # refs/convert/parquet: the hub's parquet export of a script-based data set

    @property
    def label(self) -> str:
        return f"{self.path}" + (f" {self.name}" if self.name else "") + f" {self.split}"

    def load(self, purpose: str) -> list[dict]:
        """The split's rows (cached for the process)."""
        if self not in _HUB_ROWS:
            kwargs = {"split": self.split}
            if self.name:
                kwargs["name"] = self.name
            if self.revision:
                kwargs["revision"] = self.revision
            rows = load_hub(self.path, task=purpose, bundled=True, **kwargs)
            _HUB_ROWS[self] = [dict(row) for row in rows]
        return _HUB_ROWS[self]


_HUB_ROWS: dict[HubSplit, list[dict]] = {}
_WIKITEXT, _PTB = "Salesforce/wikitext", "ptb-text-only/ptb_text_only"
#: every file of the offline bundle, and the hub split it is a copy of (the data sets the papers and lm-eval read)
HUB: dict[str, HubSplit] = {
    "wikitext-2/wiki.test.raw": HubSplit(_WIKITEXT, "wikitext-2-raw-v1", "test"),
    "wikitext-2/wiki.test.tokens": HubSplit(_WIKITEXT, "wikitext-2-v1", "test"),
    "wikitext-2/wiki.valid.tokens": HubSplit(_WIKITEXT, "wikitext-2-v1", "validation"),
    "ptb/ptb.test.txt": HubSplit(_PTB, "penn_treebank", "test", "refs/convert/parquet"),
    "ptb/ptb.valid.txt": HubSplit(_PTB, "penn_treebank", "validation", "refs/convert/parquet"),
    "lambada/lambada_test.jsonl": HubSplit("EleutherAI/lambada_openai", "default", "test"),
    "piqa/valid.jsonl": HubSplit("baber/piqa", None, "validation"),
    "piqa/valid-labels.lst": HubSplit("baber/piqa", None, "validation"),
    "copa/val.jsonl": HubSplit("aps/super_glue", "copa", "validation"),
    "openbookqa/test.tsv": HubSplit("allenai/openbookqa", "main", "test"),
    "openbookqa/dev.tsv": HubSplit("allenai/openbookqa", "main", "validation"),
    "winogrande/dev.jsonl": HubSplit("allenai/winogrande", "winogrande_xl", "validation"),
    "winogrande/dev-labels.lst": HubSplit("allenai/winogrande", "winogrande_xl", "validation"),
    "rte/val.jsonl": HubSplit("nyu-mll/glue", "rte", "validation"),
    "hellaswag/hellaswag_val_full.txt.bz2": HubSplit("Rowan/hellaswag", None, "validation"),
    "arc_easy/test.llm_adapters_format.json": HubSplit("allenai/ai2_arc", "ARC-Easy", "test"),
}
#: the OPT tokenizer (one for every OPT size) where no bundle holds it and the model names none
OPT_TOKENIZER_ID = "facebook/opt-125m"


class HubData:
    """The data of the bundle's files read from the Hugging Face hub through `datasets` (no bundle given).

    The same texts as a bundle gives (WikiText-2 rows joined with "\n\n", PTB sentences …), so perplexity is the
    same on either source; zero-shot tasks run lm-eval's own tasks and data sets. `check` refuses, before any work,
    a data set that cannot be had (offline and not cached)."""

    kind = "hub"
    root = None  # no folder: the offline lm-eval task copies are not used
    verify = True  # nothing to skip: there is no manifest to check against
    source = "the Hugging Face hub (no --data-dir, HARNESS_DATA_DIR or bundle was given)"

    def spec(self) -> dict:
        return {"kind": "hub"}

    def describe(self) -> str:
        return "the Hugging Face hub (datasets)"

    @cached_property
    def fingerprint(self) -> str:
        """A content id for cache keys: the hub splits it reads (token ids are keyed by the text's own hash)."""
        listing = sorted((rel, split.label, split.revision or "") for rel, split in HUB.items())
        return "hub-" + hashlib.sha256(json.dumps(listing).encode()).hexdigest()[:16]

    def check(self, files) -> None:
        for rel in files:
            if rel in TOKENIZER_FILES:
                continue  # the tokenizer comes from the model or a named one (harness.models.tokenizer_dir_for)
            split = self._split(rel)
            check_hub(split.path, f"{rel} (from {split.label})", bundled=True)

    def path(self, rel: str) -> Path:
        raise HarnessError(f"{rel} is a file of an offline bundle, and no bundle was given (the data comes from the "
                           "Hugging Face hub); pass --data-dir DIR or set HARNESS_DATA_DIR")

    def _split(self, rel: str) -> HubSplit:
        if rel not in HUB:
            raise HarnessError(f"no Hugging Face data set serves the bundle file {rel}; pass --data-dir with a bundle "
                               "that holds it")
        return HUB[rel]

    def rows(self, rel: str) -> list[dict]:
        """The hub rows the bundle file `rel` is a copy of."""
        return self._split(rel).load(rel)

    def column(self, rel: str, name: str) -> list:
        return [row[name] for row in self.rows(rel)]

    # -- texts (the same as DataDir's) -------------------------------------------------------------------
    def wikitext2_test(self) -> str:
        return wikitext_join(self.column("wikitext-2/wiki.test.raw", "text"))

    def ptb_test(self) -> str:
        return " ".join(ptb_sentences(self.column("ptb/ptb.test.txt", "sentence")))

    def ptb_valid_sparsegpt(self) -> str:
        return "\n\n".join(ptb_sentences(self.column("ptb/ptb.valid.txt", "sentence")))

    def calibration_text(self, name: str = "wikitext2-valid") -> str:
        rel = calibration_file(name)
        if name == "wikitext2-valid":
            return wikitext_join(self.column(rel, "text"))
        return " ".join(ptb_sentences(self.column(rel, "sentence")))


def resolve_data(explicit: str | Path | None = None, verify: bool = True):
    """The run's data source: a bundle (--data-dir, HARNESS_DATA_DIR, or a checkout's ../shared/data), else the
    Hugging Face hub (`HubData`)."""
    if explicit or os.environ.get("HARNESS_DATA_DIR"):
        return DataDir.resolve(explicit, verify)
    if source_checkout() is not None and DEFAULT_DATA_DIR.is_dir():
        return DataDir.resolve(None, verify)
    return HubData()


def data_from_spec(spec: dict):
    """The source `spec()` describes (a worker process opening the driver's source)."""
    if spec.get("kind") == "hub":
        return HubData()
    return DataDir(spec["root"], "the driver's data directory", verify=spec.get("verify", True))


#: BookCorpus as the hub serves it (the data set's parquet export) and how much of it the task reads
BOOKCORPUS = {"path": "bookcorpus/bookcorpus", "revision": "refs/convert/parquet", "split": "train", "sentences": 40000}
#: C4 as GPTQ/SparseGPT read it: the first validation shard of allenai/c4 `en`
C4 = {"path": "allenai/c4", "data_files": {"validation": "en/c4-validation.00000-of-00008.json.gz"}, "split": "validation"}


def bookcorpus_text(sentences: int = BOOKCORPUS["sentences"]) -> str:
    """The first `sentences` sentences of BookCorpus train, joined with a space (streamed from the hub)."""
    from itertools import islice

    rows = load_hub(BOOKCORPUS["path"], task="bookcorpus", streaming=True, revision=BOOKCORPUS["revision"],
                    split=BOOKCORPUS["split"])
    texts = [row["text"].strip() for row in islice(rows, sentences)]
    if not texts:
        raise HarnessError(f"task bookcorpus: {BOOKCORPUS['path']} returned no sentences")
    return " ".join(texts)


def c4_validation_texts() -> list[str]:
    """The documents of C4's first validation shard (GPTQ/SparseGPT's evaluation data)."""
    rows = load_hub(C4["path"], task="c4", data_files=C4["data_files"], split=C4["split"])
    return list(rows["text"])
