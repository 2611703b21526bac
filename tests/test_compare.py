"""`harness compare`: matched rows with differences, unmatched rows on both sides listed."""
import json

import yaml
from typer.testing import CliRunner

from harness.cli import app
from harness.compare import available, compare, load_reference


def record(method, sparsity, task, metric, value, model="opt-125m"):
    return {"job": f"{method}{sparsity}{task}", "model": model, "weights": "random", "suite": "zero-shot",
            "method": method.split(":")[0], "method_label": method, "sparsity": sparsity, "task": task,
            "metric": metric, "value": value, "stderr": 0.01, "fidelity": "exact"}


def test_every_reference_file_loads():
    names = available()
    assert {"sedghi-table1", "dejavu-table4", "dejavu-table7", "shadowllm-table2"} <= set(names)
    for name in names:
        ref = load_reference(name)
        for entry in ref["entries"]:
            assert entry["source"]


def test_compare_matches_and_lists_the_rest(tmp_path):
    ref_path = tmp_path / "ref.yaml"
    ref_path.write_text(yaml.safe_dump({"name": "toy", "unit": "percent", "entries": [
        {"model": "opt-125m", "method": "dense", "sparsity": 0, "task": "piqa", "metric": "acc", "value": 62.0,
         "source": {"paper": "toy", "table": "1"}},
        {"model": "opt-13b", "method": "dense", "sparsity": 0, "task": "piqa", "metric": "acc", "value": 76.0,
         "source": {"paper": "toy", "table": "1"}}]}))
    records = [record("dense", "0", "piqa", "acc", 0.65), record("random", "0.5", "piqa", "acc", 0.55)]
    result = compare(records, load_reference(str(ref_path)))
    assert [(r["method"], round(r["diff"], 6)) for r in result["matched"]] == [("dense", 3.0)]
    assert [r["model"] for r in result["reference_only"]] == ["opt-13b"]
    assert [r["method"] for r in result["ours_only"]] == ["random"]

    run = tmp_path / "run"
    run.mkdir()
    (run / "records.jsonl").write_text("".join(json.dumps(r) + "\n" for r in records))
    out = CliRunner().invoke(app, ["compare", str(run), "--reference", str(ref_path)])
    assert out.exit_code == 0, out.output
    assert "Only in our run (1)" in out.output and "Only in the reference (1)" in out.output
    bad = CliRunner().invoke(app, ["compare", str(run), "--reference", "no-such-paper"])
    assert bad.exit_code == 2
