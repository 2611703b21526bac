"""Triton kernels for contextual-sparse decoding: gathered GEMVs, head-sparse attention projections.

Every weight is row-major with the rows that one index selects stored contiguously, so a kernel reads only
the selected rows (the bytes it must read):

- fc1, `W1` (F, d) as Hugging Face stores it: `fc1_gather` computes y[b, j] = relu(x[b] · W1[idx[j]] + b1[idx[j]]).
- fc2, stored neuron-major `W2T` (F, d) = fc2.weight.T: `fc2_gather` computes y[b] = Σ_j a[b, j] W2T[idx[j]] + b2.
- fused QKV, head-major `Wqkv` (H, 3, hd, d) viewed (3·H·hd, d): `qkv_heads` computes q/k/v of selected heads.
- out_proj, head-major transposed `WoT` (H·hd, d) = out_proj.weight.T: `out_proj_heads` sums selected heads.

Two kernels do all four: `_rows_kernel` (one output per selected weight row, `row = idx[j // G]·S + O + j % G`)
and `_cols_kernel` (a reduction over selected rows, split over programs with fp32 atomics into a workspace,
then `_finish_kernel` adds bias and residual, casts, and zeroes the workspace again, so a CUDA graph can replay
it without a memset). Accumulation is fp32 for every operand dtype. Block sizes are autotuned on the GPU;
under TRITON_INTERPRET=1 (CPU tests) one small config keeps the interpreter fast.

Decode helpers: `head_attention` (single-query attention over a static KV cache for selected heads, fused
online softmax) and `kv_recompute` (Deja Vu: recompute the cached K/V entries of selected heads that are
missing, from the kept layer inputs).

Limits: index tensors are int32 or int64 and shared by the batch (batch ≤ 8 is the target; any works).
"""
from __future__ import annotations

import os

import torch
import triton
import triton.language as tl

INTERPRET = os.environ.get("TRITON_INTERPRET", "0") == "1"
#: KERNELS_AUTOTUNE=0 uses one fixed config per kernel (fast compiles, e.g. for correctness checks on a GPU)
AUTOTUNE = not INTERPRET and os.environ.get("KERNELS_AUTOTUNE", "1") != "0"


def _pow2(n: int) -> int:
    return max(1, triton.next_power_of_2(int(n)))


# ------------------------------------------------------------------------------------------------------------
# autotune configs
# ------------------------------------------------------------------------------------------------------------
def _row_configs():
    if INTERPRET:
        return [triton.Config({"BLOCK_N": 8, "BLOCK_K": 32}, num_warps=4)]
    if not AUTOTUNE:
        return [triton.Config({"BLOCK_N": 4, "BLOCK_K": 256}, num_warps=4)]
    out = []
    for bn, bk, warps in [(4, 512, 4), (8, 256, 4), (2, 1024, 4), (8, 512, 8), (16, 256, 8),  # batch 1
                          (2, 256, 4), (4, 128, 4), (4, 256, 8), (2, 512, 8), (8, 128, 8)]:  # batch 8
        out.append(triton.Config({"BLOCK_N": bn, "BLOCK_K": bk}, num_warps=warps))
    return out


def _col_configs():
    if INTERPRET:
        return [triton.Config({"BLOCK_R": 8, "BLOCK_D": 32, "ITERS": 2}, num_warps=4)]
    if not AUTOTUNE:
        return [triton.Config({"BLOCK_R": 8, "BLOCK_D": 128, "ITERS": 4}, num_warps=4)]
    out = []
    for br, bd, it, warps in [(16, 128, 4, 4), (8, 256, 4, 4), (16, 256, 4, 8), (32, 128, 2, 8),
                              (16, 256, 8, 8),  # batch 1
                              (4, 128, 8, 4), (8, 64, 8, 4), (4, 256, 8, 8), (8, 128, 4, 8)]:  # batch 8
        out.append(triton.Config({"BLOCK_R": br, "BLOCK_D": bd, "ITERS": it}, num_warps=warps))
    return out


def _prune(size_keys):
    """Keep configs whose fp32 accumulator (BLOCK_B × two block dims) holds 16 to 64 values per thread:
    larger spills registers, smaller leaves too few loads in flight (and costs compile time)."""
    def prune(configs, named_args, **kwargs):
        bb = named_args.get("BLOCK_B", kwargs.get("BLOCK_B", 1))
        kept = [c for c in configs
                if 16 * 32 * c.num_warps <= bb * c.kwargs[size_keys[0]] * c.kwargs[size_keys[1]] <= 64 * 32 * c.num_warps]
        return kept or configs[:1]
    return {"early_config_prune": prune}


# ------------------------------------------------------------------------------------------------------------
# kernels
# ------------------------------------------------------------------------------------------------------------
@triton.autotune(configs=_row_configs(), key=["N", "K", "G", "BLOCK_B", "RELU", "SCATTER"],
                 prune_configs_by=_prune(("BLOCK_N", "BLOCK_K")))
@triton.jit
def _rows_kernel(x_ptr, w_ptr, bias_ptr, idx_ptr, out_ptr, pos_ptr,
                 B, N, K, row_stride, row_offset,
                 stride_xb, stride_ob, stride_oslot, stride_opos,
                 G: tl.constexpr, HAS_BIAS: tl.constexpr, RELU: tl.constexpr, SCATTER: tl.constexpr,
                 HAS_POS: tl.constexpr, BLOCK_B: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_K: tl.constexpr):
    """out[b, slot(j), j % G] = act(x[b] · W[row(j)] + bias[row(j)]) for the N = len(idx)·G outputs j."""
    pid = tl.program_id(0)
    offs_n = pid * BLOCK_N + tl.arange(0, BLOCK_N)
    mask_n = offs_n < N
    slot = offs_n // G
    within = offs_n % G
    unit = tl.load(idx_ptr + slot, mask=mask_n, other=0).to(tl.int64)
    rows = unit * row_stride + row_offset + within
    offs_b = tl.arange(0, BLOCK_B)
    mask_b = offs_b < B
    acc = tl.zeros((BLOCK_B, BLOCK_N, BLOCK_K), dtype=tl.float32)
    for k0 in range(0, K, BLOCK_K):
        offs_k = k0 + tl.arange(0, BLOCK_K)
        mask_k = offs_k < K
        w = tl.load(w_ptr + rows[:, None] * K + offs_k[None, :], mask=mask_n[:, None] & mask_k[None, :], other=0.0)
        x = tl.load(x_ptr + offs_b[:, None] * stride_xb + offs_k[None, :], mask=mask_b[:, None] & mask_k[None, :],
                    other=0.0)
        acc += x.to(tl.float32)[:, None, :] * w.to(tl.float32)[None, :, :]
    y = tl.sum(acc, axis=2)
    if HAS_BIAS:
        y += tl.load(bias_ptr + rows, mask=mask_n, other=0.0).to(tl.float32)[None, :]
    if RELU:
        y = tl.maximum(y, 0.0)
    if SCATTER:
        oslot = unit
    else:
        oslot = slot.to(tl.int64)
    offs = offs_b[:, None].to(tl.int64) * stride_ob + oslot[None, :] * stride_oslot + within[None, :]
    if HAS_POS:
        offs += tl.load(pos_ptr).to(tl.int64) * stride_opos
    tl.store(out_ptr + offs, y.to(out_ptr.dtype.element_ty), mask=mask_b[:, None] & mask_n[None, :])


@triton.autotune(configs=_col_configs(), key=["R", "D", "G", "BLOCK_B"], reset_to_zero=["acc_ptr"],
                 prune_configs_by=_prune(("BLOCK_R", "BLOCK_D")))
@triton.jit
def _cols_kernel(a_ptr, w_ptr, idx_ptr, acc_ptr, B, R, D, row_stride, stride_ab,
                 G: tl.constexpr, BLOCK_B: tl.constexpr, BLOCK_R: tl.constexpr, BLOCK_D: tl.constexpr,
                 ITERS: tl.constexpr):
    """acc[b, :] += Σ_r a[b, r] · W[row(r)] over this program's ITERS·BLOCK_R selected rows."""
    pid_d = tl.program_id(0)
    pid_r = tl.program_id(1)
    offs_d = pid_d * BLOCK_D + tl.arange(0, BLOCK_D)
    mask_d = offs_d < D
    offs_b = tl.arange(0, BLOCK_B)
    mask_b = offs_b < B
    acc = tl.zeros((BLOCK_B, BLOCK_R, BLOCK_D), dtype=tl.float32)
    for i in tl.static_range(ITERS):
        offs_r = (pid_r * ITERS + i) * BLOCK_R + tl.arange(0, BLOCK_R)
        mask_r = offs_r < R
        unit = tl.load(idx_ptr + offs_r // G, mask=mask_r, other=0).to(tl.int64)
        rows = unit * row_stride + offs_r % G
        w = tl.load(w_ptr + rows[:, None] * D + offs_d[None, :], mask=mask_r[:, None] & mask_d[None, :], other=0.0)
        a = tl.load(a_ptr + offs_b[:, None] * stride_ab + offs_r[None, :], mask=mask_b[:, None] & mask_r[None, :],
                    other=0.0)
        acc += a.to(tl.float32)[:, :, None] * w.to(tl.float32)[None, :, :]
    y = tl.sum(acc, axis=1)
    tl.atomic_add(acc_ptr + offs_b[:, None] * D + offs_d[None, :], y, mask=mask_b[:, None] & mask_d[None, :])


@triton.jit
def _finish_kernel(acc_ptr, bias_ptr, res_ptr, out_ptr, total, D, stride_rb, stride_ob,
                   HAS_BIAS: tl.constexpr, HAS_RES: tl.constexpr, BLOCK: tl.constexpr):
    """out = acc + bias (+ residual), cast; acc = 0 (ready for the next call / graph replay)."""
    offs = tl.program_id(0) * BLOCK + tl.arange(0, BLOCK)
    mask = offs < total
    b = offs // D
    col = offs % D
    y = tl.load(acc_ptr + offs, mask=mask, other=0.0)
    if HAS_BIAS:
        y += tl.load(bias_ptr + col, mask=mask, other=0.0).to(tl.float32)
    if HAS_RES:
        y += tl.load(res_ptr + b * stride_rb + col, mask=mask, other=0.0).to(tl.float32)
    tl.store(out_ptr + b * stride_ob + col, y.to(out_ptr.dtype.element_ty), mask=mask)
    tl.store(acc_ptr + offs, tl.zeros((BLOCK,), dtype=tl.float32), mask=mask)


@triton.jit
def _attention_kernel(q_ptr, cache_ptr, idx_ptr, pos_ptr, out_ptr, n_sel, H, T_max, HD, scale,
                      stride_qb, stride_qh, stride_ob, stride_oh,
                      BLOCK_T: tl.constexpr, BLOCK_D: tl.constexpr):
    """out[b, h] = softmax(q[b, h] · K[b, idx[h], :L] · scale) V[b, idx[h], :L], L = pos + 1; cache (B, H, T, 2, HD)."""
    pid = tl.program_id(0)
    b = pid // n_sel
    h = pid % n_sel
    head = tl.load(idx_ptr + h).to(tl.int64)
    length = tl.load(pos_ptr).to(tl.int32) + 1
    offs_d = tl.arange(0, BLOCK_D)
    mask_d = offs_d < HD
    q = tl.load(q_ptr + b * stride_qb + h * stride_qh + offs_d, mask=mask_d, other=0.0).to(tl.float32) * scale
    base = cache_ptr + ((b.to(tl.int64) * H + head) * T_max) * 2 * HD
    m = tl.full((), float("-inf"), tl.float32)
    s = tl.zeros((), dtype=tl.float32)
    acc = tl.zeros((BLOCK_D,), dtype=tl.float32)
    for t0 in range(0, length, BLOCK_T):
        offs_t = t0 + tl.arange(0, BLOCK_T)
        mask_t = offs_t < length
        ptrs = base + offs_t[:, None] * (2 * HD) + offs_d[None, :]
        mask = mask_t[:, None] & mask_d[None, :]
        k = tl.load(ptrs, mask=mask, other=0.0).to(tl.float32)
        scores = tl.sum(k * q[None, :], axis=1)
        scores = tl.where(mask_t, scores, float("-inf"))
        m_new = tl.maximum(m, tl.max(scores, axis=0))
        p = tl.exp(scores - m_new)
        alpha = tl.exp(m - m_new)
        v = tl.load(ptrs + HD, mask=mask, other=0.0).to(tl.float32)
        acc = acc * alpha + tl.sum(p[:, None] * v, axis=0)
        s = s * alpha + tl.sum(p, axis=0)
        m = m_new
    tl.store(out_ptr + b * stride_ob + h * stride_oh + offs_d, (acc / s).to(out_ptr.dtype.element_ty), mask=mask_d)


@triton.jit
def _recompute_kernel(x_ptr, w_ptr, bias_ptr, idx_ptr, cache_ptr, have_ptr, pos_ptr,
                      B, H, T_max, D, HD,
                      BLOCK_T: tl.constexpr, BLOCK_K: tl.constexpr, BLOCK_2HD: tl.constexpr, UPCAST: tl.constexpr,
                      IEEE: tl.constexpr):
    """For selected head idx[program 0] and tokens t in this block with t < pos and not have[head, t]:
    cache[b, head, t] = x[b, t] · Wkv[head]ᵀ + bkv[head] (x: kept normed layer inputs (B, T, D)); then mark
    have[head, t] for every t ≤ pos in the block. Blocks with nothing missing only mark."""
    head = tl.load(idx_ptr + tl.program_id(0)).to(tl.int64)
    offs_t = tl.program_id(1) * BLOCK_T + tl.arange(0, BLOCK_T)
    pos = tl.load(pos_ptr).to(tl.int32)
    in_range = offs_t < T_max
    have = tl.load(have_ptr + head * T_max + offs_t, mask=in_range, other=1)
    need = (have == 0) & (offs_t < pos)
    if tl.sum(need.to(tl.int32), axis=0) > 0:
        offs_c = tl.arange(0, BLOCK_2HD)
        mask_c = offs_c < 2 * HD
        rows = head * 3 * HD + HD + offs_c  # the k and v rows of this head in the head-major fused weight
        bias = tl.load(bias_ptr + rows, mask=mask_c, other=0.0).to(tl.float32)
        for b in range(0, B):
            acc = tl.zeros((BLOCK_T, BLOCK_2HD), dtype=tl.float32)
            for k0 in range(0, D, BLOCK_K):
                offs_k = k0 + tl.arange(0, BLOCK_K)
                mask_k = offs_k < D
                x = tl.load(x_ptr + (b * T_max + offs_t[:, None]).to(tl.int64) * D + offs_k[None, :],
                            mask=need[:, None] & mask_k[None, :], other=0.0)
                w = tl.load(w_ptr + rows[None, :] * D + offs_k[:, None], mask=mask_c[None, :] & mask_k[:, None],
                            other=0.0)
                if UPCAST:  # the interpreter's dot mishandles bf16 operands
                    x = x.to(tl.float32)
                    w = w.to(tl.float32)
                if IEEE:  # fp32 operands: full fp32 products, not tf32
                    acc = tl.dot(x, w, acc, input_precision="ieee")
                else:
                    acc = tl.dot(x, w, acc)
            acc += bias[None, :]
            dst = cache_ptr + ((b * H + head) * T_max + offs_t[:, None]).to(tl.int64) * (2 * HD) + offs_c[None, :]
            tl.store(dst, acc.to(cache_ptr.dtype.element_ty), mask=need[:, None] & mask_c[None, :])
    tl.store(have_ptr + head * T_max + offs_t, tl.full((BLOCK_T,), 1, tl.int8), mask=in_range & (offs_t <= pos))


# ------------------------------------------------------------------------------------------------------------
# wrappers
# ------------------------------------------------------------------------------------------------------------
def _check_x(x: torch.Tensor, k: int) -> None:
    assert x.dim() == 2 and x.shape[1] == k and x.stride(1) == 1, f"expected (B, {k}) with unit stride, got {tuple(x.shape)}"


def gather_rows(x, w, bias, idx, *, group=1, row_stride=1, row_offset=0, relu=False, out=None,
                scatter=False, pos=None, out_strides=None):
    """out[b, slot, g] = act(x[b] · w[idx[slot]·row_stride + row_offset + g] + bias[...]), g < group.

    Plain output: (B, len(idx), group). With `scatter`, output slot = idx[slot] (write into a per-unit buffer);
    with `pos` (a 1-element int tensor) `out_strides[2]·pos` is added (write at a KV-cache position).
    `out_strides` = (batch, slot, pos) element strides of `out`; the `group` elements are contiguous."""
    B, K = x.shape
    _check_x(x, w.shape[1])
    assert w.is_contiguous()
    n = idx.numel() * group
    if out is None:
        out = torch.empty(B, idx.numel(), group, device=x.device, dtype=x.dtype)
        out_strides = (out.stride(0), out.stride(1), 0)
    elif out_strides is None:
        out_strides = (out.stride(0), out.stride(1), 0)
    grid = lambda meta: (triton.cdiv(n, meta["BLOCK_N"]),)  # noqa: E731
    _rows_kernel[grid](x, w, bias if bias is not None else w, idx, out, pos if pos is not None else idx,
                       B, n, K, row_stride, row_offset, x.stride(0), *out_strides,
                       G=group, HAS_BIAS=bias is not None, RELU=relu, SCATTER=scatter, HAS_POS=pos is not None,
                       BLOCK_B=_pow2(B))
    return out


_WORKSPACES: dict = {}


def _workspace(B, D, device):
    key = (B, D, str(device))
    if key not in _WORKSPACES:
        _WORKSPACES[key] = torch.zeros(B, D, device=device, dtype=torch.float32)
    return _WORKSPACES[key]


def gather_cols(a, w, bias, idx, *, group=1, row_stride=1, out=None, residual=None, workspace=None):
    """out[b] = Σ_r a[b, r] · w[idx[r // group]·row_stride + r % group] + bias (+ residual[b]).

    `a` is (B, len(idx)·group). The fp32 workspace (B, D) must be zero; it is left zero. `out` may be `residual`."""
    B, R = a.shape
    D = w.shape[1]
    assert R == idx.numel() * group and a.stride(1) == 1 and w.is_contiguous()
    acc = workspace if workspace is not None else _workspace(B, D, a.device)
    if out is None:
        out = torch.empty(B, D, device=a.device, dtype=a.dtype)
    grid = lambda meta: (triton.cdiv(D, meta["BLOCK_D"]), triton.cdiv(R, meta["BLOCK_R"] * meta["ITERS"]))  # noqa: E731
    _cols_kernel[grid](a, w, idx, acc, B, R, D, row_stride, a.stride(0), G=group, BLOCK_B=_pow2(B))
    block = 1024
    res = residual if residual is not None else out
    _finish_kernel[(triton.cdiv(B * D, block),)](acc, bias if bias is not None else acc, res, out, B * D, D,
                                                 res.stride(0), out.stride(0), HAS_BIAS=bias is not None,
                                                 HAS_RES=residual is not None, BLOCK=block)
    return out


# -- the four projections ------------------------------------------------------------------------------------
def fc1_gather(x, w1, b1, idx, out=None):
    """relu(x · W1[idx]ᵀ + b1[idx]) → (B, len(idx)); W1 is fc1.weight (F, d)."""
    res = gather_rows(x, w1, b1, idx, relu=True, out=None if out is None else out.view(out.shape[0], -1, 1))
    return res.view(x.shape[0], idx.numel())


def fc2_gather(a, w2t, b2, idx, out=None, residual=None, workspace=None):
    """a · W2T[idx] + b2 (+ residual) → (B, d); W2T is fc2.weight.T (F, d), a is (B, len(idx))."""
    return gather_cols(a, w2t, b2, idx, out=out, residual=residual, workspace=workspace)


QKV_PARTS = {"qkv": (0, 3), "q": (0, 1), "k": (1, 2), "v": (2, 3), "kv": (1, 3)}


def qkv_heads(x, wqkv, bqkv, head_idx, head_dim, part="qkv", out=None):
    """The `part` ("qkv", "q", "kv", ...) projections of selected heads → (B, len(head_idx), n_parts, head_dim).

    `wqkv` is head-major (H·3·hd, d): head h's q, k, v rows are rows [3·hd·h, 3·hd·(h+1))."""
    first, last = QKV_PARTS[part]
    res = gather_rows(x, wqkv, bqkv, head_idx, group=(last - first) * head_dim, row_stride=3 * head_dim,
                      row_offset=first * head_dim, out=None if out is None else out.view(out.shape[0], head_idx.numel(), -1))
    return res.view(x.shape[0], head_idx.numel(), last - first, head_dim)


def kv_to_cache(x, wqkv, bqkv, head_idx, head_dim, cache, pos):
    """Compute k, v of selected heads for the token x (B, d) and write them at `pos` of cache (B, H, T, 2, hd)."""
    B, H, T = cache.shape[:3]
    assert cache.is_contiguous()
    gather_rows(x, wqkv, bqkv, head_idx, group=2 * head_dim, row_stride=3 * head_dim, row_offset=head_dim,
                out=cache, scatter=True, pos=pos, out_strides=(cache.stride(0), cache.stride(1), cache.stride(2)))
    return cache


def out_proj_heads(attn, wot, bo, head_idx, head_dim, out=None, residual=None, workspace=None):
    """attn (B, len(head_idx)·hd) of selected heads · WoT[heads]  + bo (+ residual) → (B, d); WoT = out_proj.weight.T."""
    return gather_cols(attn, wot, bo, head_idx, group=head_dim, row_stride=head_dim, out=out, residual=residual,
                       workspace=workspace)


def head_attention(q, cache, head_idx, pos, scale, out=None):
    """Single-token attention of selected heads over cache positions [0, pos]: q (B, n, hd) → (B, n, hd)."""
    B, n, hd = q.shape
    _, H, T = cache.shape[:3]
    assert q.stride(2) == 1 and cache.is_contiguous()
    if out is None:
        out = torch.empty(B, n, hd, device=q.device, dtype=q.dtype)
    block_t = 16 if INTERPRET else 64
    _attention_kernel[(B * n,)](q, cache, head_idx, pos, out, n, H, T, hd, scale, q.stride(0), q.stride(1),
                                out.stride(0), out.stride(1), BLOCK_T=block_t, BLOCK_D=_pow2(hd),
                                num_warps=4)
    return out


def _dot_in_fp32(t):
    return INTERPRET or t.dtype == torch.float32


def kv_recompute(xkeep, wqkv, bqkv, head_idx, head_dim, cache, have, pos):
    """Fill the missing cache entries (have == 0, t < pos) of selected heads from kept inputs xkeep (B, T, d);
    then mark have[head, t] = 1 for t ≤ pos (the caller writes position pos itself)."""
    B, H, T = cache.shape[:3]
    D = xkeep.shape[-1]
    assert xkeep.is_contiguous() and have.dtype == torch.int8 and have.is_contiguous()
    block_t = 16
    _recompute_kernel[(head_idx.numel(), triton.cdiv(T, block_t))](
        xkeep, wqkv, bqkv, head_idx, cache, have, pos, B, H, T, D, head_dim,
        BLOCK_T=block_t, BLOCK_K=32 if INTERPRET else 64, BLOCK_2HD=_pow2(2 * head_dim), UPCAST=INTERPRET,
        IEEE=_dot_in_fp32(xkeep), num_warps=4)
    return cache
