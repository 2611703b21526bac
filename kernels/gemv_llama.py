"""Triton kernels of the Llama-family sparse decode step (`kernels.decode_llama`), beside `kernels.gemv`'s.

`kernels.gemv` already has what is shared with OPT: the gathered-row GEMV (`gather_rows`: the fused QKV of the kept
query heads and every K/V head, one launch), split-T attention (`attend`, which indexes the cache by the index it is
given: the engine passes each kept query head's K/V head, so GQA needs no new attention kernel), the gathered
column reductions into the fp32 residual stream (`out_proj_add`, `fc2_add`) and the greedy `argmax`. New here:

- `rms_norm`: RMSNorm of the fp32 stream (Hugging Face's rounding: the normalised input is cast to the model dtype
  before the weight multiplies it).
- `embed`: the token's embedding row into the fp32 stream (Llama has no position table).
- `rope_to_cache`: RoPE on the step's q (kept heads) and k (every K/V head) read from the QKV output, q to a buffer,
  rotated k and v into the static cache at `pos` (cos/sin tables precomputed for every position).
- `swiglu_gather`: gate and up rows of the kept neurons (interleaved, neuron j's at rows 2j, 2j+1 of (2F, d)) in one
  pass, act = silu(gate) · up fused.
- `input_sparse_add`: TEAL-style input sparsity, the transpose of the row gathers: acc[b] += Σ_r x̃[b, r] · Wᵀ[r]
  over the input-major weight Wᵀ (in, out), x̃ = x where |x| > t (t per column segment: q/k/v or gate/up share one
  launch with their own thresholds). Masked-off inputs are skipped inside the kernel (TEAL's own approach): their
  weight rows are masked out of the loads, so no memory traffic is issued for them, and the number kept may change
  every token with no host sync and no compaction. Optionally the kernel counts the kept inputs per token
  (counts[pos, b, segment]) and computes its input as SwiGLU of the gate/up accumulators (the down projection).

PDL follows `kernels.gemv` (its module-level mode, `gemv.set_pdl`): each kernel waits before reading what the
previous kernel wrote and lets the next one launch after its main loop. Under TRITON_INTERPRET=1 one small config
per kernel keeps the interpreter fast.
"""
from __future__ import annotations

import torch
import triton
import triton.language as tl
from triton.language.extra.cuda import gdc_launch_dependents, gdc_wait

from kernels import gemv
from kernels.gemv import _col_configs, _pow2, _prune, _row_configs


def _pdl():
    return gemv.PDL


def _launch():
    return gemv._LAUNCH


# ------------------------------------------------------------------------------------------------------------
# kernels
# ------------------------------------------------------------------------------------------------------------
@triton.jit
def _rms_norm_kernel(h_ptr, w_ptr, out_ptr, D, eps, stride_hb, stride_ob, PDL: tl.constexpr, BLOCK: tl.constexpr):
    """out[b] = w · cast(h[b] · rsqrt(mean(h[b]²) + eps)) (fp32 statistics; the product cast to out's dtype)."""
    b = tl.program_id(0).to(tl.int64)
    offs = tl.arange(0, BLOCK)
    mask = offs < D
    gamma = tl.load(w_ptr + offs, mask=mask, other=0.0).to(tl.float32)
    if PDL:
        gdc_launch_dependents()
        gdc_wait()
    x = tl.load(h_ptr + b * stride_hb + offs, mask=mask, other=0.0).to(tl.float32)
    rstd = 1.0 / tl.sqrt(tl.sum(x * x, axis=0) / D + eps)
    n = (x * rstd).to(out_ptr.dtype.element_ty).to(tl.float32)
    tl.store(out_ptr + b * stride_ob + offs, (n * gamma).to(out_ptr.dtype.element_ty), mask=mask)


@triton.jit
def _embed_kernel(token_ptr, table_ptr, h_ptr, D, stride_hb, BLOCK: tl.constexpr):
    b = tl.program_id(0)
    offs = tl.program_id(1) * BLOCK + tl.arange(0, BLOCK)
    mask = offs < D
    token = tl.load(token_ptr + b).to(tl.int64)
    tl.store(h_ptr + b * stride_hb + offs, tl.load(table_ptr + token * D + offs, mask=mask, other=0.0).to(tl.float32),
             mask=mask)


@triton.jit
def _rope_kernel(src_ptr, bias_ptr, cos_ptr, sin_ptr, pos_ptr, q_ptr, cache_ptr,
                 n_q, n_kv, H, HD, T_max, stride_sb, stride_qb, stride_cb,
                 HAS_BIAS: tl.constexpr, PDL: tl.constexpr, BLOCK_D: tl.constexpr):
    """Program (b, u), src (B, n_q + 2·n_kv, HD) = [q of the kept heads | k of every K/V head | v of every K/V head]:
    u < n_q: q_out[b, u] = rope(q); else, K/V head g = u − n_q: cache[b, g, pos] = (rope(k), v).
    HAS_BIAS (src an fp32 accumulator with n_q = H): the bias of row unit·HD + e is added, then the model dtype's
    rounding (the projection's output) before the rotation. rope(x)[e] = x[e]·cos[pos, e] + sign·x[e ± HD/2]·sin[pos, e]
    (rotate_half: −x[e + HD/2] for e < HD/2, x[e − HD/2] after)."""
    b = tl.program_id(0).to(tl.int64)
    u = tl.program_id(1)
    if PDL:
        gdc_launch_dependents()
    offs = tl.arange(0, BLOCK_D)
    mask = offs < HD
    half = HD // 2
    partner = tl.where(offs < half, offs + half, offs - half)
    sign = tl.where(offs < half, -1.0, 1.0)
    p = tl.load(pos_ptr).to(tl.int64)
    cos = tl.load(cos_ptr + p * HD + offs, mask=mask, other=0.0)
    sin = tl.load(sin_ptr + p * HD + offs, mask=mask, other=0.0)
    is_q = u < n_q
    g = u - n_q
    k_unit = tl.where(is_q, u, n_q + g)
    if HAS_BIAS:
        bias_unit = tl.where(is_q, u, H + g)
        bias = tl.load(bias_ptr + bias_unit * HD + offs, mask=mask, other=0.0).to(tl.float32)
        bias_p = tl.load(bias_ptr + bias_unit * HD + partner, mask=mask, other=0.0).to(tl.float32)
    if PDL:
        gdc_wait()
    x = tl.load(src_ptr + b * stride_sb + k_unit * HD + offs, mask=mask, other=0.0).to(tl.float32)
    xp = tl.load(src_ptr + b * stride_sb + k_unit * HD + partner, mask=mask, other=0.0).to(tl.float32)
    if HAS_BIAS:
        x = (x + bias).to(cache_ptr.dtype.element_ty).to(tl.float32)
        xp = (xp + bias_p).to(cache_ptr.dtype.element_ty).to(tl.float32)
    y = x * cos + sign * xp * sin
    if is_q:
        tl.store(q_ptr + b * stride_qb + u * HD + offs, y.to(q_ptr.dtype.element_ty), mask=mask)
    else:
        dst = cache_ptr + b * stride_cb + ((g * T_max + p) * 2) * HD
        tl.store(dst + offs, y.to(cache_ptr.dtype.element_ty), mask=mask)
        v = tl.load(src_ptr + b * stride_sb + (n_q + n_kv + g) * HD + offs, mask=mask, other=0.0).to(tl.float32)
        if HAS_BIAS:
            v += tl.load(bias_ptr + (H + n_kv + g) * HD + offs, mask=mask, other=0.0).to(tl.float32)
        tl.store(dst + HD + offs, v.to(cache_ptr.dtype.element_ty), mask=mask)


def _sparse_configs():
    if gemv.INTERPRET:  # few, large programs: the interpreter's cost is per program
        return [triton.Config({"BLOCK_R": 32, "BLOCK_D": 64, "ITERS": 1}, num_warps=4)]
    return _col_configs()


def _swiglu_configs():
    if gemv.INTERPRET:
        return [triton.Config({"BLOCK_N": 32, "BLOCK_K": 64}, num_warps=4)]
    return _row_configs()


@triton.autotune(configs=_swiglu_configs(), key=["N", "K", "BLOCK_B"], prune_configs_by=_prune(("BLOCK_N", "BLOCK_K")))
@triton.jit
def _swiglu_kernel(x_ptr, w_ptr, bias_ptr, idx_ptr, out_ptr, B, N, K, stride_xb, stride_ob,
                   HAS_BIAS: tl.constexpr, PDL: tl.constexpr, PREFETCH: tl.constexpr,
                   BLOCK_B: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_K: tl.constexpr):
    """out[b, j] = cast(cast(silu(g)) · u), g = cast(x[b] · W[2·idx[j]] + bias), u = cast(x[b] · W[2·idx[j] + 1] + bias)
    (casts to the model dtype, as the model rounds each projection's output); W (2F, d) gate/up interleaved."""
    pid = tl.program_id(0)
    if PDL:
        if not PREFETCH:
            gdc_wait()
    offs_n = pid * BLOCK_N + tl.arange(0, BLOCK_N)
    mask_n = offs_n < N
    unit = tl.load(idx_ptr + offs_n, mask=mask_n, other=0).to(tl.int64)
    rows_g = 2 * unit
    rows_u = rows_g + 1
    offs_b = tl.arange(0, BLOCK_B)
    mask_b = offs_b < B
    offs_k = tl.arange(0, BLOCK_K)
    mask_k = offs_k < K
    wm = mask_n[:, None] & mask_k[None, :]
    wg = tl.load(w_ptr + rows_g[:, None] * K + offs_k[None, :], mask=wm, other=0.0)
    wu = tl.load(w_ptr + rows_u[:, None] * K + offs_k[None, :], mask=wm, other=0.0)
    if PDL:
        if PREFETCH:
            gdc_wait()
    x = tl.load(x_ptr + offs_b[:, None] * stride_xb + offs_k[None, :], mask=mask_b[:, None] & mask_k[None, :],
                other=0.0).to(tl.float32)
    acc_g = x[:, None, :] * wg.to(tl.float32)[None, :, :]
    acc_u = x[:, None, :] * wu.to(tl.float32)[None, :, :]
    for k0 in range(BLOCK_K, K, BLOCK_K):
        offs_k = k0 + tl.arange(0, BLOCK_K)
        mask_k = offs_k < K
        wm = mask_n[:, None] & mask_k[None, :]
        wg = tl.load(w_ptr + rows_g[:, None] * K + offs_k[None, :], mask=wm, other=0.0)
        wu = tl.load(w_ptr + rows_u[:, None] * K + offs_k[None, :], mask=wm, other=0.0)
        x = tl.load(x_ptr + offs_b[:, None] * stride_xb + offs_k[None, :], mask=mask_b[:, None] & mask_k[None, :],
                    other=0.0).to(tl.float32)
        acc_g += x[:, None, :] * wg.to(tl.float32)[None, :, :]
        acc_u += x[:, None, :] * wu.to(tl.float32)[None, :, :]
    if PDL:
        gdc_launch_dependents()
    g = tl.sum(acc_g, axis=2)
    u = tl.sum(acc_u, axis=2)
    if HAS_BIAS:
        g += tl.load(bias_ptr + rows_g, mask=mask_n, other=0.0).to(tl.float32)[None, :]
        u += tl.load(bias_ptr + rows_u, mask=mask_n, other=0.0).to(tl.float32)[None, :]
    dt = out_ptr.dtype.element_ty
    g = g.to(dt).to(tl.float32)
    u = u.to(dt).to(tl.float32)
    act = (g / (1.0 + tl.exp(-g))).to(dt).to(tl.float32) * u
    tl.store(out_ptr + offs_b[:, None] * stride_ob + offs_n[None, :], act.to(dt), mask=mask_b[:, None] & mask_n[None, :])


@triton.autotune(configs=_sparse_configs(), key=["R", "NCOL", "BLOCK_B", "SWIGLU", "N_SEG"],
                 restore_value=["acc_ptr", "cnt_ptr"], prune_configs_by=_prune(("BLOCK_R", "BLOCK_D")))
@triton.jit
def _input_sparse_kernel(x_ptr, w_ptr, acc_ptr, t_ptr, bias_ptr, xbias_ptr, cnt_ptr, pos_ptr,
                         B, R, NCOL, c1, c2, stride_xb, x_up, stride_accb, stride_ct, stride_cb,
                         N_SEG: tl.constexpr, HAS_BIAS: tl.constexpr, SWIGLU: tl.constexpr, XBIAS: tl.constexpr,
                         COUNT: tl.constexpr, PDL: tl.constexpr, BLOCK_B: tl.constexpr, BLOCK_R: tl.constexpr,
                         BLOCK_D: tl.constexpr, ITERS: tl.constexpr):
    """Program (d, r, s): columns [start_s + d·BLOCK_D, …) of segment s (segments [0, c1), [c1, c2), [c2, NCOL)),
    input rows [r·ITERS·BLOCK_R, …): acc[b, col] += Σ_rows x̃[b, row] · W[row, col] (+ bias[col], by r = 0), where
    x̃ = x if |x| > t[s] else 0. A weight row is loaded only where some sequence of the batch keeps that input.
    SWIGLU: x[b, row] = cast(cast(silu(g)) · u), g = cast(x[b, row] + xbias[row]), u = cast(x[b, x_up + row] +
    xbias[x_up + row]) (casts to W's dtype; x the fp32 gate/up accumulators). COUNT: the kept inputs of each
    sequence are added to cnt[pos, b, s] by the programs of the first column block."""
    pid_d = tl.program_id(0)
    pid_r = tl.program_id(1)
    seg = tl.program_id(2)
    start = tl.where(seg == 0, 0, tl.where(seg == 1, c1, c2))
    end = tl.where(seg == N_SEG - 1, NCOL, tl.where(seg == 0, c1, c2))
    offs_d = start + pid_d * BLOCK_D + tl.arange(0, BLOCK_D)
    if start + pid_d * BLOCK_D < end:
        mask_d = offs_d < end
        offs_b = tl.arange(0, BLOCK_B)
        mask_b = offs_b < B
        t = tl.load(t_ptr + seg)
        if PDL:
            gdc_wait()
        acc = tl.zeros((BLOCK_B, BLOCK_R, BLOCK_D), dtype=tl.float32)
        kept = tl.zeros((BLOCK_B,), dtype=tl.int32)
        for i in tl.static_range(ITERS):
            offs_r = (pid_r * ITERS + i) * BLOCK_R + tl.arange(0, BLOCK_R)
            mask_r = offs_r < R
            mask_x = mask_b[:, None] & mask_r[None, :]
            x = tl.load(x_ptr + offs_b[:, None] * stride_xb + offs_r[None, :], mask=mask_x, other=0.0).to(tl.float32)
            if SWIGLU:
                dt = w_ptr.dtype.element_ty
                u = tl.load(x_ptr + offs_b[:, None] * stride_xb + x_up + offs_r[None, :], mask=mask_x,
                            other=0.0).to(tl.float32)
                if XBIAS:
                    x += tl.load(xbias_ptr + offs_r, mask=mask_r, other=0.0).to(tl.float32)[None, :]
                    u += tl.load(xbias_ptr + x_up + offs_r, mask=mask_r, other=0.0).to(tl.float32)[None, :]
                g = x.to(dt).to(tl.float32)
                u = u.to(dt).to(tl.float32)
                x = ((g / (1.0 + tl.exp(-g))).to(dt).to(tl.float32) * u).to(dt).to(tl.float32)
            keep = (tl.abs(x) > t) & mask_x
            if COUNT:
                kept += tl.sum(keep.to(tl.int32), axis=1)
            row = tl.max(keep.to(tl.int32), axis=0) > 0  # some sequence keeps this input: its row is read
            w = tl.load(w_ptr + offs_r.to(tl.int64)[:, None] * NCOL + offs_d[None, :],
                        mask=row[:, None] & mask_d[None, :], other=0.0)
            acc += tl.where(keep, x, 0.0)[:, :, None] * w.to(tl.float32)[None, :, :]
        if PDL:
            gdc_launch_dependents()
        y = tl.sum(acc, axis=1)
        if HAS_BIAS:
            if pid_r == 0:
                y += tl.load(bias_ptr + offs_d, mask=mask_d, other=0.0).to(tl.float32)[None, :]
        tl.atomic_add(acc_ptr + offs_b[:, None] * stride_accb + offs_d[None, :], y,
                      mask=mask_b[:, None] & mask_d[None, :])
        if COUNT:
            if pid_d == 0:
                p = tl.load(pos_ptr).to(tl.int64)
                tl.atomic_add(cnt_ptr + p * stride_ct + offs_b * stride_cb + seg, kept, mask=mask_b)
    else:
        if PDL:
            gdc_launch_dependents()


# ------------------------------------------------------------------------------------------------------------
# wrappers (same signatures as kernels.reference_llama's)
# ------------------------------------------------------------------------------------------------------------
def rms_norm(h, weight, eps, dtype):
    """RMSNorm of the fp32 residual stream h (B, d) → (B, d) in `dtype`."""
    B, D = h.shape
    out = torch.empty(B, D, device=h.device, dtype=dtype)
    _rms_norm_kernel[(B,)](h, weight, out, D, eps, h.stride(0), out.stride(0), PDL=_pdl(), BLOCK=_pow2(D),
                           num_warps=8 if D > 2048 else 4, **_launch())
    return out


def embed(token, table, h):
    """h (B, d) fp32 = table[token]."""
    B, D = h.shape
    assert table.is_contiguous() and h.stride(1) == 1
    block = min(_pow2(D), 2048)
    _embed_kernel[(B, triton.cdiv(D, block))](token, table, h, D, h.stride(0), BLOCK=block, num_warps=4)
    return h


def rope_to_cache(src, bias, cos, sin, pos, cache, n_q, num_heads):
    """q (B, n_q, hd) rotated (returned, cache dtype); rotated k and v of every K/V head into cache[:, g, pos].
    src (B, n_q + 2·Hkv, hd); bias: the fused q/k/v bias to add first (src an fp32 accumulator, n_q = H) or None."""
    B, units, HD = src.shape
    n_kv = cache.shape[1]
    assert units == n_q + 2 * n_kv and src.stride(2) == 1 and src.stride(1) == HD and cache.is_contiguous()
    assert cos.is_contiguous() and sin.is_contiguous() and HD % 2 == 0
    q = torch.empty(B, n_q, HD, device=src.device, dtype=cache.dtype)
    _rope_kernel[(B, n_q + n_kv)](src, bias if bias is not None else src, cos, sin, pos, q, cache,
                                  n_q, n_kv, num_heads, HD, cache.shape[2], src.stride(0), q.stride(0), cache.stride(0),
                                  HAS_BIAS=bias is not None, PDL=_pdl(), BLOCK_D=_pow2(HD), num_warps=1, **_launch())
    return q


def swiglu_gather(x, wgu, bgu, idx, *, fixed=False):
    """silu(x·Wg[idx]ᵀ + bg) · (x·Wu[idx]ᵀ + bu) → (B, len(idx)) in x's dtype; wgu (2F, d) gate/up interleaved."""
    B, K = x.shape
    assert x.stride(1) == 1 and wgu.is_contiguous() and wgu.shape[1] == K
    n = idx.numel()
    out = torch.empty(B, n, device=x.device, dtype=x.dtype)
    grid = lambda meta: (triton.cdiv(n, meta["BLOCK_N"]),)  # noqa: E731
    _swiglu_kernel[grid](x, wgu, bgu if bgu is not None else wgu, idx, out, B, n, K, x.stride(0), out.stride(0),
                         HAS_BIAS=bgu is not None, PDL=_pdl(), PREFETCH=gemv._prefetch(fixed), BLOCK_B=_pow2(B),
                         **_launch())
    return out


def input_sparse_add(x, wt, thresholds, acc, *, segments, bias=None, counts=None, pos=None, swiglu=None):
    """acc (B, NCOL) fp32 += x̃ · wt (+ bias), x̃ = x where |x| > t: wt (R, NCOL) input-major, `segments` the column
    boundaries (0, c1, …, NCOL) of at most 3 segments with thresholds[s] each (an fp32 device tensor).
    swiglu=(xbias or None, ): x (B, 2R) holds the gate/up accumulators and x̃ is thresholded SwiGLU of them.
    counts (T, B, n_seg) int32 (a view is fine): the kept inputs of each sequence added at [pos, b, s]."""
    R, NCOL = wt.shape
    B = acc.shape[0]
    n_seg = len(segments) - 1
    assert 1 <= n_seg <= 3 and segments[0] == 0 and segments[-1] == NCOL and thresholds.numel() >= n_seg
    assert wt.is_contiguous() and acc.dtype == torch.float32 and acc.stride(1) == 1 and x.stride(1) == 1
    assert thresholds.dtype == torch.float32 and thresholds.is_contiguous()
    bounds = list(segments[1:-1]) + [NCOL] * (3 - n_seg)
    c1, c2 = bounds[0], bounds[1]
    width = max(b - a for a, b in zip(segments, segments[1:]))
    xbias = swiglu[0] if swiglu is not None else None
    cs = counts.stride() if counts is not None else (0, 0, 0)
    if counts is not None:
        assert counts.dtype == torch.int32 and counts.stride(2) == 1
    grid = lambda meta: (triton.cdiv(width, meta["BLOCK_D"]), triton.cdiv(R, meta["BLOCK_R"] * meta["ITERS"]), n_seg)  # noqa: E731
    _input_sparse_kernel[grid](x, wt, acc, thresholds, bias if bias is not None else wt,
                               xbias if xbias is not None else wt, counts if counts is not None else acc,
                               pos if pos is not None else acc,
                               B, R, NCOL, c1, c2, x.stride(0), R if swiglu is not None else 0, acc.stride(0),
                               cs[0], cs[1], N_SEG=n_seg, HAS_BIAS=bias is not None, SWIGLU=swiglu is not None,
                               XBIAS=xbias is not None, COUNT=counts is not None, PDL=_pdl(), BLOCK_B=_pow2(B),
                               **_launch())
    return acc
