"""`harness compare RUN_DIR --reference NAME`: a run's records beside the numbers printed in a paper.

References live in suites/references/NAME.yaml (see its README). Published rows are matched with our records on
(model, method, sparsity, task, metric); the difference is ours − published, in the reference's unit. Two metrics
that papers print are computed here from the run's records (`derived_records`):
  * zero_shot_7_mean / acc: the mean of the acc of the 7 downstream tasks of ShadowLLM (all 7 needed), per
    configuration and seed;
  * generation_128_128 / latency_ms: the request time (prompt 128 + 128 generated tokens, batch 1) of the latency
    suite's records (task `decode`, our sparse decode engine).
Published rows without a record, rows that the harness cannot produce (the reference's `unavailable` reasons) and
records without a published row are listed in their own sections, never dropped.
"""
from __future__ import annotations

import math
from pathlib import Path

from harness.errors import HarnessError
from harness.resources import references_dir
from harness.suites import load_yaml_mapping, yaml_files

REFERENCES_DIR = references_dir()
UNITS = ("percent", "fraction", "ppl", "ms")
SEVEN_TASKS = ("piqa", "copa", "openbookqa", "winogrande", "rte", "hellaswag", "arc_easy")
MEAN_TASK, LATENCY_TASK = "zero_shot_7_mean", "generation_128_128"
LATENCY_SETTING = {"prompt_len": 128, "new_tokens": 128, "batch": 1, "engine": "ours"}


def available() -> dict[str, Path]:
    return yaml_files(REFERENCES_DIR)


def load_reference(name: str) -> dict:
    path, ref = load_yaml_mapping("reference", name, REFERENCES_DIR)
    if not isinstance(ref.get("entries", []), list):
        raise HarnessError(f"reference file {path} must be a mapping with an `entries` list")
    ref.setdefault("name", path.stem)
    ref.setdefault("entries", [])
    ref.setdefault("unit", "percent")
    ref.setdefault("unavailable", {})
    for index, entry in enumerate(ref["entries"]):
        missing = [k for k in ("model", "method", "sparsity", "task", "metric", "value", "source") if k not in entry]
        if missing:
            raise HarnessError(f"{path}: entry {index} lacks {', '.join(missing)}")
        if entry.get("unit", ref["unit"]) not in UNITS:
            raise HarnessError(f"{path}: entry {index} has unit {entry.get('unit', ref['unit'])!r}; valid: {', '.join(UNITS)}")
        unknown = [k for k in entry.get("unavailable", []) if k not in ref["unavailable"]]
        if unknown:
            raise HarnessError(f"{path}: entry {index} is unavailable for {unknown}, which the file's `unavailable` "
                               "does not explain")
    return ref


def _sparsity(value) -> str:
    text = str(value).strip()
    try:
        return f"{float(text):g}"
    except ValueError:
        return text


def _method(text: str) -> str:
    """The label a method's records carry (a name without variant gets its default variant)."""
    from methods import MethodSpec, get_method

    try:
        return get_method(MethodSpec.parse(str(text))).label
    except HarnessError:  # not a harness method (e.g. a quantized row): kept as printed
        return str(text)


def record_key(r: dict) -> tuple:
    return (r["model"], r.get("method_label") or r["method"], _sparsity(r["sparsity"]), r["task"], r["metric"])


def entry_key(e: dict) -> tuple:
    return (str(e["model"]), _method(e["method"]), _sparsity(e["sparsity"]), str(e["task"]), str(e["metric"]))


# -- metrics computed from a run's records -------------------------------------------------------------------
def _config_key(r: dict) -> tuple:
    return (r["model"], r.get("weights"), r.get("method_label") or r["method"], _sparsity(r["sparsity"]),
            r.get("seed"), r.get("scope", "token"), r.get("allocation", "local"))


def mean_of_seven(records: list[dict]) -> list[dict]:
    """One `zero_shot_7_mean` acc record per configuration and seed that has the acc of all 7 tasks; its stderr
    combines the tasks' (independent) stderrs: sqrt(Σ se²) / 7."""
    groups: dict[tuple, dict[str, dict]] = {}
    for r in records:
        if r.get("task") in SEVEN_TASKS and r.get("metric") == "acc" and r.get("value") is not None:
            groups.setdefault(_config_key(r), {})[r["task"]] = r
    out = []
    for per_task in groups.values():
        if set(per_task) != set(SEVEN_TASKS):
            continue
        rows = [per_task[t] for t in SEVEN_TASKS]
        errors = [r.get("stderr") for r in rows]
        stderr = math.sqrt(sum(e * e for e in errors)) / len(rows) if all(e is not None for e in errors) else None
        loose = [r["task"] for r in rows if r.get("fidelity") not in (None, "exact")]
        out.append({**rows[0], "task": MEAN_TASK, "metric": "acc", "value": sum(r["value"] for r in rows) / len(rows),
                    "stderr": stderr, "n": sum(r.get("n") or 0 for r in rows), "tasks": list(SEVEN_TASKS),
                    "fidelity": "approximate" if loose else "exact",
                    "fidelity_note": (f"mean over the 7 tasks; {', '.join(loose)} not exactly lm-eval's data"
                                      if loose else "mean over the 7 tasks")})
    return out


def generation_latency(records: list[dict]) -> list[dict]:
    """`generation_128_128` latency_ms records from the latency suite's request times (prompt 128 + 128 new tokens,
    batch 1, our engine); the dense baseline's label loses its engine suffix."""
    out = []
    for r in records:
        if r.get("task") != "decode" or r.get("metric") != "request_ms" or r.get("value") is None:
            continue
        if any(r.get(k) != v for k, v in LATENCY_SETTING.items()):
            continue
        label = (r.get("method_label") or r["method"]).removesuffix(" · ours")
        out.append({**r, "task": LATENCY_TASK, "metric": "latency_ms", "method_label": label})
    return out


def derived_records(records: list[dict]) -> list[dict]:
    return mean_of_seven(records) + generation_latency(records)


# -- the comparison ------------------------------------------------------------------------------------------
def _scaled(value, unit: str, metric: str):
    """Our value in the reference's unit (accuracies are fractions in records)."""
    if value is None:
        return None
    return value * 100.0 if unit == "percent" and metric.startswith("acc") else value


def _spread(r: dict) -> str | None:
    """What the ± of our value is: std over seeds (several seeds) or the record's stderr."""
    if r.get("stderr") is None:
        return None
    return f"std over {len(r['seeds'])} seeds" if "seeds" in r else "stderr"


def compare(records: list[dict], ref: dict) -> dict:
    """{'matched', 'ours_only', 'reference_only', 'unavailable'}: lists of row dicts. Several seeds of one
    configuration become mean ± std over seeds, as in the tables. A reference with `scope` matches only records
    of that mask scope (dense and latency: any)."""
    from harness.tables import over_seeds

    scope = ref.get("scope")
    ours = {}
    for r in over_seeds(list(records) + derived_records(records)):
        if scope and r.get("method") != "dense" and r["task"] != LATENCY_TASK and r.get("scope", "token") != scope:
            continue  # latency does not depend on the mask scope (the decode engine's masks are its own)
        ours.setdefault(record_key(r), r)
    published, unavailable = {}, []
    for e in ref["entries"]:
        key = entry_key(e)
        if e.get("unavailable"):
            row = dict(zip(("model", "method", "sparsity", "task", "metric"), key))
            row.update(reference=float(e["value"]), std=e.get("std"), unit=e.get("unit", ref["unit"]),
                       source=e["source"], unavailable=list(e["unavailable"]))
            unavailable.append(row)
        else:
            published.setdefault(key, e)
    pairs = {(k[3], k[4]) for k in published} | {(r["task"], r["metric"]) for r in unavailable}
    matched, ours_only, ref_only = [], [], []
    for key, e in published.items():
        unit = e.get("unit", ref["unit"])
        row = dict(zip(("model", "method", "sparsity", "task", "metric"), key))
        row.update(reference=float(e["value"]), std=e.get("std"), unit=unit, source=e["source"])
        if key in ours:
            r = ours[key]
            value = _scaled(r["value"], unit, key[4])
            row.update(ours=value, stderr=_scaled(r.get("stderr"), unit, key[4]), spread=_spread(r),
                       weights=r.get("weights"), scope=r.get("scope"), allocation=r.get("allocation"),
                       diff=None if value is None else value - float(e["value"]), fidelity=r.get("fidelity"))
            matched.append(row)
        else:
            ref_only.append(row)
    for key, r in ours.items():
        if key not in published and (key[3], key[4]) in pairs:
            row = dict(zip(("model", "method", "sparsity", "task", "metric"), key))
            row.update(ours=r["value"], stderr=r.get("stderr"), spread=_spread(r), weights=r.get("weights"),
                       scope=r.get("scope"), allocation=r.get("allocation"), fidelity=r.get("fidelity"))
            ours_only.append(row)
    return {"matched": matched, "ours_only": ours_only, "reference_only": ref_only, "unavailable": unavailable}


def _num(value, digits=2) -> str:
    if value is None or (isinstance(value, float) and math.isnan(value)):
        return "–"
    return f"{value:.{digits}f}" if abs(value) < 1e4 else f"{value:.4g}"


def _source(source) -> str:
    if isinstance(source, dict):
        return ", ".join(f"{k}: {v}" for k, v in source.items())
    return str(source)


def _ours(row, digits) -> str:
    text = _num(row["ours"], digits)
    if row.get("stderr") is not None:
        text += f" ± {_num(row['stderr'], digits)} ({row['spread']})"
    return text + (" †" if row.get("fidelity") not in (None, "exact") else "")


def _published(row) -> str:
    return _num(row["reference"], 4 if row["unit"] == "fraction" else 2) + (
        f" ± {_num(row['std'])}" if row.get("std") is not None else "")


def _setting(row) -> str:
    return f"{row.get('weights')}, {row.get('scope') or 'token'}, {row.get('allocation') or 'local'}"


def markdown(result: dict, ref: dict, run_dir) -> str:
    lines = [f"# {run_dir} vs {ref['name']}", "",
             f"Reference: {ref.get('paper', '?')}, {ref.get('table', '?')} — {ref.get('setting', '')}".rstrip(" —"),
             "Matched on model, method, sparsity, task, metric; diff = ours − published, in the published unit "
             "(accuracies in percent or as fractions as the paper prints them, perplexity, ms). "
             "setting = our weights, mask scope, allocation."
             + (f" Only records of mask scope `{ref['scope']}` are matched (dense and latency: any)."
                if ref.get("scope") else ""),
             ""]
    for note in ref.get("notes", []):
        lines.append(f"- {note}")
    if ref.get("notes"):
        lines.append("")
    head = ["model", "method", "sparsity", "task", "metric"]
    digits = lambda row: 4 if row.get("unit") == "fraction" else 2  # noqa: E731
    sections = [
        ("Published beside ours", result["matched"], ["ours", "published", "diff", "setting", "source"],
         lambda r: [_ours(r, digits(r)), _published(r), _num(r["diff"], digits(r)), _setting(r), _source(r["source"])],
         ""),
        ("Published, not in this run", result["reference_only"], ["published", "source"],
         lambda r: [_published(r), _source(r["source"])], " — every published row has a counterpart"),
        ("Published, cannot be produced with this tool", result["unavailable"], ["published", "why", "source"],
         lambda r: [_published(r), ", ".join(r["unavailable"]), _source(r["source"])], ""),
        ("In this run, not published", result["ours_only"], ["ours", "setting"],
         lambda r: [_ours(r, 4), _setting(r)], " (records of tasks and metrics the table does not print are not listed)"),
    ]
    for number, (title, rows, extra, cells, empty_note) in enumerate(sections):
        lines += ([""] if number else []) + [f"## {title} ({len(rows)})", ""]
        if rows:
            lines.append("| " + " | ".join(head + extra) + " |")
            lines.append("|" + "---|" * (len(head) + len(extra)))
            lines += ["| " + " | ".join([str(r[k]) for k in head] + cells(r)) + " |" for r in rows]
        else:
            lines.append("(none)" + empty_note)
    reasons = sorted({key for row in result["unavailable"] for key in row["unavailable"]})
    if reasons:
        lines += [""] + [f"- {key}: {ref['unavailable'][key]}" for key in reasons]
    if any(row.get("fidelity") not in (None, "exact") for row in result["matched"] + result["ours_only"]):
        lines += ["", "† offline data that does not reproduce lm-eval's data set exactly (see the record's fidelity_note)."]
    return "\n".join(lines) + "\n"


def run_compare(run_dir, reference: str) -> str:
    from harness.store import read_records

    run_dir = Path(run_dir)
    if not (run_dir / "records.jsonl").exists():
        raise HarnessError(f"{run_dir} holds no records.jsonl: not a run folder (or no job has finished yet)")
    ref = load_reference(reference)
    return markdown(compare(read_records(run_dir), ref), ref, run_dir)
