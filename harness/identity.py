"""Content identity of a model checkpoint: a hash of every tensor, read once and remembered.

A safetensors file is streamed once: its header names every tensor (dtype, shape, byte range) and each tensor's
bytes are hashed in chunks, so the identity does not depend on how the checkpoint is split into shards or in
what order a writer laid the tensors out. Other weight files (`.bin`, `.pt`) and the small files that shape
the model (config, tokenizer) are hashed byte for byte. Digests are remembered per file in a small JSON file
(`model-digests.json` in the artefact cache folder), keyed by the file's resolved path, size and mtime_ns, so
a 60 GB checkpoint costs one read and later runs only `stat` it; a file rewritten in place (fine-tuning saved
over the old weights) gets a new size or mtime and is hashed again.
"""
from __future__ import annotations

import hashlib
import json
import os
import struct
import tempfile
from pathlib import Path

from harness.errors import HarnessError

WEIGHT_SUFFIXES = (".safetensors", ".bin", ".pt", ".pth")
SMALL_SUFFIXES = (".json", ".txt", ".model")  # config, generation config, tokenizer files, shard index
DIGESTS_FILE = "model-digests.json"
CHUNK = 16 << 20
VOLATILE_CONFIG_KEYS = ("transformers_version", "_name_or_path")  # change with the library, not the model


def _sha256_stream(handle, length: int, digest) -> None:
    while length > 0:
        block = handle.read(min(CHUNK, length))
        if not block:
            raise HarnessError(f"{handle.name} ends early: it is truncated or not a safetensors file")
        digest.update(block)
        length -= len(block)


def safetensors_digests(path: Path) -> dict[str, str]:
    """{tensor name: sha256 of (name, dtype, shape, bytes)} for one safetensors file, reading it once in order."""
    with open(path, "rb") as handle:
        head = handle.read(8)
        if len(head) != 8:
            raise HarnessError(f"{path} is not a safetensors file (shorter than its header)")
        (header_size,) = struct.unpack("<Q", head)
        if header_size > os.path.getsize(path):
            raise HarnessError(f"{path} is not a safetensors file (its header length is larger than the file)")
        try:
            header = json.loads(handle.read(header_size))
        except (json.JSONDecodeError, UnicodeDecodeError) as exc:
            raise HarnessError(f"{path} is not a safetensors file (its header is not JSON: {exc})") from exc
        header.pop("__metadata__", None)
        start = 8 + header_size
        digests = {}
        for name, info in sorted(header.items(), key=lambda item: item[1]["data_offsets"][0]):
            begin, end = info["data_offsets"]
            digest = hashlib.sha256(json.dumps([name, info["dtype"], info["shape"]]).encode())
            if handle.tell() != start + begin:  # tensors are contiguous in files written by safetensors
                handle.seek(start + begin)
            _sha256_stream(handle, end - begin, digest)
            digests[name] = digest.hexdigest()
    return digests


def bytes_digest(path: Path) -> str:
    digest = hashlib.sha256()
    with open(path, "rb") as handle:
        for block in iter(lambda: handle.read(CHUNK), b""):
            digest.update(block)
    return digest.hexdigest()


def config_digest(path: Path) -> str:
    """A config file's content without the keys that only name the library or the path it was saved from."""
    try:
        values = json.loads(Path(path).read_text())
    except (OSError, json.JSONDecodeError) as exc:
        raise HarnessError(f"cannot read the model config {path}: {exc}") from exc
    for key in VOLATILE_CONFIG_KEYS:
        values.pop(key, None)
    return hashlib.sha256(json.dumps(values, sort_keys=True).encode()).hexdigest()


class DigestCache:
    """Per-file digests remembered by (resolved path, size, mtime_ns) in `<root>/model-digests.json`.

    `root=None` remembers nothing (every call hashes). A cache that cannot be written (a read-only shared
    folder) is used as it is: digests are then recomputed by the next process too, never wrong."""

    def __init__(self, root: str | Path | None):
        self.path = None if root is None else Path(root) / DIGESTS_FILE
        self.hashed: list[Path] = []  # files read in this process (tests count them)

    def _load(self) -> dict:
        if self.path is None or not self.path.exists():
            return {}
        try:
            return json.loads(self.path.read_text()).get("files", {})
        except (OSError, json.JSONDecodeError):
            return {}  # a torn or foreign file: recompute, and overwrite it below

    def _save(self, entries: dict) -> None:
        try:
            self.path.parent.mkdir(parents=True, exist_ok=True)
            handle, tmp = tempfile.mkstemp(prefix=f".{self.path.name}.", dir=self.path.parent)
            with os.fdopen(handle, "w") as out:
                json.dump({"files": entries}, out, indent=0, sort_keys=True)
            os.replace(tmp, self.path)
        except OSError:
            pass

    def digests(self, files: list[Path], compute) -> dict[Path, object]:
        """{file: compute(file)} for each file, from the cache where its size and mtime are unchanged."""
        entries, new, out = self._load(), {}, {}
        for file in files:
            real = Path(file).resolve()
            stat = real.stat()
            entry = entries.get(str(real))
            if not entry or entry.get("size") != stat.st_size or entry.get("mtime_ns") != stat.st_mtime_ns:
                self.hashed.append(real)
                entry = new[str(real)] = {"size": stat.st_size, "mtime_ns": stat.st_mtime_ns, "digest": compute(real)}
            out[file] = entry["digest"]
        if new and self.path is not None:
            self._save({**self._load(), **new})  # keep what another process wrote meanwhile
        return out


def _compute(path: Path):
    if path.suffix == ".safetensors":
        return {"tensors": safetensors_digests(path)}
    if path.name == "config.json":
        return {"config": config_digest(path)}
    return {"bytes": bytes_digest(path)}


def checkpoint_files(root: Path) -> list[Path]:
    """The files of a checkpoint directory that decide what model it is (top level only: no Trainer
    `checkpoint-N/` subfolders; not the safetensors shard index, which only says where each tensor is)."""
    return sorted(p for p in Path(root).iterdir()
                  if p.is_file() and p.suffix in WEIGHT_SUFFIXES + SMALL_SUFFIXES
                  and not p.name.endswith(".safetensors.index.json"))


def directory_identity(root: str | Path, cache: DigestCache) -> str:
    """sha256 over every tensor (by name, across all shards) and every config/tokenizer file of a checkpoint."""
    files = checkpoint_files(Path(root))
    if not any(p.suffix in WEIGHT_SUFFIXES for p in files):
        raise HarnessError(f"model directory {root} holds no weights (no {', '.join(WEIGHT_SUFFIXES)} file); "
                           "use --weights random to build its architecture with seeded random weights")
    tensors, others = {}, {}
    for file, digest in cache.digests(files, _compute).items():
        if "tensors" in digest:
            for name, value in digest["tensors"].items():
                tensors[name] = value if name not in tensors else tensors[name] + value
        else:
            others[file.name] = digest.get("config") or digest["bytes"]
    payload = json.dumps({"tensors": tensors, "files": others}, sort_keys=True)
    return hashlib.sha256(payload.encode()).hexdigest()
