"""A real package: every code folder is in the wheel's package list, suites come through importlib.resources, runs
write under ./results of the current directory, suites that need the checkout say so, and the optional W&B
logging. (.ci/run installs the wheel into a fresh venv and runs the smoke suite from an unrelated directory.)"""
import importlib.machinery
import json
import sys
import tomllib
import types
from pathlib import Path

import pytest
from typer.testing import CliRunner

from harness.cli import app

ROOT = Path(__file__).resolve().parent.parent


def test_the_wheel_lists_every_package_and_ships_the_suites():
    tool = tomllib.loads((ROOT / "pyproject.toml").read_text())["tool"]["setuptools"]
    code = {str(init.parent.relative_to(ROOT)).replace("/", ".") for top in ("harness", "methods", "kernels")
            for init in (ROOT / top).rglob("__init__.py")}
    assert code <= set(tool["packages"]), code - set(tool["packages"])
    assert tool["package-dir"] == {"harness._suites": "suites"}
    data = {f"harness._suites.{p.name}" for p in (ROOT / "suites").iterdir() if p.is_dir()} | {"harness._suites"}
    assert data <= set(tool["packages"]) and data <= set(tool["package-data"])
    for package, patterns in tool["package-data"].items():
        folder = ROOT / "suites" / package.removeprefix("harness._suites").lstrip(".").replace(".", "/")
        shipped = {p.name for pattern in patterns for p in folder.glob(pattern)}
        assert shipped == {p.name for p in folder.iterdir() if p.is_file()}, folder


def test_extras():
    extras = tomllib.loads((ROOT / "pyproject.toml").read_text())["project"]["optional-dependencies"]
    assert {"gpu", "ray", "zero-shot", "deepspeed", "all"} <= set(extras)
    assert extras["all"] == ["sparsity-harness[gpu,ray,zero-shot,deepspeed,wandb]"]


def test_package_data_is_found_in_the_checkout_and_in_an_install(tmp_path, monkeypatch):
    import harness.resources as resources

    assert resources.suites_dir() == ROOT / "suites"  # a checkout: no harness/_suites
    installed = tmp_path / "site" / "harness"
    (installed / "_suites").mkdir(parents=True)

    class Files:  # importlib.resources.files("harness") of an installed package
        def __truediv__(self, name):
            return installed / name

    monkeypatch.setattr(resources.resources, "files", lambda package: Files())
    monkeypatch.setattr(resources, "source_checkout", lambda: None)
    assert resources.suites_dir() == installed / "_suites"


def tiny_run(model_dir, *extra):
    return CliRunner().invoke(app, ["run", "--suite", "smoke", "--model", str(model_dir), "--weights", "pretrained",
                                    "--methods", "dense", "--tasks", "wikitext2", "--limit", "1", "--seqlen", "32",
                                    "--device", "cpu", *map(str, extra)])


def test_runs_write_under_results_of_the_current_directory(tiny_model_dir, tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    result = tiny_run(tiny_model_dir)
    assert result.exit_code == 0, result.output
    (run_dir,) = (tmp_path / "results").glob("smoke-*")
    assert (run_dir / "records.jsonl").exists()


def test_a_reference_model_suite_outside_a_checkout_names_model(monkeypatch, tmp_path):
    import harness.resources as resources

    monkeypatch.setattr(resources, "source_checkout", lambda: None)
    monkeypatch.chdir(tmp_path)  # an unrelated directory: tests/fixtures/… is not there
    result = CliRunner().invoke(app, ["run", "--suite", "sedghi-fig1b", "--out", str(tmp_path / "run")])
    assert result.exit_code == 2 and "--model" in result.output and "source checkout" in result.output
    assert not (tmp_path / "run").exists()


def test_wandb_without_wandb_installed_is_refused_before_any_work(tiny_model_dir, tmp_path, monkeypatch):
    import importlib.util

    real = importlib.util.find_spec
    monkeypatch.setattr(importlib.util, "find_spec", lambda name, *a: None if name == "wandb" else real(name, *a))
    result = tiny_run(tiny_model_dir, "--out", tmp_path / "run", "--wandb", "proj")
    assert result.exit_code == 2 and "pip install wandb" in result.output
    assert not (tmp_path / "run").exists()


def test_wandb_logs_one_run_per_job(tiny_model_dir, tmp_path, monkeypatch):
    runs = []

    class Run:
        def __init__(self, **kwargs):
            self.kwargs, self.logged, self.summary, self.finished = kwargs, {}, {}, False
            runs.append(self)

        def log(self, values):
            self.logged.update(values)

        def finish(self):
            self.finished = True

    fake = types.ModuleType("wandb")
    fake.__spec__ = importlib.machinery.ModuleSpec("wandb", None)
    fake.init = lambda **kwargs: Run(**kwargs)
    monkeypatch.setitem(sys.modules, "wandb", fake)
    out = tmp_path / "run"
    result = CliRunner().invoke(app, ["run", "--suite", "smoke", "--model", str(tiny_model_dir), "--weights",
                                      "pretrained", "--methods", "dense,random", "--sparsity", "0.5", "--tasks",
                                      "wikitext2", "--limit", "1", "--seqlen", "32", "--device", "cpu", "--out",
                                      str(out), "--wandb", "my-project"])
    assert result.exit_code == 0, result.output
    records = [json.loads(line) for line in (out / "records.jsonl").read_text().splitlines()]
    assert len(runs) == len(records) == 2 and all(run.finished for run in runs)
    assert {run.kwargs["project"] for run in runs} == {"my-project"} and {run.kwargs["group"] for run in runs} == {"run"}
    by_method = {run.kwargs["config"]["method"]: run for run in runs}
    for record in records:
        assert by_method[record["method"]].logged["wikitext2/ppl"] == record["value"]
