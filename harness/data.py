"""The data directory: where it is, checking its files against MANIFEST.tsv, and the text loaders; and the
data sets that only the Hugging Face hub has (BookCorpus, C4), read through `datasets`.

Resolution order: `--data-dir`, else `HARNESS_DATA_DIR`, else `../shared/data` beside the repository.
"""
from __future__ import annotations

import hashlib
import os
from functools import cached_property
from pathlib import Path

from harness.errors import HarnessError

REPO_ROOT = Path(__file__).resolve().parent.parent
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
    """A data directory and its manifest; `path(rel)` checks existence and sha256 on first use.

    `verify=False` (`--no-verify`) uses the files unchecked: the directory may lack MANIFEST.tsv, and the
    records of such a run say `data_verified: false`."""

    def __init__(self, root: Path, source: str, verify: bool = True):
        self.root = Path(root)
        self.source = source  # which setting chose it, for error messages
        self.verify = verify

    @classmethod
    def resolve(cls, explicit: str | Path | None = None, verify: bool = True) -> "DataDir":
        if explicit:
            root, source = Path(explicit), "--data-dir"
        elif os.environ.get("HARNESS_DATA_DIR"):
            root, source = Path(os.environ["HARNESS_DATA_DIR"]), "the HARNESS_DATA_DIR environment variable"
        else:
            root, source = DEFAULT_DATA_DIR, f"the default ({DEFAULT_DATA_DIR})"
        if not root.is_dir():
            raise HarnessError(
                f"data directory {root} does not exist (chosen by {source}); "
                "point --data-dir or HARNESS_DATA_DIR at a folder laid out like ../shared/data"
            )
        return cls(root.resolve(), source, verify)

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
        if name == "reference-holdout":
            from harness.reference_model import holdout_text

            return holdout_text(self)
        return _hf_wikitext_join(path) if name == "wikitext2-valid" else _ptb_join(path)


def calibration_file(name: str) -> str:
    """The data file a calibration set is read from."""
    if name not in CALIBRATION_FILES:
        raise HarnessError(f"unknown calibration data {name!r}; valid: {', '.join(sorted(CALIBRATION_FILES))}")
    return CALIBRATION_FILES[name]


def _hf_wikitext_join(path: Path) -> str:
    with open(path, encoding="utf-8") as handle:
        rows = [line if line.strip() else "" for line in handle]
    return "\n\n".join(rows)


def _ptb_sentences(path: Path) -> list[str]:
    with open(path, encoding="utf-8") as handle:
        return [line.strip() for line in handle if line.strip()]


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


def check_hub(path: str, task: str, streaming: bool = False) -> None:
    """Exit-2 error when `task` needs the hub data set `path` and cannot have it: the hub is off and the data set
    is not cached (a streamed data set always needs the hub)."""
    if hub_offline() and (streaming or not hf_dataset_cached(path)):
        where = "it is streamed from the hub" if streaming else "it is not in the local Hugging Face cache"
        raise HarnessError(
            f"task {task} reads the Hugging Face data set {path} through `datasets` (the data directory has no copy), "
            f"but the hub is switched off (HF_HUB_OFFLINE / HF_DATASETS_OFFLINE) and {where}: run it on a machine "
            "with access to the hub, or leave the task out"
        )


def load_hub(path: str, *, task: str, streaming: bool = False, **kwargs):
    """`datasets.load_dataset(path, **kwargs)` for `task`, with a message that names the data set on failure."""
    import datasets

    check_hub(path, task, streaming)
    try:
        return datasets.load_dataset(path, streaming=streaming, **kwargs)
    except Exception as exc:  # network, authentication, a changed data set: say which one
        raise HarnessError(f"task {task}: loading the Hugging Face data set {path} {kwargs} failed: "
                           f"{type(exc).__name__}: {exc}") from exc


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
