"""`harness compare RUN_DIR --reference NAME`: a run's records beside the numbers printed in a paper.

References live in suites/references/NAME.yaml (see its README). Rows are matched on (model, method,
sparsity, task, metric); the difference is ours − published, in the reference's unit. Records and
published entries without a counterpart are listed in their own sections, never dropped.
"""
from __future__ import annotations

import math
from pathlib import Path

from harness.data import REPO_ROOT
from harness.errors import HarnessError
from harness.suites import load_yaml_mapping, yaml_files

REFERENCES_DIR = REPO_ROOT / "suites" / "references"
UNITS = ("percent", "fraction")


def available() -> dict[str, Path]:
    return yaml_files(REFERENCES_DIR)


def load_reference(name: str) -> dict:
    path, ref = load_yaml_mapping("reference", name, REFERENCES_DIR)
    if not isinstance(ref.get("entries", []), list):
        raise HarnessError(f"reference file {path} must be a mapping with an `entries` list")
    ref.setdefault("name", path.stem)
    ref.setdefault("entries", [])
    ref.setdefault("unit", "percent")
    for index, entry in enumerate(ref["entries"]):
        missing = [k for k in ("model", "method", "sparsity", "task", "metric", "value", "source") if k not in entry]
        if missing:
            raise HarnessError(f"{path}: entry {index} lacks {', '.join(missing)}")
        if entry.get("unit", ref["unit"]) not in UNITS:
            raise HarnessError(f"{path}: entry {index} has unit {entry.get('unit')!r}; valid: {', '.join(UNITS)}")
    return ref


def _sparsity(value) -> str:
    text = str(value).strip()
    try:
        return f"{float(text):g}"
    except ValueError:
        return text


def record_key(r: dict) -> tuple:
    return (r["model"], r.get("method_label") or r["method"], _sparsity(r["sparsity"]), r["task"], r["metric"])


def entry_key(e: dict) -> tuple:
    return (str(e["model"]), str(e["method"]), _sparsity(e["sparsity"]), str(e["task"]), str(e["metric"]))


def _scaled(value, unit: str, metric: str):
    """Our value in the reference's unit (accuracies are fractions in records)."""
    if value is None:
        return None
    return value * 100.0 if unit == "percent" and metric.startswith("acc") else value


def compare(records: list[dict], ref: dict) -> dict:
    """{'matched': [...], 'ours_only': [...], 'reference_only': [...]} of row dicts. Several seeds of one
    configuration become mean ± std over seeds, as in the tables."""
    from harness.tables import over_seeds

    ours = {}
    for r in over_seeds(records):
        ours.setdefault(record_key(r), r)
    published = {}
    for e in ref["entries"]:
        published.setdefault(entry_key(e), e)
    matched, ours_only, ref_only = [], [], []
    for key, e in published.items():
        unit = e.get("unit", ref["unit"])
        row = dict(zip(("model", "method", "sparsity", "task", "metric"), key))
        row.update(reference=float(e["value"]), unit=unit, source=e["source"])
        if key in ours:
            r = ours[key]
            value = _scaled(r["value"], unit, key[4])
            row.update(ours=value, stderr=_scaled(r.get("stderr"), unit, key[4]), weights=r.get("weights"),
                       diff=None if value is None else value - float(e["value"]), fidelity=r.get("fidelity"))
            matched.append(row)
        else:
            ref_only.append(row)
    for key, r in ours.items():
        if key not in published:
            row = dict(zip(("model", "method", "sparsity", "task", "metric"), key))
            row.update(ours=r["value"], stderr=r.get("stderr"), weights=r.get("weights"), fidelity=r.get("fidelity"))
            ours_only.append(row)
    return {"matched": matched, "ours_only": ours_only, "reference_only": ref_only}


def _num(value, digits=2) -> str:
    if value is None or (isinstance(value, float) and math.isnan(value)):
        return "–"
    return f"{value:.{digits}f}" if abs(value) < 1e4 else f"{value:.4g}"


def _source(source) -> str:
    if isinstance(source, dict):
        return ", ".join(f"{k}: {v}" for k, v in source.items())
    return str(source)


def markdown(result: dict, ref: dict, run_dir) -> str:
    lines = [f"# {run_dir} vs {ref['name']}", "",
             f"Reference: {ref.get('paper', '?')}, {ref.get('table', '?')} — {ref.get('setting', '')}".rstrip(" —"),
             f"Matched on model, method, sparsity, task, metric; diff = ours − published ({ref['unit']} for accuracies).", ""]
    if ref.get("status"):
        lines += [f"Reference status: {ref['status']}", ""]
    head = ["model", "method", "sparsity", "task", "metric"]
    def ours(row, digits):
        text = _num(row["ours"], digits) + (f" ± {_num(row['stderr'], digits)}" if row.get("stderr") is not None else "")
        return text + (" †" if row.get("fidelity") not in (None, "exact") else "")

    sections = [
        ("Matched", result["matched"], ["ours", "published", "diff", "source"],
         lambda r: [ours(r, 2), _num(r["reference"]), _num(r["diff"]), _source(r["source"])], ""),
        ("Only in our run", result["ours_only"], ["weights", "ours"], lambda r: [str(r.get("weights")), ours(r, 4)], ""),
        ("Only in the reference", result["reference_only"], ["published", "source"],
         lambda r: [_num(r["reference"]), _source(r["source"])],
         "" if ref["entries"] else " — the reference has no entries yet"),
    ]
    for number, (title, rows, extra, cells, empty_note) in enumerate(sections):
        lines += ([""] if number else []) + [f"## {title} ({len(rows)})", ""]
        if rows:
            lines.append("| " + " | ".join(head + extra) + " |")
            lines.append("|" + "---|" * (len(head) + len(extra)))
            lines += ["| " + " | ".join([str(r[k]) for k in head] + cells(r)) + " |" for r in rows]
        else:
            lines.append("(none)" + empty_note)
    if any(row.get("fidelity") not in (None, "exact") for row in result["matched"]):
        lines += ["", "† offline data that does not reproduce lm-eval's data set exactly (see the record's fidelity_note)."]
    return "\n".join(lines) + "\n"


def run_compare(run_dir, reference: str) -> str:
    from harness.store import read_records

    run_dir = Path(run_dir)
    if not (run_dir / "records.jsonl").exists():
        raise HarnessError(f"{run_dir} holds no records.jsonl: not a run folder (or no job has finished yet)")
    ref = load_reference(reference)
    return markdown(compare(read_records(run_dir), ref), ref, run_dir)
