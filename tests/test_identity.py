"""A model's identity is its content: every tensor of a checkpoint, hashed once and remembered by (path, size,
mtime); a checkpoint changed anywhere (a late tensor included) gets a new identity and a new fit."""
import json
import os
import shutil
import struct

import pytest
import torch
from safetensors.torch import load_file, save_file
from typer.testing import CliRunner

from conftest import tiny_model
from harness.cli import app
from harness.identity import DIGESTS_FILE, DigestCache, directory_identity
from harness.models import ModelSpec, hub_snapshot

LATE = "model.decoder.layers.1.fc2.weight"  # the last layer's fc2 of the tiny model (2 layers)


def fit(model_dir, cache):
    result = CliRunner().invoke(app, ["fit", "--method", "static", "--model", str(model_dir), "--weights", "pretrained",
                                      "--calib-samples", "2", "--cache-dir", str(cache)], catch_exceptions=False)
    assert result.exit_code == 0, result.output
    return result.stdout.strip().splitlines()[-1]


def tensor_offset(path, name) -> int:
    with open(path, "rb") as handle:
        (size,) = struct.unpack("<Q", handle.read(8))
        header = json.loads(handle.read(size))
    return 8 + size + header[name]["data_offsets"][0]


def change_tensor(model_dir, name):
    path = model_dir / "model.safetensors"
    tensors = load_file(path)
    tensors[name] = torch.zeros_like(tensors[name])
    save_file(tensors, path, metadata={"format": "pt"})


def test_a_checkpoint_changed_in_a_late_tensor_gets_a_new_identity_and_a_new_fit(tiny_model_dir, tmp_path):
    original, cache = tmp_path / "original", tmp_path / "cache"
    shutil.copytree(tiny_model_dir, original)
    first = fit(original, cache)
    copy = tmp_path / "fine-tuned"
    shutil.copytree(original, copy)
    assert fit(copy, cache) == first, "an identical copy is the same model: its fit is reused"
    change_tensor(copy, LATE)
    assert tensor_offset(copy / "model.safetensors", LATE) > 1 << 20  # beyond what a head-of-file hash would read
    assert os.path.getsize(copy / "model.safetensors") == os.path.getsize(original / "model.safetensors")
    assert ModelSpec(str(copy), "pretrained").identity() != ModelSpec(str(original), "pretrained").identity()
    second = fit(copy, cache)
    assert second != first and (cache / "importance").exists()
    assert sorted(p.name for p in (cache / "importance").iterdir()) == sorted({first.split("/")[-1],
                                                                              second.split("/")[-1]})
    assert fit(original, cache) == first, "the original's fit is still reused"


def test_identity_is_every_tensor_whatever_the_sharding(tmp_path):
    model = tiny_model()
    model.save_pretrained(tmp_path / "one")
    model.save_pretrained(tmp_path / "shards", max_shard_size="2MB")
    assert len(list((tmp_path / "shards").glob("*.safetensors"))) > 1
    one, shards = (directory_identity(tmp_path / name, DigestCache(None)) for name in ("one", "shards"))
    assert one == shards
    config = json.loads((tmp_path / "one" / "config.json").read_text())
    (tmp_path / "one" / "config.json").write_text(json.dumps({**config, "transformers_version": "0.0"}))
    assert directory_identity(tmp_path / "one", DigestCache(None)) == one, "the library version is not the model"
    (tmp_path / "one" / "config.json").write_text(json.dumps({**config, "do_layer_norm_before": False}))
    assert directory_identity(tmp_path / "one", DigestCache(None)) != one, "the architecture is"


def test_digests_are_read_once_and_reread_when_the_file_changes(tiny_model_dir, tmp_path):
    model = tmp_path / "model"
    shutil.copytree(tiny_model_dir, model)
    cache = DigestCache(tmp_path / "cache")
    identity = directory_identity(model, cache)
    assert (model / "model.safetensors").resolve() in cache.hashed
    assert (tmp_path / "cache" / DIGESTS_FILE).exists()
    again = DigestCache(tmp_path / "cache")  # a later process: only stats the files
    assert directory_identity(model, again) == identity and again.hashed == []
    stat = (model / "model.safetensors").stat()
    os.utime(model / "model.safetensors", ns=(stat.st_atime_ns, stat.st_mtime_ns + 1_000_000))
    touched = DigestCache(tmp_path / "cache")
    assert directory_identity(model, touched) == identity and touched.hashed == [(model / "model.safetensors").resolve()]


def test_random_weights_keep_their_seeded_identity(tiny_model_dir, tmp_path):
    a, b = ModelSpec("opt-125m", "random").identity(0), ModelSpec("opt-125m", "random").identity(1)
    assert a != b and a == ModelSpec("opt-125m", "random").identity(0, tmp_path)
    assert not (tmp_path / DIGESTS_FILE).exists(), "random weights read no checkpoint"
    copy = tmp_path / "copy"
    shutil.copytree(tiny_model_dir, copy)
    before = ModelSpec(str(copy), "random").identity()
    change_tensor(copy, LATE)
    assert ModelSpec(str(copy), "random").identity() == before, "random weights do not depend on the checkpoint's"
    assert ModelSpec(str(copy), "pretrained").identity() != before


def test_a_hub_id_is_hashed_from_its_local_snapshot(tiny_model_dir, tmp_path, monkeypatch):
    import huggingface_hub.constants

    revision = "0" * 40
    snapshot = tmp_path / "hub" / "models--someone--tiny-opt" / "snapshots" / revision
    shutil.copytree(tiny_model_dir, snapshot)
    (snapshot.parent.parent / "refs").mkdir()
    (snapshot.parent.parent / "refs" / "main").write_text(revision)
    monkeypatch.setattr(huggingface_hub.constants, "HF_HUB_CACHE", str(tmp_path / "hub"))
    hub_snapshot.cache_clear()
    try:
        spec = ModelSpec("someone/tiny-opt", "pretrained")
        assert spec.kind == "hub" and spec.checkpoint_dir() == snapshot
        assert spec.identity() == ModelSpec(str(tiny_model_dir), "pretrained").identity()
        hub_snapshot.cache_clear()
        missing = ModelSpec("someone/not-cached", "pretrained")
        with pytest.raises(Exception, match="not in the local Hugging Face cache"):
            missing.checkpoint_dir()
    finally:
        hub_snapshot.cache_clear()
