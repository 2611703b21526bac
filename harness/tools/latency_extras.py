"""Decode latency rows beside the latency suite's (issue 15): the TEAL kernel anchor and bf16.

    python3 -m harness.tools.latency_extras --out $OUT [--teal .gpu/anchors/teal] [--model opt-13b]

1. TEAL anchor: TEAL's own Triton sparse GEMV (`splitk_sparse_gemv`, FasterDecoding/TEAL, carried as an ignored
   folder, never part of the project) against ours at the model's shapes, in the same process: y = W·x̃ with
   x̃ = x where |x| > t, for input densities 0.1 / 0.5 / 0.9 / 1.0 (thresholds set from the quantiles of |x|),
   W the model's fc1 (d → F) and fc2 (F → d) shapes. Ours is `kernels.gemv_llama.input_sparse_add` (threshold in
   the kernel, fp32 accumulation; the accumulator's zeroing counted in its time) and, as the bound a compaction
   would give, the rows GEMV over only the kept rows of Wᵀ (`gemv.gather_cols` on precomputed indices); cuBLAS on
   the dense W is the dense reference. Medians of triton.testing.do_bench.
2. bf16: the model cast to bfloat16; dense, static h0.5/n0.9 and dejavu h0.5/n0.9 (seeded predictors: their cost
   does not depend on their values) on our engine, batch 1, prompt 128 + 128, kv as given.

Prints a markdown table last; writes latency-extras.md and latency-extras.json to --out.
"""
from __future__ import annotations

import argparse
import json
import sys
import time
import traceback
import types
from pathlib import Path

import torch

ROWS: list[dict] = []


def log(*parts):
    print(" ".join(str(p) for p in parts), flush=True)


def _teal_module(folder: Path):
    """TEAL's sparse_gemv.py, imported from its carried copy; its torch.compile wrapper base (compile_wrapper, not
    carried) is stubbed: only the Triton kernel and its launcher are timed."""
    stub = types.ModuleType("compile_wrapper")
    stub.BaseKernel = type("BaseKernel", (), {})
    sys.modules.setdefault("compile_wrapper", stub)
    sys.path.insert(0, str(folder))
    import sparse_gemv  # noqa: E402  (the anchor, by path)

    return sparse_gemv


def teal_anchor(folder: Path, d: int, F: int) -> None:
    import triton.testing

    from kernels import gemv, gemv_llama

    teal = _teal_module(folder)
    g = torch.Generator(device="cuda").manual_seed(0)
    for name, n_in, n_out in (("fc1 shape", d, F), ("fc2 shape", F, d)):
        wt = (torch.randn(n_in, n_out, device="cuda", generator=g) * 0.02).half()  # input-major (ours)
        w_col = wt.t()  # (n_out, n_in) column-major view: TEAL's layout
        x = torch.randn(1, n_in, device="cuda", generator=g).half()
        dense_ms = triton.testing.do_bench(lambda: torch.matmul(x, wt), return_mode="median")
        for density in (0.1, 0.5, 0.9, 1.0):
            t = 0.0 if density >= 1.0 else float(x.abs().float().quantile(1 - density))
            thresholds = torch.tensor([t, t, t], device="cuda", dtype=torch.float32)
            acc = torch.zeros(1, n_out, device="cuda", dtype=torch.float32)

            def ours():
                acc.zero_()
                gemv_llama.input_sparse_add(x, wt, thresholds, acc, segments=(0, n_out))

            kept = (x.abs() > t).nonzero()[:, 1].to(torch.int32)
            a = x[:, kept.long()].contiguous()

            def compact():
                gemv.gather_cols(a, wt, None, kept)

            def theirs():
                teal.splitk_sparse_gemv(x.view(1, 1, -1), w_col, t, 0)

            ref = (x.float() * (x.abs() > t)) @ wt.float()
            ours()
            err_ours = float((acc - ref).norm() / ref.norm())
            err_teal = float((theirs_out := teal.splitk_sparse_gemv(x.view(1, 1, -1), w_col, t, 0)).float().view(1, -1)
                             .sub(ref).norm() / ref.norm())
            del theirs_out
            row = {"part": "teal-anchor", "shape": name, "n_in": n_in, "n_out": n_out, "density": density,
                   "kept": int(kept.numel()),
                   "ours_ms": triton.testing.do_bench(ours, return_mode="median"),
                   "ours_compacted_ms": triton.testing.do_bench(compact, return_mode="median"),
                   "teal_ms": triton.testing.do_bench(theirs, return_mode="median"),
                   "cublas_dense_ms": dense_ms, "rel_err_ours": err_ours, "rel_err_teal": err_teal}
            ROWS.append(row)
            log(f"TEAL anchor {name} density {density}: ours {row['ours_ms'] * 1e3:.1f} us, compacted "
                f"{row['ours_compacted_ms'] * 1e3:.1f} us, TEAL {row['teal_ms'] * 1e3:.1f} us, cuBLAS dense "
                f"{dense_ms * 1e3:.1f} us (rel. err ours {err_ours:.1e}, TEAL {err_teal:.1e})")


def bf16_rows(model_name: str, kv: str) -> None:
    from harness.decoding import source_for
    from harness.engine import Allocation
    from harness.latency import copy_bandwidth, measure_ours, prompt_ids
    from harness.models import ModelSpec, load_model
    from harness.tools import latency_bench as lb
    from kernels.decode import DenseMasks, SparseDecoder

    model = load_model(ModelSpec(model_name, "random"), device="cuda", dtype=torch.bfloat16, seed=0)
    c = model.config
    bw = copy_bandwidth("cuda")
    prompt = prompt_ids(c, 1, 128, 0, "cuda")
    settings = dict(batch=1, prompt=128, new_tokens=128, warmup=1, repeats=2)
    layers = None
    for label, make, mode in (
            ("dense · ours", lambda: DenseMasks(c.num_hidden_layers), "all"),
            ("static h0.5/n0.9", lambda: source_for("static", lb.static_policy(model), Allocation(0.5, 0.9), model),
             "recompute"),
            ("dejavu h0.5/n0.9 (seeded)", lambda: source_for("dejavu", lb.predictors("dejavu", model),
                                                             Allocation(0.5, 0.9), model), kv)):
        try:
            source = make()
            engine = SparseDecoder(model, source, max_len=256, kv=mode, layers=layers)
            layers = engine.layers
            stats = measure_ours(engine, prompt, settings, "cuda")
            pb = source.predictor_bytes() if hasattr(source, "predictor_bytes") else 0
            floor = (engine.weight_bytes() + pb) / bw * 1e3
            ROWS.append({"part": "bf16", "model": model_name, "row": label, "kv": mode, "token_ms": stats["token_ms"],
                         "token_ms_p90": stats["token_ms_p90"], "floor_ms": floor})
            log(f"bf16 {model_name} {label} kv={mode}: {stats['token_ms']:.3f} ms/token (floor {floor:.3f})")
            del engine, source
        except Exception as exc:  # noqa: BLE001 - one row failing must not hide the others
            ROWS.append({"part": "bf16", "model": model_name, "row": label, "error": f"{type(exc).__name__}: {exc}"[:500]})
            log(traceback.format_exc())


def markdown() -> str:
    lines = ["| shape | input density | kept | ours (in-kernel threshold) µs | ours on compacted indices µs | "
             "TEAL µs | TEAL / ours | cuBLAS dense µs |", "|---|---|---|---|---|---|---|---|"]
    for r in ROWS:
        if r["part"] == "teal-anchor":
            lines.append(f"| {r['shape']} ({r['n_in']}→{r['n_out']}) | {r['density']} | {r['kept']} | "
                         f"{r['ours_ms'] * 1e3:.1f} | {r['ours_compacted_ms'] * 1e3:.1f} | {r['teal_ms'] * 1e3:.1f} | "
                         f"{r['teal_ms'] / r['ours_ms']:.2f} | {r['cublas_dense_ms'] * 1e3:.1f} |")
    lines += ["", "| bf16 row | kv | ms/token p50 | p90 | floor ms | × floor |", "|---|---|---|---|---|---|"]
    for r in ROWS:
        if r["part"] == "bf16":
            if r.get("error"):
                lines.append(f"| {r['model']} {r['row']} | – | error: {r['error'][:120]} | | | |")
            else:
                lines.append(f"| {r['model']} {r['row']} | {r['kv']} | {r['token_ms']:.3f} | {r['token_ms_p90']:.3f} | "
                             f"{r['floor_ms']:.3f} | {r['token_ms'] / r['floor_ms']:.2f} |")
    return "\n".join(lines) + "\n"


def main(argv=None):
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--out", required=True)
    parser.add_argument("--teal", default=".gpu/anchors/teal", help="folder holding TEAL's sparse_gemv.py")
    parser.add_argument("--model", default="opt-13b")
    parser.add_argument("--kv", default="all", help="K/V policy of the dejavu bf16 row")
    parser.add_argument("--parts", default="teal,bf16")
    args = parser.parse_args(argv)
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    begin = time.time()
    from harness.models import ModelSpec

    config = ModelSpec(args.model, "random").config()
    for part in args.parts.split(","):
        try:
            if part == "teal":
                teal_anchor(Path(args.teal), config.hidden_size, config.ffn_dim)
            elif part == "bf16":
                bf16_rows(args.model, args.kv)
        except Exception:  # noqa: BLE001
            log(f"part {part} failed:\n{traceback.format_exc()}")
        (out / "latency-extras.json").write_text(json.dumps(ROWS, indent=1))
        (out / "latency-extras.md").write_text(markdown())
    log(f"wall {time.time() - begin:.0f} s\n")
    log(markdown())


if __name__ == "__main__":
    main()
