"""Decode latency on one GPU (issue 7, items 3-5): the report results/reports/latency-h200.md.

    python3 -m harness.tools.latency_bench --out $OUT [--budget 530] [--models opt-13b,opt-30b]
    TRITON_INTERPRET=1 python3 -m harness.tools.latency_bench --small --out /tmp/lat   # the same code, tiny, on a CPU

For each model (random weights, fp16, batch 1, prompt 128 + 128 generated tokens): dense baselines (Hugging Face
generate eager; our engine dense with a CUDA graph; Hugging Face static cache + torch.compile; DeepSpeed-Inference
with kernel injection in a subprocess), then the sparse engine with static masks and with the predictors of
dejavu, shadow and timewise inside the step at 50% heads + 90% neurons and 50% + 50%, each with its predictor's
share of the step (against a static source of the same per-layer counts), then a sparsity sweep with static
masks. Every figure sits beside its weight-streaming floor (bytes the step reads / measured copy bandwidth).
Timing and statistics are harness.latency's (CUDA events, medians); the table is harness.latency's too.

Predictors are the methods' own architectures and default sizes (methods.dejavu / shadow / timewise), seeded and
untrained: on random weights only their cost matters, and it does not depend on their values. Every configuration
runs in try/except; results and the report are rewritten after each one; a time budget skips what would not fit
and the report says what was skipped.
"""
from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import time
import traceback
from pathlib import Path

import torch

T0 = time.time()
STATE = {"records": [], "sweep": [], "skipped": [], "errors": [], "notes": [], "machine": "", "deepspeed": None}
OUT = Path(".")
ARGS = None


def log(*parts):
    text = " ".join(str(p) for p in parts)
    print(f"[{time.time() - T0:6.1f}s] {text}", flush=True)
    with open(OUT / "latency-bench.log", "a") as handle:
        handle.write(text + "\n")


def left() -> float:
    return ARGS.budget - (time.time() - T0)


def fits(what: str, need_s: float) -> bool:
    if left() >= need_s:
        return True
    STATE["skipped"].append(f"{what} (needs ~{need_s:.0f} s, {max(left(), 0):.0f} s of the budget left)")
    log(f"SKIP {what}: time budget")
    return False


def guarded(what):
    def wrap(fn):
        def inner(*args, **kwargs):
            try:
                return fn(*args, **kwargs)
            except Exception as exc:  # noqa: BLE001 - one call of the device must return every other figure
                message = f"{what}: {type(exc).__name__}: {str(exc)[:600]}"
                STATE["errors"].append(message)
                log("ERROR", message)
                log(traceback.format_exc())
                if torch.cuda.is_available():
                    torch.cuda.empty_cache()
        return inner
    return wrap


# ------------------------------------------------------------------------------------------------------------
# DeepSpeed: unpack the carried wheels, prebuild its inference op (nvcc) in the background, run in a subprocess
# ------------------------------------------------------------------------------------------------------------
def ds_paths():
    import tempfile

    root = Path(tempfile.gettempdir()) / "latency-bench-ds-site"
    return root, root / "torch_extensions"


def ds_env():
    root, ext = ds_paths()
    env = dict(os.environ)
    env["PYTHONPATH"] = f"{root}:{os.getcwd()}:" + env.get("PYTHONPATH", "")
    env["PATH"] = f"{root / 'ninja' / 'data' / 'bin'}:" + env.get("PATH", "")
    env.update(TORCH_EXTENSIONS_DIR=str(ext), TORCH_CUDA_ARCH_LIST="9.0", MAX_JOBS="12", DS_BUILD_OPS="0",
               RANK="0", LOCAL_RANK="0", WORLD_SIZE="1", MASTER_ADDR="127.0.0.1", MASTER_PORT="29561",
               PYTHONUNBUFFERED="1")
    return env


def ds_unpack() -> str:
    """Unzip the wheels of .whl/deepspeed (DeepSpeed 0.19.8 built without ops, and its small dependencies)."""
    import zipfile

    root, _ = ds_paths()
    root.mkdir(parents=True, exist_ok=True)
    tag = f"cp{sys.version_info.major}{sys.version_info.minor}"
    done = []
    for wheel in sorted(Path(ARGS.wheels).glob("*.whl")):
        if "-cp" in wheel.name and f"-{tag}-" not in wheel.name:
            continue
        name = wheel.name.split("-")[0].lower()
        try:
            __import__({"py_cpuinfo": "cpuinfo"}.get(name, name))
            if name != "deepspeed":
                continue  # the image has it
        except ImportError:
            pass
        with zipfile.ZipFile(wheel) as z:
            z.extractall(root)
        done.append(wheel.name)
    ninja = root / "ninja" / "data" / "bin" / "ninja"
    if ninja.exists():
        ninja.chmod(0o755)
    return ", ".join(done)


def ds_prepare_start():
    if not Path(ARGS.wheels).is_dir():
        STATE["deepspeed"] = f"not run: no DeepSpeed wheels at {ARGS.wheels} (carry .whl/deepspeed)"
        return None
    try:
        unpacked = ds_unpack()
    except Exception as exc:  # noqa: BLE001
        STATE["deepspeed"] = f"could not unpack the wheels: {exc!r}"
        return None
    log(f"deepspeed wheels unpacked: {unpacked}")
    code = ("import time,torch; t=time.time(); import deepspeed; print('deepspeed', deepspeed.__version__, flush=True); "
            "from deepspeed.ops.op_builder import InferenceBuilder; b=InferenceBuilder(); "
            "print('compatible', b.is_compatible(True), flush=True); b.load(); "
            "print(f'inference op built in {time.time()-t:.0f} s', flush=True)")
    handle = open(OUT / "deepspeed-prepare.log", "w")
    return subprocess.Popen([sys.executable, "-c", code], stdout=handle, stderr=subprocess.STDOUT, env=ds_env())


def ds_run(model_name: str, prepare, timeout: float):
    """Build the model in a subprocess, inject DeepSpeed's kernels, time generate (harness.latency.measure_hf)."""
    if prepare is not None and prepare.poll() is None:
        log("waiting for the DeepSpeed op build")
        try:
            prepare.wait(timeout=max(1.0, timeout - 60))
        except subprocess.TimeoutExpired:
            prepare.kill()
            return {"error": f"DeepSpeed's inference op (nvcc JIT build) did not finish within the time budget; "
                             f"tail of its log: {_tail(OUT / 'deepspeed-prepare.log')}"}
    if prepare is not None and prepare.returncode != 0:
        return {"error": f"DeepSpeed's inference op did not build (exit {prepare.returncode}): "
                         f"{_tail(OUT / 'deepspeed-prepare.log')}"}
    result = OUT / f"deepspeed-{model_name}.json"
    cmd = [sys.executable, "-m", "harness.tools.latency_bench", "--ds-child", model_name, "--out", str(OUT),
           "--budget", str(timeout)] + (["--small"] if ARGS.small else [])
    with open(OUT / f"deepspeed-{model_name}.log", "w") as handle:
        try:
            code = subprocess.run(cmd, stdout=handle, stderr=subprocess.STDOUT, env=ds_env(), timeout=timeout).returncode
        except subprocess.TimeoutExpired:
            return {"error": f"timed out after {timeout:.0f} s: {_tail(OUT / f'deepspeed-{model_name}.log')}"}
    if result.exists():
        return json.loads(result.read_text())
    return {"error": f"exit {code}: {_tail(OUT / f'deepspeed-{model_name}.log')}"}


def _tail(path, lines=25) -> str:
    try:
        text = Path(path).read_text().strip().splitlines()
    except OSError:
        return "(no log)"
    keep = [line for line in text if line.strip()][-lines:]
    return "\n".join(keep)


def ds_child(model_name: str):
    from harness.latency import measure_hf, prompt_ids

    result = OUT / f"deepspeed-{model_name}.json"
    try:
        model = build(model_name)
        import deepspeed

        print("deepspeed", deepspeed.__version__, flush=True)
        engine = deepspeed.init_inference(model, dtype=torch.float16, replace_with_kernel_inject=True,
                                          tensor_parallel={"tp_size": 1})
        ds_model = engine.module
        settings = dict(SETTINGS, repeats=1)
        prompt = prompt_ids(model.config, 1, settings["prompt"], 0, device())
        stats = measure_hf(ds_model, prompt, settings, device(), static=False)
        stats["deepspeed"] = deepspeed.__version__
        result.write_text(json.dumps(stats))
    except Exception as exc:  # noqa: BLE001
        traceback.print_exc()
        result.write_text(json.dumps({"error": f"{type(exc).__name__}: {str(exc)[:1500]}",
                                      "where": traceback.format_exc()[-2500:]}))


# ------------------------------------------------------------------------------------------------------------
# models, predictors, measurements
# ------------------------------------------------------------------------------------------------------------
SETTINGS = dict(batch=1, prompt=128, new_tokens=128, warmup=1, repeats=2, backend=None, cuda_graph=True, seed=0)


def device():
    return "cuda" if torch.cuda.is_available() else "cpu"


def build(name: str):
    from harness.models import ModelSpec, load_model

    if ARGS.small:
        from transformers import OPTConfig, OPTForCausalLM

        config = OPTConfig(vocab_size=512, hidden_size=64, num_hidden_layers=3, num_attention_heads=4, ffn_dim=256,
                           word_embed_proj_dim=64, max_position_embeddings=512, dropout=0.0)
        torch.manual_seed(0)
        return OPTForCausalLM(config).eval().requires_grad_(False)
    dtype = torch.float16 if torch.cuda.is_available() else torch.float32
    return load_model(ModelSpec(name, "random"), device=device(), dtype=dtype, seed=0)


def predictors(method: str, model):
    """The method's masked-engine policy with seeded, untrained predictors of its default architecture."""
    c = model.config
    d, L, H, F = c.hidden_size, c.num_hidden_layers, c.num_attention_heads, c.ffn_dim
    torch.manual_seed(1)
    previous = torch.get_default_dtype()
    if torch.cuda.is_available():  # built in fp16 on the GPU: shadow's predictor alone is 2.8 G parameters at opt-30b
        torch.set_default_dtype(torch.float16)
    try:
        return _predictors(method, c, d, L, H, F)
    finally:
        torch.set_default_dtype(previous)


def _predictors(method, c, d, L, H, F):
    from methods.dejavu import DEFAULTS as DV, DejaVuPolicy
    from methods.predictors import low_rank
    from methods.shadow import DEFAULTS as SH, ShadowPolicy, shadow_predictor
    from methods.timewise import DEFAULTS as TW, TimewisePolicy, timewise_predictor

    with torch.device(device()):
        if method == "dejavu":
            return DejaVuPolicy({l: low_rank(d, DV["hidden"], H) for l in range(L)},
                                {l: low_rank(d, DV["hidden"], F) for l in range(L)})
        if method == "shadow":
            return ShadowPolicy(shadow_predictor(c, SH["hidden"]), c)
        if method == "timewise":
            return TimewisePolicy("current", {l: timewise_predictor(d, H, TW) for l in range(L)}, TW["M"])
    raise ValueError(method)


def static_policy(model):
    from methods.static import StaticPolicy

    c = model.config
    g = torch.Generator().manual_seed(2)
    return StaticPolicy(torch.rand(c.num_hidden_layers, c.num_attention_heads, generator=g),
                        torch.rand(c.num_hidden_layers, c.ffn_dim, generator=g))


class Bench:
    """One model: its engine weights (shared), the copy bandwidth, and the records of every configuration."""

    def __init__(self, name, bw):
        self.name, self.bw = name, bw
        self.model = build(name)
        c = self.model.config
        self.L, self.H, self.F = c.num_hidden_layers, c.num_attention_heads, c.ffn_dim
        from harness.latency import prompt_ids

        self.prompt = prompt_ids(c, 1, SETTINGS["prompt"], 0, device())
        self.layers = None
        self.dense_token_ms = None

    def engine(self, source, kv):
        from kernels.decode import SparseDecoder

        engine = SparseDecoder(self.model, source, max_len=SETTINGS["prompt"] + SETTINGS["new_tokens"], kv=kv,
                               cuda_graph=SETTINGS["cuda_graph"], layers=self.layers)
        self.layers = engine.layers
        return engine

    def record(self, label, sparsity, stats, achieved=(0.0, 0.0)):
        from harness.latency import METRICS

        base = {"model": self.name, "weights": "random", "dtype": "float16" if torch.cuda.is_available() else "float32",
                "device": torch.cuda.get_device_name(0) if torch.cuda.is_available() else "cpu", "task": "decode",
                "method_label": label, "method": label.split(" ")[0], "sparsity": sparsity,
                "achieved_heads": achieved[0], "achieved_neurons": achieved[1], "batch": SETTINGS["batch"],
                "prompt_len": SETTINGS["prompt"], "new_tokens": SETTINGS["new_tokens"], "copy_bandwidth_gbps": self.bw / 1e9,
                "weights_note": "random weights, untrained predictors: latency only", "timer": stats.get("timer")}
        extra = {k: v for k, v in stats.items() if k not in METRICS and k != "predictor_share"}
        for metric in METRICS + ("predictor_share",):
            if metric in stats:
                STATE["records"].append({**base, **extra, "metric": metric, "value": stats[metric]})
        if stats.get("error"):
            STATE["records"].append({**base, "metric": "token_ms", "value": None, "error": stats["error"]})
        write_report()

    def dense_floor(self):
        from harness.latency import floor_bytes

        c = self.model.config
        return floor_bytes(c, next(self.model.parameters()).dtype, [self.H] * self.L, [self.F] * self.L, "all")

    def hf(self, static: bool):
        from harness.latency import measure_hf

        label = "dense · hf-static+compile" if static else "dense · hf-eager"
        stats = measure_hf(self.model, self.prompt, dict(SETTINGS, repeats=1), device(), static=static)
        stats["floor_ms"] = self.dense_floor() / self.bw * 1e3
        log(f"{self.name} {label}: {stats['token_ms']:.3f} ms/token, prefill {stats['prefill_ms']:.1f} ms")
        self.record(label, "0", stats)
        if static:
            torch._dynamo.reset()
            torch.cuda.empty_cache() if torch.cuda.is_available() else None

    def ours(self, label, sparsity, source, kv, reference=None):
        from harness.latency import measure_ours

        engine = self.engine(source, kv)
        try:
            stats = measure_ours(engine, self.prompt, SETTINGS, device())
        except Exception as exc:  # noqa: BLE001 - e.g. an op of the predictor that a CUDA graph cannot capture
            if not engine.use_graph:
                raise
            message = f"{type(exc).__name__}: {str(exc)[:300]}"
            log(f"{label}: CUDA graph failed ({message}); measuring without the graph")
            STATE["errors"].append(f"{self.name} {label} @ {sparsity}: CUDA graph failed, measured without: {message}")
            del engine
            torch.cuda.synchronize()
            engine = self.engine(source, kv)
            engine.use_graph = False
            stats = measure_ours(engine, self.prompt, SETTINGS, device())
            stats["cuda_graph"] = False
        model_bytes = engine.weight_bytes()
        pred_bytes = source.predictor_bytes() if hasattr(source, "predictor_bytes") else 0
        stats.update(kv=kv, pdl=_pdl_mode(), weight_bytes=model_bytes, predictor_bytes=pred_bytes,
                     floor_ms=(model_bytes + pred_bytes) / self.bw * 1e3, floor_model_ms=model_bytes / self.bw * 1e3)
        achieved = (sum(1 - k / self.H for k in engine.heads_kept) / self.L,
                    sum(1 - k / self.F for k in engine.neurons_kept) / self.L)
        del engine
        if reference is not None:
            ref_engine = self.engine(reference, kv)
            ref = measure_ours(ref_engine, self.prompt, SETTINGS, device())
            del ref_engine
            t, r = stats["token_ms"], ref["token_ms"]
            stats.update(predictor_share=min(1.0, max(0.0, (t - r) / t)), predictor_ms=t - r, reference_token_ms=r)
        elif getattr(source, "static", False) and label != "dense · ours":
            stats.update(predictor_share=0.0, predictor_ms=0.0)
        if label == "dense · ours":
            STATE["sweep"].append({"model": self.name, "sparsity": 0.0, "token_ms": stats["token_ms"],
                                   "token_ms_p90": stats["token_ms_p90"], "floor_ms": stats["floor_ms"]})
        log(f"{self.name} {label} @ {sparsity} kv={kv}: {stats['token_ms']:.3f} ms/token "
            f"(floor {stats['floor_ms']:.3f}) share {stats.get('predictor_share', '-')}")
        self.record(label, sparsity, stats, achieved)
        return stats

    def sparse(self, method, heads, neurons):
        from harness.engine import Allocation
        from harness.decoding import source_for
        from kernels.sources import reference_source

        sparsity = f"h{heads}/n{neurons}"
        if method == "static":
            policy, allocation, label = static_policy(self.model), Allocation(heads, neurons), "static"
        elif method == "shadow":
            policy, allocation, label = predictors(method, self.model), Allocation(heads, neurons, dense_layers=(0,)), "shadow"
        elif method == "timewise":
            policy, allocation, label = predictors(method, self.model), Allocation(heads, 0.0), "timewise:current (heads only)"
        else:
            policy, allocation, label = predictors(method, self.model), Allocation(heads, neurons), method
        source = source_for(method, policy, allocation, self.model)
        del policy  # the source keeps what it needs (its folded copy is made when the engine binds it)
        reference = None if getattr(source, "static", False) else reference_source(source, self.L)
        self.ours(label, sparsity, source, "recompute", reference)
        del source
        if torch.cuda.is_available():
            torch.cuda.empty_cache()

    def sweep_point(self, s):
        from harness.engine import Allocation
        from harness.decoding import source_for

        source = source_for("static", static_policy(self.model), Allocation(s, s), self.model)
        stats = self.ours(f"static (sweep h=n={s})", f"h{s}/n{s}", source, "recompute")
        STATE["sweep"].append({"model": self.name, "sparsity": s, "token_ms": stats["token_ms"],
                               "token_ms_p90": stats["token_ms_p90"], "floor_ms": stats["floor_ms"]})


# ------------------------------------------------------------------------------------------------------------
# the report
# ------------------------------------------------------------------------------------------------------------
def targets_text() -> str:
    rows = {}
    for r in STATE["records"]:
        if r["metric"] == "token_ms" and r.get("value"):
            rows[(r["model"], r["method_label"], r["sparsity"])] = r["value"]
    m = "opt-13b"
    dense = rows.get((m, "dense · ours", "0"))
    static = rows.get((m, "static", "h0.5/n0.9"))
    eager = rows.get((m, "dense · hf-eager", "0"))
    compiled = rows.get((m, "dense · hf-static+compile", "0"))
    floor_dense = next((r["value"] for r in STATE["records"] if r["model"] == m and r["method_label"] == "dense · ours"
                        and r["metric"] == "floor_ms"), None)
    out = ["| target (OPT-13B, fp16, B=1, 128+128) | measured | met? |", "| --- | --- | --- |"]

    def line(what, value, ok, how):
        out.append(f"| {what} | {value} | {'yes' if ok else 'no' if ok is not None else '–'}{how} |")

    def f(x):
        return "–" if x is None else f"{x:.2f}"

    line("dense engine ≤ 8 ms/token (≤ 1.3× floor)", f"{f(dense)} ms (floor {f(floor_dense)})",
         None if dense is None else dense <= 8, "" if dense is None or dense <= 8 else f", by {dense - 8:.2f} ms")
    line("static 50% heads + 90% neurons ≤ 2.5 ms/token", f"{f(static)} ms", None if static is None else static <= 2.5,
         "" if static is None or static <= 2.5 else f", by {static - 2.5:.2f} ms ({static / 2.5:.2f}×)")
    for what, ref, need in (("≥ 3× our dense engine", dense, 3), ("≥ 4× HF static-cache (compiled)", compiled, 4),
                            ("≥ 10× HF eager", eager, 10)):
        ratio = ref / static if ref and static else None
        line(what, "–" if ratio is None else f"{ratio:.2f}×", None if ratio is None else ratio >= need,
             "" if ratio is None or ratio >= need else f" (needs {need}×)")
    for r in STATE["records"]:
        if r["model"] == m and r["metric"] == "predictor_share" and r["method"] in ("dejavu", "shadow", "timewise:current"):
            share = r["value"]
            line(f"{r['method_label']} @ {r['sparsity']}: predictor ≤ 10% of the step", f"{100 * share:.1f}% "
                 f"({r.get('predictor_ms', 0):.2f} ms on {r.get('reference_token_ms', 0):.2f} ms)", share <= 0.10,
                 "" if share <= 0.10 else f", by {100 * (share - 0.10):.1f} points")
    return "\n".join(out)


def sweep_plot():
    if not STATE["sweep"]:
        return None
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(6.4, 4.2))
    for i, model in enumerate(dict.fromkeys(p["model"] for p in STATE["sweep"])):
        pts = sorted((p["sparsity"], p["token_ms"], p["floor_ms"]) for p in STATE["sweep"] if p["model"] == model)
        color = f"C{i}"
        ax.plot([p[0] for p in pts], [p[1] for p in pts], marker="o", color=color, label=f"{model}: measured (median)")
        ax.plot([p[0] for p in pts], [p[2] for p in pts], linestyle="--", color=color, label=f"{model}: weight-streaming floor")
    ax.set_xlabel("sparsity (fraction of heads and of neurons skipped, static masks, kv=recompute)")
    ax.set_ylabel("ms per token")
    ax.set_title("decode ms/token vs sparsity · fp16 · batch 1 · random weights", fontsize=10)
    ax.set_ylim(bottom=0)
    ax.legend(fontsize=8)
    fig.tight_layout()
    path = OUT / "latency-sweep-h200.png"
    fig.savefig(path, dpi=130)
    plt.close(fig)
    return path


def _pdl_mode() -> str:
    from kernels import gemv

    return gemv.PDL_MODE


def write_report():
    from harness.latency import latency_markdown

    try:
        plot = sweep_plot()
    except Exception as exc:  # noqa: BLE001
        plot = None
        STATE["errors"].append(f"plot: {exc!r}")
    main = [r for r in STATE["records"] if "sweep" not in r["method_label"]]
    lines = ["# Decode latency on one H200", "",
             f"Machine: {STATE['machine']}", "",
             "Command (from the repository root):",
             "", "```", f"python3 -m harness.tools.latency_bench --out $OUT --budget {ARGS.budget:.0f}", "```", "",
             f"Wall time of the script: {time.time() - T0:.0f} s (budget {ARGS.budget:.0f} s). Our engine's kernels: "
             f"programmatic dependent launch mode {_pdl_mode()!r} (KERNELS_PDL; see kernels.gemv.set_pdl).", "",
             "Random weights (seeded), fp16, batch 1, prompt 128 + 128 generated tokens (greedy); per model one warm-up "
             "request then 2 measured requests for our engine (254 step times), 1 for the Hugging Face baselines "
             "(127). Medians of CUDA-event times around each step (its greedy argmax computed inside it); request ms is a host timer. "
             "Predictors: the methods' own architectures and default sizes (dejavu low-rank 1000 per layer for heads "
             "and neurons, shadow one 2048-hidden MLP for every later head and neuron, timewise MLPs with two 256-unit hidden layers), "
             "seeded and untrained (their cost does not depend on their values), run inside the CUDA graph. "
             "Predictor share = (t − t_static) / t, t_static = the same engine with a static source of the same "
             "per-layer counts. Floor = bytes one step reads (kept weights, K/V rows of kept heads for kv=recompute, "
             "lm_head, plus the predictor's weights) / the measured copy bandwidth (read + write). shadow keeps layer "
             "0 dense; timewise predicts heads only (neurons dense).", "",
             "## Against the targets", "", targets_text(), "", "## Latency", "", latency_markdown(main)]
    if STATE["sweep"]:
        lines += ["## Sparsity sweep (static masks, h = n = s, kv=recompute)", "",
                  f"![per-token ms vs sparsity]({plot.name if plot else 'latency-sweep-h200.png'})", "",
                  "| model | s | ms/token p50 | p90 | floor ms | × floor |", "| --- | --- | --- | --- | --- | --- |"]
        for p in sorted(STATE["sweep"], key=lambda p: (p["model"], p["sparsity"])):
            lines.append(f"| {p['model']} | {p['sparsity']} | {p['token_ms']:.3f} | {p['token_ms_p90']:.3f} | "
                         f"{p['floor_ms']:.3f} | {p['token_ms'] / p['floor_ms']:.2f} |")
        lines.append("")
    lines += ["## DeepSpeed-Inference", "", STATE["deepspeed"] or "not reached", ""]
    if STATE["skipped"]:
        lines += ["## Skipped (time budget)", ""] + [f"- {s}" for s in STATE["skipped"]] + [""]
    if STATE["errors"]:
        lines += ["## Errors", ""] + [f"- {e}" for e in STATE["errors"]] + [""]
    lines += STATE["notes"]
    (OUT / "latency-h200.md").write_text("\n".join(lines) + "\n")
    (OUT / "latency-results.json").write_text(json.dumps({k: STATE[k] for k in ("records", "sweep", "skipped", "errors")},
                                                         default=str))


# ------------------------------------------------------------------------------------------------------------
def run_model(name, bw, prepare, hf_static: bool):
    bench = Bench(name, bw)
    log(f"{name} built ({sum(p.numel() for p in bench.model.parameters()) / 1e9:.2f} B parameters)")
    from kernels.decode import DenseMasks

    guarded(f"{name} hf-eager")(bench.hf)(False)
    if fits(f"{name} our engine dense", 30):
        guarded(f"{name} ours dense")(bench.ours)("dense · ours", "0", DenseMasks(bench.L), "all")
    for heads, neurons in ((0.5, 0.9), (0.5, 0.5)):
        for method in ("static", "dejavu", "shadow", "timewise"):
            if method == "timewise" and neurons != 0.9:
                continue  # heads only: the same configuration at both neuron targets
            if fits(f"{name} {method} h{heads}/n{neurons}", 12):
                guarded(f"{name} {method} h{heads}/n{neurons}")(bench.sparse)(method, heads, neurons)
    for s in ARGS.sweep:
        if fits(f"{name} sweep s={s}", 10):
            guarded(f"{name} sweep {s}")(bench.sweep_point)(s)
    if hf_static and fits(f"{name} HF static cache + torch.compile", ARGS.hf_static_need):
        guarded(f"{name} hf-static")(bench.hf)(True)
    del bench
    if torch.cuda.is_available():
        torch.cuda.empty_cache()


# wheels the GPU image lacks for DeepSpeed 0.19.8 (its other needs, numpy/packaging/psutil/torch/tqdm, are there)
DS_BINARY_WHEELS = ("einops", "hjson", "py-cpuinfo", "ninja", "msgpack", "pydantic", "pydantic-core", "annotated-types",
                    "typing-inspection", "typing-extensions")


def prepare_wheels(folder: str, python: str = "3.12") -> None:
    """On a machine with the package index: fill `folder` with what a GPU call must carry for DeepSpeed.
    DeepSpeed itself is built from its sdist without CUDA ops; the rest are binary wheels for the GPU's Python."""
    import subprocess

    target = Path(folder)
    target.mkdir(parents=True, exist_ok=True)
    env = {**os.environ, "DS_BUILD_OPS": "0"}
    subprocess.run([sys.executable, "-m", "pip", "wheel", "--no-deps", "-w", str(target), "deepspeed==0.19.8"],
                   check=True, env=env)
    platforms = [arg for p in ("manylinux_2_28_x86_64", "manylinux_2_17_x86_64", "manylinux2014_x86_64")
                 for arg in ("--platform", p)]
    subprocess.run([sys.executable, "-m", "pip", "download", "--no-deps", "--only-binary=:all:", "--python-version",
                    python, "--implementation", "cp", *platforms, "-d", str(target), *DS_BINARY_WHEELS], check=True)
    print("\n".join(sorted(p.name for p in target.glob("*.whl"))))


def main():
    global OUT, ARGS
    if "--prepare-wheels" in sys.argv:  # python -m harness.tools.latency_bench --prepare-wheels [.whl/deepspeed]
        rest = sys.argv[sys.argv.index("--prepare-wheels") + 1:]
        prepare_wheels(rest[0] if rest else ".whl/deepspeed")
        return
    parser = argparse.ArgumentParser()
    parser.add_argument("--out", default=os.environ.get("OUT") or "results/latency-bench")
    parser.add_argument("--budget", type=float, default=530.0, help="seconds; what would not fit is skipped")
    parser.add_argument("--models", default="opt-13b,opt-30b")
    parser.add_argument("--sweep", default="0.25,0.5,0.75,0.9,0.95")
    parser.add_argument("--hf-static-need", type=float, default=75.0, help="seconds to reserve for HF compile")
    parser.add_argument("--hf-static-models", default="opt-13b,opt-30b")
    parser.add_argument("--wheels", default=".whl/deepspeed")
    parser.add_argument("--no-deepspeed", action="store_true")
    parser.add_argument("--small", action="store_true")
    parser.add_argument("--ds-child", default=None)
    ARGS = parser.parse_args()
    ARGS.sweep = [float(s) for s in ARGS.sweep.split(",") if s]
    OUT = Path(ARGS.out)
    OUT.mkdir(parents=True, exist_ok=True)
    if ARGS.small:
        SETTINGS.update(prompt=8, new_tokens=6, backend="torch")
    if ARGS.ds_child:
        return ds_child(ARGS.ds_child)
    (OUT / "latency-bench.log").write_text("")
    import transformers
    import triton

    if torch.cuda.is_available():
        p = torch.cuda.get_device_properties(0)
        STATE["machine"] = (f"one {p.name} ({p.multi_processor_count} SMs, {p.total_memory / 2**30:.0f} GiB), "
                            f"torch {torch.__version__}, triton {triton.__version__}, transformers {transformers.__version__}, "
                            f"CUDA {torch.version.cuda}")
    else:
        STATE["machine"] = f"CPU, torch {torch.__version__} (smoke run)"
    log(STATE["machine"])
    prepare = None if ARGS.no_deepspeed or not torch.cuda.is_available() else ds_prepare_start()
    if ARGS.no_deepspeed or not torch.cuda.is_available():
        STATE["deepspeed"] = "not run (" + ("--no-deepspeed" if ARGS.no_deepspeed else "no GPU") + ")"
    from harness.latency import copy_bandwidth

    bw = copy_bandwidth(device(), 2048 if torch.cuda.is_available() else 16)
    log(f"copy bandwidth {bw / 1e12:.3f} TB/s (read + write)")
    STATE["notes"].append(f"Copy bandwidth: {bw / 1e12:.3f} TB/s (device-to-device copy of 2 GB, read + write).")
    models = [m for m in ARGS.models.split(",") if m]
    hf_static = set(ARGS.hf_static_models.split(","))
    ds_done = prepare is None
    for i, name in enumerate(models):
        guarded(f"{name}")(run_model)(name, bw, prepare, name in hf_static)
        write_report()
        if not ds_done and (prepare.poll() is not None or i == len(models) - 1) and fits("DeepSpeed opt-13b", 45):
            ds_done = True
            ds = ds_run(models[0], prepare, min(150.0, left() - 5))
            if "error" in ds:
                STATE["deepspeed"] = ("DeepSpeed-Inference (kernel injection, 0.19.8, ops JIT-built with nvcc) did not run "
                                      f"for {models[0]}:\n\n```\n{ds['error']}\n{ds.get('where', '')}\n```")
            else:
                STATE["deepspeed"] = f"ran for {models[0]}: {ds.get('token_ms', float('nan')):.3f} ms/token"
                bench_bw = bw
                rec = Bench.__new__(Bench)
                rec.name, rec.bw = models[0], bench_bw
                from harness.latency import floor_bytes
                from harness.models import opt_config

                c = opt_config(models[0]) if not ARGS.small else None
                if c is not None:
                    ds["floor_ms"] = floor_bytes(c, torch.float16, [c.num_attention_heads] * c.num_hidden_layers,
                                                 [c.ffn_dim] * c.num_hidden_layers, "all") / bw * 1e3
                Bench.record(rec, "dense · deepspeed", "0", ds)
            write_report()
    if not ds_done:
        STATE["deepspeed"] = f"not run: time budget (its op build log: {_tail(OUT / 'deepspeed-prepare.log', 5)})"
        if prepare is not None and prepare.poll() is None:
            prepare.kill()
    write_report()
    log(f"done in {time.time() - T0:.0f} s")
    print((OUT / "latency-h200.md").read_text())


if __name__ == "__main__":
    main()
