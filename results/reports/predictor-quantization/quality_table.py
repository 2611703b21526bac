"""The predictor-quantization table, computed from the runs' records (nothing typed).

    PYTHONPATH=. python results/reports/predictor-quantization/quality_table.py results/pq-dejavu-{model,int8,fp8} \
        results/pq-timewise-{model,int8,fp8}

Each run folder holds one `predictor_weights` format (its records say which). Rows: method × sparsity (seed 0, as
the runs); columns: perplexity with the fitted weights (`model`), then each 8-bit format with its change relative to
`model`, and the mean head (and neuron) recall of the predictors on held-out calibration tokens per format.
"""
from __future__ import annotations

import sys
from collections import defaultdict

from harness.store import read_records
from harness.tables import _sparsity_key

FORMATS = ("model", "int8", "fp8")


def collect(run_dirs):
    cells = defaultdict(dict)  # (task, method, sparsity) -> {format: record}
    dense = {}
    commits = set()
    for run_dir in run_dirs:
        for r in read_records(run_dir):
            commits.add(r["provenance"]["commit"])
            if r["method"] == "dense":
                dense[r["task"]] = r
                continue
            cells[(r["task"], r["method_label"], r["sparsity"], tuple(r["dense_layers"]))][r["predictor_weights"]] = r
    return cells, dense, commits


def recall(record, unit):
    value = record.get(f"predictor_recall_{unit}")
    return "–" if value is None else f"{value:.4f}"


def main(run_dirs):
    cells, dense, commits = collect(run_dirs)
    lines = ["| task | method | sparsity | dense layers | ppl model | ppl int8 | Δ int8 | ppl fp8 | Δ fp8 | "
             "head recall model / int8 / fp8 | neuron recall model / int8 / fp8 |",
             "|:--|:--|:--|:--|--:|--:|--:|--:|--:|:--|:--|"]
    for task, r in sorted(dense.items()):
        lines.append(f"| {task} | dense | 0 | – | {r['value']:.2f} | | | | | | |")
    for key in sorted(cells, key=lambda k: (k[0], k[1], _sparsity_key(k[2]))):
        task, label, sparsity, dense_layers = key
        row = cells[key]
        if "model" not in row:
            continue
        base = row["model"]["value"]
        out = [task, label, sparsity, ",".join(map(str, dense_layers)) or "none", f"{base:.2f}"]
        for kind in ("int8", "fp8"):
            if kind in row:
                value = row[kind]["value"]
                out += [f"{value:.2f}", f"{100 * (value / base - 1):+.2f}%"]
            else:
                out += ["–", "–"]
        for unit in ("heads", "neurons"):
            out.append(" / ".join(recall(row[k], unit) if k in row else "–" for k in FORMATS))
        lines.append("| " + " | ".join(out) + " |")
    print("\n".join(lines))
    print(f"\nRecords of commit(s) {', '.join(sorted(commits))}; perplexity over the runs' windows (`limit`), seed 0.")


if __name__ == "__main__":
    main(sys.argv[1:])
