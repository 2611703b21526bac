"""Tables a reader can trust: a metric name on every column, every ± labelled (std over seeds or stderr over n)
and shown only when n > 1, one kind of ± per column, one number format per table, NaN explained."""
import math
import re

from harness.tables import latex, markdown, quality_table


def record(method, sparsity, value, stderr=None, n=2, seed=0, task="wikitext2", metric="ppl"):
    return {"method": method, "method_label": method, "sparsity": sparsity, "seed": seed, "value": value,
            "stderr": stderr, "n": n, "task": task, "metric": metric, "model": "tiny", "weights": "pretrained",
            "suite": "t", "sparsity_heads": float(sparsity), "sparsity_neurons": 0.0,
            "achieved_heads": float(sparsity), "achieved_neurons": 0.0}


RECORDS = [
    record("dense", "0", 27.5, 0.41),
    record("random", "0.5", 120.3, 3.1, seed=0), record("random", "0.5", 125.1, 3.3, seed=1),
    record("random", "0.5", 118.0, 2.9, seed=2),
    record("norm-mask", "0.5", 40.2, 0.8), record("norm-mask", "0.25", 31.2, 0.6),
    record("dense", "0", 0.531, 0.0123, n=100, task="piqa", metric="acc"),
    record("dense", "0", 0.5, 0.3, n=1, task="copa", metric="acc"),
    record("dense", "0", math.nan, None, n=100, task="piqa", metric="acc_norm"),
]


def main_table(text: str) -> list[str]:
    lines = text.split("\n\n")[1].splitlines()
    return lines


def test_columns_name_their_metric_and_their_spread():
    header = main_table(markdown(RECORDS))[0]
    columns = [c.strip() for c in header.strip("|").split("|")][1:]
    assert columns == ["wikitext2 ppl @ 0 (± stderr, n=2)", "wikitext2 ppl @ 0.25 (± stderr, n=2)",
                       "wikitext2 ppl @ 0.5 (± std over 3 seeds)", "piqa acc @ 0 (± stderr, n=100)",
                       "copa acc @ 0", "piqa acc_norm @ 0"]


def test_one_kind_of_spread_per_column_and_none_from_a_single_window():
    rows = {line.split("|")[1].strip(): [c.strip() for c in line.strip("|").split("|")[1:]]
            for line in main_table(markdown(RECORDS))[2:]}
    assert rows["random"][2] == "121.133 ± 3.623"  # mean ± std over the 3 seeds, not a stderr
    assert rows["norm-mask"][2] == "40.200"  # seed-independent: one value in the column of seed spreads
    assert rows["norm-mask"][1] == "31.200 ± 0.600"  # its own column: the stderr over 2 windows
    assert rows["dense"][4] == "0.500", "n = 1: no ±"
    assert rows["dense"][3] == "0.531 ± 0.012"
    text = markdown(RECORDS)
    assert "norm-mask: does not depend on the seed" in text


def test_one_number_format_per_table():
    numbers = re.findall(r"\d+\.\d+", "\n".join(main_table(markdown(RECORDS))[2:]))
    assert numbers and {len(n.split(".")[1]) for n in numbers} == {3}
    large = [record("dense", "0", 51234.5678, 1234.5), record("random", "0.5", 9.87654, 0.5)]
    numbers = re.findall(r"\d+\.\d+", "\n".join(main_table(markdown(large))[2:]))
    assert sorted(numbers) == sorted(["51234.57", "1234.50", "9.88", "0.50"]), "no exponent notation, 2 decimals"


def test_nan_is_explained():
    text = markdown(RECORDS)
    assert "| –" in text and "–: the job produced no finite number" in text
    assert "no finite number" not in markdown(RECORDS[:2])
    report = quality_table([{"spec": {"method": "dejavu", "sparsity": "0.5", "seed": 0},
                             "predictor_quality": {"heads": {"mean": {"recall": 0.9, "precision": 0.8}},
                                                   "predictor": {"params": 262144, "flops_per_token": 524288},
                                                   "model": {"flops_per_token": 1.2e8}}}])
    assert "nan" not in report.lower() and "| –" in report and "not defined for that predictor" in report
    assert "0.262" in report and "120.000" in report  # params and FLOPs in millions, the table's one format


def test_latex_labels_the_spread_in_a_header_row():
    text = latex(RECORDS)
    assert r"$\pm$ std over 3 seeds" in text and r"$\pm$ stderr, n=2" in text
    assert "121.133 $\\pm$ 3.623" in text and "no finite number" in text
    assert not re.search(r"&\s*nan\s*(&|\\\\)", text.lower()) and "& -- " in text
