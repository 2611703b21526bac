"""The artefact cache: fitted statistics and predictors, stored as safetensors + JSON metadata.

Each artefact lives in `<cache>/<kind>/<key>/` (meta.json + one or more safetensors shards) where key hashes everything it depends on (model
identity, data, budget, criterion, hyper-parameters). A corrupt or half-written artefact is reported
and rebuilt; a finished one is reused (the `builds` counter tells tests how many were made).
"""
from __future__ import annotations

import hashlib
import json
import os
import shutil
import tempfile
import time
from dataclasses import dataclass, field
from pathlib import Path

import torch
from safetensors.torch import load_file, save_file

from harness.data import sha256_file
from harness.resources import results_dir


def content_key(inputs: dict) -> str:
    return hashlib.sha256(json.dumps(inputs, sort_keys=True, default=str).encode()).hexdigest()[:20]


@dataclass
class Artefact:
    tensors: dict[str, torch.Tensor]
    meta: dict = field(default_factory=dict)
    path: Path | None = None


class CorruptArtefact(Exception):
    pass


def cache_root(explicit: str | Path | None = None) -> Path:
    """--cache-dir, else HARNESS_CACHE_DIR, else ./results/cache (in the current directory)."""
    return Path(explicit or os.environ.get("HARNESS_CACHE_DIR") or results_dir() / "cache")


class ArtefactCache:
    def __init__(self, root: str | Path | None = None, log=print, shard_bytes: int = 1 << 30):
        self.root = cache_root(root)
        self.shard_bytes = shard_bytes
        self.log = log
        self.builds = 0
        self.hits = 0

    def folder(self, kind: str, inputs: dict) -> Path:
        return self.root / kind / content_key(inputs)

    def get_or_build(self, kind: str, inputs: dict, build, fit: bool = True) -> Artefact:
        """Load the artefact for `inputs`, or call `build() -> (tensors, meta)` and store its result.
        fit=False: a helper artefact (token ids), not counted in `builds`/`hits` nor reported when reused."""
        folder = self.folder(kind, inputs)
        if folder.exists():
            try:
                artefact = self.load(folder)
                if fit:
                    self.hits += 1
                    self.log(f"reused cached artefact {kind} {folder}")
                return artefact
            except CorruptArtefact as exc:
                self.log(f"[warn] corrupt artefact {folder}: {exc}; rebuilding it")
                shutil.rmtree(folder, ignore_errors=True)
        started = time.time()
        tensors, meta = build()
        meta = {**meta, "kind": kind, "key": folder.name, "inputs": inputs, "build_seconds": round(time.time() - started, 3)}
        self.builds += fit
        return self.store(folder, tensors, meta)

    def store(self, folder: Path, tensors: dict, meta: dict) -> Artefact:
        """Write tensors (sharded into files of at most `shard_bytes`) and meta atomically into `folder`."""
        folder.parent.mkdir(parents=True, exist_ok=True)
        staging = Path(tempfile.mkdtemp(prefix=f".{folder.name}.", dir=folder.parent))
        tensors = {name: t.detach().to("cpu").contiguous() for name, t in tensors.items()}
        files = {}
        for index, shard in enumerate(_shards(tensors, self.shard_bytes)):
            name = "tensors.safetensors" if index == 0 else f"tensors.{index}.safetensors"
            save_file(shard, str(staging / name))
            files[name] = sha256_file(staging / name)
        meta = {**meta, "files": files}
        (staging / "meta.json").write_text(json.dumps(meta, indent=1, sort_keys=True, default=str))
        if folder.exists():  # another worker finished first: keep theirs
            shutil.rmtree(staging, ignore_errors=True)
            return self.load(folder)
        os.replace(staging, folder)
        return Artefact(tensors, meta, folder)

    @staticmethod
    def load(folder: Path) -> Artefact:
        meta_path = folder / "meta.json"
        if not meta_path.exists():
            raise CorruptArtefact("meta.json is missing")
        try:
            meta = json.loads(meta_path.read_text())
        except json.JSONDecodeError as exc:
            raise CorruptArtefact(f"meta.json is not JSON ({exc})") from exc
        tensors = {}
        for name, digest in meta.get("files", {}).items():
            path = folder / name
            if not path.exists():
                raise CorruptArtefact(f"{name} is missing")
            if sha256_file(path) != digest:
                raise CorruptArtefact(f"{name} does not match the sha256 in meta.json")
            try:
                tensors.update(load_file(str(path)))
            except Exception as exc:  # noqa: BLE001 - safetensors raises several types
                raise CorruptArtefact(f"cannot read {name} ({exc})") from exc
        if not meta.get("files"):
            raise CorruptArtefact("meta.json lists no tensor files")
        return Artefact(tensors, meta, folder)


def _shards(tensors: dict, limit: int):
    shard, size = {}, 0
    for name, tensor in tensors.items():
        nbytes = tensor.numel() * tensor.element_size()
        if shard and size + nbytes > limit:
            yield shard
            shard, size = {}, 0
        shard[name] = tensor
        size += nbytes
    yield shard
