"""Exact lowest-k selection of half-precision score rows in one Triton launch (the masked engine on a GPU).

One program per row holds the row's 16-bit scores as order-preserving keys, finds the key of the `skip`-th
smallest by two 256-bin histograms (high byte, then low byte among the keys of the chosen high byte), and
writes the keep mask: keys below the threshold are skipped, and among keys equal to it the highest indices
(the kept ties are the lowest indices, as in `lowest_k_mask` and the decode engine). At (2048, 20480) this
reads the scores once and writes the mask once, where torch's kthvalue and the tie bookkeeping take ~2 ms a
layer on an H200. `harness.engine.lowest_k_mask` uses it for fp16/bf16 rows on CUDA when Triton is installed and
HARNESS_SELECT=triton is set. It is opt-in because on the H200 (results/reports/acceptance-h200.md) one call
measured 1.40 ms against 2.34 ms for the kthvalue form, yet Deja Vu's evaluation ran at 0.16× of a plain forward
with it against 0.37× with kthvalue: the cost it adds inside the engine is not understood yet.
"""
from __future__ import annotations

import os

import torch

MAX_ROW = 65536


def enabled() -> bool:
    return os.environ.get("HARNESS_SELECT", "") == "triton"


def available(scores: torch.Tensor) -> bool:
    if not scores.is_cuda or scores.dtype not in (torch.float16, torch.bfloat16) or scores.shape[-1] > MAX_ROW:
        return False
    return triton is not None


try:  # Triton is optional (the [gpu] extra); without it the engine uses the torch form
    import triton
    import triton.language as tl
except ImportError:  # pragma: no cover - depends on the installation
    triton = None

if triton is not None:
    @triton.jit
    def _lowest_k_keep_kernel(scores_ptr, keep_ptr, n, skip, BLOCK: tl.constexpr):
        row = tl.program_id(0).to(tl.int64)
        offsets = tl.arange(0, BLOCK)
        inside = offsets < n
        bits = tl.load(scores_ptr + row * n + offsets, mask=inside, other=0).to(tl.int16, bitcast=True)
        raw = bits.to(tl.int32) & 0xFFFF
        # order-preserving unsigned keys: negatives flipped whole, positives with the sign bit set
        key = tl.where((raw & 0x8000) != 0, (~raw) & 0xFFFF, raw | 0x8000)
        key = tl.where(raw == 0x8000, 0x8000, key)  # -0.0 ties with +0.0
        key = tl.where(inside, key, 0x10000)  # padding sorts after every score
        bins = tl.arange(0, 512)
        high = tl.histogram(key >> 8, 512)
        below_high = tl.cumsum(high, axis=0) - high  # keys whose high byte is below each bin
        chosen_high = tl.sum(((below_high + high) < skip).to(tl.int32), axis=0)
        before = tl.sum(tl.where(bins < chosen_high, high, 0), axis=0)
        low = tl.histogram(tl.where((key >> 8) == chosen_high, key & 0xFF, 511), 512)
        low = tl.where(bins < 256, low, 0)
        chosen_low = tl.sum(((tl.cumsum(low, axis=0) + before) < skip).to(tl.int32), axis=0)
        threshold = chosen_high * 256 + chosen_low
        below = key < threshold
        tied = key == threshold
        missing = skip - tl.sum(below.to(tl.int32), axis=0)
        from_end = tl.cumsum(tied.to(tl.int32), axis=0, reverse=True)
        skipped = below | (tied & (from_end <= missing))
        tl.store(keep_ptr + row * n + offsets, (~skipped).to(tl.int8), mask=inside)


def lowest_k_keep(scores: torch.Tensor, skip: int) -> torch.Tensor:
    """Keep-mask (same shape, bool) with exactly `skip` of each row's lowest scores False; 0 < skip < n."""
    n = scores.shape[-1]
    rows = scores.reshape(-1, n).contiguous()
    keep = torch.empty(rows.shape, dtype=torch.int8, device=scores.device)
    block = triton.next_power_of_2(n)
    warps = 4 if block <= 2048 else (8 if block <= 8192 else 16)
    _lowest_k_keep_kernel[(rows.shape[0],)](rows, keep, n, skip, BLOCK=block, num_warps=warps)
    return keep.view(torch.bool).view(scores.shape)


def warm_up(widths, dtype: torch.dtype, device) -> None:
    """Compile the kernel for these row widths before anything is timed (Triton compiles on first use)."""
    probe = torch.empty(0, device=device, dtype=dtype)
    if not enabled() or not available(probe):
        return
    for n in sorted(set(widths)):
        if 1 < n <= MAX_ROW:
            lowest_k_keep(torch.zeros(1, n, device=device, dtype=dtype), n // 2)
