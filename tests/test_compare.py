"""`harness compare`: published rows beside ours with differences, the computed metrics (mean over the 7 tasks,
generation latency), rows the harness cannot produce, and the reference files against the papers' tables."""
import csv
import json
import re
from pathlib import Path

import pytest
import yaml
from typer.testing import CliRunner

from harness.cli import app
from harness.compare import SEVEN_TASKS, available, compare, derived_records, load_reference

PAPERS = Path(__file__).resolve().parent.parent.parent / "shared" / "papers"


def record(method, sparsity, task, metric, value, model="opt-125m", seed=0, stderr=0.01, **extra):
    return {"job": f"{method}{sparsity}{task}{seed}", "model": model, "weights": "random", "suite": "zero-shot",
            "method": method.split(":")[0], "method_label": method, "sparsity": sparsity, "task": task,
            "metric": metric, "value": value, "stderr": stderr, "fidelity": "exact", "seed": seed, **extra}


def test_every_reference_file_loads():
    names = available()
    assert {"sedghi-table1", "dejavu-table4", "dejavu-table7", "shadowllm-table2"} <= set(names)
    for name in names:
        ref = load_reference(name)
        assert ref["entries"] and "status" not in ref
        for entry in ref["entries"]:
            assert entry["source"]


def _tsv(name):
    lines = [line for line in (PAPERS / name).read_text().splitlines() if line and not line.startswith("#")]
    return list(csv.DictReader(lines, delimiter="\t"))


@pytest.mark.skipif(not PAPERS.is_dir(), reason="the papers' tables are not beside the repository")
def test_reference_files_are_the_papers_tables():
    sedghi = load_reference("sedghi-table1")["entries"]
    rows = _tsv("sedghi-table1.tsv")
    assert len(sedghi) == len(rows) == 90
    task = {"wikitext": "wikitext2", "ptb": "ptb_new", "bookcorpus": "bookcorpus"}
    got = {(e["task"], e["model"], e["method"], str(e["sparsity"])): (e["value"], e.get("std")) for e in sedghi}
    for r in rows:
        s = float(r["sparsity_heads"])
        key = (task[r["dataset"]], r["model"], r["method"], "0" if s == 0 else f"h{s:g}")
        assert got[key] == (float(r["perplexity"]), float(r["std"]) if r["std"] else None), key
    for name, table in (("dejavu-table4", "table4"), ("dejavu-table7", "table7")):
        entries = load_reference(name)["entries"]
        printed = [r for r in _tsv("dejavu-tables.tsv") if r["table"] == table]
        assert sorted(e["value"] for e in entries) == sorted(float(r["value"]) for r in printed)
        assert all(e["value"] < 1 for e in entries if e["metric"] == "acc")  # fractions, not percent
        assert all("opt-175b" in e["unavailable"] for e in entries)
        assert all(("w4a16" in e["unavailable"]) == ("w4a16" in e["method"]) for e in entries)
    shadow = load_reference("shadowllm-table2")["entries"]
    printed = {(r["method"], r["metric"]): float(r["value"]) for r in _tsv("shadowllm-tables.tsv") if r["table"] == "table2"}
    method = {"static:plainact": "static", "dense": "dense", "dejavu:shadowllm": "dejavu", "shadow:plainact": "shadow"}
    metric = {"acc": "acc_percent", "latency_ms": "latency_ms"}
    assert {(method[e["method"]], metric[e["metric"]]): e["value"] for e in shadow} == printed


def test_reference_files_and_output_speak_of_the_tool_and_the_papers_only(tmp_path):
    words = re.compile(r"\bsession\b|\bissue\b|search corpus|\blead\b|\bengineer", re.I)
    for path in available().values():
        assert not words.search(path.read_text()), path
    run = fake_run(tmp_path)
    for name in available():
        out = CliRunner().invoke(app, ["compare", str(run), "--reference", name])
        assert out.exit_code == 0, out.output
        assert not words.search(out.output), name


def fake_run(tmp_path):
    """A run folder: Sedghi-style perplexity over 2 seeds, the 7 zero-shot tasks, and latency records."""
    records = [record("dense", "0", "wikitext2", "ppl", 14.0, model="opt-1.3b", stderr=0.2)]
    records += [record("timewise:current", "h0.25", "wikitext2", "ppl", v, model="opt-1.3b", seed=s)
                for s, v in enumerate((13.0, 15.0))]
    for method, sparsity, scope, base in (("dense", "0", "request", 0.50), ("shadow:plainact", "0.5", "request", 0.40),
                                          ("static:plainact", "0.5", "token", 0.30)):
        for i, task in enumerate(SEVEN_TASKS):
            records.append(record(method, sparsity, task, "acc", base + 0.01 * i, model="opt-13b", scope=scope,
                                  stderr=0.02))
    records.append(record("shadow:plainact", "0.5", "piqa", "acc_norm", 0.7, model="opt-13b", scope="request"))
    latency = dict(task="decode", prompt_len=128, new_tokens=128, batch=1, model="opt-13b", scope="token", stderr=None)
    records += [record("dense · ours", "0", metric="request_ms", value=2500.0, engine="ours", **latency),
                record("dense · hf-eager", "0", metric="request_ms", value=5000.0, engine="hf-eager", **latency),
                record("shadow:plainact", "0.5", metric="request_ms", value=2400.0, engine="ours", **latency),
                record("shadow:plainact", "0.5", metric="token_ms", value=18.0, engine="ours", **latency)]
    records[-4]["method"] = records[-3]["method"] = "dense"
    run = tmp_path / "run"
    run.mkdir()
    (run / "records.jsonl").write_text("".join(json.dumps(r) + "\n" for r in records))
    return run


def test_the_mean_over_seven_tasks_and_the_generation_latency_are_computed():
    records = [json.loads(line) for line in fake_run_records()]
    derived = {(r["method_label"], r["task"]): r for r in derived_records(records)}
    mean = derived[("dense", "zero_shot_7_mean")]
    assert mean["value"] == pytest.approx(0.50 + 0.01 * 3) and mean["stderr"] == pytest.approx(0.02 / 7 ** 0.5)
    assert derived[("dense", "generation_128_128")]["value"] == 2500.0  # our engine, not Hugging Face's
    assert derived[("shadow:plainact", "generation_128_128")]["value"] == 2400.0
    assert ("dense · hf-eager", "generation_128_128") not in derived
    six = [r for r in records if r["task"] != "rte"]
    assert not [r for r in derived_records(six) if r["task"] == "zero_shot_7_mean"]  # all 7 needed


def fake_run_records():
    import tempfile

    with tempfile.TemporaryDirectory() as folder:
        return (fake_run(Path(folder)) / "records.jsonl").read_text().splitlines()


def test_compare_puts_published_rows_beside_ours(tmp_path):
    run = fake_run(tmp_path)
    records = [json.loads(line) for line in (run / "records.jsonl").read_text().splitlines()]
    sedghi = compare(records, load_reference("sedghi-table1"))
    matched = {(r["method"], r["sparsity"]): r for r in sedghi["matched"]}
    current = matched[("timewise:current", "h0.25")]
    assert current["ours"] == pytest.approx(14.0) and current["diff"] == pytest.approx(0.5)  # 13.5 published
    assert current["spread"] == "std over 2 seeds" and current["std"] == 0.07
    assert matched[("dense", "0")]["diff"] == pytest.approx(0.5) and matched[("dense", "0")]["spread"] == "stderr"
    assert len(sedghi["reference_only"]) == 88 and not sedghi["unavailable"]

    shadow = compare(records, load_reference("shadowllm-table2"))
    rows = {(r["method"], r["task"]): r for r in shadow["matched"]}
    assert rows[("shadow:plainact", "zero_shot_7_mean")]["ours"] == pytest.approx(43.0)  # percent
    assert rows[("shadow:plainact", "zero_shot_7_mean")]["diff"] == pytest.approx(43.0 - 61.19)
    assert rows[("dense", "generation_128_128")]["diff"] == pytest.approx(2500 - 2609)
    assert rows[("shadow:plainact", "generation_128_128")]["diff"] == pytest.approx(2400 - 2562)  # any mask scope
    # static ran with token scope: ShadowLLM's table is per-request masks, so it is not matched
    assert ("static:plainact", "zero_shot_7_mean") not in rows
    assert {(r["method"], r["task"]) for r in shadow["reference_only"]} >= {("static:plainact", "zero_shot_7_mean")}

    table7 = compare(records, load_reference("dejavu-table7"))
    assert not table7["matched"] and len(table7["unavailable"]) == 28

    out = CliRunner().invoke(app, ["compare", str(run), "--reference", "shadowllm-table2"])
    assert out.exit_code == 0, out.output
    assert "## Published beside ours (4)" in out.output and "| 43.00 ± " in out.output
    assert "-18.19" in out.output and "-109.00" in out.output
    out = CliRunner().invoke(app, ["compare", str(run), "--reference", "dejavu-table7"])
    assert "## Published, cannot be produced with this tool (28)" in out.output
    assert "- w4a16: 4-bit weight quantization" in out.output and "| 0.4020 | opt-175b |" in out.output


def test_compare_matches_and_lists_the_rest(tmp_path):
    ref_path = tmp_path / "ref.yaml"
    ref_path.write_text(yaml.safe_dump({"name": "toy", "unit": "percent", "entries": [
        {"model": "opt-125m", "method": "dense", "sparsity": 0, "task": "piqa", "metric": "acc", "value": 62.0,
         "source": {"paper": "toy", "table": "1"}},
        {"model": "opt-13b", "method": "dense", "sparsity": 0, "task": "piqa", "metric": "acc", "value": 76.0,
         "source": {"paper": "toy", "table": "1"}}]}))
    records = [record("dense", "0", "piqa", "acc", 0.65), record("random", "0.5", "piqa", "acc", 0.55),
               record("random", "0.5", "copa", "acc", 0.55)]
    result = compare(records, load_reference(str(ref_path)))
    assert [(r["method"], round(r["diff"], 6)) for r in result["matched"]] == [("dense", 3.0)]
    assert [r["model"] for r in result["reference_only"]] == ["opt-13b"]
    assert [(r["method"], r["task"]) for r in result["ours_only"]] == [("random", "piqa")]  # copa: not in the table

    run = tmp_path / "run"
    run.mkdir()
    (run / "records.jsonl").write_text("".join(json.dumps(r) + "\n" for r in records))
    out = CliRunner().invoke(app, ["compare", str(run), "--reference", str(ref_path)])
    assert out.exit_code == 0, out.output
    assert "In this run, not published (1)" in out.output and "Published, not in this run (1)" in out.output
    bad = CliRunner().invoke(app, ["compare", str(run), "--reference", "no-such-paper"])
    assert bad.exit_code == 2
