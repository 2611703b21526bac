"""GPU acceptance of the headline workload: every method on a large OPT (random weights, fp16) on one GPU with
the default settings, in one process.

    python -m harness.tools.acceptance --model opt-13b --out OUT [--windows 16] [--zero-shot-limit 200]

What it runs and prints (and writes to OUT/acceptance-<model>.json and .md):
  1. the fit estimate (host memory, artefact-cache disk, GPU memory) that `harness run` checks before a run;
  2. trace collection and criterion scores once (shared by every method), then each method's fit on its own
     (seconds after the traces), peak GPU memory, and the artefact cache's size by kind on disk;
  3. WikiText-2 perplexity windows (2048 tokens) through the harness for every method, as tokens/s against a
     plain Hugging Face forward pass of the same model over the same windows, timed before and after the
     methods in the same process (tokenization cached, outside both timings);
  4. zero-shot through lm-eval (offline task files, batch size "auto") for the predictor methods and dense,
     as examples/s against lm-eval's own `hf` model on the same tasks and limit;
  5. one window of each predictor method under torch.profiler (CUDA time by op), and the mask selection of a
     20480-wide row (the old torch.topk against the current kthvalue form).
A time budget (`--budget` seconds) stops the zero-shot part early; what did not run is listed as such.
"""
from __future__ import annotations

import argparse
import json
import os
import shutil
import time
from pathlib import Path

import torch

WINDOW = 2048
#: methods also evaluated with the torch selection (HARNESS_SELECT=torch) beside the default Triton kernel
SELECTION_COMPARED = ("dejavu", "random", "shadow")


T0 = time.perf_counter()


def log(message: str) -> None:
    """Print with the seconds since the script started (the fits' stage lines then give a timeline)."""
    print(f"[{time.perf_counter() - T0:6.1f}s] {message}", flush=True)


def sync() -> None:
    if torch.cuda.is_available():
        torch.cuda.synchronize()


def reset_peak() -> None:
    if torch.cuda.is_available():
        torch.cuda.reset_peak_memory_stats()


def peak_gb() -> float:
    return torch.cuda.max_memory_allocated() / 2**30 if torch.cuda.is_available() else 0.0


def plain_hf_tokens_per_s(model, ids: torch.Tensor, windows: int, seqlen: int = WINDOW) -> float:
    """A plain forward pass (logits) of every window, batch 1, as the perplexity task runs them."""
    device = next(model.parameters()).device
    batches = [ids[i * seqlen:(i + 1) * seqlen][None].to(device) for i in range(windows)]
    with torch.no_grad():
        model(input_ids=batches[0], use_cache=False)  # warm-up
        sync()
        start = time.perf_counter()
        for batch in batches:
            model(input_ids=batch, use_cache=False).logits
        sync()
    return windows * seqlen / (time.perf_counter() - start)


def checkpoint(report: dict, out: Path, name: str, cache_dir: Path, started: float, stage: str) -> None:
    """Write the report so far (json and md), after every stage: a call stopped by its timeout keeps what ran."""
    report["cache_gb"] = cache_sizes(cache_dir)
    report["elapsed_s"] = time.perf_counter() - started
    report["stage"] = stage
    (out / f"acceptance-{name}.json").write_text(json.dumps(report, indent=1, default=str))
    (out / f"acceptance-{name}.md").write_text(render(report))


def cache_sizes(root: Path) -> dict:
    sizes = {}
    for kind in sorted(p for p in root.iterdir() if p.is_dir()) if root.exists() else []:
        sizes[kind.name] = sum(f.stat().st_size for f in kind.rglob("*") if f.is_file()) / 2**30
    return sizes


def mask_selection_ms() -> dict:
    """One selection of (2048, 20480) fp16 scores, skip half: torch.topk (the engine's first form), the kthvalue
    form (HARNESS_SELECT=torch) and the Triton kernel, on spread scores and on a narrow range with many ties
    (what trained predictors give), with the masks compared."""
    from harness import selection
    from harness.engine import lowest_k_mask

    device = "cuda" if torch.cuda.is_available() else "cpu"
    dtype = torch.float16 if device == "cuda" else torch.float32
    spread = torch.randn(1, 2048, 20480, device=device).to(dtype)
    narrow = (3 + 0.01 * torch.randn(1, 2048, 20480, device=device)).to(dtype)
    skip = 10240

    def timed(fn):
        fn()
        sync()
        times = []
        for _ in range(10):
            start = time.perf_counter()
            fn()
            sync()
            times.append(time.perf_counter() - start)
        return sorted(times)[len(times) // 2] * 1e3

    def torch_form(scores):
        os.environ["HARNESS_SELECT"] = "torch"
        try:
            return lowest_k_mask(scores, skip)
        finally:
            os.environ.pop("HARNESS_SELECT")

    out = {}
    for label, scores in (("spread", spread), ("narrow", narrow)):
        def old(scores=scores):
            keep = torch.ones_like(scores, dtype=torch.bool)
            keep.scatter_(-1, torch.topk(scores.float(), skip, dim=-1, largest=False).indices, False)
            return keep

        out[f"{label}: torch.topk"] = timed(old)
        out[f"{label}: kthvalue form"] = timed(lambda scores=scores: torch_form(scores))
        if selection.available(scores):
            for warps in (4, 8, 16):
                out[f"{label}: Triton, {warps} warps"] = timed(
                    lambda scores=scores, warps=warps: selection.lowest_k_keep(scores, skip, num_warps=warps))
            out[f"{label}: Triton == kthvalue form"] = bool(torch.equal(selection.lowest_k_keep(scores, skip),
                                                                        torch_form(scores)))
    return out


def profile_window(session, job, ids) -> list[tuple[str, float]]:
    """CUDA time by op of one window under the job's method (top 12)."""
    from torch.profiler import ProfilerActivity, profile

    from harness.engine import MaskedEngine
    from methods import MethodSpec, get_method

    spec = MethodSpec.parse(job.method)
    ctx = session.fit_context(spec.name, job.seed)
    method = get_method(spec, ctx.settings)
    allocation = method.adjust(job.allocation(session.config))
    artefact = method.fit(ctx, allocation)
    policy = method.policy(ctx, allocation, artefact)
    window = ids[:WINDOW][None].to(session.device)
    with MaskedEngine(session.model, policy, allocation).applied(), torch.no_grad():
        session.model(input_ids=window, use_cache=False)
        sync()
        with profile(activities=[ProfilerActivity.CUDA, ProfilerActivity.CPU]) as prof:
            session.model(input_ids=window, use_cache=False)
            sync()
    rows = [(e.key, e.device_time_total / 1e3) for e in prof.key_averages()]
    with MaskedEngine(session.model, policy, allocation).applied(), torch.no_grad():
        issued, total = [], []
        for _ in range(3):  # when the host returns from the forward call, and when the GPU has finished it
            sync()
            start = time.perf_counter()
            session.model(input_ids=window, use_cache=False)
            issued.append(time.perf_counter() - start)
            sync()
            total.append(time.perf_counter() - start)
    timing = [("host issue ms (median of 3)", sorted(issued)[1] * 1e3), ("window ms", sorted(total)[1] * 1e3)]
    return timing + sorted(rows, key=lambda r: -r[1])[:12]


def main(argv=None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--model", default="opt-13b")
    parser.add_argument("--out", default=os.environ.get("OUT") or "results/acceptance")
    parser.add_argument("--data-dir", default=None)
    parser.add_argument("--cache-dir", default="/tmp/harness-acceptance-cache")
    parser.add_argument("--windows", type=int, default=16)
    parser.add_argument("--sparsity", default="0.5")
    parser.add_argument("--methods", default="dense,static,random,norm-mask,replace:head,replace:ranked,dejavu,shadow,"
                                             "timewise")
    parser.add_argument("--zero-shot-methods", default="dense,norm-mask,static,dejavu,shadow,timewise")
    parser.add_argument("--zero-shot-tasks", default="piqa,copa,openbookqa,winogrande,rte,hellaswag,arc_easy,"
                                                     "lambada_openai")
    parser.add_argument("--zero-shot-limit", type=int, default=200)
    parser.add_argument("--budget", type=float, default=540.0, help="seconds; the zero-shot part stops in time")
    parser.add_argument("--no-profile", action="store_true")
    parser.add_argument("--no-selection-compare", action="store_true",
                        help="skip the second evaluation of " + ", ".join(SELECTION_COMPARED) + " with HARNESS_SELECT=torch")
    parser.add_argument("--profile-methods", default="dejavu,shadow",
                        help="methods profiled on one window (CUDA time by op, host issue time)")
    parser.add_argument("--no-zero-shot", action="store_true")
    parser.add_argument("--method-settings", default="{}",
                        help='JSON of per-method settings, as a suite\'s method_settings, e.g. '
                             '\'{"shadow": {"examples": 300, "epochs": 10}}\' (recorded in the report)')
    parser.add_argument("--device", default="cuda", help="cpu only to check the script itself")
    args = parser.parse_args(argv)
    started = time.perf_counter()
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    cache_dir = Path(args.cache_dir)

    from harness.artefacts import ArtefactCache
    from harness.data import DataDir
    from harness.footprint import check_run
    from harness.models import ModelSpec
    from harness.runner import Session, execute_job
    from harness.spec import RunConfig, expand_jobs
    from harness.tokens import token_ids
    from harness.traces import collect_scores, collect_traces
    from methods import MethodSpec, get_method

    dtype = "float16" if args.device.startswith("cuda") else "float32"
    try:
        method_settings = json.loads(args.method_settings)
    except json.JSONDecodeError as exc:
        parser.error(f"--method-settings is not JSON: {exc}")
    if not isinstance(method_settings, dict) or not all(isinstance(v, dict) for v in method_settings.values()):
        parser.error('--method-settings must map a method name to its settings, e.g. {"shadow": {"epochs": 10}}')
    config = RunConfig(suite="acceptance", model=args.model, weights="random", device=args.device, dtype=dtype,
                       methods=args.methods.split(","), sparsity=[args.sparsity], tasks=["wikitext2"], limit=args.windows,
                       method_settings=method_settings)
    config.validate()
    data = DataDir.resolve(args.data_dir)
    spec = ModelSpec(config.model, config.weights)
    identity = config.identity(spec.identity(), data.fingerprint, dtype)
    jobs = expand_jobs(config, identity)
    report: dict = {"model": args.model, "gpu": torch.cuda.get_device_name() if torch.cuda.is_available() else "cpu", "windows": args.windows,
                    "sparsity": args.sparsity, "calib_budget_gb": config.calib_budget_gb,
                    "calib": f"{config.calib_samples} x {config.calib_seqlen} tokens of {config.calib_data}",
                    "method_settings": method_settings}
    if not args.no_selection_compare:  # first: a broken kernel shows before the model is built
        report["mask_selection_ms"] = mask_selection_ms()
        log(f"mask selection: {report['mask_selection_ms']}")
    report["estimate"] = check_run(config, jobs, spec, cache_dir)
    log(f"fit estimate: {report['estimate']}")
    session = Session(config, data, ArtefactCache(cache_dir, log=log), log=log)
    clock = time.perf_counter()
    model = session.model
    sync()
    report["load_s"] = time.perf_counter() - clock
    ids = token_ids(session, "wikitext2", data.wikitext2_test)
    report["plain_hf_before"] = plain_hf_tokens_per_s(model, ids, args.windows)
    log(f"model built in {report['load_s']:.1f} s; plain HF forward {report['plain_hf_before']:.0f} tokens/s")

    ctx = session.fit_context("dejavu")
    reset_peak()
    clock = time.perf_counter()
    traces = session.memo("traces", lambda: collect_traces(ctx))
    report["traces_s"] = time.perf_counter() - clock
    report["traces"] = traces.sampling
    lmtext = [get_method(MethodSpec.parse(m)) for m in config.methods if MethodSpec.parse(m).name == "shadow"]
    lmtext = [m for m in lmtext if m.protocol == "lmtext"]  # the few-shot protocol scores its own examples
    if lmtext:
        clock = time.perf_counter()
        collect_scores(ctx, lmtext[0].criterion)
        report["scores_s"] = time.perf_counter() - clock
    report["traces_peak_gpu_gb"] = peak_gb()
    name = spec.label
    rows = report["perplexity"] = []
    save = lambda stage: checkpoint(report, out, name, cache_dir, started, stage)  # noqa: E731
    save("traces")
    for job in jobs:
        spec_ = MethodSpec.parse(job.method)
        fit_ctx = session.fit_context(spec_.name, job.seed)
        method = get_method(spec_, fit_ctx.settings)
        allocation = method.adjust(job.allocation(config))
        reset_peak()
        clock = time.perf_counter()
        method.fit(fit_ctx, allocation)
        sync()
        fit_s = time.perf_counter() - clock
        fit_peak = peak_gb()
        result = execute_job(session, job)
        record = result["records"][0]
        processed = record["n"] * record["seqlen"]
        rows.append({"method": job.method, "fit_s": fit_s, "fit_peak_gpu_gb": fit_peak,
                     "eval_s": record["timings"]["eval_s"], "tokens_per_s": processed / record["timings"]["eval_s"],
                     "ppl": record["value"], "achieved_heads": record["achieved_heads"],
                     "achieved_neurons": record["achieved_neurons"], "eval_peak_gpu_gb": record["peak_gpu_gb"],
                     "calib_tokens": record.get("calib_tokens")})
        rows[-1]["vs_plain_hf"] = rows[-1]["tokens_per_s"] / report["plain_hf_before"]  # until the "after" pass
        log(f"{job.method}: fit {fit_s:.1f} s, {rows[-1]['tokens_per_s']:.0f} tokens/s, ppl {record['value']:.1f}")
        save(f"perplexity: {job.method}")
    for job in jobs:  # the same jobs with the torch selection (HARNESS_SELECT=torch), side by side
        if (torch.cuda.is_available() and not args.no_selection_compare
                and MethodSpec.parse(job.method).name in SELECTION_COMPARED):
            os.environ["HARNESS_SELECT"] = "torch"
            try:
                record = execute_job(session, job)["records"][0]
            finally:
                os.environ.pop("HARNESS_SELECT")
            rows.append({"method": f"{job.method} [torch selection]", "fit_s": float("nan"), "fit_peak_gpu_gb": 0.0,
                         "eval_s": record["timings"]["eval_s"],
                         "tokens_per_s": record["n"] * record["seqlen"] / record["timings"]["eval_s"],
                         "ppl": record["value"], "achieved_heads": record["achieved_heads"],
                         "achieved_neurons": record["achieved_neurons"], "eval_peak_gpu_gb": record["peak_gpu_gb"],
                         "calib_tokens": record.get("calib_tokens")})
            rows[-1]["vs_plain_hf"] = rows[-1]["tokens_per_s"] / report["plain_hf_before"]
            log(f"{rows[-1]['method']}: {rows[-1]['tokens_per_s']:.0f} tokens/s, ppl {record['value']:.1f}")
            save(f"perplexity: {rows[-1]['method']}")
    report["plain_hf_after"] = plain_hf_tokens_per_s(model, ids, args.windows)
    plain = (report["plain_hf_before"] + report["plain_hf_after"]) / 2
    for row in rows:
        row["vs_plain_hf"] = row["tokens_per_s"] / plain
    save("perplexity")

    if not args.no_profile:
        report["profiles"] = {}
        for job in jobs:
            if MethodSpec.parse(job.method).name in args.profile_methods.split(","):
                report["profiles"][job.method] = profile_window(session, job, ids)
                save(f"profile: {job.method}")

    if args.no_zero_shot:
        report["zero_shot"] = {"error": "not run (--no-zero-shot)"}
    else:
        zero_shot(session, args, started, out, report, save)
    report["total_s"] = time.perf_counter() - started
    save("done")
    print((out / f"acceptance-{name}.md").read_text())
    shutil.rmtree(cache_dir, ignore_errors=True)


def zero_shot(session, args, started, out, report: dict, save) -> None:
    """lm-eval's own hf model (the dense baseline) on every task, then each zero-shot method task by task through
    the harness, into report["zero_shot"], saved after every task."""
    from dataclasses import replace

    from harness.lmeval import ZERO_SHOT, run_lm_eval, task_manager
    from harness.runner import Session, execute_job
    from harness.spec import expand_jobs

    try:
        import lm_eval  # noqa: F401
    except ImportError as exc:
        report["zero_shot"] = {"error": f"lm-eval is not installed: {exc}"}
        return
    tasks = args.zero_shot_tasks.split(",")
    config = replace(session.config, tasks=tasks, limit=args.zero_shot_limit,
                     methods=args.zero_shot_methods.split(","))
    zs = Session(config, session.data, session.cache, log=log)
    zs.__dict__["model"], zs.__dict__["tokenizer"] = session.model, session.tokenizer
    zs._memo = session._memo
    zs.run_dir = out / "zero-shot"
    result = report["zero_shot"] = {"limit": args.zero_shot_limit, "tasks": tasks, "harness": {}, "lm_eval_hf": {},
                                    "not_run": []}
    from lm_eval.models.huggingface import HFLM

    def in_time():
        return time.perf_counter() - started < args.budget

    baseline = HFLM(pretrained=session.model, tokenizer=session.tokenizer, batch_size="auto")
    manager = task_manager(session.data.root, local_only=True)  # the offline tasks (ZERO_SHOT[task].local_task)
    for task in tasks:  # the baseline first: its ratio is what the dense rows are judged by
        if not in_time():
            result["not_run"].append(f"lm-eval hf {task}")
            continue
        clock = time.perf_counter()
        res = run_lm_eval(baseline, [ZERO_SHOT[task].local_task], manager, limit=args.zero_shot_limit)
        seconds = time.perf_counter() - clock
        n = res.get("n-samples", {}).get(ZERO_SHOT[task].local_task, {}).get("effective")
        result["lm_eval_hf"][task] = {"s": seconds, "n": n}
        save(f"zero-shot: lm-eval hf {task}")
    order = {task: i for i, task in enumerate(tasks)}  # task by task, so a cut budget leaves every method some tasks
    for job in sorted(expand_jobs(config, {}), key=lambda job: order[job.task]):
        if not in_time():
            result["not_run"].append(f"{job.method} {job.task}")
            continue
        record = execute_job(zs, job)["records"][0]
        result["harness"].setdefault(job.method, {})[job.task] = {
            "s": record["timings"]["eval_s"], "n": record["n"], record["metric"]: record["value"]}
        log(f"zero-shot {job.method} {job.task}: {record['metric']} {record['value']:.3f} in {record['timings']['eval_s']:.1f} s")
        save(f"zero-shot: {job.method} {job.task}")


def render(report: dict) -> str:
    lines = [f"# Acceptance: {report['model']} (random weights, fp16) on {report['gpu']}", "",
             f"Calibration: {report['calib']}, budget {report['calib_budget_gb']} GiB: traces keep "
             f"{report['traces']['calib_tokens']} of {report['traces']['calib_tokens_total']} tokens "
             f"({report['traces']['calib_sampling']}). Fit estimate: {json.dumps(report['estimate'])}.", "",
             f"Model build {report['load_s']:.1f} s; traces {report['traces_s']:.1f} s"
             + (f"; criterion scores {report['scores_s']:.1f} s" if "scores_s" in report else "")
             + f"; trace collection peak GPU {report['traces_peak_gpu_gb']:.1f} GiB.", "",
             f"Plain HF forward over the same {report['windows']} windows of {WINDOW}: "
             f"{report['plain_hf_before']:.0f} tokens/s before the methods, "
             + (f"{report['plain_hf_after']:.0f} after." if "plain_hf_after" in report else
                "not yet measured after them (ratios below are to the 'before' figure)."), "",
             "| method | fit s (after traces) | fit peak GPU GiB | eval tokens/s | vs plain HF | eval peak GPU GiB | ppl | "
             "achieved heads / neurons |", "|---|---|---|---|---|---|---|---|"]
    if "total_s" not in report:
        lines[2:2] = [f"**Partial report:** written after stage '{report.get('stage')}', {report.get('elapsed_s', 0):.0f} s "
                      "into the run; the stages after it did not finish.", ""]
    for r in report["perplexity"]:
        lines.append(f"| {r['method']} | {r['fit_s']:.1f} | {r['fit_peak_gpu_gb']:.1f} | {r['tokens_per_s']:.0f} | "
                     f"{r['vs_plain_hf']:.2f}× | {r['eval_peak_gpu_gb'] or 0:.1f} | {r['ppl']:.1f} | "
                     f"{r['achieved_heads']:.3f} / {r['achieved_neurons']:.3f} |")
    cache = report["cache_gb"]
    lines += ["", f"Artefact cache on disk: {sum(cache.values()):.2f} GiB in all; "
              + ", ".join(f"{k} {v:.2f}" for k, v in cache.items()) + " GiB."]
    if report.get("method_settings"):
        lines += ["", f"Method settings (not the defaults where named): {json.dumps(report['method_settings'])}."]
    if "mask_selection_ms" in report:
        lines += ["", "Mask selection of (2048, 20480) fp16 scores, skip 10240 (medians of 10): "
                  + ", ".join(f"{k} {v:.2f} ms" if not isinstance(v, bool) else f"{k}: {v}"
                              for k, v in report["mask_selection_ms"].items()) + "."]
    for label, rows in report.get("profiles", {}).items():
        lines += ["", f"One window of {label} (host issue time, window time, then CUDA time by op): "
                  + "; ".join(f"{name} {ms:.1f} ms" for name, ms in rows[:8])]
    zs = report.get("zero_shot", {"error": "not reached"})
    if "error" in zs:
        lines += ["", f"Zero-shot: {zs['error']}"]
    else:
        base = zs["lm_eval_hf"]
        lines += ["", f"Zero-shot (lm-eval, offline task files, limit {zs['limit']}, batch size auto): examples/s, "
                  "and the ratio to lm-eval's own hf model on the same task", "",
                  "| method | " + " | ".join(zs["tasks"]) + " | all tasks |", "|---" * (len(zs["tasks"]) + 2) + "|"]
        rows = [("lm-eval hf", base)] + list(zs["harness"].items())
        for label, tasks in rows:
            cells = []
            for task in zs["tasks"]:
                cell = tasks.get(task)
                if cell is None:
                    cells.append("not run")
                    continue
                rate = cell["n"] / cell["s"]
                ratio = (f" ({rate / (base[task]['n'] / base[task]['s']):.2f}×)" if label != "lm-eval hf" and task in base
                         else "")
                cells.append(f"{rate:.1f}{ratio}")
            done = [t for t in zs["tasks"] if t in tasks and t in base]
            total = (sum(tasks[t]["n"] for t in done) / sum(tasks[t]["s"] for t in done)) if done else None
            base_total = (sum(base[t]["n"] for t in done) / sum(base[t]["s"] for t in done)) if done else None
            summary = "" if total is None else (f"{total:.1f}" + ("" if label == "lm-eval hf" else f" ({total / base_total:.2f}×)"))
            lines.append(f"| {label} | " + " | ".join(cells) + f" | {summary} |")
        if zs["not_run"]:
            lines += ["", "Not run (time budget): " + ", ".join(zs["not_run"])]
    if "total_s" in report:
        lines += ["", f"Total {report['total_s']:.0f} s."]
    return "\n".join(lines) + "\n"


if __name__ == "__main__":  # pragma: no cover - GPU script
    main()
