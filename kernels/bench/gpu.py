"""GPU checks and figures of the sparse kernels and the sparse decode engine (issue 7).

    KERNELS_AUTOTUNE=0 python -m kernels.bench.gpu --part checks  # (a) kernel checks at OPT-13B/30B shapes, fp16/bf16/fp32
    python -m kernels.bench.gpu --part topk                       # (e) the predictors' top-k, each search, ties
    python -m kernels.bench.gpu --part perf                       # (b) kernel bandwidth at OPT-30B shapes, 25% density
                                                                  # (c) engine vs masked engine, opt-13b shape, 3 layers
                                                                  # (d) decode ms/token, random-weight OPT-13B, CUDA graph
    TRITON_INTERPRET=1 python -m kernels.bench.gpu --small        # the same code at tiny shapes on a CPU (smoke test)

Writes a log and a markdown summary under --out (default $OUT, else results/kernels-bench); the summary table
is printed last. Bandwidths are bytes the kernel must read / its median CUPTI duration from a cold L2
(`kernel_ms`, which also gives the per-layer kernel times); the copy bandwidth counts bytes read + written by a device-to-device
copy (the convention of issue 7: 26.2 GB at 4.28 TB/s = 6.1 ms). `--part bandwidth` and `--part equivalence`
run (b) and (c) alone. `--part configs` (not in `all`) times every candidate block config of the step's four
GEMVs and ranks the autotuner's pick (`part_configs`).
"""
from __future__ import annotations

import argparse
import os
import statistics
import time
import traceback
from pathlib import Path

import torch

ROWS: list[tuple] = []  # (section, what, value, note)
LOG = None
T0 = time.time()


def log(*args):
    text = " ".join(str(a) for a in args)
    print(text, flush=True)
    if LOG is not None:
        with open(LOG, "a") as handle:
            handle.write(text + "\n")


def row(section, what, value, note=""):
    ROWS.append((section, what, value, note))
    log(f"[{section}] {what}: {value} {note}")


def guarded(fn):
    def wrapper(*args, **kwargs):
        try:
            return fn(*args, **kwargs)
        except Exception as exc:  # keep going: one device call must return every other figure
            log(f"ERROR in {fn.__name__}: {exc!r}")
            log(traceback.format_exc())
            row(fn.__name__, "ERROR", repr(exc)[:200])
    return wrapper


def cuda() -> bool:
    return torch.cuda.is_available()


def bench_ms(fn) -> float:
    """Median ms of fn: triton's do_bench on CUDA (L2 flushed between runs), wall clock on CPU."""
    if cuda():
        from triton.testing import do_bench

        return do_bench(fn, warmup=25, rep=200, return_mode="median")
    times = []
    for _ in range(3):
        start = time.perf_counter()
        fn()
        times.append((time.perf_counter() - start) * 1e3)
    return statistics.median(times)


# ------------------------------------------------------------------------------------------------------------
# (a) checks
# ------------------------------------------------------------------------------------------------------------
def shapes(small):
    if small:
        return [("tiny", 64, 256, 4)]
    return [("opt-13b", 5120, 20480, 40), ("opt-30b", 7168, 28672, 56)]


def part_checks(small):
    from kernels import checks

    for name, d, F, H in shapes(small):
        hd = d // H
        cases = [(torch.float16, 1), (torch.float16, 8), (torch.bfloat16, 1), (torch.bfloat16, 8), (torch.float32, 1)]
        for dtype, B in cases:
            tag = f"{name} {str(dtype)[6:]} B={B}"
            run = [
                ("fc1 25%+3", lambda: checks.check_fc1(d, F, F // 4 + 3, B, dtype, seed=1)),
                ("fc2 10%+5", lambda: checks.check_fc2(d, F, F // 10 + 5, B, dtype, seed=2, residual=True)),
                ("qkv heads", lambda: checks.check_qkv(d, H, hd, H // 2 + 1, B, dtype, seed=3, part="qkv")),
                ("q heads", lambda: checks.check_qkv(d, H, hd, H // 4 + 1, B, dtype, seed=4, part="q")),
                ("out_proj heads", lambda: checks.check_out_proj(d, H, hd, H // 2 + 1, B, dtype, seed=5)),
                ("kv_to_cache", lambda: checks.check_kv_to_cache(d, H, hd, 64, H // 2 + 1, B, dtype, seed=6)),
                ("attention T=256", lambda: checks.check_attention(H, hd, 256, H // 2 + 1, B, 200, dtype, seed=7)),
                ("attention T=256 fixed heads", lambda: checks.check_attention(H, hd, 256, H // 2 + 1, B, 200, dtype,
                                                                               seed=7, fixed=True)),
                ("kv_recompute", lambda: checks.check_recompute(d, H, hd, 64, H // 2 + 1, B, 50, dtype, seed=8)),
                ("layer_norm (+keep)", lambda: checks.check_layer_norm(d, 64, B, dtype, seed=9, keep=True)),
                ("qkv_to_cache", lambda: checks.check_qkv_to_cache(d, H, hd, 64, H // 2 + 1, B, dtype, seed=13)),
                ("attend+out_proj_add T=256", lambda: checks.check_attend_out_proj(d, H, hd, 256, H // 2 + 1, B, 200,
                                                                                   dtype, seed=10)),
                ("fc2_add 10%+5", lambda: checks.check_fc2_add(d, F, F // 10 + 5, B, dtype, seed=12)),
                ("argmax vocab", lambda: checks.check_argmax(50272, B, seed=18)),
                ("embed", lambda: checks.check_embed(d, 1000, 256, B, dtype, seed=19)),
                ("topk neurons 10%", lambda: checks.check_topk(F, F // 10, B, seed=14)),
                ("topk heads 50%", lambda: checks.check_topk(H, H // 2, B, seed=15)),
            ]
            for what, fn in run:
                try:
                    err = fn()
                    row("checks", f"{tag} {what}", f"PASS rel.err {err:.2e}")
                except Exception as exc:  # noqa: BLE001
                    row("checks", f"{tag} {what}", f"FAIL {str(exc)[:160]}")
                    log(traceback.format_exc())


# ------------------------------------------------------------------------------------------------------------
# (b) kernel bandwidth
# ------------------------------------------------------------------------------------------------------------
def copy_bandwidth(small) -> float:
    """Bytes/s of a device-to-device copy, counting bytes read + written."""
    n = (1 << 20) if small else (1 << 30)  # 2 GiB fp16 each way
    dev = "cuda" if cuda() else "cpu"
    x = torch.randn(n, device=dev, dtype=torch.float16)
    y = torch.empty_like(x)
    ms = bench_ms(lambda: y.copy_(x))
    bw = 2 * x.numel() * 2 / (ms * 1e-3)
    row("perf", "device-to-device copy", f"{bw / 1e12:.3f} TB/s", f"({2 * n * 2 / 1e9:.1f} GB moved in {ms:.3f} ms)")
    del x, y
    return bw


@guarded
def part_kernel_bandwidth(small, copy_bw):
    from kernels import gemv

    dev = "cuda" if cuda() else "cpu"
    name, d, F, H = shapes(small)[-1]
    hd, dt, B = d // H, torch.float16, 1
    kf, kh = F // 4, H // 4
    g = torch.Generator().manual_seed(0)
    rnd = lambda *s: (torch.randn(*s, generator=g) * 0.02).to(dev, dt)  # noqa: E731
    sel = lambda n, k: torch.randperm(n, generator=g)[:k].sort().values.to(torch.int32).to(dev)  # noqa: E731
    x, w1, b1, w2t, b2 = rnd(B, d), rnd(F, d), rnd(F), rnd(F, d), rnd(d)
    wqkv, bqkv, wot, bo = rnd(3 * d, d), rnd(3 * d), rnd(d, d), rnd(d)
    nid, hid, all_h = sel(F, kf), sel(H, kh), torch.arange(H, device=dev, dtype=torch.int32)
    a = rnd(B, kf).abs()
    attn = rnd(B, kh * hd)
    cache = rnd(B, H, 256, 2, hd)
    pos = torch.tensor([255], device=dev)
    q = rnd(B, kh, hd)
    e = 2
    cases = [
        ("fc1 gather (25% neurons)", lambda: gemv.fc1_gather(x, w1, b1, nid), kf * (d + 1) * e),
        ("fc2 gather (25% neurons)", lambda: gemv.fc2_gather(a, w2t, b2, nid), (kf * d + d) * e),
        ("qkv heads (25% heads)", lambda: gemv.qkv_heads(x, wqkv, bqkv, hid, hd, "qkv"), 3 * kh * hd * (d + 1) * e),
        ("q heads (25% heads)", lambda: gemv.qkv_heads(x, wqkv, bqkv, hid, hd, "q"), kh * hd * (d + 1) * e),
        ("kv all heads -> cache", lambda: gemv.kv_to_cache(x, wqkv, bqkv, all_h, hd, cache, pos), 2 * H * hd * (d + 1) * e),
        ("out_proj heads (25% heads)", lambda: gemv.out_proj_heads(attn, wot, bo, hid, hd), (kh * hd * d + d) * e),
        ("attention 25% heads, T=256", lambda: gemv.head_attention(q, cache, hid, pos, hd ** -0.5), kh * 256 * 2 * hd * e),
    ]
    h32 = x.float()
    attn_out = gemv.attend(q, cache, hid, pos, hd ** -0.5)
    cases += [
        ("[step] layer_norm", lambda: gemv.layer_norm(h32, b2, b2, 1e-5, dt), 0),
        ("[step] fc2_add (25% neurons)", lambda: gemv.fc2_add(a, w2t, b2, nid, h32), (kf * d + d) * e),
        ("[step] qkv_to_cache (25% heads)", lambda: gemv.qkv_to_cache(x, wqkv, bqkv, hid, hd, cache, pos),
         3 * kh * hd * (d + 1) * e),
        ("[step] out_proj_add (25% heads)", lambda: gemv.out_proj_add(attn_out, wot, bo, hid, hd, h32),
         (kh * hd * d + d) * e),
        ("[step] attend 25% heads, T=256", lambda: gemv.attend(q, cache, hid, pos, hd ** -0.5), kh * 256 * 2 * hd * e),
    ]
    w_dense = rnd(kf, d)
    cases.append(("[cuBLAS] dense GEMV, fc1-sized rows", lambda: torch.nn.functional.linear(x, w_dense), kf * d * e))
    log(f"kernel bandwidth at {name} shapes (d={d}, F={F}, H={H}), fp16, batch 1, 25% density: each case's kernel "
        f"durations (CUPTI) after an L2 flush, PDL off")
    with gemv.pdl_off():
        _time_cases(cases, copy_bw)


def kernel_ms(fn, reps=20) -> float:
    """Median over reps of the summed CUDA durations (CUPTI, torch.profiler) of the kernels fn launches, each rep
    after a 256 MB write that flushes the L2: the kernels' own time from a cold cache, without launch overhead
    (CUDA-event timing of a 10–40 µs kernel mostly measures the launch). Wall clock on a CPU."""
    if not cuda():
        return bench_ms(fn)
    from torch.profiler import ProfilerActivity, profile

    from kernels.profiling import kernel_events

    flush = torch.empty(256 << 20, dtype=torch.int8, device="cuda")
    fn()
    torch.cuda.synchronize()
    with profile(activities=[ProfilerActivity.CUDA]) as prof:
        for _ in range(reps):
            flush.fill_(1)
            fn()
        torch.cuda.synchronize()
    per_rep, current = [], None
    for name, _, us in kernel_events(prof):
        if "FillFunctor" in name:  # the flush starts a rep
            if current is not None:
                per_rep.append(current)
            current = 0.0
        elif current is not None:
            current += us
    per_rep.append(current)
    return statistics.median(per_rep) / 1e3


def _time_cases(cases, copy_bw):
    for what, fn, nbytes in cases:
        fn()  # autotune outside the timing
        ms = kernel_ms(fn)
        bw = nbytes / (ms * 1e-3)
        if not nbytes:
            row("bandwidth", what, f"{ms * 1e3:.1f} us")
            continue
        row("bandwidth", what, f"{ms * 1e3:.1f} us, {bw / 1e12:.2f} TB/s = {100 * bw / copy_bw:.0f}% of copy",
            f"({nbytes / 1e6:.1f} MB)")


# ------------------------------------------------------------------------------------------------------------
# (c) engine vs masked engine, (d) decode timing
# ------------------------------------------------------------------------------------------------------------
def build_model(small, layers=None, perturb=False, name="opt-13b"):
    from transformers import OPTConfig, OPTForCausalLM

    from harness.models import opt_config

    if small:
        config = OPTConfig(vocab_size=512, hidden_size=64, num_hidden_layers=2, num_attention_heads=4, ffn_dim=256,
                           word_embed_proj_dim=64, max_position_embeddings=512, dropout=0.0)
    else:
        config = opt_config(name)
    if layers is not None:
        config.num_hidden_layers = layers
    config._attn_implementation = "sdpa"
    dev = "cuda" if cuda() else "cpu"
    dtype = torch.float16 if cuda() else torch.float32
    torch.manual_seed(0)
    previous = torch.get_default_dtype()
    torch.set_default_dtype(dtype)
    try:
        with torch.device(dev):
            model = OPTForCausalLM(config).eval()
    finally:
        torch.set_default_dtype(previous)
    model.requires_grad_(False)
    if perturb:  # HF initialises biases to zero: make them (and the norms) non-trivial for the comparison
        with torch.no_grad():
            for p in model.parameters():
                if p.dim() == 1:
                    p.add_(torch.randn_like(p) * 0.02)
    return model


@guarded
def part_equivalence(small):
    from kernels.decode import SparseDecoder, StaticMasks
    from kernels.equivalence import (ScheduleSource, masked_engine_logits, random_schedule, relative_errors,
                                     sparse_engine_logits)

    model = build_model(small, layers=None if small else 3, perturb=True)
    c = model.config
    H, F, L = c.num_attention_heads, c.ffn_dim, c.num_hidden_layers
    kh, kf = H // 2, F // 10
    dev = next(model.parameters()).device
    g = torch.Generator().manual_seed(1)
    prompt = torch.randint(0, c.vocab_size, (1, 32), generator=g).to(dev)
    tokens = torch.randint(0, c.vocab_size, (16,), generator=g).to(dev)
    tol = 1e-2 if cuda() else 1e-4
    log(f"engine vs masked engine: {'tiny' if small else 'opt-13b shape'}, {L} layers, {next(model.parameters()).dtype}, "
        f"kept {kh}/{H} heads, {kf}/{F} neurons, prompt 32 + 16 tokens")
    for per_step, kv, graph in [(True, "all", False), (True, "recompute", False), (False, "recompute", True),
                                (False, "all", True)]:
        schedule = random_schedule(H, F, kh, kf, per_step=per_step)
        expected = masked_engine_logits(model, schedule, prompt, tokens, kh, kf)
        if per_step:
            source = ScheduleSource(schedule)
        else:
            source = StaticMasks(*zip(*[schedule(0, layer) for layer in range(L)]))
        engine = SparseDecoder(model, source, max_len=64, kv=kv, heads_kept=kh, neurons_kept=kf, cuda_graph=graph)
        errors, agree = relative_errors(sparse_engine_logits(engine, prompt, tokens), expected)
        ok = max(errors) <= tol
        masks = "per-token random masks" if per_step else "static masks"
        row("equivalence", f"kv={kv}, {masks}, graph={graph and cuda()}",
            f"{'PASS' if ok else 'FAIL'} max rel.err {max(errors):.2e} (tol {tol:g}), argmax agrees {sum(agree)}/{len(agree)}")
        del engine
    del model
    if cuda():
        torch.cuda.empty_cache()


@guarded
def part_decode_timing(small, copy_bw):
    from kernels.decode import DenseMasks, SparseDecoder, StaticMasks

    model = build_model(small)
    c = model.config
    H, F, L = c.num_attention_heads, c.ffn_dim, c.num_hidden_layers
    dev = next(model.parameters()).device
    prompt_len, new = (128, 128) if not small else (16, 8)
    prompt = torch.randint(0, c.vocab_size, (1, prompt_len), generator=torch.Generator().manual_seed(2)).to(dev)
    g = torch.Generator().manual_seed(3)
    heads = [torch.randperm(H, generator=g)[:H // 2].sort().values for _ in range(L)]
    neurons = [torch.randperm(F, generator=g)[:F // 10].sort().values for _ in range(L)]
    log(f"decode timing: random-weight {'tiny' if small else 'opt-13b'} ({L} layers), fp16, batch 1, "
        f"prompt {prompt_len} + {new} tokens")
    base = None
    for label, masks, kv in [("dense (all heads/neurons)", DenseMasks(L), "all"),
                             ("50% heads + 90% neurons, kv=recompute", StaticMasks(heads, neurons), "recompute"),
                             ("50% heads + 90% neurons, kv=all", StaticMasks(heads, neurons), "all")]:
        engine = SparseDecoder(model, masks, max_len=prompt_len + new + 1, kv=kv,
                               layers=base.layers if base is not None else None)
        if base is None:
            base = engine
            free_layers(model)
        per_token, replay = time_decode(engine, prompt, new)
        floor = engine.weight_bytes() / copy_bw * 1e3
        row("decode", label, f"{statistics.median(per_token):.3f} ms/token (p90 {quantile(per_token, 0.9):.3f}; "
            f"graph replay alone {replay:.3f})", f"floor {floor:.3f} ms ({engine.weight_bytes() / 1e9:.2f} GB)")
        if engine is not base:
            del engine
    if not small:
        layer_breakdown(base, heads, neurons)


def free_layers(model):
    """The engine holds its own re-laid-out copy of the decoder layers: drop the model's (memory)."""
    model.model.decoder.layers = None
    if cuda():
        torch.cuda.empty_cache()


def quantile(values, q):
    values = sorted(values)
    return values[min(len(values) - 1, int(q * len(values)))]


@torch.no_grad()
def time_decode(engine, prompt, new):
    engine.prefill(prompt)
    engine.step(engine.next_token)  # capture + autotune (not timed)
    times = []
    for _ in range(new - 1):
        token = engine.next_token  # the step's greedy token, computed inside the step
        if cuda():
            start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
            start.record()
            logits = engine.step(token)
            end.record()
            end.synchronize()
            times.append(start.elapsed_time(end))
        else:
            t = time.perf_counter()
            logits = engine.step(token)
            times.append((time.perf_counter() - t) * 1e3)
    replay = float("nan")
    if cuda() and engine.graph is not None:  # back-to-back replays (pos advances; stays inside max_len below)
        engine.pos.fill_(prompt.shape[1])
        start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
        n = min(32, new - 1)
        start.record()
        for _ in range(n):
            engine.graph.replay()
        end.record()
        end.synchronize()
        replay = start.elapsed_time(end) / n
    return times, replay


def layer_breakdown(engine, heads, neurons):
    """do_bench of each kernel of one sparse layer (50% heads, 90% neurons skipped), opt-13b shapes."""
    import torch.nn.functional as F

    from kernels import gemv

    w, d, hd, B = engine.layers[0], engine.hidden, engine.head_dim, 1
    dev = engine.device
    x = torch.randn(B, d, device=dev, dtype=engine.dtype)
    h_idx = heads[0].to(dev, torch.int32)
    n_idx = neurons[0].to(dev, torch.int32)
    all_h = engine.all_heads
    cache = engine.cache[0]
    pos = torch.tensor([200], device=dev)
    q = torch.randn(B, h_idx.numel(), hd, device=dev, dtype=engine.dtype)
    a = torch.randn(B, n_idx.numel(), device=dev, dtype=engine.dtype).abs()
    all_n = torch.arange(engine.ffn_dim, device=dev, dtype=torch.int32)
    a_all = torch.randn(B, engine.ffn_dim, device=dev, dtype=engine.dtype).abs()
    have = torch.ones(engine.num_heads, cache.shape[2], dtype=torch.int8, device=dev)
    xkeep = torch.randn(B, cache.shape[2], d, device=dev, dtype=engine.dtype)
    h32 = x.float()
    attn_out = gemv.attend(q, cache, h_idx, pos, hd ** -0.5)
    parts = [
        ("layer_norm (+keep)", lambda: gemv.layer_norm(h32, w.ln1_w, w.ln1_b, w.eps1, x.dtype, keep=xkeep, pos=pos)),
        ("qkv_to_cache, all heads (dense)", lambda: gemv.qkv_to_cache(x, w.wqkv, w.bqkv, all_h, hd, cache, pos)),
        ("qkv_to_cache, kept heads", lambda: gemv.qkv_to_cache(x, w.wqkv, w.bqkv, h_idx, hd, cache, pos)),
        ("attend, kept heads, nothing to recompute", lambda: gemv.attend(q, cache, h_idx, pos, hd ** -0.5,
                                                                          recompute=(xkeep, w.wqkv, w.bqkv, have))),
        ("out_proj_add, kept heads", lambda: gemv.out_proj_add(attn_out, w.wot, w.bo, h_idx, hd, h32)),
        ("fc1, kept neurons", lambda: gemv.fc1_gather(x, w.w1, w.b1, n_idx)),
        ("fc2_add, kept neurons", lambda: gemv.fc2_add(a, w.w2t, w.b2, n_idx, h32)),
        ("fc1, all neurons (dense)", lambda: gemv.fc1_gather(x, w.w1, w.b1, all_n)),
        ("fc2_add, all neurons (dense)", lambda: gemv.fc2_add(a_all, w.w2t, w.b2, all_n, h32)),
        ("lm_head (per step, not per layer)", lambda: F.linear(x, engine.lm_head)),
    ]
    with gemv.pdl_off():
        for what, fn in parts:
            fn()
            row("layer", what, f"{kernel_ms(fn) * 1e3:.1f} us")


def _candidate_configs(keys, sizes, iters=(None,)):
    """Every (block sizes, ITERS, warps) of the grid that the autotuner's prune rule keeps, plus the tuned list."""
    import itertools

    import triton

    from kernels import gemv

    out = []
    for blocks, it, warps in itertools.product(itertools.product(*sizes), iters, (4, 8)):
        kw = dict(zip(keys, blocks), **({"ITERS": it} if it else {}))
        out.append(triton.Config(kw, num_warps=warps))
    keep = gemv._prune(keys)["early_config_prune"]
    return keep(out, {"BLOCK_B": 1})


def part_configs(small, top=8):
    """Kernel time (CUPTI, L2 flushed, PDL off) of every candidate config of the step's four GEMVs, fp16, batch 1,
    at OPT-13B's static 50% heads + 90% neurons shapes (and, for the two split-K kernels, OPT-30B's 25%): the
    fastest `top` per case, and the rank of the config the autotuner picks from its list."""
    from kernels import gemv

    dev, dt = ("cuda" if cuda() else "cpu"), torch.float16
    rows = _candidate_configs(("BLOCK_N", "BLOCK_K"), ((1, 2, 4, 8, 16, 32), (128, 256, 512, 1024, 2048)))
    cols = _candidate_configs(("BLOCK_R", "BLOCK_D"), ((4, 8, 16, 32), (128, 256, 512, 1024)), iters=(4, 8, 16))
    if small:
        rows, cols = rows[:3], cols[:3]
    with gemv.pdl_off():
        for name, d, F, H in shapes(small):
            hd, g = d // H, torch.Generator().manual_seed(0)
            kh, kf = (H // 2, F // 10) if name == "opt-13b" else (H // 4, F // 4)
            rnd = lambda *s: torch.randn(*s, generator=g).to(dev, dt)  # noqa: E731
            x, w1, w2t, wqkv, wot = rnd(1, d), rnd(kf, d), rnd(kf, d), rnd(3 * kh * hd, d), rnd(kh * hd, d)
            b1, bqkv, bias = rnd(kf), rnd(3 * kh * hd), rnd(d)
            act, attn = rnd(1, kf), rnd(1, kh * hd).float()
            idx_f, idx_h = torch.arange(kf, device=dev, dtype=torch.int32), torch.arange(kh, device=dev, dtype=torch.int32)
            h = torch.zeros(1, d, device=dev)
            out1, q = torch.empty(1, kf, 1, device=dev, dtype=dt), torch.empty(1, kh, hd, device=dev, dtype=dt)
            cache = torch.zeros(1, kh, 8, 2, hd, device=dev, dtype=dt)
            pos = torch.tensor([3], device=dev)
            cases = [
                ("fc1", rows, 2 * kf * d, lambda c: gemv._rows(x, w1, b1, idx_f, relu=True, out=out1,
                                                               out_strides=(out1.stride(0), out1.stride(1)), config=c)),
                ("qkv_to_cache", rows, 2 * 3 * kh * hd * d, lambda c: gemv._rows(
                    x, wqkv, bqkv, idx_h, group=3 * hd, row_stride=3 * hd, out=q, out_strides=(q.stride(0), q.stride(1)),
                    cache=cache, pos=pos, split=hd, config=c)),
                ("fc2_add", cols, 2 * kf * d, lambda c: gemv._cols(act, w2t, idx_f, h, bias, config=c)),
                ("out_proj_add", cols, 2 * kh * hd * d, lambda c: gemv._cols(attn, wot, idx_h, h, bias, group=hd,
                                                                           row_stride=hd, config=c)),
            ]
            for what, configs, nbytes, launch in cases:
                if configs is rows and name != shapes(small)[0][0]:
                    continue
                launch(None)  # the autotuner's pick
                tuned = (gemv._rows_kernel if configs is rows else gemv._cols_kernel).best_config
                timed = []
                for config in configs:
                    try:
                        timed.append((kernel_ms(lambda: launch(config), reps=10), str(config)))
                    except Exception as exc:  # noqa: BLE001 - e.g. out of shared memory
                        log(f"[configs] {name} {what} {config}: {type(exc).__name__}")
                timed.sort()
                tuned_ms = kernel_ms(lambda: launch(tuned), reps=10)
                rank = sum(ms < tuned_ms for ms, _ in timed) + 1
                tag = f"{name} {what} ({nbytes / 1e6:.1f} MB)"
                row("configs", f"{tag}: autotuned", f"{tuned_ms * 1e3:.1f} us (rank {rank} of {len(timed)})", str(tuned))
                for ms, config in timed[:top]:
                    row("configs", tag, f"{ms * 1e3:.1f} us", config)


@guarded
def part_topk(small):
    """(e) The predictors' top-k (kernels.topk.select) per search, on spread and on tie-heavy (rounded) fp16 scores,
    at Deja Vu's row widths (a neuron row of 20480, a head row of 40; batch 1 and 4 with the batch mean), kernel
    time from a cold L2; then the masked engine's selection (harness.selection.lowest_k_keep) of (2048, 20480)
    scores, skip half. The sets of both searches are compared."""
    from harness import selection
    from kernels.topk import SEARCHES, select

    device = "cuda" if cuda() else "cpu"
    neurons, heads = (256, 8) if small else (20480, 40)
    g = torch.Generator(device=device).manual_seed(0)
    kinds = {"spread": lambda shape: torch.randn(shape, device=device, generator=g),
             "tie-heavy": lambda shape: (torch.randn(shape, device=device, generator=g) * 3).round()}
    for label, make in kinds.items():
        for batch, n, k in ((1, neurons, neurons // 10), (1, heads, heads // 2), (4, neurons, neurons // 10)):
            scores = make((batch, 1, n)).half()
            sets = {}
            for search in SEARCHES:
                fn = lambda search=search: select(scores, k, search=search, triton_kernel=True)  # noqa: E731
                sets[search] = fn()
                row("topk", f"select {label} B={batch} n={n} k={k} {search}", f"{kernel_ms(fn) * 1e3:.1f} us")
            row("topk", f"select {label} B={batch} n={n}: searches agree", bool(torch.equal(*sets.values())))
        if selection.available(make((1, 8)).half()) or small:
            rows = make((1 if small else 2048, neurons)).half()
            fn = lambda rows=rows: selection.lowest_k_keep(rows, neurons // 2)  # noqa: E731
            row("topk", f"masked-engine selection {label} {tuple(rows.shape)}, skip half", f"{kernel_ms(fn) * 1e3:.1f} us")


def main():
    global LOG
    parser = argparse.ArgumentParser()
    parser.add_argument("--part", choices=["checks", "perf", "bandwidth", "equivalence", "configs", "topk", "all"],
                        default="all", help="perf = bandwidth + equivalence (engine vs masked engine) + decode timing; "
                        "configs = every candidate block config of the step's GEMVs, timed (not in all)")
    parser.add_argument("--small", action="store_true", help="tiny shapes (CPU smoke run)")
    parser.add_argument("--out", default=os.environ.get("OUT") or "results/kernels-bench")
    args = parser.parse_args()
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    LOG = out / f"bench-{args.part}.log"
    LOG.write_text("")
    if cuda():
        props = torch.cuda.get_device_properties(0)
        log(f"device: {props.name}, {props.multi_processor_count} SMs, {props.total_memory / 2**30:.0f} GiB; "
            f"torch {torch.__version__}")
    import transformers
    import triton

    from kernels import gemv

    log(f"triton {triton.__version__}, transformers {transformers.__version__}, "
        f"KERNELS_AUTOTUNE={os.environ.get('KERNELS_AUTOTUNE', '1')}, TRITON_INTERPRET={os.environ.get('TRITON_INTERPRET', '0')}, "
        f"KERNELS_PDL={gemv.PDL_MODE}")
    if args.part in ("checks", "all"):
        part_checks(args.small)
        log(f"checks done at {time.time() - T0:.0f} s")
    if args.part in ("perf", "bandwidth", "all"):
        copy_bw = copy_bandwidth(args.small)
        part_kernel_bandwidth(args.small, copy_bw)
        log(f"bandwidth done at {time.time() - T0:.0f} s")
    if args.part in ("perf", "equivalence", "all"):
        part_equivalence(args.small)
        log(f"equivalence done at {time.time() - T0:.0f} s")
    if args.part == "configs":
        part_configs(args.small)
        log(f"configs done at {time.time() - T0:.0f} s")
    if args.part in ("topk", "all"):
        part_topk(args.small)
        log(f"topk done at {time.time() - T0:.0f} s")
    if args.part in ("perf", "all"):
        part_decode_timing(args.small, copy_bw)
        log(f"decode timing done at {time.time() - T0:.0f} s")
    lines = ["| section | what | figure | note |", "| --- | --- | --- | --- |"]
    lines += [f"| {s} | {w} | {v} | {n} |" for s, w, v, n in ROWS]
    (out / f"summary-{args.part}.md").write_text("\n".join(lines) + "\n")
    log("\n" + "\n".join(lines))


if __name__ == "__main__":
    main()
