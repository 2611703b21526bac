"""GPU checks of the Ray executor on one machine with 2 GPUs (issue 6). Run from the repository root:

    python -m harness.tools.gpu_checks_distributed --data-dir DATA --out DIR

(a) the small sweep (suites/sweeps/small.yaml: 7 jobs, one shared fit) spreads its jobs over both GPUs,
    and every job's record names its GPU;
(b) an OPT-13B random-weight perplexity job (dense and norm-mask 0.5, 2 windows of 2048 tokens) sharded
    over 2 GPUs gives the same perplexity as on one GPU;
(c) throughput: 8 equal jobs (random 0.5, seeds 0-7, OPT-6.7B, `--windows` windows) on 2 GPUs take at
    most 0.6x the wall time they take on 1 GPU (cluster start excluded; actor start, model loading and
    tokenization included).
Prints a table and writes report.md and checks.json to --out. Exit code 1 when a check fails.
"""
from __future__ import annotations

import argparse
import json
import os
import sys
import tempfile
import time
from pathlib import Path

for key, value in {"RAY_USAGE_STATS_ENABLED": "0", "RAY_AUTH_MODE": "disabled", "HF_HUB_OFFLINE": "1",
                   "TOKENIZERS_PARALLELISM": "false", "NCCL_NVLS_ENABLE": "0",
                   "TORCH_SYMM_MEM_DISABLE_MULTICAST": "1", "NVSHMEM_DISABLE_NVLS": "1"}.items():
    os.environ.setdefault(key, value)

from harness.data import REPO_ROOT  # noqa: E402

os.environ["PYTHONPATH"] = os.pathsep.join(p for p in (str(REPO_ROOT), os.environ.get("PYTHONPATH")) if p)


class UI:
    """A quiet executor UI: one line per finished job."""

    def start(self, total, skipped):
        print(f"  {total} jobs, {skipped} already done", flush=True)

    def job_finished(self, job, result):
        values = ", ".join(f"{r['metric']}={r['value']:.6g}" for r in result.get("records", []))
        where = (result.get("placement") or {}).get("gpus")
        print(f"  {result['status']} {job.method} @ {job.sparsity} seed {job.seed} gpus {where}: "
              f"{values or result.get('error')}", flush=True)


def run_config(root: Path, name: str, overrides: dict, data_dir, cache_dir, executor):
    """One run (a Unit) through the Ray executor; returns (records, failures, seconds)."""
    from harness.artefacts import ArtefactCache
    from harness.suites import build_config
    from harness.executors import Unit
    from harness.runner import Session
    from harness.spec import config_dict
    from harness.store import RunStore

    config = build_config("perplexity", overrides)
    from harness.validate import prepare

    prepared = prepare(config, data_dir, None, cache_dir=cache_dir)
    data, identity, jobs = prepared.data, prepared.identity, prepared.jobs
    store = RunStore(root / name)
    store.claim(identity, config_dict(config))
    session = Session(config, data, ArtefactCache(cache_dir, log=print), None, log=print)
    session.run_dir = store.root
    clock = time.perf_counter()
    summary = executor.run_units([Unit(session, store, jobs)], UI())
    seconds = time.perf_counter() - clock
    return store.records(), store.failures(), seconds, summary


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--data-dir", default=None)
    parser.add_argument("--out", default=os.environ.get("OUT") or str(REPO_ROOT / "results" / "gpu-checks-distributed"))
    parser.add_argument("--windows", type=int, default=160, help="(c): perplexity windows per job (stride 512)")
    parser.add_argument("--throughput-model", default="opt-6.7b")
    parser.add_argument("--sharded-model", default="opt-13b", help="(b): the model sharded over 2 GPUs")
    parser.add_argument("--skip", default="", help="comma-separated checks to skip: a, b, c")
    args = parser.parse_args(argv)
    skip = set(filter(None, args.skip.split(",")))
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    work = Path(tempfile.mkdtemp(prefix="gpu-checks-"))
    cache_dir = work / "cache"

    import ray
    import torch

    from harness.executors import RayExecutor
    from harness.sweep import build_units, claim, load_sweep, write_sweep_tables

    gpus = torch.cuda.device_count()
    print(f"torch {torch.__version__}, {gpus} GPUs: {[torch.cuda.get_device_name(i) for i in range(gpus)]}, "
          f"ray {ray.__version__}", flush=True)
    rows, checks = [], {}
    started = time.perf_counter()

    def flush():  # after every check: a run stopped at its time limit still leaves what it found
        lines = ["| check | result | verdict |", "| --- | --- | --- |"] + [f"| {a} | {b} | {c} |" for a, b, c in rows]
        report = ["# Ray executor on 2×GPU: checks", "",
                  f"torch {torch.__version__}, ray {ray.__version__}, GPUs: "
                  f"{[torch.cuda.get_device_name(i) for i in range(gpus)]}, {time.perf_counter() - started:.0f} s", "",
                  "Command: `python -m harness.tools.gpu_checks_distributed " + " ".join(argv or sys.argv[1:]) + "`", "",
                  *lines, ""]
        (out / "report.md").write_text("\n".join(report))
        (out / "checks.json").write_text(json.dumps(checks, indent=1, default=str))
    ray.init(num_gpus=2, include_dashboard=False, log_to_driver=False)
    executor = RayExecutor(retries=1)

    if "a" not in skip:  # the small sweep over both GPUs
        print("(a) small sweep on 2 GPUs", flush=True)
        spec = load_sweep(REPO_ROOT / "suites" / "sweeps" / "small.yaml")
        sweep_dir = work / "sweep-small"
        units = build_units(spec, sweep_dir, args.data_dir, None, cache_dir, log=print)
        claim(sweep_dir, spec, units)
        clock = time.perf_counter()
        summary = executor.run_units(units, UI())
        seconds = time.perf_counter() - clock
        write_sweep_tables(sweep_dir)
        records = [r for u in units for r in u.store.records()]
        used = sorted({g for r in records for g in r.get("gpus", [])})
        ok = summary.failed == 0 and len(records) == 7 and len(used) == 2 and all(len(r["gpus"]) == 1 for r in records)
        checks["a"] = {"ok": ok, "jobs": len(records), "failed": summary.failed, "gpus_used": used,
                       "jobs_per_gpu": {g: sum(r["gpus"] == [g] for r in records) for g in used},
                       "seconds": round(seconds, 1)}
        rows.append(("(a) sweep spreads over both GPUs", f"{len(records)} jobs, per GPU {checks['a']['jobs_per_gpu']}",
                     "PASS" if ok else "FAIL"))
        (out / "sweep_table.md").write_text((sweep_dir / "table.md").read_text())
        flush()

    if "b" not in skip:  # OPT-13B sharded vs one GPU
        print(f"(b) {args.sharded_model} random weights, 1 GPU vs sharded over 2", flush=True)
        overrides = dict(model=args.sharded_model, weights="random", methods=["dense", "norm-mask"], sparsity=["0.5"],
                         tasks=["wikitext2"], limit=2)
        results = {}
        for count in (1, 2):
            executor.gpus_per_job = count
            records, failures, seconds, _ = run_config(work, f"opt13b-{count}gpu", overrides, args.data_dir,
                                                       cache_dir, executor)
            results[count] = {"records": {r["method"]: r for r in records}, "failures": failures, "seconds": seconds}
        executor.gpus_per_job = None
        detail, ok = {}, not results[1]["failures"] and not results[2]["failures"]
        for method in ("dense", "norm-mask"):
            one, two = results[1]["records"].get(method), results[2]["records"].get(method)
            if one is None or two is None:
                ok = False
                continue
            rel = abs(one["value"] - two["value"]) / abs(one["value"])
            same_masks = all(abs((one[k] or 0.0) - (two[k] or 0.0)) < 1e-9 for k in ("achieved_heads", "achieved_neurons"))
            ok = ok and rel < 1e-3 and same_masks and two["sharding"] is not None and len(two["gpus"]) == 2
            detail[method] = {"ppl_1gpu": one["value"], "ppl_2gpu": two["value"], "rel_diff": rel,
                              "achieved_1gpu": [one["achieved_heads"], one["achieved_neurons"]],
                              "achieved_2gpu": [two["achieved_heads"], two["achieved_neurons"]],
                              "gpus_2gpu": two["gpus"], "sharding": two["sharding"]}
            rows.append((f"(b) {args.sharded_model} {method} ppl 1 GPU vs 2", f"{one['value']:.6g} vs {two['value']:.6g} "
                         f"(rel {rel:.1e}), layers {two['sharding'] and two['sharding']['layers_per_device']}",
                         "PASS" if ok else "FAIL"))
        checks["b"] = {"ok": ok, "methods": detail, "failures": [f.get("error") for r in results.values()
                                                                 for f in r["failures"]],
                       "seconds": {count: round(r["seconds"], 1) for count, r in results.items()}}
        flush()

    if "c" not in skip:  # throughput: 8 equal jobs on 2 GPUs vs 1
        print(f"(c) 8 equal jobs ({args.throughput_model}, {args.windows} windows each) on 2 GPUs, then 1", flush=True)
        overrides = dict(model=args.throughput_model, weights="random", methods=["random"], sparsity=["0.5"],
                         tasks=["wikitext2"], limit=args.windows, stride=512, seed=list(range(8)))
        _, fail2, two, _ = run_config(work, "throughput-2gpu", overrides, args.data_dir, cache_dir, executor)
        checks["c"] = {"ok": False, "seconds_2gpu": round(two, 1), "note": "1-GPU run not finished"}
        flush()
        ray.shutdown()
        ray.init(num_gpus=1, include_dashboard=False, log_to_driver=False)
        _, fail1, one, _ = run_config(work, "throughput-1gpu", overrides, args.data_dir, cache_dir, executor)
        ratio = two / one
        ok = ratio <= 0.6 and not fail1 and not fail2
        checks["c"] = {"ok": ok, "seconds_1gpu": round(one, 1), "seconds_2gpu": round(two, 1), "ratio": round(ratio, 3),
                       "windows": args.windows, "model": args.throughput_model}
        rows.append(("(c) 8 jobs: 2 GPUs / 1 GPU wall time", f"{two:.1f} s / {one:.1f} s = {ratio:.2f} (≤ 0.6)",
                     "PASS" if ok else "FAIL"))
    ray.shutdown()

    width = max(len(r[0]) for r in rows) if rows else 10
    print("\n".join(f"{a:<{width}}  {c}  {b}" for a, b, c in rows), flush=True)
    flush()
    return 0 if checks and all(c["ok"] for c in checks.values()) else 1


if __name__ == "__main__":
    sys.exit(main())
