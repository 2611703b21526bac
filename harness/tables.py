"""Tables and plots from records: one table per (model, weights, suite), rows = methods (with variant
and any non-default scope/allocation), columns = (task metric, sparsity), cells = value ± spread.

What a reader can rely on: every column names its metric; every ± is labelled in its column header, either
the std over seeds (seeded methods run with several seeds) or the stderr over the n windows/examples of one
job, and a column never mixes the two; a ± is shown only when it is computed from more than one seed or
window; all numbers of a table share one fixed-point format; cells without a number and NaNs in the
predictor report are explained under the table."""
from __future__ import annotations

import math
from pathlib import Path

import pandas as pd

from harness.store import write_atomic

FORMATS = ("md", "latex")
MISSING = "–"


def row_label(record: dict) -> str:
    label = record.get("method_label") or record["method"]
    tags = []
    if record.get("scope", "token") != "token":
        tags.append(f"scope={record['scope']}")
    if record.get("allocation", "local") != "local" and record.get("method") != "dense":
        tags.append(record["allocation"])
    return f"{label} [{', '.join(tags)}]" if tags else label


def column_label(record: dict) -> str:
    """`task metric`, with † when the task's data is not exactly lm-eval's."""
    return f"{record['task']} {record['metric']}" + ("†" if record.get("fidelity") not in (None, "exact") else "")


def _finite(value) -> bool:
    return value is not None and not (isinstance(value, float) and math.isnan(value))


def spread(record: dict) -> tuple[str | None, float | None]:
    """('seeds', std over seeds) for a record merged over several seeds, ('stderr', stderr) for one job whose
    stderr comes from n > 1 windows/examples, else (None, None)."""
    if len(record.get("seeds", ())) > 1:
        return "seeds", record.get("stderr")
    if _finite(record.get("stderr")) and (record.get("n") or 0) > 1:
        return "stderr", record["stderr"]
    return None, None


def decimals(numbers) -> int:
    """One fixed-point format for a whole table: enough decimals (2 to 4) that its smallest non-zero number
    keeps two significant digits."""
    magnitudes = [abs(x) for x in numbers if _finite(x) and not math.isinf(x) and x != 0]
    if not magnitudes:
        return 2
    return max(2, min(4, math.ceil(-math.log10(min(magnitudes))) + 1))


def number(value, places: int) -> str:
    return f"{value:.{places}f}" if _finite(value) else MISSING


def cell(value, pm, places: int) -> str:
    """`value ± pm` in the table's format (`pm` None: the value alone)."""
    text = number(value, places)
    return f"{text} ± {number(pm, places)}" if _finite(pm) and _finite(value) else text


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
                       "achieved_neurons": _mean([r.get("achieved_neurons") for r in rows]),
                       **({"achieved_inputs": _mean([r.get("achieved_inputs") for r in rows])}
                          if any("achieved_inputs" in r for r in rows) else {})})
    return merged


def _mean(values):
    values = [v for v in values if v is not None]
    return sum(values) / len(values) if values else None


def groups(records: list[dict]) -> dict[tuple, list[dict]]:
    out: dict[tuple, list[dict]] = {}
    for record in records:
        out.setdefault((record["model"], record["weights"], record.get("suite", "")), []).append(record)
    return out


class Column:
    """What one column's ± means: the std over k seeds, or the stderr over n windows/examples (or none)."""

    def __init__(self, rows: list[dict]):
        kinds = {kind for kind in (spread(r)[0] for r in rows) if kind}
        self.kind = "seeds" if "seeds" in kinds else ("stderr" if kinds else None)
        if self.kind == "seeds":
            counts = sorted({len(r["seeds"]) for r in rows if len(r.get("seeds", ())) > 1})
            self.label = f"± std over {'/'.join(map(str, counts))} seeds"
        elif self.kind == "stderr":
            counts = sorted({r["n"] for r in rows if spread(r)[0] == "stderr"})
            self.label = f"± stderr, n={'/'.join(map(str, counts))}"
        else:
            self.label = ""

    def pm(self, record: dict):
        kind, value = spread(record)
        return value if kind == self.kind else None


def frame(records: list[dict], value_of=None, column_of=column_label) -> pd.DataFrame:
    """The pivot: rows method labels (dense first), columns (column_of(record), sparsity, ± label).
    `value_of(record, pm)` makes a cell; by default `value ± pm` in the table's one number format."""
    columns: dict[tuple, list[dict]] = {}
    for r in records:
        columns.setdefault((column_of(r), str(r["sparsity"])), []).append(r)
    meaning = {key: Column(rows) for key, rows in columns.items()}
    if value_of is None:
        places = decimals([r["value"] for r in records] + [meaning[(column_of(r), str(r["sparsity"]))].pm(r)
                                                           for r in records])
        value_of = lambda r, pm: cell(r["value"], pm, places)  # noqa: E731
    row_order = list(dict.fromkeys(row_label(r) for r in sorted(records, key=lambda r: r["method"] != "dense")))
    task_order = list(dict.fromkeys(column_of(r) for r in records))
    keys = sorted(columns, key=lambda c: (task_order.index(c[0]), _sparsity_key(c[1])))
    index = pd.MultiIndex.from_tuples([(*key, meaning[key].label) for key in keys], names=["task", "sparsity", "±"])
    table = pd.DataFrame("", index=pd.Index(row_order, name="method"), columns=index)
    for key in keys:
        for r in columns[key]:
            table.loc[row_label(r), (*key, meaning[key].label)] = value_of(r, meaning[key].pm(r))
    return table


def header(model: str, weights: str, suite: str, records: list[dict]) -> str:
    metrics = sorted({r["metric"] for r in records})
    text = f"model: {model} · weights: {weights} · suite: {suite} · metrics: {', '.join(metrics)}"
    seeds = {len(r["seeds"]) for r in records if "seeds" in r}
    if seeds:
        text += f" · seeded methods: mean ± std over {'/'.join(map(str, sorted(seeds)))} seeds"
    formats = sorted({r["predictor_weights"] for r in records if r.get("predictor_weights", "model") != "model"})
    if formats:
        text += f" · predictor weights: {'/'.join(formats)} (per-row scales, fake-quantized)"
    if any(r.get("data_verified") is False for r in records):
        text += " · data not verified against its manifest (--no-verify)"
    return text


def table_notes(records: list[dict]) -> list[str]:
    """What a reader needs to read the cells: one-value rows in columns of seed spreads, missing numbers."""
    notes = []
    columns: dict[tuple, list[dict]] = {}
    for r in records:
        columns.setdefault((column_label(r), str(r["sparsity"])), []).append(r)
    single = sorted({row_label(r) for rows in columns.values() if Column(rows).kind == "seeds"
                     for r in rows if len(r.get("seeds", ())) <= 1})
    if single:
        one = len(single) == 1
        notes.append(f"- {', '.join(single)}: {'does' if one else 'do'} not depend on the seed, so "
                     f"{'it' if one else 'each'} ran once and shows one value in the columns of std over seeds (its "
                     "stderr over windows/examples is in records.jsonl)")
    if any(not _finite(r["value"]) for r in records):
        notes.append(f"- {MISSING}: the job produced no finite number for this metric (NaN: e.g. a loss that "
                     "overflowed); see its record in records.jsonl")
    return notes


def achieved_cell(record: dict, pm=None) -> str:
    parts = []
    for unit, short in (("heads", "h"), ("neurons", "n"), ("inputs", "i")):  # i: linear-layer inputs (TEAL, WINA)
        requested, achieved = record.get(f"sparsity_{unit}") or 0.0, record.get(f"achieved_{unit}")
        if requested or achieved:
            parts.append(f"{short} {requested:.3f}→{number(achieved, 3)}")
    return " / ".join(parts) or f"{0:.3f}"


def flat_columns(table: pd.DataFrame, spreads: bool = True) -> pd.DataFrame:
    """One header row for markdown: `task metric @ sparsity (± label)`."""
    table = table.copy()
    table.columns = [f"{task} @ {sparsity}" + (f" ({pm})" if pm and spreads else "")
                     for task, sparsity, pm in table.columns]
    return table


def markdown(records: list[dict], failures: list[dict] = ()) -> str:
    blocks = []
    for (model, weights, suite), rows in groups(over_seeds(records)).items():
        blocks.append(f"## {header(model, weights, suite, rows)}\n")
        blocks.append(flat_columns(frame(rows)).to_markdown(disable_numparse=True) + "\n")
        notes = table_notes(rows) + fidelity_notes(rows)
        if notes:
            blocks.append("\n".join(notes) + "\n")
        first_per_cell = list({(row_label(r), r["task"], str(r["sparsity"])): r for r in rows}.values())
        achieved = frame(first_per_cell, value_of=achieved_cell, column_of=lambda r: r["task"])
        inputs = any(r.get("sparsity_inputs") or r.get("achieved_inputs") for r in rows)
        blocks.append("Requested → achieved sparsity (fraction of heads h / neurons n"
                      + (" / linear-layer weight columns i (input entries, weighted by parameters)" if inputs else "")
                      + " skipped per token):\n")
        blocks.append(flat_columns(achieved, spreads=False).to_markdown(disable_numparse=True) + "\n")
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


def fidelity_notes(records: list[dict]) -> list[str]:
    """Footnotes (†) for tasks whose data is not exactly lm-eval's (see harness/lmeval.py)."""
    notes = {}
    for r in records:
        if r.get("fidelity") not in (None, "exact"):
            notes.setdefault(r["task"], f"{r['fidelity']}: {r.get('fidelity_note', '')}")
    return [f"- † {task}: {note}" for task, note in sorted(notes.items())]


def latex(records: list[dict]) -> str:
    blocks = []
    for (model, weights, suite), rows in groups(over_seeds(records)).items():
        table = frame(rows)
        table = table.map(_latex_escape)
        table.index = [_latex_escape(i) for i in table.index]
        table.index.name = "method"
        table.columns = pd.MultiIndex.from_tuples([(_latex_escape(t), s, _latex_escape(pm)) for t, s, pm in table.columns],
                                                  names=["task", "sparsity", "±"])
        caption = _latex_escape(". ".join([header(model, weights, suite, rows)]
                                          + [note.removeprefix("- ") for note in table_notes(rows)]))
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
                series = sorted((x_of(r), r["value"], spread(r)[1]) for r in points if row_label(r) == label)
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
            kinds = {spread(r)[0] for r in points} - {None}
            bars = {"seeds": "std over seeds (seeded methods)", "stderr": "stderr over windows/examples"}
            fig.text(0.01, 0.005, "error bars: " + (", ".join(bars[k] for k in sorted(kinds)) or "none (one seed, "
                     "one window)"), fontsize=6, color="dimgray")
            fig.tight_layout(rect=(0, 0.03, 1, 1))
            path = out_dir / f"plot_{suite}_{model}_{task}_{metric}.png".replace("/", "_")
            fig.savefig(path, dpi=120)
            plt.close(fig)
            written.append(path)
    return written


QUALITY_NOTE = (f"{MISSING} in a Spearman column: not defined for that predictor. Predictors trained on keep/skip "
                "labels (Deja Vu, timewise) output a set, not an importance ranking, so only recall and precision "
                "apply; the global ρ (one ranking over all layers' units) exists only for predictors of importance.")


def quality_table(jobs: list[dict]) -> str:
    """Predictor quality of every fitted predictor (mean over layers; global = one ranking over all layers);
    fractions and correlations with 3 decimals, parameters and FLOPs in millions with 3 decimals."""
    rows, seen = [], set()

    def fixed(value, scale=1.0):
        return f"{value / scale:.3f}" if _finite(value) else MISSING

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
                         "unit": unit, "recall": fixed(mean.get("recall")), "precision": fixed(mean.get("precision")),
                         "spearman ρ": fixed(mean.get("spearman")), "global spearman ρ": fixed(overall.get("spearman")),
                         "predictor params (M)": fixed(cost.get("params"), 1e6),
                         "predictor MFLOPs/token": fixed(cost.get("flops_per_token"), 1e6),
                         "model MFLOPs/token": fixed((quality.get("model") or {}).get("flops_per_token"), 1e6)})
    if not rows:
        return ""
    table = pd.DataFrame(rows).sort_values(["method", "sparsity", "seed", "unit"])
    text = table.to_markdown(index=False, disable_numparse=True)
    note = QUALITY_NOTE if any(MISSING in (r["spearman ρ"], r["global spearman ρ"]) for r in rows) else ""
    return ("## Predictor quality (held-out calibration tokens: recall/precision of the kept set vs the oracle set, "
            "Spearman ρ of predicted vs true importance)\n\n" + text + "\n" + (f"\n{note}\n" if note else ""))


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
