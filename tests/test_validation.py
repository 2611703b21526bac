"""One validation pass before any work: every bad input exits 2 with what was wrong and what is valid, before a
model is built or a folder is created (the run folder and the artefact cache stay absent)."""
import importlib.util
import json
import os
from pathlib import Path

import pytest
import torch
import yaml
from typer.testing import CliRunner

from harness.cli import app
from harness.data import DEFAULT_DATA_DIR
from methods import REGISTRY, Method, register

runner = CliRunner()


def invoke(*args):
    return runner.invoke(app, [str(a) for a in args], catch_exceptions=False)


def refused(result, *messages, nothing_in=None):
    """Exit 2, each message in the output, and (nothing_in) no file or folder created under that folder."""
    assert result.exit_code == 2, result.output
    text = " ".join(result.output.split())  # rich wraps long lines
    for message in messages:
        assert message in text, text
    if nothing_in is not None:
        assert sorted(p.name for p in Path(nothing_in).iterdir()) == [], "created before the refusal"


def run(tmp_path, *args, model="opt-125m", weights="random"):
    work = tmp_path / "work"
    work.mkdir(exist_ok=True)
    return invoke("run", "--suite", "smoke", "--model", model, "--weights", weights, "--limit", 1,
                  "--out", work / "run", "--cache-dir", work / "cache", *args), work


@pytest.mark.parametrize("args, messages", [
    (["--device", "nosuch"], ["unknown device 'nosuch'", "valid: auto, cpu, cuda, cuda:N"]),
    (["--dense-layers", "99"], ["--dense-layers 99", "12 decoder layers", "valid: 0 … 11"]),
    (["--dense-layers", "x"], ["cannot read --dense-layers"]),
    (["--seqlen", "4096"], ["--seqlen 4096", "2048 positions", "valid: 1 … 2048"]),
    (["--stride", "256", "--seqlen", "128"], ["--stride 256", "window of 128 tokens", "valid: 1 … 128"]),
    (["--stride", "4096"], ["--stride 4096", "window of 2048 tokens", "valid: 1 … 2048"]),
    (["--allocation", "global", "--methods", "dense,norm-mask"],
     ["--allocation global", "norm-mask", "Valid with global: random, shadow, static", "--allocation local"]),
    (["--allocation", "global", "--methods", "replace:head"], ["replace:head", "Valid with global"]),
    (["--gpus-per-job", "2"], ["--gpus-per-job only applies to --executor ray"]),
    (["--ray-address", "auto", "--retries", "3"], ["--ray-address, --retries only apply to --executor ray"]),
    (["--scope", "request", "--tasks", "decode", "--methods", "dense"], ["--scope request", "decode", "--scope token"]),
    (["--tokenizer", "/nonexistent/tokenizer"], ["tokenizer directory /nonexistent/tokenizer does not exist"]),
])
def test_bad_input_is_refused_before_anything_is_created(args, messages, tmp_path):
    result, work = run(tmp_path, *args)
    refused(result, *messages, nothing_in=work)


@pytest.mark.skipif(torch.cuda.is_available(), reason="this machine has a GPU")
def test_a_gpu_device_without_a_gpu_is_refused(tmp_path):
    for device in ("cuda", "cuda:1"):
        result, work = run(tmp_path, "--device", device)
        refused(result, f"--device {device}: no CUDA GPU is available", "valid here: auto, cpu", nothing_in=work)


def test_out_must_be_a_writable_folder(tmp_path):
    work = tmp_path / "work"
    work.mkdir()
    (work / "a-file").write_text("not a folder\n")
    result = invoke("run", "--limit", 1, "--out", work / "a-file", "--cache-dir", work / "cache")
    refused(result, "--out", "a-file is a file, not a folder")
    result = invoke("run", "--limit", 1, "--out", work / "a-file" / "run", "--cache-dir", work / "cache")
    refused(result, "is a file, so the folder cannot be created")
    assert sorted(p.name for p in work.iterdir()) == ["a-file"]


def test_out_in_a_read_only_place_is_refused(tmp_path):
    if os.geteuid() != 0:
        place = tmp_path / "read-only"
        place.mkdir()
        place.chmod(0o555)
    else:  # root writes through permission bits; sysfs refuses new entries even to root
        place = Path("/sys")
        if not place.is_dir() or os.access(place, os.W_OK) and _creatable(place):
            pytest.skip("no read-only folder on this machine")
    try:
        result, work = run(tmp_path, "--out", place / "run")
        refused(result, f"--out {place / 'run'}: cannot write in {place}", nothing_in=work)
    finally:
        if place != Path("/sys"):
            place.chmod(0o755)


def _creatable(place: Path) -> bool:
    try:
        (place / ".harness-probe").mkdir()
    except OSError:
        return False
    (place / ".harness-probe").rmdir()
    return True


@pytest.fixture
def data_copy(tmp_path):
    """A data directory whose files link to the real ones (a file to alter is copied first)."""
    root = tmp_path / "data"
    for path in DEFAULT_DATA_DIR.rglob("*"):
        if path.is_file():
            target = root / path.relative_to(DEFAULT_DATA_DIR)
            target.parent.mkdir(parents=True, exist_ok=True)
            target.symlink_to(path)
    return root


def alter(root: Path, rel: str) -> None:
    text = (root / rel).read_text()
    (root / rel).unlink()
    (root / rel).write_text(text + "an extra line\n")


def test_an_altered_calibration_file_is_refused_before_the_run(data_copy, tiny_model_dir, tmp_path):
    alter(data_copy, "wikitext-2/wiki.valid.tokens")
    result, work = run(tmp_path, "--methods", "dense,static", "--data-dir", data_copy, model=tiny_model_dir,
                       weights="pretrained")
    refused(result, "wiki.valid.tokens does not match MANIFEST.tsv", nothing_in=work)
    fit = invoke("fit", "--method", "replace:head", "--data-dir", data_copy, "--cache-dir", work / "cache")
    refused(fit, "wiki.valid.tokens does not match MANIFEST.tsv", nothing_in=work)


def test_a_data_directory_without_manifest_is_refused_unless_no_verify(data_copy, tiny_model_dir, tmp_path):
    (data_copy / "MANIFEST.tsv").unlink()
    result, work = run(tmp_path, "--methods", "dense", "--data-dir", data_copy, "--seqlen", 64,
                       model=tiny_model_dir, weights="pretrained")
    refused(result, "has no MANIFEST.tsv", "--no-verify", nothing_in=work)
    result, work = run(tmp_path, "--methods", "dense", "--data-dir", data_copy, "--seqlen", 64, "--no-verify",
                       model=tiny_model_dir, weights="pretrained")
    assert result.exit_code == 0, result.output
    records = [json.loads(line) for line in (work / "run" / "records.jsonl").read_text().splitlines()]
    assert records and all(r["data_verified"] is False for r in records)
    assert "data not verified against its manifest (--no-verify)" in (work / "run" / "table.md").read_text()
    run_json = json.loads((work / "run" / "run.json").read_text())
    assert run_json["identity"]["data"].startswith("unverified-")


def test_verified_runs_say_so(tiny_model_dir, tmp_path):
    result, work = run(tmp_path, "--methods", "dense", "--seqlen", 64, "--stride", 32, model=tiny_model_dir,
                       weights="pretrained")
    assert result.exit_code == 0, result.output
    (record,) = [json.loads(line) for line in (work / "run" / "records.jsonl").read_text().splitlines()]
    assert record["data_verified"] is True
    assert record["stride"] == 32 and "non-overlapping" not in record["protocol"] and "stride 32" in record["protocol"]


def test_a_file_not_in_the_manifest_is_refused(data_copy, tmp_path):
    manifest = data_copy / "MANIFEST.tsv"
    lines = manifest.read_text().splitlines()
    manifest.unlink()
    manifest.write_text("".join(line + "\n" for line in lines if not line.startswith("ptb/ptb.test.txt")))
    result, work = run(tmp_path, "--tasks", "ptb_new", "--data-dir", data_copy)
    refused(result, "ptb.test.txt is not listed in", "--no-verify", nothing_in=work)


def test_missing_extras_are_named_with_their_install_command(tmp_path, monkeypatch):
    real = importlib.util.find_spec

    def without(*names):
        monkeypatch.setattr(importlib.util, "find_spec", lambda name, *a: None if name in names else real(name, *a))

    without("lm_eval")
    result, work = run(tmp_path, "--tasks", "copa", "--methods", "dense")
    refused(result, "copa", "lm-eval", "pip install 'sparsity-harness[zero-shot]'", nothing_in=work)
    without("ray")
    result, work = run(tmp_path, "--executor", "ray")
    refused(result, "--executor ray needs Ray", "pip install 'sparsity-harness[ray]'", nothing_in=work)


def test_a_model_of_another_family_is_refused(tmp_path):
    from transformers import GPT2Config

    GPT2Config(n_layer=1, n_embd=8, n_head=2).save_pretrained(tmp_path / "gpt2")
    result, work = run(tmp_path, model=tmp_path / "gpt2", weights="random")
    refused(result, "is a 'gpt2' model", "supports OPT", nothing_in=work)


def test_a_local_directory_without_weights_is_refused_for_pretrained(tiny_model_dir, tmp_path):
    config_only = tmp_path / "config-only"
    config_only.mkdir()
    (config_only / "config.json").write_text((Path(tiny_model_dir) / "config.json").read_text())
    result, work = run(tmp_path, model=config_only, weights="pretrained")
    refused(result, "holds no weights", "--weights random", nothing_in=work)


def test_fit_validates_before_fitting(tmp_path):
    work = tmp_path / "work"
    work.mkdir()
    refused(invoke("fit", "--method", "static", "--device", "nosuch", "--cache-dir", work / "cache"),
            "unknown device 'nosuch'", nothing_in=work)
    refused(invoke("fit", "--method", "norm-mask", "--allocation", "global", "--cache-dir", work / "cache"),
            "--allocation global", "norm-mask", nothing_in=work)
    (work / "cache-file").write_text("")
    refused(invoke("fit", "--method", "static", "--cache-dir", work / "cache-file"), "--cache-dir", "is a file")


def write_sweep(path, **extra):
    sweep = {"name": "v", "models": ["opt-125m"], "weights": "random", "suites": ["smoke"], "tasks": ["wikitext2"],
             "methods": ["dense", "random"], "sparsity": [0.5], "settings": {"limit": 1}, **extra}
    path.write_text(yaml.safe_dump(sweep))
    return path


def test_sweep_validates_every_run_before_the_sweep_folder_exists(tmp_path):
    work = tmp_path / "work"
    work.mkdir()
    file = write_sweep(tmp_path / "bad-device.yaml", settings={"limit": 1, "device": "nosuch"})
    refused(invoke("sweep", file, "--out", work / "sweep"), "unknown device 'nosuch'", nothing_in=work)
    file = write_sweep(tmp_path / "ray-keys.yaml", gpus_per_job=2, retries=2)
    refused(invoke("sweep", file, "--out", work / "sweep"), "gpus_per_job, retries", "executor: ray", nothing_in=work)
    refused(invoke("sweep", write_sweep(tmp_path / "ok.yaml"), "--out", work / "sweep", "--gpus-per-job", 1),
            "--gpus-per-job only applies to --executor ray", nothing_in=work)
    (work / "a-file").write_text("")
    refused(invoke("sweep", write_sweep(tmp_path / "ok.yaml"), "--out", work / "a-file"), "is a file")
    ray_file = write_sweep(tmp_path / "ray.yaml", executor="ray", retries=2)
    result = invoke("sweep", ray_file, "--executor", "local", "--dry-run", "--out", work / "sweep")
    assert result.exit_code == 0 and "the sweep file's Ray settings (retries) are not used" in result.output


class RefusesItsSettings(Method):
    """Its fit refuses a setting at once, before touching the model: the planner's probe finds it."""

    name = "refuses-test"
    units = frozenset({"heads"})
    description = "test only: a fit that refuses its settings"

    def fit(self, ctx, allocation):
        from harness.errors import HarnessError

        raise HarnessError("setting `width` must be positive (got -1)")

    def policy(self, ctx, allocation, artefact):
        return None


@pytest.mark.skipif(importlib.util.find_spec("ray") is None, reason="needs ray")
def test_ray_refuses_input_errors_at_planning(tmp_path):
    register(RefusesItsSettings)
    try:
        work = tmp_path / "work"
        work.mkdir()
        result = invoke("run", "--executor", "ray", "--methods", "dense,refuses-test", "--limit", 1,
                        "--out", work / "run", "--cache-dir", work / "cache")
        refused(result, "refuses-test (sparsity 0.5): setting `width` must be positive", nothing_in=work)
        file = write_sweep(tmp_path / "sweep.yaml", methods=["dense", "refuses-test"], executor="ray")
        refused(invoke("sweep", file, "--out", work / "sweep"), "setting `width` must be positive", nothing_in=work)
    finally:
        REGISTRY.pop("refuses-test")
