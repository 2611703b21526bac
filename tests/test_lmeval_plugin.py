"""lm-eval's ecosystem: `harness-masked` as an lm-eval model plugin (harness/lmeval_plugin.py), lm-eval's caches
keyed per configuration, and a run's zero-shot results in lm-eval's own schema and file names."""
import json
import sys
import tomllib
from pathlib import Path

import pytest
from typer.testing import CliRunner

pytest.importorskip("lm_eval")

from harness.errors import HarnessError  # noqa: E402
from harness.lmeval import adapter_class, task_manager  # noqa: E402
from harness.lmeval_plugin import GROUP, NAME, build_masked, cache_scoping, list_models, main, register  # noqa: E402

ROOT = Path(__file__).resolve().parent.parent


def test_the_distribution_declares_the_lm_eval_entry_point_and_the_command():
    project = tomllib.loads((ROOT / "pyproject.toml").read_text())["project"]
    assert project["entry-points"][GROUP] == {NAME: "harness.lmeval_plugin:HarnessMaskedLM"}
    assert project["scripts"]["harness-lm-eval"] == "harness.lmeval_plugin:main"


def test_registered_with_lm_eval_it_is_the_adapter_class():
    from lm_eval.api.registry import get_model

    register()
    assert NAME in list_models() and "hf" in list_models()
    assert get_model(NAME) is adapter_class()


def test_harness_lm_eval_lists_the_plugin(capsys):
    main(["ls", "models"])
    assert NAME in capsys.readouterr().out.split()


def model_args(model_dir, **extra):
    values = {"pretrained": str(model_dir), "device": "cpu", "dtype": "float32", **extra}
    return ",".join(f"{k}={v}" for k, v in values.items())


def test_lm_eval_runs_the_plugin_from_its_model_args(tiny_model_dir, data):
    """lm-eval's own simple_evaluate builds the model from model_args: the method is fitted and applied."""
    from lm_eval import simple_evaluate

    register()
    results = simple_evaluate(model=NAME, model_args=model_args(tiny_model_dir, method="random", sparsity=0.5),
                              tasks=["copa_local"], task_manager=task_manager(data.root), limit=4, batch_size=2,
                              bootstrap_iters=0)
    assert "acc,none" in results["results"]["copa_local"]
    info = results["config"]["harness"]
    assert info["method"] == "random" and info["sparsity"] == "0.5" and info["data_source"] == "bundle"
    assert info["achieved_heads"] == pytest.approx(0.5, abs=0.05)


def test_lm_evals_caches_never_mix_configurations(tiny_model_dir, tmp_path):
    import lm_eval.api.model as api

    cls = adapter_class()
    half = cls(pretrained=str(tiny_model_dir), method="random", sparsity=0.5, device="cpu", dtype="float32")
    quarter = cls(pretrained=str(tiny_model_dir), method="random", sparsity=0.25, device="cpu", dtype="float32")
    assert half.tokenizer_name != quarter.tokenizer_name  # the request cache's key
    cache_scoping()
    paths = {api.CachingLM(lm, str(tmp_path / "answers_rank0.db")).cache_db for lm in (half, quarter)}
    assert len(paths) == 2 and all(path.endswith(".db") and NAME in path for path in paths)


@pytest.mark.parametrize("extra, expected", [
    ({"method": "random"}, "needs sparsity="),
    ({"method": "nosuch"}, "valid methods"),
    ({"method": "random", "sparsity": "1.5"}, "outside [0, 1)"),
    ({"method": "dense", "dense_layers": "x"}, "dense_layers"),
    ({"method": "dense", "weights": "other"}, "valid: pretrained, random"),
])
def test_bad_model_args_name_what_is_valid(tiny_model_dir, extra, expected):
    with pytest.raises(HarnessError, match=expected.replace("[", r"\[").replace(")", r"\)")):
        build_masked(str(tiny_model_dir), device="cpu", **extra)


def test_harness_lm_eval_exits_2_on_bad_model_args(tiny_model_dir, monkeypatch, capsys):
    """lm-eval's command line (replaced here: it indexes every task first) builds the model; bad model_args exit 2."""
    import lm_eval.__main__ as lm_eval_main

    seen = []

    def cli_evaluate():
        seen.append(list(sys.argv))
        build_masked(str(tiny_model_dir), method="nosuch")

    monkeypatch.setattr(lm_eval_main, "cli_evaluate", cli_evaluate)
    monkeypatch.setattr(sys, "argv", list(sys.argv))
    with pytest.raises(SystemExit) as exit_:
        main(["run", "--model", NAME, "--tasks", "copa"])
    assert exit_.value.code == 2 and "valid methods" in capsys.readouterr().err
    assert seen == [["lm-eval", "run", "--model", NAME, "--tasks", "copa"]]


def test_a_runs_zero_shot_results_are_in_lm_evals_schema(tiny_model_dir, tmp_path):
    from harness.cli import app

    out = tmp_path / "run"
    result = CliRunner().invoke(app, ["run", "--suite", "zero-shot", "--model", str(tiny_model_dir), "--weights",
                                      "pretrained", "--methods", "dense", "--tasks", "copa", "--limit", "3", "--device",
                                      "cpu", "--lmeval-source", "local", "--log-samples", "--out", str(out)])
    assert result.exit_code == 0, result.output
    (record,) = [json.loads(line) for line in (out / "records.jsonl").read_text().splitlines()]
    folder = out / "lm_eval" / record["job"]
    (results,) = folder.glob("results_*.json")
    (samples,) = folder.glob("samples_copa_local_*.jsonl")
    assert record["lm_eval_results"] == str(results.relative_to(out))
    assert results.name[len("results_"):-len(".json")] == samples.name[len("samples_copa_local_"):-len(".jsonl")]
    saved = json.loads(results.read_text())
    for key in ("results", "configs", "versions", "n-shot", "config", "task_hashes", "model_name"):
        assert key in saved, key
    assert saved["results"]["copa_local"]["acc,none"] == record["value"]
    lines = [json.loads(line) for line in samples.read_text().splitlines()]
    assert len(lines) == 3 and {"doc_id", "arguments", "resps", "filtered_resps", "target"} <= set(lines[0])
