"""Tables and plots from records: one table per (model, weights, suite), rows = methods (with variant
and any non-default scope/allocation), columns = (task, sparsity), cells = value ± stderr."""
from __future__ import annotations

import math
from pathlib import Path

import pandas as pd

from harness.store import write_atomic

FORMATS = ("md", "latex")


def row_label(record: dict) -> str:
    label = record.get("method_label") or record["method"]
    tags = []
    if record.get("scope", "token") != "token":
        tags.append(f"scope={record['scope']}")
    if record.get("allocation", "local") != "local" and record.get("method") != "dense":
        tags.append(record["allocation"])
    return f"{label} [{', '.join(tags)}]" if tags else label


def column_label(record: dict, multi_metric: set) -> str:
    label = f"{record['task']} {record['metric']}" if record["task"] in multi_metric else record["task"]
    return label + ("†" if record.get("fidelity") not in (None, "exact") else "")


def _number(value) -> str:
    if value is None or (isinstance(value, float) and math.isnan(value)):
        return "–"
    magnitude = abs(value)
    return f"{value:.4g}" if magnitude >= 1e4 or magnitude < 1e-2 else f"{value:.2f}"


def cell(value, stderr) -> str:
    text = _number(value)
    return f"{text} ± {_number(stderr)}" if stderr is not None and not (isinstance(stderr, float) and math.isnan(stderr)) else text


def sparsity_value(label: str) -> float | None:
    """The number a sparsity label stands for: 0.5, h0.5 or n0.9 (None for combined targets like h0.5/n0.9)."""
    text = str(label)
    try:
        return float(text[1:] if text[:1] in ("h", "n") else text)
    except ValueError:
        return None


def _sparsity_key(label: str):
    value = sparsity_value(label)
    return (0, value, str(label)) if value is not None else (1, 0.0, str(label))


def over_seeds(records: list[dict]) -> list[dict]:
    """One record per (job without seed, metric): several seeds become mean ± std over seeds."""
    cells: dict[tuple, list[dict]] = {}
    for r in records:
        cells.setdefault((row_label(r), r["task"], r["metric"], str(r["sparsity"]), r["model"], r["weights"],
                          r.get("suite", "")), []).append(r)
    merged = []
    for rows in cells.values():
        if len(rows) == 1:
            merged.append(rows[0])
            continue
        values = [r["value"] for r in rows]
        mean = sum(values) / len(values)
        std = math.sqrt(sum((v - mean) ** 2 for v in values) / (len(values) - 1))
        merged.append({**rows[0], "value": mean, "stderr": std, "seeds": sorted(r["seed"] for r in rows),
                       "achieved_heads": _mean([r.get("achieved_heads") for r in rows]),
                       "achieved_neurons": _mean([r.get("achieved_neurons") for r in rows])})
    return merged


def _mean(values):
    values = [v for v in values if v is not None]
    return sum(values) / len(values) if values else None


def groups(records: list[dict]) -> dict[tuple, list[dict]]:
    out: dict[tuple, list[dict]] = {}
    for record in records:
        out.setdefault((record["model"], record["weights"], record.get("suite", "")), []).append(record)
    return out


def frame(records: list[dict], value_of=lambda r: cell(r["value"], r.get("stderr"))) -> pd.DataFrame:
    """The pivot: rows method labels (dense first), columns (task, sparsity)."""
    metrics_per_task: dict[str, set] = {}
    for r in records:
        metrics_per_task.setdefault(r["task"], set()).add(r["metric"])
    multi = {task for task, metrics in metrics_per_task.items() if len(metrics) > 1}
    rows = {}
    for r in records:
        rows[(row_label(r), (column_label(r, multi), str(r["sparsity"])))] = value_of(r)
    row_order = list(dict.fromkeys(row_label(r) for r in sorted(records, key=lambda r: r["method"] != "dense")))
    task_order = list(dict.fromkeys(column_label(r, multi) for r in records))
    columns = sorted({c for _, c in rows}, key=lambda c: (task_order.index(c[0]), _sparsity_key(c[1])))
    table = pd.DataFrame("", index=pd.Index(row_order, name="method"),
                         columns=pd.MultiIndex.from_tuples(columns, names=["task", "sparsity"]))
    for (row, column), value in rows.items():
        table.loc[row, column] = value
    return table


def header(model: str, weights: str, suite: str, records: list[dict]) -> str:
    metrics = sorted({r["metric"] for r in records})
    text = f"model: {model} · weights: {weights} · suite: {suite} · metrics: {', '.join(metrics)}"
    seeds = {len(r["seeds"]) for r in records if "seeds" in r}
    if seeds:
        text += f" · seeded methods: mean ± std over {'/'.join(map(str, sorted(seeds)))} seeds"
    return text


def achieved_cell(record: dict) -> str:
    parts = []
    for unit, short in (("heads", "h"), ("neurons", "n")):
        requested, achieved = record.get(f"sparsity_{unit}") or 0.0, record.get(f"achieved_{unit}")
        if requested or achieved:
            parts.append(f"{short} {requested:.2f}→{achieved:.3f}" if achieved is not None else f"{short} {requested:.2f}→–")
    return " / ".join(parts) or "0"


def flat_columns(table: pd.DataFrame) -> pd.DataFrame:
    """One header row for markdown: `task @ sparsity`."""
    table = table.copy()
    table.columns = [f"{task} @ {sparsity}" for task, sparsity in table.columns]
    return table


def markdown(records: list[dict], failures: list[dict] = ()) -> str:
    blocks = []
    for (model, weights, suite), rows in groups(over_seeds(records)).items():
        blocks.append(f"## {header(model, weights, suite, rows)}\n")
        blocks.append(flat_columns(frame(rows)).to_markdown() + "\n")
        first_per_cell = list({(row_label(r), r["task"], str(r["sparsity"])): r for r in rows}.values())
        achieved = frame(first_per_cell, value_of=achieved_cell)
        blocks.append("Requested → achieved sparsity (fraction of heads h / neurons n skipped per token):\n")
        blocks.append(flat_columns(achieved).to_markdown() + "\n")
        notes = fidelity_notes(rows)
        if notes:
            blocks.append(notes + "\n")
    if failures:
        blocks.append("## Failed jobs\n")
        for job in failures:
            spec = job.get("spec", {})
            blocks.append(f"- {spec.get('method')} sparsity {spec.get('sparsity')} task {spec.get('task')}: "
                          f"{job.get('error', 'unknown error')}")
        blocks.append("")
    return "\n".join(blocks) if blocks else "No records yet.\n"


def _latex_escape(text: str) -> str:
    for old, new in (("\\", r"\textbackslash{}"), ("_", r"\_"), ("%", r"\%"), ("&", r"\&"), ("#", r"\#")):
        text = text.replace(old, new)
    return text.replace("±", r"$\pm$").replace("→", r"$\to$").replace("–", "--").replace("·", r"$\cdot$")


def fidelity_notes(records: list[dict]) -> str:
    """Footnotes (†) for tasks whose data is not exactly lm-eval's (see harness/lmeval.py)."""
    notes = {}
    for r in records:
        if r.get("fidelity") not in (None, "exact"):
            notes.setdefault(r["task"], f"{r['fidelity']}: {r.get('fidelity_note', '')}")
    return "\n".join(f"- † {task}: {note}" for task, note in sorted(notes.items()))


def latex(records: list[dict]) -> str:
    blocks = []
    for (model, weights, suite), rows in groups(over_seeds(records)).items():
        table = frame(rows)
        table = table.map(_latex_escape)
        table.index = [_latex_escape(i) for i in table.index]
        table.index.name = "method"
        table.columns = pd.MultiIndex.from_tuples([(_latex_escape(t), s) for t, s in table.columns],
                                                  names=["task", "sparsity"])
        caption = _latex_escape(header(model, weights, suite, rows))
        blocks.append(table.style.to_latex(hrules=True, multicol_align="c", caption=caption,
                                           position="ht", position_float="centering"))
    return "\n".join(blocks) if blocks else "% no records yet\n"


def plots(records: list[dict], out_dir: Path) -> list[Path]:
    """Metric vs requested sparsity, one line per method, for every (model, suite, task, metric) with ≥2 levels."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    written = []
    for (model, weights, suite), rows in groups(over_seeds(records)).items():
        for (task, metric) in dict.fromkeys((r["task"], r["metric"]) for r in rows):
            points = [r for r in rows if r["task"] == task and r["metric"] == metric]
            levels = {r["sparsity"] for r in points if r["method"] != "dense"}
            numeric = all(sparsity_value(level) is not None for level in levels)
            if len(levels) < 2 or not numeric:
                continue
            heads_only = all(str(level).startswith("h") for level in levels) and all(r.get("model_heads") for r in points)

            def x_of(r):
                value = sparsity_value(r["sparsity"])
                return value * r["model_heads"] if heads_only else value

            fig, ax = plt.subplots(figsize=(5.5, 3.8))
            for label in dict.fromkeys(row_label(r) for r in points):
                series = sorted((x_of(r), r["value"], r.get("stderr")) for r in points if row_label(r) == label)
                if all(s == 0 for s, _, _ in series) and len(series) == 1:
                    ax.axhline(series[0][1], linestyle="--", color="black", label=label)
                    continue
                xs, ys = [s for s, _, _ in series], [v for _, v, _ in series]
                errs = [e if e is not None else 0.0 for _, _, e in series]
                ax.errorbar(xs, ys, yerr=errs, marker="o", capsize=3, label=label)
            ax.set_xlabel("skipped heads per layer" if heads_only else "requested sparsity")
            ax.set_ylabel(metric)
            if metric == "ppl":
                ax.set_yscale("log")
            ax.set_title(f"{task} · {model} ({weights})", fontsize=10)
            ax.legend(fontsize=8)
            seeded = any("seeds" in r for r in points)
            fig.text(0.01, 0.005, "error bars: std over seeds (seeded methods), stderr over windows/examples (others)"
                     if seeded else "error bars: stderr over windows/examples", fontsize=6, color="dimgray")
            fig.tight_layout(rect=(0, 0.03, 1, 1))
            path = out_dir / f"plot_{suite}_{model}_{task}_{metric}.png".replace("/", "_")
            fig.savefig(path, dpi=120)
            plt.close(fig)
            written.append(path)
    return written


def quality_table(jobs: list[dict]) -> str:
    """Predictor quality of every fitted predictor (mean over layers; global = one ranking over all layers)."""
    rows, seen = [], set()
    for job in jobs:
        quality, spec = job.get("predictor_quality"), job.get("spec", {})
        key = (spec.get("method"), spec.get("sparsity"), spec.get("seed"))
        if not quality or key in seen:  # the jobs of several tasks share one predictor and one report
            continue
        seen.add(key)
        for unit in ("heads", "neurons"):
            if unit not in quality:
                continue
            mean, overall = quality[unit]["mean"], quality[unit].get("global", {})
            cost = quality.get("predictor") or quality[unit].get("predictor") or {}
            rows.append({"method": spec.get("method"), "sparsity": spec.get("sparsity"), "seed": spec.get("seed"),
                         "unit": unit, "recall": mean.get("recall"), "precision": mean.get("precision"),
                         "spearman": mean.get("spearman"), "global spearman": overall.get("spearman"),
                         "predictor params": cost.get("params"), "predictor FLOPs/token": cost.get("flops_per_token"),
                         "model FLOPs/token": (quality.get("model") or {}).get("flops_per_token")})
    if not rows:
        return ""
    table = pd.DataFrame(rows).sort_values(["method", "sparsity", "seed", "unit"])
    text = table.to_markdown(index=False, floatfmt=".3f")
    return ("## Predictor quality (held-out calibration tokens: recall/precision of the kept set vs the oracle set, "
            "Spearman ρ of predicted vs true importance)\n\n" + text + "\n")


def write_tables(run_dir: Path, records: list[dict], failures: list[dict] = (), formats=FORMATS,
                 jobs: list[dict] = ()) -> list[Path]:
    run_dir = Path(run_dir)
    written = []
    if "md" in formats:
        quality = quality_table(jobs)
        write_atomic(run_dir / "table.md", markdown(records, failures) + ("\n" + quality if quality else ""))
        written.append(run_dir / "table.md")
    if "latex" in formats:
        write_atomic(run_dir / "table.tex", latex(records))
    if "md" in formats and any(r.get("task") == "decode" for r in records):
        from harness.latency import latency_markdown  # the latency table: one row per method · engine

        write_atomic(run_dir / "latency.md", latency_markdown(records))
        written.append(run_dir / "latency.md")
        written.append(run_dir / "table.tex")
    written += plots(records, run_dir)
    return written
