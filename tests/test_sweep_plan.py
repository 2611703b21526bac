"""Planning a sweep without a cluster: which jobs share a fit, GPUs per job, the layer split of a sharded model
(and that a sharded model gives the same numbers as an unsharded one)."""
import pytest

from harness.artefacts import ArtefactCache
from harness.executors import Unit, fit_keys, plan_units
from harness.models import opt_config
from harness.placement import gpus_for, layer_device_map
from harness.runner import Session, execute_job
from harness.spec import RunConfig, expand_jobs
from harness.store import RunStore


def session_for(methods, sparsity, data, tmp_path, **extra):
    config = RunConfig(model="opt-125m", weights="random", methods=methods, sparsity=sparsity, tasks=["wikitext2"],
                       **extra)
    session = Session(config, data, ArtefactCache(tmp_path / "cache"))
    return session, expand_jobs(config, config.identity(session.model_identity, data.fingerprint, "float32"))


def test_fit_keys_tell_which_jobs_share_a_fit_without_fitting(data, tmp_path):
    session, jobs = session_for(["dense", "static:plainact", "static:l2norm", "shadow", "replace:head",
                                 "replace:ranked", "dejavu"], ["0.25", "0.5"], data, tmp_path)
    keys = {(j.method, j.sparsity): fit_keys(session, j) for j in jobs}
    assert keys[("dense", "0")] is None
    assert len({keys[(m, s)] for m in ("static:plainact", "static:l2norm") for s in ("0.25", "0.5")}) == 1
    assert keys[("shadow:plainact", "0.25")] == keys[("shadow:plainact", "0.5")]
    assert keys[("replace:head", "0.25")] == keys[("replace:head", "0.5")]
    assert keys[("replace:ranked", "0.25")] != keys[("replace:ranked", "0.5")]
    assert keys[("dejavu", "0.25")] != keys[("dejavu", "0.5")]
    assert keys[("dejavu", "0.25")][1] == keys[("dejavu", "0.5")][1]  # the MLP predictors do not depend on it
    assert not (tmp_path / "cache").exists(), "probing builds nothing"

    plan = plan_units([Unit(session, RunStore(tmp_path / "run"), jobs)])
    shared = sorted(len(f.dependents) for f in plan.fits)
    assert len(plan.evals) == len(jobs) == 13
    assert shared == [1, 1, 1, 1, 2, 2, 4]  # dejavu ×2, replace:ranked ×2, replace:head, shadow, static
    dejavu = [f for f in plan.fits if f.job.method == "dejavu"]
    assert dejavu[1].after == [dejavu[0].fit], "a fit sharing an artefact with an earlier one waits for it"


def test_gpus_per_job_from_model_size_and_dtype():
    assert gpus_for(opt_config("opt-13b"), "float16") == 1
    assert gpus_for(opt_config("opt-30b"), "float32") == 2
    assert gpus_for(opt_config("opt-66b"), "float16") == 2
    assert gpus_for(opt_config("opt-66b"), "float16", gpu_memory_gb=200) == 1
    assert gpus_for(opt_config("opt-30b"), "float16") == 1
    assert gpus_for(opt_config("opt-13b"), "float16", override=2) == 2
    assert gpus_for(opt_config("opt-13b"), "float16", override=2, latency=True) == 1  # latency stays on one GPU


def test_layer_device_map_splits_decoder_layers_evenly():
    device_map, per_device = layer_device_map(opt_config("opt-13b"), ["cuda:0", "cuda:1"])
    assert per_device == [20, 20]
    assert device_map["model.decoder.layers.19"] == "cuda:0" and device_map["model.decoder.layers.20"] == "cuda:1"
    assert device_map["lm_head"] == device_map["model.decoder.embed_tokens"] == "cuda:0"
    assert device_map["model.decoder.final_layer_norm"] == "cuda:1"
    device_map, per_device = layer_device_map(opt_config("opt-350m"), ["a", "b", "c"])
    assert per_device == [8, 8, 8] and device_map["model.decoder.project_out"] == "c"
    assert "model.decoder.final_layer_norm" not in device_map


@pytest.mark.parametrize("method", ["dense", "norm-mask"])
def test_a_sharded_model_gives_the_same_perplexity(method, tiny_model_dir, data, tmp_path):
    pytest.importorskip("accelerate")
    config = RunConfig(model=str(tiny_model_dir), weights="pretrained", methods=[method], sparsity=["0.5"],
                       tasks=["wikitext2"], seqlen=64, limit=2)
    values = []
    for sharded in (False, True):
        session = Session(config, data, ArtefactCache(tmp_path / "cache"))
        if sharded:  # two "devices" that are both the CPU: the same hooks and device map as on GPUs
            session.device_map, _ = layer_device_map(session.model_spec.config(), ["cpu", "cpu"])
        job = expand_jobs(config, config.identity(session.model_identity, data.fingerprint, "float32"))[0]
        values.append(execute_job(session, job)["records"][0]["value"])
    assert values[0] == pytest.approx(values[1], rel=1e-6)


def test_a_local_sweep_writes_one_table_per_model_and_suite(tiny_model_dir, tmp_path):
    import yaml
    from typer.testing import CliRunner

    from harness.cli import app

    sweep = {"name": "two-suites", "models": [str(tiny_model_dir)], "weights": "pretrained",
             "suites": ["smoke", "perplexity"], "tasks": ["wikitext2"], "methods": ["dense", "random"],
             "sparsity": [0.5], "settings": {"seqlen": 64, "limit": 1}}
    (tmp_path / "sweep.yaml").write_text(yaml.safe_dump(sweep))
    out = tmp_path / "sweep"
    result = CliRunner().invoke(app, ["sweep", str(tmp_path / "sweep.yaml"), "--out", str(out)])
    assert result.exit_code == 0, result.output
    assert "4 ran, 0 already done, 0 failed" in result.output
    assert sorted(p.name for p in out.iterdir() if p.is_dir()) == [f"perplexity-{tiny_model_dir.name}-pretrained",
                                                                  f"smoke-{tiny_model_dir.name}-pretrained"]
    table = CliRunner().invoke(app, ["table", str(out)])
    assert table.exit_code == 0, table.output
    assert table.output.count(f"## model: {tiny_model_dir.name} · weights: pretrained · suite: ") == 2
    again = CliRunner().invoke(app, ["sweep", str(tmp_path / "sweep.yaml"), "--out", str(out)])
    assert "0 ran, 4 already done, 0 failed" in again.output
