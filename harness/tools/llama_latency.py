"""Decode latency of the Llama-family sparse decode engine (issue 16, item 5) on one GPU.

    python -m harness.tools.llama_latency --out DIR                  # H200: llama-2-7b and llama-3-8b shapes
    python -m harness.tools.llama_latency --out DIR --small          # llama-tiny on the CPU, TRITON_INTERPRET=1

Per model (built-in exact config, `--weights random`: seeded random weights built directly on the GPU in fp16;
batch 1, prompt 128 + 128 greedy tokens): rows
  dense · ours        kernels.decode_llama.LlamaSparseDecoder, DenseMasks, CUDA graph, PDL (gemv's default mode)
  dense · hf-eager    Hugging Face generate, dynamic cache (reference)
  static h0.5/n0.9    the static method's source (random importance tables: latency does not depend on them)
  teal 40% / 50%      teal:uniform thresholds fitted on calibration windows of random token ids (methods.teal
                      .magnitude_histograms of the random-weight model's q/k/v/o/gate/up/down inputs, the quantile
                      at the target per layer and site), the engine's input-sparse path; the achieved input sparsity
                      of the decoded tokens is recorded (thresholds fluctuate)
  dejavu h0.5/n0.9    Deja Vu's low-rank predictors (methods.dejavu defaults, hidden 1000), seeded, untrained
  shadow h0.5/n0.9    ShadowLLM's one predictor (hidden 2048, layer 0 dense), seeded, untrained
each with ms/token (median of CUDA-event step times), its weight-streaming floor (bytes the step reads: kept weights,
lm_head, the predictor's weights; teal: the mean kept input rows of the decoded tokens; / harness.latency
.copy_bandwidth) and the ratio to our dense engine. Writes llama-latency.md and llama-latency.json to --out and
prints the table last. Timing and statistics are harness.latency's.
"""
from __future__ import annotations

import argparse
import json
import os
import sys
import time
import traceback
from pathlib import Path

T0 = time.time()
#: seconds of the budget kept for each model still to come (llama-3-8b took 55 s for every row after llama-2-7b)
RESERVE_S = 60.0


def log(*parts):
    print(f"[{time.time() - T0:6.1f}s]", *parts, flush=True)


def main(argv=None):
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--out", required=True)
    parser.add_argument("--small", action="store_true", help="tiny shapes on the CPU under TRITON_INTERPRET=1")
    parser.add_argument("--models", default=None, help="comma-separated built-in names (default llama-2-7b,llama-3-8b)")
    parser.add_argument("--rows", default="dense,hf-eager,static,teal40,teal50,dejavu,shadow")
    parser.add_argument("--budget", type=float, default=540.0, help="seconds; rows that would not fit are skipped")
    args = parser.parse_args(argv)
    if args.small:
        os.environ["TRITON_INTERPRET"] = "1"  # before any Triton kernel is defined
    run(args)


def run(args):
    import torch

    from harness.engine import Allocation
    from harness.latency import copy_bandwidth, measure_hf, measure_ours, prompt_ids
    from harness.models import ModelSpec, load_model
    from kernels.decode import DenseMasks
    from kernels.decode_llama import LlamaSparseDecoder

    out_dir = Path(args.out)
    out_dir.mkdir(parents=True, exist_ok=True)
    small = args.small
    device = "cpu" if small else "cuda"
    dtype = torch.float32 if small else torch.float16
    models = args.models.split(",") if args.models else (["llama-tiny"] if small else ["llama-2-7b", "llama-3-8b"])
    wanted = args.rows.split(",")
    settings = dict(prompt=8 if small else 128, new_tokens=4 if small else 128, warmup=1, repeats=1 if small else 2,
                    seed=0)
    hf_settings = {**settings, "repeats": 1}
    machine = torch.cuda.get_device_name() if torch.cuda.is_available() else "cpu"
    report = {"machine": machine, "torch": torch.__version__, "settings": settings, "models": {}, "skipped": [],
              "errors": []}
    log(f"machine {machine}; models {models}; rows {wanted}")
    bw = copy_bandwidth(device, 8 if small else None)
    report["copy_bandwidth_gbps"] = bw / 1e9
    log(f"copy bandwidth {bw / 1e9:.0f} GB/s")
    run_start = time.time()

    for position, name in enumerate(models):
        start = time.time()
        rows = []
        report["models"][name] = rows
        log(f"== {name}: building the random model on {device} ({dtype})")
        model = load_model(ModelSpec(name, "random"), device=device, dtype=dtype, seed=0)
        config = model.config
        L, H, Fd = config.num_hidden_layers, config.num_attention_heads, config.ffn_dim
        prompt = prompt_ids(config, 1, settings["prompt"], 0, device)
        max_len = settings["prompt"] + settings["new_tokens"]
        shared = {}  # the re-laid-out weights, shared by every engine of this model
        log(f"model built in {time.time() - start:.1f} s")

        def engine_for(source):
            kw = dict(max_len=max_len, backend="triton", cuda_graph=not small, device=device, dtype=dtype)
            if "layers" in shared:
                kw["layers"] = shared["layers"]
            engine = LlamaSparseDecoder(model, source, **kw)
            shared["layers"] = engine.layers
            return engine

        def ours(label, sparsity, source, note=""):
            engine = engine_for(source)
            stats = measure_ours(engine, prompt, settings, device)
            pred = source.predictor_bytes() if hasattr(source, "predictor_bytes") else 0
            row = {"row": label, "engine": "ours", "sparsity": sparsity, "token_ms": stats["token_ms"],
                   "token_ms_p90": stats["token_ms_p90"], "prefill_ms": stats["prefill_ms"],
                   "weight_bytes": engine.weight_bytes(), "predictor_bytes": pred, "note": note,
                   "heads_kept": engine.heads_kept, "neurons_kept": engine.neurons_kept,
                   "peak_mem_gb": stats["peak_mem_gb"], "cuda_graph": bool(engine.use_graph)}
            if engine.input_sparse:
                achieved = engine.input_sparsity()
                row["achieved_inputs"] = achieved["achieved_inputs"]
                row["achieved_per_token"] = achieved["per_token"]
                row["achieved_inputs_per_site"] = achieved["achieved_inputs_per_site"]
            else:
                row["achieved_heads"] = sum(1 - k / H for k in engine.heads_kept) / L
                row["achieved_neurons"] = sum(1 - k / Fd for k in engine.neurons_kept) / L
            row["floor_ms"] = (row["weight_bytes"] + pred) / bw * 1e3
            del engine
            return row

        def guarded(label, fn, need_s):
            # one budget for the run: the first model pays the kernels' autotuning, so an equal split starved it;
            # each model still to come keeps RESERVE_S for its own rows (shapes shared with an earlier model tune
            # nothing new)
            left = args.budget - (time.time() - run_start) - RESERVE_S * (len(models) - position - 1)
            if left < need_s:
                report["skipped"].append(f"{name} {label}: {left:.0f} s of the run's budget left, needs ~{need_s:.0f}")
                log(f"SKIP {label}")
                return
            t = time.time()
            try:
                row = fn()
                rows.append(row)
                log(f"{label}: {row['token_ms']:.3f} ms/token, floor {row['floor_ms']:.3f} ms ({time.time() - t:.1f} s)")
            except Exception as exc:  # noqa: BLE001 - one row failing must not hide the others
                report["errors"].append(f"{name} {label}: {type(exc).__name__}: {exc}")
                log(f"ERROR {label}: {traceback.format_exc()}")
            if not small:
                torch.cuda.empty_cache()

        if "dense" in wanted:
            guarded("dense · ours", lambda: ours("dense · ours", "0", DenseMasks(L)), 20)
        if "hf-eager" in wanted:
            def hf():
                stats = measure_hf(model, prompt, hf_settings, device, static=False)
                dense = engine_for(DenseMasks(L)).weight_bytes() if "layers" in shared else None
                return {"row": "dense · hf-eager", "engine": "hf-eager", "sparsity": "0", "token_ms": stats["token_ms"],
                        "token_ms_p90": stats["token_ms_p90"], "prefill_ms": stats["prefill_ms"],
                        "weight_bytes": dense, "predictor_bytes": 0,
                        "floor_ms": dense / bw * 1e3 if dense else None, "note": "reference"}
            guarded("dense · hf-eager", hf, 15)
        if "static" in wanted:
            def static():
                from harness.decoding import source_for
                from methods.static import StaticPolicy

                g = torch.Generator().manual_seed(11)
                policy = StaticPolicy(torch.rand(L, H, generator=g), torch.rand(L, Fd, generator=g))
                return ours("static", "h0.5/n0.9", source_for("static", policy, Allocation(0.5, 0.9), model))
            guarded("static", static, 20)
        counts = {}
        for target in (0.4, 0.5):
            key = f"teal{int(target * 100)}"
            if key not in wanted:
                continue

            def teal(target=target):
                from methods.teal import InputThresholdPolicy, decode_source, magnitude_histograms, threshold

                sites = ["q", "k", "v", "o", "gate", "up", "down"]
                if "counts" not in counts:
                    windows = 2 if small else 4
                    ids = torch.randint(3, config.vocab_size, (windows, settings["prompt"]),
                                        generator=torch.Generator().manual_seed(5))
                    counts["counts"] = magnitude_histograms(model, ids, sites)
                hist = counts["counts"]
                t = torch.tensor([[threshold(hist[l, s], target) for s in range(len(sites))] for l in range(L)],
                                 dtype=torch.float64)
                source = decode_source(InputThresholdPolicy(t, sites), Allocation(inputs=target), model)
                return ours(f"teal {int(target * 100)}%", f"i{target}", source,
                            note="teal:uniform, thresholds fitted on random-token calibration windows")
            guarded(f"teal {int(target * 100)}%", teal, 25)
        if "dejavu" in wanted:
            def dejavu():
                from harness.decoding import source_for
                from methods.dejavu import DEFAULTS, DejaVuPolicy
                from methods.predictors import low_rank

                torch.manual_seed(1)
                with torch.device(device):
                    attn = {l: low_rank(config.hidden_size, DEFAULTS["hidden"], H) for l in range(L)}
                    mlp = {l: low_rank(config.hidden_size, DEFAULTS["hidden"], Fd) for l in range(L)}
                source = source_for("dejavu", DejaVuPolicy(attn, mlp), Allocation(0.5, 0.9), model)
                return ours("dejavu", "h0.5/n0.9", source, note="seeded untrained predictors (hidden 1000)")
            guarded("dejavu", dejavu, 30)
        if "shadow" in wanted:
            def shadow():
                from harness.decoding import source_for
                from methods.shadow import DEFAULTS, ShadowPolicy, shadow_predictor

                torch.manual_seed(2)
                with torch.device(device):
                    predictor = shadow_predictor(config, DEFAULTS["hidden"])
                source = source_for("shadow", ShadowPolicy(predictor, config), Allocation(0.5, 0.9, dense_layers=(0,)), model)
                del predictor
                return ours("shadow", "h0.5/n0.9", source, note="seeded untrained predictor (hidden 2048), layer 0 dense")
            guarded("shadow", shadow, 30)
        log(f"{name}: {time.time() - start:.1f} s")
        del model, shared
        if not small:
            torch.cuda.empty_cache()
        write(out_dir, report)
    text = write(out_dir, report)
    print(text, flush=True)


def _f(value, digits=2):
    return "–" if value is None else f"{value:.{digits}f}"


def markdown(report) -> str:
    s = report["settings"]
    lines = [f"# Llama-family decode latency ({report['machine']})", "",
             f"Random weights (seeded), batch 1, prompt {s['prompt']} + {s['new_tokens']} greedy tokens; medians of "
             f"step times (CUDA events on a GPU, host timers on a CPU) ({s['repeats']} measured requests after {s['warmup']} warm-up for ours, 1 for "
             f"Hugging Face); copy bandwidth {report['copy_bandwidth_gbps']:.0f} GB/s (read + write).", ""]
    for name, rows in report["models"].items():
        dense = next((r["token_ms"] for r in rows if r["row"] == "dense · ours"), None)
        lines += [f"## {name}", "",
                  "| row | sparsity | achieved | ms/token p50 | p90 | floor ms | × floor | × vs dense ours | weights GB | note |",
                  "|---|---|---|---|---|---|---|---|---|---|"]
        for r in rows:
            if "achieved_inputs" in r:
                pt = r["achieved_per_token"]
                achieved = f"inputs {r['achieved_inputs']:.3f} (per token {pt['min']:.3f}–{pt['max']:.3f})"
            elif "achieved_heads" in r:
                achieved = f"h {r['achieved_heads']:.2f} / n {r['achieved_neurons']:.2f}"
            else:
                achieved = "–"
            token, floor = r.get("token_ms"), r.get("floor_ms")
            gb = ((r.get("weight_bytes") or 0) + (r.get("predictor_bytes") or 0)) / 1e9
            lines.append(f"| {r['row']} | {r['sparsity']} | {achieved} | {_f(token, 3)} | {_f(r.get('token_ms_p90'), 3)} "
                         f"| {_f(floor, 3)} | {_f(token / floor if token and floor else None)} "
                         f"| {_f(dense / token if dense and token else None)} | {gb:.2f} | {r.get('note', '')} |")
        teal50 = next((r["token_ms"] for r in rows if r["row"] == "teal 50%"), None)
        dense_row = next((r for r in rows if r["row"] == "dense · ours"), None)
        lines.append("")
        if dense_row:
            lines.append(f"- dense ≤ 1.10× its floor: {dense_row['token_ms'] / dense_row['floor_ms']:.3f}× "
                         f"({'met' if dense_row['token_ms'] <= 1.10 * dense_row['floor_ms'] else 'not met'})")
        if dense and teal50:
            lines.append(f"- teal 50% ≥ 1.8× our dense: {dense / teal50:.3f}× ({'met' if dense / teal50 >= 1.8 else 'not met'})")
        lines.append("")
    if report["skipped"]:
        lines += ["Skipped:", *[f"- {s}" for s in report["skipped"]], ""]
    if report["errors"]:
        lines += ["Errors:", *[f"- {e}" for e in report["errors"]], ""]
    return "\n".join(lines)


def write(out_dir: Path, report) -> str:
    text = markdown(report)
    (out_dir / "llama-latency.md").write_text(text)
    (out_dir / "llama-latency.json").write_text(json.dumps(report, indent=1, default=str))
    return text


if __name__ == "__main__":
    sys.exit(main())
