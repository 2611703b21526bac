"""The Ray executor and `harness sweep` on a local Ray cluster (CPU, 2 workers): a sweep with one shared fit
completes; failing, once-failing and worker-killing jobs are retried and reported while the others finish; a job
refusing its input is recorded at once, without a retry."""
import json
import os
import sys
from pathlib import Path

import pytest
import yaml
from typer.testing import CliRunner

ray = pytest.importorskip("ray")

from harness.cli import app  # noqa: E402

TESTS = Path(__file__).parent
SETTINGS = {"seqlen": 64, "limit": 2, "calib_samples": 2, "calib_seqlen": 32}


@pytest.fixture(scope="module")
def ray_cluster():
    """A local cluster of 2 CPUs whose workers can import tests/ray_plugins.py (the test-only method)."""
    saved = {k: os.environ.get(k) for k in ("PYTHONPATH", "RAY_USAGE_STATS_ENABLED", "RAY_AUTH_MODE")}
    os.environ["PYTHONPATH"] = os.pathsep.join(p for p in (str(TESTS), saved["PYTHONPATH"]) if p)
    os.environ["RAY_USAGE_STATS_ENABLED"], os.environ["RAY_AUTH_MODE"] = "0", "disabled"
    ray.init(num_cpus=2, include_dashboard=False, log_to_driver=False)
    yield
    ray.shutdown()
    for key, value in saved.items():
        if value is None:
            os.environ.pop(key, None)
        else:
            os.environ[key] = value


@pytest.fixture
def flaky_method():
    """Registers the `flaky` method in this process for one test (workers import it themselves)."""
    from methods import REGISTRY

    sys.path.insert(0, str(TESTS))
    import ray_plugins  # noqa: F401

    yield
    REGISTRY.pop("flaky", None)
    sys.modules.pop("ray_plugins", None)
    sys.path.remove(str(TESTS))


def write_sweep(path, model_dir, methods, sparsity, settings=None):
    sweep = {"name": "t", "models": [str(model_dir)], "weights": "pretrained", "suites": ["smoke"],
             "tasks": ["wikitext2"], "methods": methods, "sparsity": sparsity, "seeds": [0],
             "settings": {**SETTINGS, **(settings or {})}}
    path.write_text(yaml.safe_dump(sweep))
    return path


def sweep_cli(*args):
    return CliRunner().invoke(app, ["sweep", *map(str, args)])


def job_files(run_dir):
    return [json.loads(p.read_text()) for p in sorted((run_dir / "jobs").glob("*.json"))]


def test_sweep_with_a_shared_fit_completes_on_two_workers(ray_cluster, tiny_model_dir, tmp_path):
    file = write_sweep(tmp_path / "sweep.yaml", tiny_model_dir, ["dense", "random", "static:plainact", "static:l2norm"],
                       [0.3, 0.6])
    out, cache = tmp_path / "sweep", tmp_path / "cache"
    plan = sweep_cli(file, "--executor", "ray", "--dry-run", "--out", out, "--cache-dir", cache)
    assert plan.exit_code == 0, plan.output
    assert "7 evaluation jobs to run" in plan.output and "1 fit jobs" in plan.output
    assert "(importance) on 1 GPU(s), shared by 4 jobs" in plan.output
    assert not out.exists(), "--dry-run writes nothing"

    result = sweep_cli(file, "--executor", "ray", "--out", out, "--cache-dir", cache)
    assert result.exit_code == 0, result.output
    assert "7 ran, 0 already done, 0 failed" in result.output
    (run_dir,) = out.glob("smoke-*")  # one run folder per (model, suite)
    records = [json.loads(line) for line in (run_dir / "records.jsonl").read_text().splitlines()]
    assert len(records) == 7
    assert len(list((cache / "importance").iterdir())) == 1, "one fit, shared"
    static = [r for r in records if r["method"] == "static"]
    assert len({r["artefact"] for r in static}) == 1 and len(static) == 4
    assert {r["executor"] for r in records} == {"ray"} and all(r["sharding"] is None for r in records)
    assert len({r["worker_pid"] for r in records}) == 2, "both workers took jobs"
    assert all(job["attempts"] == 1 for job in job_files(run_dir))

    table = CliRunner().invoke(app, ["table", str(out)])
    assert table.exit_code == 0, table.output
    label = Path(tiny_model_dir).name
    assert table.output.count(f"## model: {label} · weights: pretrained · suite: smoke") == 1
    assert (out / f"plot_smoke_{label}_wikitext2_ppl.png").exists()


def test_failing_jobs_are_retried_and_reported_while_the_others_finish(ray_cluster, flaky_method, tiny_model_dir,
                                                                      tmp_path):
    state = tmp_path / "state"
    file = write_sweep(tmp_path / "sweep.yaml", tiny_model_dir, ["dense", "flaky:always", "flaky:once", "flaky:crash",
                                                                   "flaky:fit", "flaky:input"],
                       [0.5], {"method_settings": {"flaky": {"state_dir": str(state)}}})
    out = tmp_path / "sweep"
    result = sweep_cli(file, "--executor", "ray", "--out", out, "--retries", 1)
    assert result.exit_code == 1, result.output
    assert "3 ran, 0 already done, 3 failed" in result.output, result.output
    jobs = {job["spec"]["method"]: job for job in job_files(next(out.glob("smoke-*")))}
    assert jobs["flaky:always"]["status"] == "failed" and jobs["flaky:always"]["attempts"] == 2
    assert "made to fail" in jobs["flaky:always"]["error"]
    assert jobs["flaky:once"]["status"] == "ok" and jobs["flaky:once"]["attempts"] == 2
    assert jobs["flaky:crash"]["status"] == "ok" and jobs["flaky:crash"]["attempts"] == 2  # its worker was lost
    assert jobs["dense"]["status"] == "ok" and jobs["dense"]["attempts"] == 1
    assert jobs["flaky:input"]["status"] == "failed" and jobs["flaky:input"]["attempts"] == 1, "input errors: no retry"
    assert "HarnessError: flaky: this input is refused" in jobs["flaky:input"]["error"]
    assert (state / "input-attempts").read_text().count("attempt") == 1
    assert jobs["flaky:fit"]["status"] == "failed"
    assert jobs["flaky:fit"]["error"] == "its fit (flaky:fit) failed: RuntimeError: flaky: fit failed"
    assert "flaky:always sparsity 0.5 task wikitext2: RuntimeError: flaky: made to fail" in (out / "table.md").read_text()
