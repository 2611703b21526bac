"""Triton kernels for contextual-sparse decoding: gathered GEMVs, head-sparse attention projections.

Every weight is row-major with the rows that one index selects stored contiguously, so a kernel reads only
the selected rows (the bytes it must read):

- fc1, `W1` (F, d) as Hugging Face stores it: `fc1_gather` computes y[b, j] = relu(x[b] · W1[idx[j]] + b1[idx[j]]).
- fc2, stored neuron-major `W2T` (F, d) = fc2.weight.T: `fc2_gather` computes y[b] = Σ_j a[b, j] W2T[idx[j]] + b2.
- fused QKV, head-major `Wqkv` (H, 3, hd, d) viewed (3·H·hd, d): `qkv_heads` computes q/k/v of selected heads.
- out_proj, head-major transposed `WoT` (H·hd, d) = out_proj.weight.T: `out_proj_heads` sums selected heads.

Two kernels do all four: `_rows_kernel` (one output per selected weight row, `row = idx[j // G]·S + O + j % G`)
and `_cols_kernel` (a reduction over selected rows, split over programs with fp32 atomics). Accumulation is
fp32 for every operand dtype. Block sizes are autotuned on the GPU; under TRITON_INTERPRET=1 (CPU tests) one
small config keeps the interpreter fast.

The decode step (`kernels.decode`) runs seven launches per layer (`layer_norm`, `qkv_to_cache`, `attend`,
`out_proj_add`, `layer_norm`, `fc1_gather`, `fc2_add`) with these fusions:
- *routing*: the fused QKV GEMV writes q of the selected heads to a buffer and their k/v straight into the
  static KV cache at the current position; the LayerNorm kernel also writes the normalised input to the
  kept-input store (Deja Vu).
- *split-T attention*: one program per (selected head, chunk of positions) writes a partial softmax (max,
  sum, weighted values); the head's last program to finish (an arrival counter) combines them. With
  kv="recompute" the same program first recomputes the chunk's missing K/V entries of its head from the kept
  inputs. (Combining in out_proj's prologue instead cost every out_proj program the exps again: out_proj of
  all heads took 28 µs for 52 MB on the H200.)
- *programmatic dependent launch* (Hopper): see `_pdl_mode`.
- *no finish kernel*: out_proj and fc2 add their atomics straight into the fp32 residual stream (the bias
  added once, by the first row block).
(Folding the LayerNorm into the row GEMVs instead, one launch fewer, was measured slower on the H200: every
program re-reads the fp32 stream and γ from L2, and fc1 of the kept neurons went from 12.6 to 22.7 µs.)
The stand-alone projections above (their tests and GPU checks) write the model dtype through an fp32
workspace and `_finish_kernel`.

Limits: index tensors are int32 or int64 and shared by the batch (batch ≤ 8 is the target; any works).
"""
from __future__ import annotations

import contextlib
import os

import torch
import triton
import triton.language as tl
from triton.language.extra.cuda import gdc_launch_dependents, gdc_wait

from kernels.reference import QKV_PARTS


INTERPRET = os.environ.get("TRITON_INTERPRET", "0") == "1"
#: KERNELS_AUTOTUNE=0 uses one fixed config per kernel (fast compiles, e.g. for correctness checks on a GPU)
AUTOTUNE = not INTERPRET and os.environ.get("KERNELS_AUTOTUNE", "1") != "0"


PDL_MODES = ("0", "1", "prefetch")


def set_pdl(mode: str | None = None) -> str:
    """Programmatic dependent launch (Hopper+) for the step kernels; returns the mode in force.

    "1": a step kernel waits (griddepcontrol.wait) before touching anything an earlier kernel writes, and lets
    the next kernel launch (griddepcontrol.launch_dependents) at its start (LayerNorm, attention) or after its
    main loop (the GEMVs), so launches and ramp-ups overlap the previous kernel's tail. "prefetch" (the
    default): also, when the indices are fixed for the step (static masks, dense: `fixed=True`), a GEMV loads
    its first weight tile before the wait. "0": off. Without an argument: the environment's KERNELS_PDL. Off
    under the interpreter and on GPUs before compute capability 9. A step already captured in a CUDA graph keeps
    the mode it was captured with.

    Measured on the H200 (`kernels.profile_step` — now harness.tools.profile_step — `--layers 8 --pdl 0,1,prefetch`, results/reports/
    pdl-h200.txt): static 50% heads + 90% neurons 675 → 644 → 620 µs per 8-layer step, dense 1657 → 1623 →
    1616 µs. Issuing L2 bulk prefetches of the whole weight share before the wait was slower (726 / 1716 µs),
    as was letting the next GEMV launch at a GEMV's start (its programs then hold slots while they wait)."""
    global PDL_MODE, PDL, _LAUNCH
    mode = mode if mode is not None else os.environ.get("KERNELS_PDL", "prefetch")
    if mode not in PDL_MODES:
        raise ValueError(f"KERNELS_PDL must be one of {', '.join(PDL_MODES)}, not {mode!r}")
    if INTERPRET or not torch.cuda.is_available() or torch.cuda.get_device_capability()[0] < 9:
        mode = "0"
    PDL_MODE, PDL = mode, mode != "0"
    _LAUNCH = {"launch_pdl": True} if PDL else {}
    return mode


PDL_MODE, PDL, _LAUNCH = "0", False, {}
set_pdl()


@contextlib.contextmanager
def pdl_off():
    """PDL off inside the block. Autotune under it: with PDL the autotuner's back-to-back timing runs of one
    kernel overlap each other, and the configs it then picks are not the best ones for the step."""
    saved = PDL_MODE
    set_pdl("0")
    try:
        yield
    finally:
        set_pdl(saved)


def _pow2(n: int) -> int:
    return max(1, triton.next_power_of_2(int(n)))


# ------------------------------------------------------------------------------------------------------------
# autotune configs
# ------------------------------------------------------------------------------------------------------------
#: batches of at least this size run the rows GEMV on tensor cores (tl.dot over a batch tile of >= 16 rows) instead
#: of the fp32 broadcast-multiply; 0 (the default) never. The broadcast form keeps BLOCK_B × BLOCK_N × BLOCK_K
#: products in registers, so at batch 16 only small tiles fit (76.9 ms a dense OPT-13B step against Hugging Face
#: eager's 13.9 ms on the H200: results/reports/latency-h200.md). The tl.dot form is tested in the CPU interpreter
#: and not yet timed, hence off.
DOT_BATCH = int(os.environ.get("KERNELS_DOT_BATCH", "0"))
_DOT_ROWS = [(16, 128, 4), (32, 64, 4), (32, 128, 4), (64, 64, 4), (64, 128, 8), (128, 64, 8)]


def _dot_rows():
    """The tensor-core form's (BLOCK_N, BLOCK_K, warps) candidates when autotuning (kept apart from the broadcast
    form's by the prune: neither form ever times the other's)."""
    return _DOT_ROWS if AUTOTUNE and not INTERPRET else []


def _row_configs():
    # one config each for the interpreter and without autotuning (a single config is never timed), fit for both
    # forms (tl.dot needs tiles of at least 16 × 16)
    if INTERPRET:
        return [triton.Config({"BLOCK_N": 16, "BLOCK_K": 32}, num_warps=4)]
    if not AUTOTUNE:
        return [triton.Config({"BLOCK_N": 16, "BLOCK_K": 256}, num_warps=4)]
    out = [triton.Config({"BLOCK_N": bn, "BLOCK_K": bk}, num_warps=warps) for bn, bk, warps in _dot_rows()]
    for bn, bk, warps in [(4, 512, 4), (8, 256, 4), (2, 1024, 4), (4, 1024, 4), (8, 512, 8), (16, 256, 8),
                          (16, 512, 8), (32, 256, 8), (16, 128, 4), (32, 128, 8),  # batch 1
                          (2, 256, 4), (4, 128, 4), (4, 256, 8), (2, 512, 8), (8, 128, 8)]:  # batch 8
        out.append(triton.Config({"BLOCK_N": bn, "BLOCK_K": bk}, num_warps=warps))
    return out


def _col_configs():  # (one config each for the interpreter and without autotuning: tiles fit for tl.dot too)
    if INTERPRET:
        return [triton.Config({"BLOCK_R": 16, "BLOCK_D": 32, "ITERS": 2}, num_warps=4)]
    if not AUTOTUNE:
        return [triton.Config({"BLOCK_R": 16, "BLOCK_D": 128, "ITERS": 4}, num_warps=4)]
    out = []
    for br, bd, it, warps in [(16, 128, 4, 4), (8, 256, 4, 4), (16, 256, 4, 8), (32, 128, 2, 8),
                              (16, 256, 8, 8), (16, 128, 16, 4), (32, 128, 8, 8), (8, 512, 8, 8),  # batch 1
                              (16, 256, 4, 4), (8, 512, 4, 4), (8, 256, 8, 4), (8, 512, 16, 4),  # batch 1 (sweep)
                              (16, 256, 32, 8), (32, 128, 16, 8), (8, 512, 32, 8),  # batch 1, many rows
                              (4, 128, 8, 4), (8, 64, 8, 4), (4, 256, 8, 8), (8, 128, 4, 8)]:  # batch 8
        out.append(triton.Config({"BLOCK_R": br, "BLOCK_D": bd, "ITERS": it}, num_warps=warps))
    return out


def _prune(size_keys):
    """Keep configs whose fp32 accumulator (BLOCK_B × two block dims) holds 16 to 64 values per thread:
    larger spills registers, smaller leaves too few loads in flight (and costs compile time). The tensor-core form
    (DOT) keeps the tiles of at least 16 × 16 instead, its accumulator being BLOCK_B × BLOCK_N only."""
    def prune(configs, named_args, **kwargs):
        if len(configs) == 1:
            return configs
        bb = named_args.get("BLOCK_B", kwargs.get("BLOCK_B", 1))
        rows = size_keys[0] == "BLOCK_N"
        dot_set = {(bn, bk, warps) for bn, bk, warps in _dot_rows()} if rows else set()
        is_dot = lambda c: (c.kwargs[size_keys[0]], c.kwargs[size_keys[1]], c.num_warps) in dot_set  # noqa: E731
        if named_args.get("DOT", kwargs.get("DOT", False)):
            if not rows:  # cols: any config with tiles of at least 16 × 16 (its accumulator is BLOCK_B × BLOCK_D)
                return [c for c in configs if c.kwargs["BLOCK_R"] >= 16 and c.kwargs["BLOCK_D"] >= 16] or configs[:1]
            return [c for c in configs if is_dot(c)] or configs[-1:]
        configs = [c for c in configs if not is_dot(c)]
        kept = [c for c in configs
                if 16 * 32 * c.num_warps <= bb * c.kwargs[size_keys[0]] * c.kwargs[size_keys[1]] <= 64 * 32 * c.num_warps]
        return kept or configs[:1]
    return {"early_config_prune": prune}


@triton.jit
def _dot(acc, x, w, IEEE: tl.constexpr):
    """acc (B, N) += x (B, K) · w (N, K)ᵀ on tensor cores (8-bit codes converted to x's dtype: exact)."""
    wt = tl.trans(w.to(x.dtype))
    if IEEE:
        acc = tl.dot(x, wt, acc, input_precision="ieee")
    else:
        acc = tl.dot(x, wt, acc)
    return acc


# ------------------------------------------------------------------------------------------------------------
# kernels
# ------------------------------------------------------------------------------------------------------------
@triton.autotune(configs=_row_configs(), key=["N", "K", "G", "BLOCK_B", "RELU", "TO_CACHE", "DOT"],
                 prune_configs_by=_prune(("BLOCK_N", "BLOCK_K")))
@triton.jit
def _rows_kernel(x_ptr, w_ptr, bias_ptr, idx_ptr, out_ptr, cache_ptr, pos_ptr, count_ptr, scale_ptr,
                 B, N, K, row_stride, row_offset, split,
                 stride_xb, stride_ob, stride_oslot, stride_cb, stride_ch, stride_ct,
                 G: tl.constexpr, HAS_BIAS: tl.constexpr, RELU: tl.constexpr, TO_CACHE: tl.constexpr,
                 COUNTED: tl.constexpr, SCALE: tl.constexpr, PDL: tl.constexpr, PREFETCH: tl.constexpr,
                 DOT: tl.constexpr, IEEE: tl.constexpr,
                 BLOCK_B: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_K: tl.constexpr):
    """y[b, j] = act(x[b] · W[row(j)] + bias[row(j)]) for the N = len(idx)·G outputs j, row(j) =
    idx[j // G]·row_stride + row_offset + j % G. Element e = row_offset + j % G of a unit goes to
    out[b, j // G, j % G] if e < split, else (TO_CACHE) to cache[b, idx[j // G], pos, e − split].
    COUNTED: only the first count[0] units of idx are live (a count the step computes on the device); programs
    past them read and write nothing. SCALE: W holds 8-bit codes (int8 or fp8) and row r's product is multiplied by
    scale[r] (fp32) before the bias. PDL: wait for the previous kernel before the first read of x/idx
    (PREFETCH: idx is fixed for the step, so the first weight tile is loaded before the wait)."""
    pid = tl.program_id(0)
    if PDL:
        if not PREFETCH:
            gdc_wait()
    if COUNTED:
        N = tl.load(count_ptr).to(tl.int32) * G
    offs_n = pid * BLOCK_N + tl.arange(0, BLOCK_N)
    mask_n = offs_n < N
    K_live = tl.where(pid * BLOCK_N < N, K, 0)  # the weight loop of a program past the live units runs no step
    slot = offs_n // G
    within = offs_n % G
    unit = tl.load(idx_ptr + slot, mask=mask_n, other=0).to(tl.int64)
    rows = unit * row_stride + row_offset + within
    offs_b = tl.arange(0, BLOCK_B)
    mask_b = offs_b < B
    offs_k = tl.arange(0, BLOCK_K)
    mask_k = offs_k < K
    w = tl.load(w_ptr + rows[:, None] * K + offs_k[None, :], mask=mask_n[:, None] & mask_k[None, :], other=0.0)
    if PDL:
        if PREFETCH:
            gdc_wait()
    x = tl.load(x_ptr + offs_b[:, None] * stride_xb + offs_k[None, :], mask=mask_b[:, None] & mask_k[None, :],
                other=0.0)
    if DOT:  # tensor cores: the batch tile (>= 16 rows, padding masked to zero) times the weight tile
        acc = _dot(tl.zeros((BLOCK_B, BLOCK_N), dtype=tl.float32), x, w, IEEE)
    else:
        acc = x.to(tl.float32)[:, None, :] * w.to(tl.float32)[None, :, :]
    for k0 in range(BLOCK_K, K_live, BLOCK_K):
        offs_k = k0 + tl.arange(0, BLOCK_K)
        mask_k = offs_k < K
        w = tl.load(w_ptr + rows[:, None] * K + offs_k[None, :], mask=mask_n[:, None] & mask_k[None, :], other=0.0)
        x = tl.load(x_ptr + offs_b[:, None] * stride_xb + offs_k[None, :], mask=mask_b[:, None] & mask_k[None, :],
                    other=0.0)
        if DOT:
            acc = _dot(acc, x, w, IEEE)
        else:
            acc += x.to(tl.float32)[:, None, :] * w.to(tl.float32)[None, :, :]
    if PDL:  # the next kernel may launch once every program is past its weights (not earlier: it would hold slots)
        gdc_launch_dependents()
    if DOT:
        y = acc
    else:
        y = tl.sum(acc, axis=2)
    if SCALE:
        y *= tl.load(scale_ptr + rows, mask=mask_n, other=0.0)[None, :]
    if HAS_BIAS:
        y += tl.load(bias_ptr + rows, mask=mask_n, other=0.0).to(tl.float32)[None, :]
    if RELU:
        y = tl.maximum(y, 0.0)
    mask = mask_b[:, None] & mask_n[None, :]
    e = row_offset + within
    offs = offs_b[:, None].to(tl.int64) * stride_ob + slot[None, :].to(tl.int64) * stride_oslot + within[None, :]
    tl.store(out_ptr + offs, y.to(out_ptr.dtype.element_ty), mask=mask & (e < split)[None, :])
    if TO_CACHE:
        p = tl.load(pos_ptr).to(tl.int64)
        offs = offs_b[:, None].to(tl.int64) * stride_cb + unit[None, :] * stride_ch + p * stride_ct + (e - split)[None, :]
        tl.store(cache_ptr + offs, y.to(cache_ptr.dtype.element_ty), mask=mask & (e >= split)[None, :])


@triton.autotune(configs=_col_configs(), key=["R", "D", "G", "BLOCK_B", "DOT"], restore_value=["acc_ptr"],
                 prune_configs_by=_prune(("BLOCK_R", "BLOCK_D")))
@triton.jit
def _cols_kernel(a_ptr, w_ptr, idx_ptr, acc_ptr, bias_ptr, count_ptr,
                 B, R, D, row_stride, stride_ab, stride_accb,
                 G: tl.constexpr, HAS_BIAS: tl.constexpr, COUNTED: tl.constexpr, PDL: tl.constexpr,
                 PREFETCH: tl.constexpr, DOT: tl.constexpr, IEEE: tl.constexpr,
                 BLOCK_B: tl.constexpr, BLOCK_R: tl.constexpr, BLOCK_D: tl.constexpr, ITERS: tl.constexpr):
    """acc[b, :] += Σ_r a[b, r] · W[row(r)] over this program's ITERS·BLOCK_R selected rows, row(r) =
    idx[r // G]·row_stride + r % G (+ bias, added by the first row block). COUNTED, PDL/PREFETCH as in
    `_rows_kernel` (a program whose rows are all past the live units adds nothing, bias aside)."""
    pid_d = tl.program_id(0)
    pid_r = tl.program_id(1)
    if PDL:
        if not PREFETCH:
            gdc_wait()
    if COUNTED:
        R = tl.load(count_ptr).to(tl.int32) * G
    offs_d = pid_d * BLOCK_D + tl.arange(0, BLOCK_D)
    mask_d = offs_d < D
    offs_b = tl.arange(0, BLOCK_B)
    mask_b = offs_b < B
    if DOT:  # tensor cores (see _rows_kernel): the accumulator is BLOCK_B × BLOCK_D
        acc = tl.zeros((BLOCK_B, BLOCK_D), dtype=tl.float32)
    else:
        acc = tl.zeros((BLOCK_B, BLOCK_R, BLOCK_D), dtype=tl.float32)
    for i in tl.static_range(ITERS):
        offs_r = (pid_r * ITERS + i) * BLOCK_R + tl.arange(0, BLOCK_R)
        mask_r = offs_r < R
        unit = tl.load(idx_ptr + offs_r // G, mask=mask_r, other=0).to(tl.int64)
        rows = unit * row_stride + offs_r % G
        w = tl.load(w_ptr + rows[:, None] * D + offs_d[None, :], mask=mask_r[:, None] & mask_d[None, :], other=0.0)
        if PDL:
            if PREFETCH:
                if i == 0:
                    gdc_wait()
        a = tl.load(a_ptr + offs_b[:, None] * stride_ab + offs_r[None, :], mask=mask_b[:, None] & mask_r[None, :],
                    other=0.0)
        if DOT:
            if IEEE:
                acc = tl.dot(a.to(w.dtype), w, acc, input_precision="ieee")
            else:
                acc = tl.dot(a.to(w.dtype), w, acc)
        else:
            acc += a.to(tl.float32)[:, :, None] * w.to(tl.float32)[None, :, :]
    if PDL:
        gdc_launch_dependents()
    if DOT:
        y = acc
    else:
        y = tl.sum(acc, axis=1)
    if HAS_BIAS:
        if pid_r == 0:
            y += tl.load(bias_ptr + offs_d, mask=mask_d, other=0.0).to(tl.float32)[None, :]
    if (pid_r == 0) | (pid_r * ITERS * BLOCK_R < R):
        tl.atomic_add(acc_ptr + offs_b[:, None] * stride_accb + offs_d[None, :], y,
                      mask=mask_b[:, None] & mask_d[None, :])


@triton.jit
def _finish_kernel(acc_ptr, res_ptr, out_ptr, total, D, stride_rb, stride_ob,
                   HAS_RES: tl.constexpr, BLOCK: tl.constexpr):
    """out = acc (+ residual), cast; acc = 0 (ready for the next call / graph replay)."""
    offs = tl.program_id(0) * BLOCK + tl.arange(0, BLOCK)
    mask = offs < total
    b = offs // D
    col = offs % D
    y = tl.load(acc_ptr + offs, mask=mask, other=0.0)
    if HAS_RES:
        y += tl.load(res_ptr + b * stride_rb + col, mask=mask, other=0.0).to(tl.float32)
    tl.store(out_ptr + b * stride_ob + col, y.to(out_ptr.dtype.element_ty), mask=mask)
    tl.store(acc_ptr + offs, tl.zeros((BLOCK,), dtype=tl.float32), mask=mask)


@triton.jit
def _layer_norm_kernel(h_ptr, w_ptr, b_ptr, out_ptr, keep_ptr, pos_ptr, D, eps, stride_hb, stride_ob, stride_kb,
                       stride_kt, KEEP: tl.constexpr, PDL: tl.constexpr, BLOCK: tl.constexpr):
    """out[b] = LayerNorm(h[b]) (fp32 statistics, cast to out's dtype); KEEP: also to keep[b, pos]."""
    b = tl.program_id(0).to(tl.int64)
    offs = tl.arange(0, BLOCK)
    mask = offs < D
    gamma = tl.load(w_ptr + offs, mask=mask, other=0.0).to(tl.float32)
    beta = tl.load(b_ptr + offs, mask=mask, other=0.0).to(tl.float32)
    if PDL:
        gdc_launch_dependents()
        gdc_wait()
    x = tl.load(h_ptr + b * stride_hb + offs, mask=mask, other=0.0).to(tl.float32)
    mean = tl.sum(x, axis=0) / D
    centred = tl.where(mask, x - mean, 0.0)
    rstd = 1.0 / tl.sqrt(tl.sum(centred * centred, axis=0) / D + eps)
    y = centred * rstd * gamma + beta
    tl.store(out_ptr + b * stride_ob + offs, y.to(out_ptr.dtype.element_ty), mask=mask)
    if KEEP:
        p = tl.load(pos_ptr).to(tl.int64)
        tl.store(keep_ptr + b * stride_kb + p * stride_kt + offs, y.to(keep_ptr.dtype.element_ty), mask=mask)


@triton.jit
def _attend_kernel(q_ptr, cache_ptr, idx_ptr, pos_ptr, m_ptr, l_ptr, o_ptr, out_ptr, count_ptr,
                   x_ptr, w_ptr, bias_ptr, have_ptr, live_ptr,
                   B, n_sel, H, T_max, D, HD, scale, stride_qb, stride_qh, n_chunks,
                   NC: tl.constexpr, CHUNK: tl.constexpr, BLOCK_D: tl.constexpr,
                   ATTEND: tl.constexpr, RECOMPUTE: tl.constexpr,
                   BLOCK_K: tl.constexpr, BLOCK_2HD: tl.constexpr, UPCAST: tl.constexpr, IEEE: tl.constexpr,
                   PDL: tl.constexpr, EARLY: tl.constexpr, COUNTED: tl.constexpr):
    """Program (slot, c): selected head idx[slot], positions t of chunk c; cache (B, H, T, 2, HD).

    RECOMPUTE (Deja Vu): entries with t < pos and not have[head, t] are computed from the kept normalised layer
    inputs x (B, T, D): cache[b, head, t] = x[b, t] · Wkv[head]ᵀ + bkv[head]; then have[head, t] = 1 for t ≤ pos.
    ATTEND: the chunk's partial softmax of q[b, slot] · K[b, head, t ≤ pos] · scale: its max m, its sum l and
    Σ p·V (unnormalised) to m/l (B, n, NC) and o (B, n, NC, HD) (NC = n_chunks rounded up to a power of two;
    a chunk past pos writes m = −inf, l = 0); the head's last program to arrive (count[slot]) combines them into
    out (B, n, HD). With NC = 1 the one program writes out directly.
    EARLY (PDL, batch 1, idx fixed for the step, no RECOMPUTE): the chunk's K/V at positions t < pos, which earlier
    steps wrote, are loaded before the PDL wait, so that their memory latency overlaps the QKV launch's tail; only
    q and the entry at pos (this step's) are read after it. (pos itself changes only between steps.)
    COUNTED: only slots below live[0] are selected heads (a count computed on the device); the others do
    nothing."""
    slot = tl.program_id(0)
    c = tl.program_id(1)
    if PDL:
        gdc_launch_dependents()
        if not EARLY:
            gdc_wait()
    live = slot >= 0
    if COUNTED:
        live = slot < tl.load(live_ptr)
    head = tl.where(live, tl.load(idx_ptr + slot).to(tl.int64), 0)
    pos = tl.load(pos_ptr).to(tl.int32)
    offs_t = c * CHUNK + tl.arange(0, CHUNK)
    in_range = (offs_t < T_max) & live
    if EARLY:
        offs_e = tl.arange(0, BLOCK_D)
        early = (offs_t < pos)[:, None] & (offs_e < HD)[None, :]
        ptrs_e = cache_ptr + (head * T_max + offs_t[:, None]).to(tl.int64) * (2 * HD) + offs_e[None, :]
        k_past = tl.load(ptrs_e, mask=early, other=0.0)
        v_past = tl.load(ptrs_e + HD, mask=early, other=0.0)
        if PDL:
            gdc_wait()
    if RECOMPUTE:
        have = tl.load(have_ptr + head * T_max + offs_t, mask=in_range, other=1)
        need = (have == 0) & (offs_t < pos)
        if tl.sum(need.to(tl.int32), axis=0) > 0:
            offs_c = tl.arange(0, BLOCK_2HD)
            mask_c = offs_c < 2 * HD
            rows = head * 3 * HD + HD + offs_c  # the k and v rows of this head in the head-major fused weight
            bias = tl.load(bias_ptr + rows, mask=mask_c, other=0.0).to(tl.float32)
            for b in range(0, B):
                acc = tl.zeros((CHUNK, BLOCK_2HD), dtype=tl.float32)
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
            tl.debug_barrier()  # the chunk's recomputed entries are read below by other threads of this program
        tl.store(have_ptr + head * T_max + offs_t, tl.full((CHUNK,), 1, tl.int8), mask=in_range & (offs_t <= pos))
    if ATTEND:
        if live:  # a slot past the live count attends nothing
            offs_d = tl.arange(0, BLOCK_D)
            mask_d = offs_d < HD
            valid = offs_t <= pos
            mask = valid[:, None] & mask_d[None, :]
            for b in range(0, B):
                q = tl.load(q_ptr + b * stride_qb + slot * stride_qh + offs_d, mask=mask_d, other=0.0).to(tl.float32)
                ptrs = cache_ptr + ((b * H + head) * T_max + offs_t[:, None]).to(tl.int64) * (2 * HD) + offs_d[None, :]
                if EARLY:  # batch 1: only the entry at pos is still to read
                    now = (offs_t == pos)[:, None] & mask_d[None, :]
                    k = tl.where(now, tl.load(ptrs, mask=now, other=0.0), k_past).to(tl.float32)
                    v = tl.where(now, tl.load(ptrs + HD, mask=now, other=0.0), v_past).to(tl.float32)
                else:
                    k = tl.load(ptrs, mask=mask, other=0.0).to(tl.float32)
                    v = tl.load(ptrs + HD, mask=mask, other=0.0).to(tl.float32)
                scores = tl.where(valid, tl.sum(k * (q * scale)[None, :], axis=1), float("-inf"))
                m = tl.max(scores, axis=0)
                p = tl.exp(scores - tl.where(m == float("-inf"), 0.0, m))
                if NC == 1:
                    tl.store(out_ptr + (b * n_sel + slot) * HD + offs_d, tl.sum(p[:, None] * v, axis=0) / tl.sum(p, axis=0),
                             mask=mask_d)
                else:
                    part = (b * n_sel + slot) * NC + c
                    tl.store(m_ptr + part, m)
                    tl.store(l_ptr + part, tl.sum(p, axis=0))
                    tl.store(o_ptr + part * HD + offs_d, tl.sum(p[:, None] * v, axis=0), mask=mask_d)
            if NC > 1:  # the head's last chunk program to finish combines the n_chunks partials into out (B, n, HD)
                tl.debug_barrier()  # every thread's partials are stored before the (releasing) count
                done = tl.atomic_add(count_ptr + slot, 1)
                if done == n_chunks - 1:
                    offs_c = tl.arange(0, NC)
                    mask_c = offs_c < n_chunks
                    for b in range(0, B):
                        part = (b * n_sel + slot) * NC + offs_c
                        m_c = tl.load(m_ptr + part, mask=mask_c, other=float("-inf"), cache_modifier=".cg")
                        w_c = tl.exp(m_c - tl.max(m_c, axis=0))  # chunk 0 always holds position 0: the max is finite
                        den = tl.sum(w_c * tl.load(l_ptr + part, mask=mask_c, other=0.0, cache_modifier=".cg"), axis=0)
                        o_c = tl.load(o_ptr + part[:, None] * HD + offs_d[None, :], mask=mask_c[:, None] & mask_d[None, :],
                                      other=0.0, cache_modifier=".cg")
                        tl.store(out_ptr + (b * n_sel + slot) * HD + offs_d, tl.sum(w_c[:, None] * o_c, axis=0) / den,
                                 mask=mask_d)
                    tl.atomic_xchg(count_ptr + slot, 0)  # ready for the next launch (or graph replay)


@triton.jit
def _embed_kernel(token_ptr, pos_ptr, embed_ptr, pos_embed_ptr, h_ptr, D, offset, stride_hb, BLOCK: tl.constexpr):
    """h[b] = float(embed[token[b]] + pos_embed[pos + offset]) (the sum rounded to the table's dtype first, as
    the model computes it), for the columns of program (b, c)."""
    b = tl.program_id(0)
    offs = tl.program_id(1) * BLOCK + tl.arange(0, BLOCK)
    mask = offs < D
    token = tl.load(token_ptr + b).to(tl.int64)
    position = tl.load(pos_ptr).to(tl.int64) + offset
    e = tl.load(embed_ptr + token * D + offs, mask=mask, other=0.0).to(tl.float32)
    e += tl.load(pos_embed_ptr + position * D + offs, mask=mask, other=0.0).to(tl.float32)
    tl.store(h_ptr + b * stride_hb + offs, e.to(embed_ptr.dtype.element_ty).to(tl.float32), mask=mask)


@triton.jit
def _argmax_kernel(x_ptr, value_ptr, index_ptr, count_ptr, out_ptr, V, stride_xb, n_parts,
                   NP: tl.constexpr, BLOCK: tl.constexpr):
    """out[b] = the first index of the largest x[b, :V]: program (b, c) reduces columns [c·BLOCK, (c+1)·BLOCK)
    to (value, index) partials; the row's last program to arrive (count[b]) reduces the n_parts partials."""
    b = tl.program_id(0)
    c = tl.program_id(1)
    offs = c * BLOCK + tl.arange(0, BLOCK)
    x = tl.load(x_ptr + b.to(tl.int64) * stride_xb + offs, mask=offs < V, other=float("-inf")).to(tl.float32)
    best, where = tl.max(x, axis=0, return_indices=True, return_indices_tie_break_left=True)
    tl.store(value_ptr + b * NP + c, best)
    tl.store(index_ptr + b * NP + c, c * BLOCK + where)
    tl.debug_barrier()
    done = tl.atomic_add(count_ptr + b, 1)
    if done == n_parts - 1:
        offs_c = tl.arange(0, NP)
        mask_c = offs_c < n_parts
        values = tl.load(value_ptr + b * NP + offs_c, mask=mask_c, other=float("-inf"), cache_modifier=".cg")
        indices = tl.load(index_ptr + b * NP + offs_c, mask=mask_c, other=V, cache_modifier=".cg")
        top = tl.max(values, axis=0)
        tl.store(out_ptr + b, tl.min(tl.where(values == top, indices, V), axis=0).to(out_ptr.dtype.element_ty))
        tl.atomic_xchg(count_ptr + b, 0)


# ------------------------------------------------------------------------------------------------------------
# wrappers
# ------------------------------------------------------------------------------------------------------------
def _check_x(x: torch.Tensor, k: int) -> None:
    assert x.dim() == 2 and x.shape[1] == k and x.stride(1) == 1, f"expected (B, {k}) with unit stride, got {tuple(x.shape)}"


_NO_SPLIT = 2 ** 30  # every element to `out`


def _prefetch(fixed: bool) -> bool:
    """Load the first weight tile before the PDL wait (the indices are fixed for the step)."""
    return fixed and PDL_MODE == "prefetch"


def _rows(x, w, bias, idx, *, group=1, row_stride=1, row_offset=0, relu=False, out=None, out_strides=(0, 0),
          cache=None, pos=None, split=_NO_SPLIT, fixed=False, config=None, count=None, scale=None):
    """Launch `_rows_kernel`; see its docstring. `fixed`: idx does not change during the step (PDL prefetch).
    `config` (a triton.Config): run that one instead of autotuning (config sweeps, kernels.bench.gpu). `count`: a
    1-element int32 device tensor, the number of live units of idx (the grid covers all of idx)."""
    B, K = x.shape
    _check_x(x, w.shape[1])
    assert w.is_contiguous()
    n = idx.numel() * group
    dot = 0 < DOT_BATCH <= B
    cs = cache.stride() if cache is not None else (0, 0, 0)
    grid = lambda meta: (triton.cdiv(n, meta["BLOCK_N"]),)  # noqa: E731
    kernel, meta = (_rows_kernel, {}) if config is None else (_rows_kernel.fn, _config_kwargs(config))
    kernel[grid](x, w, bias if bias is not None else w, idx, out if out is not None else w,
                 cache if cache is not None else w, pos if pos is not None else idx,
                 count if count is not None else idx, scale if scale is not None else x,
                 B, n, K, row_stride, row_offset, split,
                 x.stride(0), out_strides[0], out_strides[1], cs[0], cs[1], cs[2],
                 G=group, HAS_BIAS=bias is not None, RELU=relu, TO_CACHE=cache is not None, COUNTED=count is not None,
                 SCALE=scale is not None, PDL=PDL, PREFETCH=_prefetch(fixed), DOT=dot, IEEE=dot and _dot_in_fp32(x),
                 BLOCK_B=max(16, _pow2(B)) if dot else _pow2(B), **_LAUNCH, **meta)
    return out


def _config_kwargs(config) -> dict:
    return {**config.kwargs, "num_warps": config.num_warps, "num_stages": config.num_stages}


def gather_rows(x, w, bias, idx, *, group=1, row_stride=1, row_offset=0, relu=False, out=None, fixed=False,
                scale=None):
    """out[b, slot, g] = act(x[b] · w[idx[slot]·row_stride + row_offset + g] + bias[...]), g < group → (B, len(idx), group).
    `scale` (fp32, one per row of w): w holds 8-bit codes, each row's product multiplied by its scale."""
    if out is None:
        out = torch.empty(x.shape[0], idx.numel(), group, device=x.device, dtype=x.dtype)
    return _rows(x, w, bias, idx, group=group, row_stride=row_stride, row_offset=row_offset, relu=relu, out=out,
                 out_strides=(out.stride(0), out.stride(1)), fixed=fixed, scale=scale)


def _cols(a, w, idx, acc, bias, *, group=1, row_stride=1, fixed=False, config=None, count=None):
    """Launch `_cols_kernel`: acc (fp32, (B, D)) += a · w[rows] (+ bias); `fixed`, `config`, `count` as in
    `_rows`."""
    B = acc.shape[0]
    D = w.shape[1]
    R = idx.numel() * group
    assert w.is_contiguous() and acc.dtype == torch.float32 and acc.stride(1) == 1
    assert a.stride(-1) == 1
    grid = lambda meta: (triton.cdiv(D, meta["BLOCK_D"]), triton.cdiv(R, meta["BLOCK_R"] * meta["ITERS"]))  # noqa: E731
    kernel, meta = (_cols_kernel, {}) if config is None else (_cols_kernel.fn, _config_kwargs(config))
    dot = 0 < DOT_BATCH <= B
    kernel[grid](a, w, idx, acc, bias if bias is not None else w, count if count is not None else idx,
                 B, R, D, row_stride, a.stride(0), acc.stride(0), G=group, HAS_BIAS=bias is not None,
                 COUNTED=count is not None, PDL=PDL, PREFETCH=_prefetch(fixed), DOT=dot,
                 IEEE=dot and _dot_in_fp32(w), BLOCK_B=max(16, _pow2(B)) if dot else _pow2(B), **_LAUNCH, **meta)


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
    assert R == idx.numel() * group and a.stride(1) == 1
    acc = workspace if workspace is not None else _workspace(B, D, a.device)
    if out is None:
        out = torch.empty(B, D, device=a.device, dtype=a.dtype)
    _cols(a, w, idx, acc, bias, group=group, row_stride=row_stride)
    block = 1024
    res = residual if residual is not None else out
    _finish_kernel[(triton.cdiv(B * D, block),)](acc, res, out, B * D, D, res.stride(0), out.stride(0),
                                                 HAS_RES=residual is not None, BLOCK=block)
    return out


# -- the four projections ------------------------------------------------------------------------------------
def fc1_gather(x, w1, b1, idx, out=None, *, fixed=False, count=None):
    """relu(x · W1[idx]ᵀ + b1[idx]) → (B, len(idx)); W1 is fc1.weight (F, d). `count`: live units of idx (the
    entries past them are not written)."""
    if out is None:
        out = torch.empty(x.shape[0], idx.numel(), device=x.device, dtype=x.dtype)
    _rows(x, w1, b1, idx, relu=True, out=out, out_strides=(out.stride(0), out.stride(1)), fixed=fixed, count=count)
    return out


def fc2_gather(a, w2t, b2, idx, out=None, residual=None, workspace=None):
    """a · W2T[idx] + b2 (+ residual) → (B, d); W2T is fc2.weight.T (F, d), a is (B, len(idx))."""
    return gather_cols(a, w2t, b2, idx, out=out, residual=residual, workspace=workspace)


def qkv_heads(x, wqkv, bqkv, head_idx, head_dim, part="qkv", out=None):
    """The `part` ("qkv", "q", "kv", ...) projections of selected heads → (B, len(head_idx), n_parts, head_dim).

    `wqkv` is head-major (H·3·hd, d): head h's q, k, v rows are rows [3·hd·h, 3·hd·(h+1))."""
    first, last = QKV_PARTS[part]
    res = gather_rows(x, wqkv, bqkv, head_idx, group=(last - first) * head_dim, row_stride=3 * head_dim,
                      row_offset=first * head_dim, out=None if out is None else out.view(out.shape[0], head_idx.numel(), -1))
    return res.view(x.shape[0], head_idx.numel(), last - first, head_dim)


def kv_to_cache(x, wqkv, bqkv, head_idx, head_dim, cache, pos):
    """Compute k, v of selected heads for the token x (B, d) and write them at `pos` of cache (B, H, T, 2, hd)."""
    qkv_to_cache(x, wqkv, bqkv, head_idx, head_dim, cache, pos, part="kv")
    return cache


def out_proj_heads(attn, wot, bo, head_idx, head_dim, out=None, residual=None, workspace=None):
    """attn (B, len(head_idx)·hd) of selected heads · WoT[heads]  + bo (+ residual) → (B, d); WoT = out_proj.weight.T."""
    return gather_cols(attn, wot, bo, head_idx, group=head_dim, row_stride=head_dim, out=out, residual=residual,
                       workspace=workspace)


# -- attention -------------------------------------------------------------------------------------------------
#: positions per attention program (KERNELS_ATTEND_CHUNK, a power of two, overrides it; for measurements)
CHUNK = int(os.environ.get("KERNELS_ATTEND_CHUNK", 16 if INTERPRET else 32))


_COUNTERS: dict = {}
_OUTGROWN: list = []  # counters replaced by larger ones: kept alive, a captured CUDA graph may still use them


def _counters(n: int, device, kind: str = "heads") -> torch.Tensor:
    """Arrival counters (zero between launches: the last program resets its own), per head for attention
    (`_attend_kernel`), per row for `argmax`. One buffer per device and kind, so launches that use one on a
    device must not run concurrently (one stream)."""
    key = f"{device}/{kind}"
    if key not in _COUNTERS or _COUNTERS[key].numel() < n:
        if key in _COUNTERS:
            _OUTGROWN.append(_COUNTERS[key])
        _COUNTERS[key] = torch.zeros(max(n, 128), device=device, dtype=torch.int32)
    return _COUNTERS[key]


def attend(q, cache, head_idx, pos, scale, *, recompute=None, attend=True, fixed=False, count=None):
    """Attention of the selected heads' queries q (B, n, hd) over cache positions [0, pos] → (B, n, hd) fp32.
    Split over positions (one program per (head, chunk of CHUNK positions); the head's last program to finish
    combines the chunks' partial softmaxes). `recompute` = (xkeep, wqkv, bqkv, have) fills the missing K/V
    entries first (Deja Vu; see `_attend_kernel`); attend=False only does that (returns None). `fixed`: head_idx
    stays the same for the step (under KERNELS_PDL=prefetch, batch 1: past K/V loaded before the PDL wait).
    `count`: a 1-element int32 device tensor, the number of live heads of head_idx (see `_rows`)."""
    B, H, T = cache.shape[:3]
    hd = cache.shape[-1]
    n = head_idx.numel()
    assert cache.is_contiguous()
    n_chunks = triton.cdiv(T, CHUNK)
    nc = _pow2(n_chunks)  # the partials' stride (a power of two for the combine's arange)
    f32 = dict(device=cache.device, dtype=torch.float32)
    out = torch.empty(B, n, hd, **f32) if attend else None
    if attend and nc > 1:
        m, l, o = torch.empty(B, n, nc, **f32), torch.empty(B, n, nc, **f32), torch.empty(B, n, nc, hd, **f32)
        counters = _counters(n, cache.device)
    else:
        m = l = o = counters = out if attend else cache
    if recompute is not None:
        xkeep, wqkv, bqkv, have = recompute
        assert xkeep.is_contiguous() and have.dtype == torch.int8 and have.is_contiguous()
    else:
        xkeep = wqkv = bqkv = have = cache
    if q is None:
        q = cache
    else:
        assert q.stride(2) == 1
    _attend_kernel[(n, n_chunks)](q, cache, head_idx, pos, m, l, o, out if out is not None else cache, counters,
                                  xkeep, wqkv, bqkv, have, count if count is not None else head_idx,
                                  B, n, H, T, xkeep.shape[-1] if recompute is not None else hd, hd, scale,
                                  q.stride(0), q.stride(1), n_chunks, NC=nc, CHUNK=CHUNK, BLOCK_D=_pow2(hd), ATTEND=attend,
                                  RECOMPUTE=recompute is not None, BLOCK_K=32 if INTERPRET else 128,
                                  BLOCK_2HD=_pow2(2 * hd), UPCAST=INTERPRET, IEEE=_dot_in_fp32(xkeep),
                                  PDL=PDL, EARLY=_prefetch(fixed) and attend and recompute is None and B == 1
                                  and count is None, COUNTED=count is not None,
                                  num_warps=8 if recompute is not None else 4, num_stages=2, **_LAUNCH)
    return out


def head_attention(q, cache, head_idx, pos, scale, out=None):
    """Single-token attention of selected heads over cache positions [0, pos]: q (B, n, hd) → (B, n, hd)."""
    y = attend(q, cache, head_idx, pos, scale).to(q.dtype)
    if out is None:
        return y
    out.copy_(y)
    return out


def _dot_in_fp32(t):
    return INTERPRET or t.dtype == torch.float32


def kv_recompute(xkeep, wqkv, bqkv, head_idx, head_dim, cache, have, pos):
    """Fill the missing cache entries (have == 0, t < pos) of selected heads from kept inputs xkeep (B, T, d);
    then mark have[head, t] = 1 for t ≤ pos (the caller writes position pos itself)."""
    attend(None, cache, head_idx, pos, 1.0, recompute=(xkeep, wqkv, bqkv, have), attend=False)
    return cache


# -- the decode step's fused operations (kernels.decode) -------------------------------------------------------
def layer_norm(h, weight, bias, eps, dtype, *, keep=None, pos=None):
    """LayerNorm of the fp32 residual stream h (B, d) → (B, d) in `dtype`; `keep` (B, T, d): also written at pos."""
    B, D = h.shape
    out = torch.empty(B, D, device=h.device, dtype=dtype)
    ks = keep.stride() if keep is not None else (0, 0, 0)
    _layer_norm_kernel[(B,)](h, weight, bias, out, keep if keep is not None else out, pos if pos is not None else h,
                             D, eps, h.stride(0), out.stride(0), ks[0], ks[1], KEEP=keep is not None, PDL=PDL,
                             BLOCK=_pow2(D), num_warps=8 if D > 2048 else 4, **_LAUNCH)
    return out


def qkv_to_cache(x, wqkv, bqkv, head_idx, head_dim, cache, pos, *, part="qkv", fixed=False, count=None):
    """q of the selected heads (returned, (B, n, hd)) and their k/v written into cache[:, head, pos], in one
    pass over their rows; `part` "q" or "kv" computes one side only (None returned for "kv"). `fixed`: the
    indices stay the same for the whole step (static masks; lets PDL prefetch weights)."""
    first, last = QKV_PARTS[part]
    q = torch.empty(x.shape[0], head_idx.numel(), head_dim, device=x.device, dtype=cache.dtype) if first == 0 else None
    _rows(x, wqkv, bqkv, head_idx, group=(last - first) * head_dim, row_stride=3 * head_dim,
          row_offset=first * head_dim, out=q, out_strides=(q.stride(0), q.stride(1)) if q is not None else (0, 0),
          cache=cache if last > 1 else None, pos=pos, split=head_dim, fixed=fixed, count=count)
    return q


def out_proj_add(attn, wot, bo, head_idx, head_dim, h, *, fixed=False, count=None):
    """h += attention output attn (B, n, hd) of the selected heads · WoT[heads] + bo."""
    _cols(attn.reshape(attn.shape[0], -1), wot, head_idx, h, bo, group=head_dim, row_stride=head_dim, fixed=fixed,
          count=count)
    return h


def fc2_add(act, w2t, b2, idx, h, *, fixed=False, count=None):
    """h += act · W2T[idx] + b2 (h: the fp32 residual stream)."""
    assert act.stride(1) == 1
    _cols(act, w2t, idx, h, b2, fixed=fixed, count=count)
    return h


def embed(token, pos, table, pos_table, offset, h):
    """h (B, d) fp32 = table[token] + pos_table[pos + offset] (token (B,), pos a 1-element tensor): the decode
    step's input in one launch."""
    B, D = h.shape
    assert table.is_contiguous() and pos_table.is_contiguous() and h.stride(1) == 1
    block = min(_pow2(D), 2048)
    _embed_kernel[(B, triton.cdiv(D, block))](token, pos, table, pos_table, h, D, offset, h.stride(0), BLOCK=block,
                                              num_warps=4)
    return h


ARGMAX_BLOCK = 2048  # logits per program of `argmax`


def argmax(logits, out=None):
    """The first index of each row's largest logit (B, V) → (B,) int64 (torch.argmax's result for finite
    logits), in one launch of ⌈V / ARGMAX_BLOCK⌉ programs per row; `out` is written in place (e.g. the next
    step's token buffer)."""
    B, V = logits.shape
    assert logits.stride(1) == 1
    n_parts = triton.cdiv(V, ARGMAX_BLOCK)
    nc = _pow2(n_parts)
    values = torch.empty(B, nc, device=logits.device, dtype=torch.float32)
    indices = torch.empty(B, nc, device=logits.device, dtype=torch.int32)
    if out is None:
        out = torch.empty(B, device=logits.device, dtype=torch.long)
    _argmax_kernel[(B, n_parts)](logits, values, indices, _counters(B, logits.device, "rows"), out, V,
                                 logits.stride(0), n_parts, NP=nc, BLOCK=ARGMAX_BLOCK, num_warps=8)
    return out
