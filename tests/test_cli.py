"""The command contract: bad input exits 2 naming the valid choices; runs resume; failures are recorded."""
import json
import os
import re
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
from typer.testing import CliRunner

from harness.cli import app
from methods import REGISTRY, Method, register

runner = CliRunner()


def invoke(*args):
    return runner.invoke(app, [str(a) for a in args], catch_exceptions=False)


def tiny_run(model_dir, out, *extra):
    return invoke("run", "--suite", "smoke", "--model", model_dir, "--weights", "pretrained", "--seqlen", 64,
                  "--limit", 2, "--out", out, *extra)


@pytest.mark.parametrize("args, message", [
    (["--methods", "dense,nosuch"], "valid methods: dejavu, dense, norm-mask, random, replace, shadow, static, timewise"),
    (["--methods", "replace:nosuch"], "valid: replace:head, replace:ranked"),
    (["--suite", "nosuch"], "valid suites: "),
    (["--model", "opt-7b"], "opt-125m, opt-350m"),
    (["--tasks", "wikitext2,nosuch"], "valid tasks: "),
    (["--sparsity", "1.0"], "outside [0, 1)"),
    (["--sparsity", "-0.2"], "outside [0, 1)"),
    (["--sparsity", "half"], "cannot read sparsity"),
    (["--methods", "replace:head", "--sparsity", "n0.5"], "does not sparsify neurons"),
    (["--allocation", "diagonal"], "valid: local, global"),
    (["--weights", "trained"], "valid: pretrained, random"),
])
def test_bad_input_exits_2_and_says_what_is_valid(args, message, tmp_path):
    result = invoke("run", "--out", tmp_path / "run", "--limit", 1, "--seqlen", 8, "--model", "opt-125m", *args)
    assert result.exit_code == 2, result.output
    assert message in result.output
    assert not (tmp_path / "run").exists()  # nothing was written


def test_smoke_with_an_unknown_method_names_the_valid_ones():
    result = invoke("run", "--suite", "smoke", "--methods", "dense,nosuch")
    assert result.exit_code == 2 and "valid methods" in result.output and "random" in result.output


def test_missing_data_names_the_path_and_the_setting(tmp_path):
    empty = tmp_path / "data"
    empty.mkdir()
    result = invoke("run", "--data-dir", empty, "--out", tmp_path / "run")
    assert result.exit_code == 2
    assert "wiki.test.raw" in result.output and "--data-dir" in result.output


def test_run_writes_records_and_tables_then_resumes(tiny_model_dir, tmp_path):
    out = tmp_path / "run"
    result = tiny_run(tiny_model_dir, out, "--methods", "dense,random,norm-mask,replace:ranked",
                      "--sparsity", "0.25,0.5", "--tasks", "wikitext2,ptb_new")
    assert result.exit_code == 0, result.output
    records = [json.loads(line) for line in (out / "records.jsonl").read_text().splitlines()]
    assert len(records) == (1 + 3 * 2) * 2
    for record in records:
        assert record["value"] > 1 and record["n"] == 2 and record["weights"] == "pretrained"
        assert record["provenance"]["commit"] and record["seed"] == 0
        if record["method"] != "dense":
            assert record["achieved_heads"] == pytest.approx(record["sparsity_heads"])
    random_half = next(r for r in records if r["method"] == "random" and r["sparsity"] == "0.5")
    assert random_half["achieved_neurons"] == pytest.approx(0.5)
    table = (out / "table.md").read_text()
    assert "model: tiny-opt" in table.replace(tiny_model_dir.name, "tiny-opt") and "weights: pretrained" in table
    assert "replace:ranked" in table and "wikitext2 ppl @ 0.25" in table and "ptb_new ppl @ 0.5" in table
    assert "\\toprule" in (out / "table.tex").read_text()
    assert list(out.glob("plot_*.png"))
    again = tiny_run(tiny_model_dir, out, "--methods", "dense,random,norm-mask,replace:ranked",
                     "--sparsity", "0.25,0.5", "--tasks", "wikitext2,ptb_new")
    assert again.exit_code == 0 and "0 ran, 14 already done" in again.output


def test_a_run_folder_of_another_spec_is_refused(tiny_model_dir, tmp_path):
    out = tmp_path / "run"
    assert tiny_run(tiny_model_dir, out, "--methods", "dense").exit_code == 0
    before = (out / "records.jsonl").read_text()
    result = tiny_run(tiny_model_dir, out, "--methods", "dense", "--weight-seed", 5)
    assert result.exit_code == 2 and "another spec" in result.output and "weight_seed" in result.output
    assert (out / "records.jsonl").read_text() == before


class Boom(Method):
    name = "boom-test"
    description = "fails on purpose (tests)"

    def policy(self, ctx, allocation, artefact):
        raise RuntimeError("planted failure")


def test_a_failing_job_is_recorded_and_the_others_finish(tiny_model_dir, tmp_path):
    register(Boom)
    try:
        out = tmp_path / "run"
        result = tiny_run(tiny_model_dir, out, "--methods", "boom-test,dense,random")
        assert result.exit_code == 1
        jobs = [json.loads(p.read_text()) for p in (out / "jobs").glob("*.json")]
        failed = [j for j in jobs if j["status"] == "failed"]
        assert len(jobs) == 3 and len(failed) == 1
        assert "planted failure" in failed[0]["traceback"] and "RuntimeError" in failed[0]["error"]
        assert "Failed jobs" in (out / "table.md").read_text()
    finally:
        REGISTRY.pop("boom-test")


def test_table_command_regenerates_from_records(tiny_model_dir, tmp_path):
    out = tmp_path / "run"
    tiny_run(tiny_model_dir, out)
    (out / "table.md").unlink()
    result = invoke("table", out, "--format", "latex")
    assert result.exit_code == 0 and "\\bottomrule" in result.output
    assert invoke("table", out, "--format", "md").exit_code == 0 and (out / "table.md").exists()
    assert invoke("table", tmp_path / "nowhere").exit_code == 2


@pytest.mark.parametrize("what, expect", [("methods", "norm-mask"), ("suites", "smoke"), ("models", "opt-66b"),
                                          ("tasks", "wikitext2")])
def test_list(what, expect):
    result = invoke("list", what)
    assert result.exit_code == 0 and expect in result.output


def test_list_unknown_exits_2():
    assert invoke("list", "gpus").exit_code == 2


def test_killed_run_resumes_with_only_the_missing_jobs(tiny_model_dir, tmp_path):
    out = tmp_path / "run"
    command = [sys.executable, "-m", "harness", "run", "--suite", "smoke", "--model", str(tiny_model_dir),
               "--weights", "pretrained", "--seqlen", "256", "--limit", "12", "--out", str(out),
               "--methods", "dense,random", "--sparsity", "0.2,0.4,0.6,0.8"]
    env = {**os.environ, "PYTHONUNBUFFERED": "1"}
    process = subprocess.Popen(command, env=env, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL,
                               cwd=Path(__file__).parent.parent)
    deadline = time.time() + 120
    while time.time() < deadline and len(list((out / "jobs").glob("*.json"))) < 2:
        time.sleep(0.05)
    process.send_signal(signal.SIGKILL)
    process.wait()
    finished = {p.name: p.read_text() for p in (out / "jobs").glob("*.json")}
    assert 2 <= len(finished) < 5, "the run must be killed halfway"
    result = subprocess.run(command, env=env, capture_output=True, text=True, cwd=Path(__file__).parent.parent)
    assert result.returncode == 0, result.stderr
    assert f"{5 - len(finished)} ran, {len(finished)} already done, 0 failed" in result.stderr
    for name, text in finished.items():  # what was written before the kill is untouched
        assert (out / "jobs" / name).read_text() == text
    assert len((out / "records.jsonl").read_text().splitlines()) == 5


def test_seed_list_repeats_only_seeded_methods_and_tables_show_mean_and_std(tiny_model_dir, tmp_path):
    out = tmp_path / "run"
    result = tiny_run(tiny_model_dir, out, "--methods", "dense,random,norm-mask", "--seed", "0,1,2")
    assert result.exit_code == 0, result.output
    records = [json.loads(line) for line in (out / "records.jsonl").read_text().splitlines()]
    assert sorted(r["seed"] for r in records if r["method"] == "random") == [0, 1, 2]
    assert [r["seed"] for r in records if r["method"] != "random"] == [0, 0]
    values = [r["value"] for r in records if r["method"] == "random"]
    mean = sum(values) / 3
    std = (sum((v - mean) ** 2 for v in values) / 2) ** 0.5
    table = (out / "table.md").read_text()
    assert "mean ± std over 3 seeds" in table and "wikitext2 ppl @ 0.5 (± std over 3 seeds)" in table
    row = next(line for line in table.splitlines() if line.startswith("| random "))
    value, spread = (float(x) for x in re.search(r"([0-9.]+) ± ([0-9.]+)", row).groups())
    assert value == pytest.approx(mean, abs=0.01) and spread == pytest.approx(std, abs=0.01)
    norm = next(line for line in table.splitlines() if line.startswith("| norm-mask "))
    assert "±" not in norm.split("|")[3]  # one value (no seed spread) in the column of std over seeds


def test_clip_units_runs_a_heads_only_method_at_a_combined_target(tiny_model_dir, tmp_path):
    out = tmp_path / "run"
    refused = tiny_run(tiny_model_dir, out, "--methods", "norm-mask,replace:head", "--sparsity", "h0.5/n0.5")
    assert refused.exit_code == 2 and "clip_units" in refused.output
    suite = tmp_path / "suite.yaml"
    suite.write_text("name: clip\ndefaults:\n  clip_units: true\n")
    result = invoke("run", "--suite", suite, "--model", tiny_model_dir, "--weights", "pretrained", "--seqlen", 64,
                    "--limit", 2, "--out", out, "--methods", "random,replace:head", "--sparsity", "h0.5/n0.5")
    assert result.exit_code == 0, result.output
    records = {r["method"]: r for r in map(json.loads, (out / "records.jsonl").read_text().splitlines())}
    assert records["replace"]["sparsity_neurons"] == 0 and records["replace"]["achieved_neurons"] == 0
    assert records["random"]["achieved_neurons"] == pytest.approx(0.5)
