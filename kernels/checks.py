"""Correctness checks of the Triton kernels against float64 references, shared by the CPU tests
(interpreter, small shapes) and `kernels/bench/gpu.py` (GPU, OPT-13B/30B shapes).

Each check draws fresh random inputs (never zeros), poisons the output with NaN, runs the kernel, and asserts
that every element was written and that ‖out − ref‖ / ‖ref‖ is within 1e-4 (fp32) or 1e-2 (fp16/bf16),
with the reference computed in float64 from the same (rounded) operands. Each returns the relative error.
"""
from __future__ import annotations

import torch

from kernels import gemv
from kernels import reference as ref

TOL = {torch.float32: 1e-4, torch.float16: 1e-2, torch.bfloat16: 1e-2}


def _device():
    return "cuda" if torch.cuda.is_available() else "cpu"


def _randn(gen, *shape, dtype, device, scale=1.0):
    t = torch.randn(*shape, generator=gen, dtype=torch.float32) * scale
    t = torch.where(t == 0, torch.full_like(t, 0.1), t)  # never zeros
    return t.to(device=device, dtype=dtype)


def _index(gen, n, keep, device):
    return torch.randperm(n, generator=gen)[:keep].to(torch.int32).to(device)


def _relerr(out, expected, dtype, what):
    assert not torch.isnan(out).any(), f"{what}: some output elements were not written (NaN poison left)"
    err = ((out.double() - expected).norm() / expected.norm()).item()
    assert err <= TOL[dtype], f"{what}: relative error {err:.3g} > {TOL[dtype]:g} ({dtype})"
    return err


def _d(*ts):
    return [None if t is None else t.double() for t in ts]


def check_fc1(d, F, keep, batch, dtype, seed=0, device=None):
    device = device or _device()
    g = torch.Generator().manual_seed(seed)
    x = _randn(g, batch, d, dtype=dtype, device=device)
    w1 = _randn(g, F, d, dtype=dtype, device=device, scale=d ** -0.5)
    b1 = _randn(g, F, dtype=dtype, device=device, scale=0.1)
    idx = _index(g, F, keep, device)
    out = torch.full((batch, keep), float("nan"), dtype=dtype, device=device)
    gemv.fc1_gather(x, w1, b1, idx, out=out)
    expected = ref.fc1_gather(*_d(x, w1, b1), idx)
    assert expected.norm() > 0
    return _relerr(out, expected, dtype, f"fc1 d={d} F={F} keep={keep} B={batch}")


def check_fc2(d, F, keep, batch, dtype, seed=0, residual=False, device=None):
    device = device or _device()
    g = torch.Generator().manual_seed(seed)
    a = _randn(g, batch, keep, dtype=dtype, device=device).abs()  # post-ReLU activations
    w2t = _randn(g, F, d, dtype=dtype, device=device, scale=F ** -0.5)
    b2 = _randn(g, d, dtype=dtype, device=device, scale=0.1)
    res = _randn(g, batch, d, dtype=dtype, device=device) if residual else None
    idx = _index(g, F, keep, device)
    out = torch.full((batch, d), float("nan"), dtype=dtype, device=device)
    gemv.fc2_gather(a, w2t, b2, idx, out=out, residual=res)
    expected = ref.fc2_gather(*_d(a, w2t, b2), idx, residual=None if res is None else res.double())
    return _relerr(out, expected, dtype, f"fc2 d={d} F={F} keep={keep} B={batch}")


def _qkv_inputs(g, batch, d, H, hd, keep, dtype, device):
    """A batch of layer inputs, a fused head-major QKV weight and bias, and a random set of kept heads."""
    x = _randn(g, batch, d, dtype=dtype, device=device)
    wqkv = _randn(g, 3 * H * hd, d, dtype=dtype, device=device, scale=d ** -0.5)
    bqkv = _randn(g, 3 * H * hd, dtype=dtype, device=device, scale=0.1)
    return x, wqkv, bqkv, _index(g, H, keep, device)


def check_qkv(d, H, hd, keep, batch, dtype, seed=0, part="qkv", device=None):
    device = device or _device()
    g = torch.Generator().manual_seed(seed)
    x, wqkv, bqkv, idx = _qkv_inputs(g, batch, d, H, hd, keep, dtype, device)
    n = len(part) if part != "qkv" else 3
    out = torch.full((batch, keep, n, hd), float("nan"), dtype=dtype, device=device)
    gemv.qkv_heads(x, wqkv, bqkv, idx, hd, part=part, out=out)
    expected = ref.qkv_heads(*_d(x, wqkv, bqkv), idx, hd, part=part)
    return _relerr(out, expected, dtype, f"qkv[{part}] d={d} H={H} keep={keep} B={batch}")


def check_out_proj(d, H, hd, keep, batch, dtype, seed=0, device=None):
    device = device or _device()
    g = torch.Generator().manual_seed(seed)
    attn = _randn(g, batch, keep * hd, dtype=dtype, device=device)
    wot = _randn(g, H * hd, d, dtype=dtype, device=device, scale=(H * hd) ** -0.5)
    bo = _randn(g, d, dtype=dtype, device=device, scale=0.1)
    idx = _index(g, H, keep, device)
    out = torch.full((batch, d), float("nan"), dtype=dtype, device=device)
    gemv.out_proj_heads(attn, wot, bo, idx, hd, out=out)
    expected = ref.out_proj_heads(*_d(attn, wot, bo), idx, hd)
    return _relerr(out, expected, dtype, f"out_proj d={d} H={H} keep={keep} B={batch}")


def check_kv_to_cache(d, H, hd, T, keep, batch, dtype, seed=0, device=None):
    device = device or _device()
    g = torch.Generator().manual_seed(seed)
    x, wqkv, bqkv, idx = _qkv_inputs(g, batch, d, H, hd, keep, dtype, device)
    pos = torch.tensor([T // 2], device=device)
    cache = torch.full((batch, H, T, 2, hd), float("nan"), dtype=dtype, device=device)
    gemv.kv_to_cache(x, wqkv, bqkv, idx, hd, cache, pos)
    written = torch.zeros(batch, H, T, 2, hd, dtype=torch.bool, device=device)
    written[:, idx.long(), T // 2] = True
    assert torch.isnan(cache[~written]).all(), "kv_to_cache wrote outside the selected heads at pos"
    expected = ref.qkv_heads(*_d(x, wqkv, bqkv), idx, hd, part="kv")
    return _relerr(cache[:, idx.long(), T // 2], expected, dtype, "kv_to_cache")


def check_attention(H, hd, T, keep, batch, pos, dtype, seed=0, fixed=False, device=None):
    """head_attention; fixed=True: `attend` told that the indices are fixed for the step (with PDL prefetch and
    batch 1 it loads the past K/V before the PDL wait)."""
    device = device or _device()
    g = torch.Generator().manual_seed(seed)
    cache = _randn(g, batch, H, T, 2, hd, dtype=dtype, device=device)
    cache[:, :, pos + 1:] = float("nan")  # positions after pos must not be read
    q = _randn(g, batch, keep, hd, dtype=dtype, device=device)
    idx = _index(g, H, keep, device)
    p = torch.tensor([pos], device=device)
    out = torch.full((batch, keep, hd), float("nan"), dtype=dtype, device=device)
    if fixed:
        out.copy_(gemv.attend(q, cache, idx, p, hd ** -0.5, fixed=True))
    else:
        gemv.head_attention(q, cache, idx, p, hd ** -0.5, out=out)
    clean = torch.nan_to_num(cache.double(), nan=0.0)
    expected = ref.head_attention(q.double(), clean, idx, p, hd ** -0.5)
    return _relerr(out, expected, dtype, f"attention T={T} pos={pos} B={batch} fixed={fixed}")


def check_recompute(d, H, hd, T, keep, batch, pos, dtype, seed=0, device=None):
    device = device or _device()
    g = torch.Generator().manual_seed(seed)
    xkeep = _randn(g, batch, T, d, dtype=dtype, device=device)
    wqkv = _randn(g, 3 * H * hd, d, dtype=dtype, device=device, scale=d ** -0.5)
    bqkv = _randn(g, 3 * H * hd, dtype=dtype, device=device, scale=0.1)
    idx = _index(g, H, keep, device)
    have = (torch.rand(H, T, generator=g) < 0.6).to(torch.int8).to(device)
    have0 = have.clone()
    cache = torch.full((batch, H, T, 2, hd), float("nan"), dtype=dtype, device=device)
    p = torch.tensor([pos], device=device)
    gemv.kv_recompute(xkeep, wqkv, bqkv, idx, hd, cache, have, p)
    t = torch.arange(T, device=device)
    sel = torch.zeros(H, dtype=torch.bool, device=device)
    sel[idx.long()] = True
    need = sel[:, None] & (have0 == 0) & (t < pos)
    assert torch.isnan(cache[:, ~need]).all(), "kv_recompute wrote entries that were not missing"
    assert not torch.isnan(cache[:, need]).any(), "kv_recompute left missing entries unwritten"
    marked = torch.where(sel[:, None] & (t <= pos), torch.ones_like(have0), have0)
    assert torch.equal(have, marked), "kv_recompute marked the wrong entries"
    full = ref.qkv_heads(xkeep.double().reshape(batch * T, d), wqkv.double(), bqkv.double(),
                         torch.arange(H, device=device), hd, part="kv").view(batch, T, H, 2, hd).transpose(1, 2)
    return _relerr(cache[:, need], full[:, need], dtype, "kv_recompute")


# -- the decode step's fused operations ------------------------------------------------------------------------
def check_layer_norm(d, T, batch, dtype, seed=0, keep=False, device=None):
    """layer_norm of the fp32 stream (non-zero mean) → dtype; with `keep`, also written at pos and nowhere else."""
    device = device or _device()
    g = torch.Generator().manual_seed(seed)
    h = _randn(g, batch, d, dtype=torch.float32, device=device, scale=2.0) + 0.5
    weight = (1 + _randn(g, d, dtype=torch.float32, device=device, scale=0.2)).to(dtype)
    bias = _randn(g, d, dtype=dtype, device=device, scale=0.1)
    p = T // 2
    store = torch.full((batch, T, d), float("nan"), dtype=dtype, device=device) if keep else None
    out = gemv.layer_norm(h, weight, bias, 1e-5, dtype, keep=store, pos=torch.tensor([p], device=device))
    expected = torch.nn.functional.layer_norm(h.double(), (d,), weight.double(), bias.double(), 1e-5)
    err = _relerr(out, expected, dtype, f"layer_norm d={d} B={batch}")
    if keep:
        assert torch.isnan(store[:, torch.arange(T, device=device) != p]).all(), "layer_norm kept outside pos"
        err = max(err, _relerr(store[:, p], expected, dtype, "layer_norm keep"))
    return err


def check_qkv_to_cache(d, H, hd, T, keep, batch, dtype, seed=0, part="qkv", device=None):
    """qkv_to_cache: q of the kept heads returned, their k/v at pos of the cache, nothing else written."""
    device = device or _device()
    g = torch.Generator().manual_seed(seed)
    x, wqkv, bqkv, idx = _qkv_inputs(g, batch, d, H, hd, keep, dtype, device)
    p = T // 2
    cache = torch.full((batch, H, T, 2, hd), float("nan"), dtype=dtype, device=device)
    q = gemv.qkv_to_cache(x, wqkv, bqkv, idx, hd, cache, torch.tensor([p], device=device), part=part)
    expected = ref.qkv_heads(*_d(x, wqkv, bqkv), idx, hd, part="qkv")  # (B, n, 3, hd)
    errors = []
    if part in ("qkv", "q"):
        errors.append(_relerr(q, expected[:, :, 0], dtype, f"qkv_to_cache[{part}] q"))
    written = torch.zeros(batch, H, T, 2, hd, dtype=torch.bool, device=device)
    if part in ("qkv", "kv"):
        written[:, idx.long(), p] = True
        errors.append(_relerr(cache[:, idx.long(), p], expected[:, :, 1:], dtype, f"qkv_to_cache[{part}] k/v"))
    assert torch.isnan(cache[~written]).all(), f"qkv_to_cache[{part}] wrote outside the kept heads' k/v at pos"
    return max(errors)


def check_attend_out_proj(d, H, hd, T, keep, batch, pos, dtype, seed=0, device=None):
    """attend (split-T, the chunks combined by each head's last program) + out_proj_add (added into the fp32
    stream). attend runs twice: its arrival counters must be back at zero after a launch."""
    device = device or _device()
    g = torch.Generator().manual_seed(seed)
    cache = _randn(g, batch, H, T, 2, hd, dtype=dtype, device=device)
    cache[:, :, pos + 1:] = float("nan")  # positions after pos must not be read
    q = _randn(g, batch, keep, hd, dtype=dtype, device=device)
    wot = _randn(g, H * hd, d, dtype=dtype, device=device, scale=(H * hd) ** -0.5)
    bo = _randn(g, d, dtype=dtype, device=device, scale=0.1)
    idx = _index(g, H, keep, device)
    h = _randn(g, batch, d, dtype=torch.float32, device=device)
    h0 = h.clone()
    p = torch.tensor([pos], device=device)
    first = gemv.attend(q, cache, idx, p, hd ** -0.5)
    gemv.out_proj_add(gemv.attend(q, cache, idx, p, hd ** -0.5), wot, bo, idx, hd, h)
    assert torch.equal(first, gemv.attend(q, cache, idx, p, hd ** -0.5)), "attend differs between launches"
    clean = torch.nan_to_num(cache.double(), nan=0.0)
    attn = ref.head_attention(q.double(), clean, idx, p, hd ** -0.5).reshape(batch, -1)
    expected = ref.out_proj_heads(attn, wot.double(), bo.double(), idx, hd)
    return _relerr(h - h0, expected, dtype, f"attend+out_proj_add T={T} pos={pos} B={batch}")


def check_argmax(V, batch, seed=0, device=None):
    """argmax: torch.argmax's index for every row of fp16 logits, ties (planted) broken by the lowest index."""
    device = device or _device()
    g = torch.Generator().manual_seed(seed)
    logits = torch.randn(batch, V, generator=g).to(device=device, dtype=torch.float16)
    top = logits.max() + 1
    for b in range(batch):  # the row's maximum twice, in different programs' columns (and once at the end)
        cols = torch.randperm(V, generator=g)[:2].sort().values
        logits[b, cols] = top
    logits[-1, -1] = top + 1
    out = torch.full((batch,), -1, dtype=torch.long, device=device)
    gemv.argmax(logits, out=out)
    assert torch.equal(out, logits.argmax(-1)), f"argmax V={V} B={batch}: {out.tolist()} != {logits.argmax(-1).tolist()}"
    assert torch.equal(gemv.argmax(logits), out), "argmax differs between launches"
    return 0.0


def check_embed(d, V, T, batch, dtype, seed=0, device=None):
    """embed: the fp32 step input = token embedding + position embedding (rounded as the model adds them)."""
    device = device or _device()
    g = torch.Generator().manual_seed(seed)
    table = _randn(g, V, d, dtype=dtype, device=device)
    pos_table = _randn(g, T + 2, d, dtype=dtype, device=device)
    token = torch.randint(0, V, (batch,), generator=g).to(device)
    pos = torch.tensor([T - 1], device=device)
    h = torch.full((batch, d), float("nan"), device=device)
    gemv.embed(token, pos, table, pos_table, 2, h)
    expected = torch.zeros(batch, d, device=device)
    ref.embed(token, pos, table, pos_table, 2, expected)
    # within one rounding of the dtype (the CPU interpreter rounds fp32 → bf16 toward zero, the GPU to nearest);
    # a sum that cancels exactly is 0 on both sides
    off = (h - expected).abs() > torch.finfo(dtype).eps * expected.abs()
    assert not torch.isnan(h).any() and not off.any(), \
        f"embed d={d} B={batch}: {int(off.sum())} elements differ from the model's sum"
    nonzero = expected != 0
    return ((h - expected).abs()[nonzero] / expected.abs()[nonzero]).max().item()


def check_fc2_add(d, F, keep, batch, dtype, seed=0, device=None):
    device = device or _device()
    g = torch.Generator().manual_seed(seed)
    a = _randn(g, batch, keep, dtype=dtype, device=device).abs()
    w2t = _randn(g, F, d, dtype=dtype, device=device, scale=F ** -0.5)
    b2 = _randn(g, d, dtype=dtype, device=device, scale=0.1)
    idx = _index(g, F, keep, device)
    h = _randn(g, batch, d, dtype=torch.float32, device=device)
    h0 = h.clone()
    gemv.fc2_add(a, w2t, b2, idx, h)
    expected = ref.fc2_gather(*_d(a, w2t, b2), idx)
    return _relerr(h - h0, expected, dtype, f"fc2_add d={d} F={F} keep={keep} B={batch}")


def check_topk(n, k, batch, seed=0, device=None):
    """kernels.topk.select: exactly the k largest batch-mean scores, as int32 in ascending order."""
    from kernels.topk import select

    device = device or _device()
    g = torch.Generator().manual_seed(seed)
    scores = torch.randn(batch, n, generator=g).to(device=device, dtype=torch.float16)
    got = select(scores, k)
    expected = torch.topk(scores.float().mean(0, keepdim=True), k, dim=-1).indices
    assert got.dtype in (torch.int32, torch.int64), "indices must be int32 or int64 (the kernels read both)"
    kth = scores.float().mean(0)[expected[0]].min()
    chosen = scores.float().mean(0)[got[0].long()]
    assert got.shape == expected.shape and chosen.min() >= kth, f"topk n={n} k={k}: not the k largest"
    assert got[0].unique().numel() == k, f"topk n={n} k={k}: repeated indices"
    return 0.0


# -- the PDL variants build for Hopper (no GPU needed: the triton wheel ships ptxas) ---------------------------
_P = "*fp16"
_ROWS_SIGNATURE = dict(
    x_ptr=_P, w_ptr=_P, bias_ptr=_P, idx_ptr="*i32", out_ptr=_P, cache_ptr=_P, pos_ptr="*i64", count_ptr="*i32",
    scale_ptr="*fp32", B="i32", N="i32",
    K="i32", row_stride="i32", row_offset="i32", split="i32", stride_xb="i32", stride_ob="i32",
    stride_oslot="i32", stride_cb="i32", stride_ch="i32", stride_ct="i32")
_ATTEND_SIGNATURE = dict(
    q_ptr=_P, cache_ptr=_P, idx_ptr="*i32", pos_ptr="*i64", m_ptr="*fp32", l_ptr="*fp32", o_ptr="*fp32",
    out_ptr="*fp32", count_ptr="*i32", x_ptr=_P, w_ptr=_P, bias_ptr=_P, have_ptr="*i8", B="i32", n_sel="i32",
    H="i32", T_max="i32", D="i32", HD="i32", scale="fp32", stride_qb="i32", stride_qh="i32", n_chunks="i32")
_HOPPER_SIGNATURES = {
    "rows": (gemv._rows_kernel, _ROWS_SIGNATURE,
             dict(G=384, HAS_BIAS=True, RELU=False, TO_CACHE=True, COUNTED=False, SCALE=False, DOT=False, IEEE=False,
                  BLOCK_B=1, BLOCK_N=8,
                  BLOCK_K=256)),
    "cols": (gemv._cols_kernel, dict(
        a_ptr="*fp32", w_ptr=_P, idx_ptr="*i32", acc_ptr="*fp32", bias_ptr=_P, count_ptr="*i32", B="i32", R="i32",
        D="i32", row_stride="i32", stride_ab="i32", stride_accb="i32"),
        dict(G=128, HAS_BIAS=True, COUNTED=False, DOT=False, IEEE=False, BLOCK_B=1, BLOCK_R=16, BLOCK_D=256, ITERS=8)),
    "rows_dot": (gemv._rows_kernel, _ROWS_SIGNATURE,  # the tensor-core form (KERNELS_DOT_BATCH), batch 16
                 dict(G=1, HAS_BIAS=True, RELU=True, TO_CACHE=False, COUNTED=False, SCALE=True, DOT=True, IEEE=False,
                      BLOCK_B=16, BLOCK_N=32, BLOCK_K=128)),
    "cols_dot": (gemv._cols_kernel, dict(
        a_ptr=_P, w_ptr=_P, idx_ptr="*i32", acc_ptr="*fp32", bias_ptr=_P, count_ptr="*i32", B="i32", R="i32",
        D="i32", row_stride="i32", stride_ab="i32", stride_accb="i32"),
        dict(G=1, HAS_BIAS=True, COUNTED=False, DOT=True, IEEE=False, BLOCK_B=16, BLOCK_R=16, BLOCK_D=128, ITERS=4)),
    "layer_norm": (gemv._layer_norm_kernel, dict(
        h_ptr="*fp32", w_ptr=_P, b_ptr=_P, out_ptr=_P, keep_ptr=_P, pos_ptr="*i64", D="i32", eps="fp32",
        stride_hb="i32", stride_ob="i32", stride_kb="i32", stride_kt="i32"), dict(KEEP=True, BLOCK=8192)),
    "attend": (gemv._attend_kernel, _ATTEND_SIGNATURE,
        dict(NC=16, CHUNK=32, BLOCK_D=128, ATTEND=True, RECOMPUTE=True, BLOCK_K=128, BLOCK_2HD=256, UPCAST=False,
             IEEE=False, EARLY=False)),
    "attend_early": (gemv._attend_kernel, _ATTEND_SIGNATURE,  # static masks, batch 1: past K/V before the wait
                     dict(NC=16, CHUNK=32, BLOCK_D=128, ATTEND=True, RECOMPUTE=False, BLOCK_K=128, BLOCK_2HD=256,
                          UPCAST=False, IEEE=False, EARLY=True)),
}


def hopper_ptx(name: str, pdl: bool, prefetch: bool = False) -> str:
    """PTX of step kernel `name` compiled for sm_90 (OPT-13B-like constants), with PDL on or off."""
    import triton
    from triton.backends.compiler import GPUTarget
    from triton.compiler import ASTSource
    from triton.runtime.jit import JITFunction

    kernel, signature, constants = _HOPPER_SIGNATURES[name]
    while hasattr(kernel, "fn"):  # autotuner → JITFunction (or the interpreter's wrapper) → the Python function
        kernel = kernel.fn
    constants = {**constants, "PDL": pdl, **({"PREFETCH": prefetch} if name in ("rows", "cols") else {})}
    source = ASTSource(fn=JITFunction(kernel), signature={**signature, **{k: "constexpr" for k in constants}},
                       constexprs=constants)
    return triton.compile(source, target=GPUTarget("cuda", 90, 32)).asm["ptx"]


def topk_ptx(kind: int, union: bool, mean: bool, search: int = 0) -> str:
    """PTX of `kernels.topk`'s kernel for sm_90 (small blocks): kind 0 fp16, 1 bf16, 2 fp32 scores."""
    import triton
    from triton.backends.compiler import GPUTarget
    from triton.compiler import ASTSource
    from triton.runtime.jit import JITFunction

    from kernels import topk

    fn = topk._topk_kernel
    while hasattr(fn, "fn"):
        fn = fn.fn
    signature = dict(s_ptr=["*fp16", "*bf16", "*fp32"][kind], out_ptr="*i32", count_ptr="*i32", B="i32", n="i32",
                     k="i32", stride_b="i32", stride_r="i32", stride_o="i32")
    constants = dict(UNION=union, MEAN=mean, KIND=kind, KEY_BITS=32 if kind == 2 else 16, BLOCK_A=64, BLOCK_B=16,
                     SEARCH=search)
    source = ASTSource(fn=JITFunction(fn), signature={**signature, **{k: "constexpr" for k in constants}},
                       constexprs=constants)
    return triton.compile(source, target=GPUTarget("cuda", 90, 32)).asm["ptx"]
