"""Exact lowest-k selection of half-precision score rows in one Triton launch (the masked engine on a GPU).

One program per row holds the row's 16-bit scores in registers as order-preserving integer keys (two
power-of-two blocks, so a 20480-wide row pads nothing), finds the key of the `skip`-th smallest by a 16-step
bisection on the key's bits (each step one count of the keys below a candidate), and writes the keep mask:
keys below the threshold are skipped, and among keys equal to it the highest indices (the kept ties are the
lowest indices, as in `lowest_k_mask` and the decode engine), by one prefix sum over the tie flags. It reads
the scores once and writes the mask once. On the H200 at (2048, 20480) it took 0.33-0.38 ms on spread scores and
0.54-0.74 ms on a narrow, tie-heavy range, when the ties were cut by a second 15-step bisection on the index
(replaced since by the prefix sum, not yet timed), against 2.4-2.9 ms for the kthvalue form and 1.45-1.50 ms for
an earlier kernel built on two 256-bin histograms per row (results/reports/acceptance-h200.md, run 4).

`harness.engine.lowest_k_mask` uses it for fp16/bf16 rows on CUDA when Triton is installed; HARNESS_SELECT=torch
selects the torch form (kthvalue) instead.
"""
from __future__ import annotations

import os

import torch

MAX_ROW = 65536


def enabled() -> bool:
    return os.environ.get("HARNESS_SELECT", "triton") != "torch"


def available(scores: torch.Tensor) -> bool:
    if not scores.is_cuda or scores.dtype not in (torch.float16, torch.bfloat16) or scores.shape[-1] > MAX_ROW:
        return False
    return triton is not None


try:  # Triton is optional (the [gpu] extra); without it the engine uses the torch form
    import triton
    import triton.language as tl

    from kernels.topk import SEARCH, blocks, find_cut, load_keys16, search_id, warps_for
except ImportError:  # pragma: no cover - depends on the installation
    triton = None

if triton is not None:
    @triton.jit
    def _lowest_k_keep_kernel(scores_ptr, keep_ptr, n, stride, skip, BLOCK_A: tl.constexpr, BLOCK_B: tl.constexpr,
                              SEARCH: tl.constexpr):
        """The search of `kernels.topk` (16-bit keys, ties skipped from the highest index), written as a mask."""
        row = tl.program_id(0).to(tl.int64)
        key_a, off_a, in_a = load_keys16(scores_ptr + row * stride, 0, n, BLOCK_A)
        key_b, off_b, in_b = load_keys16(scores_ptr + row * stride, BLOCK_A, n, BLOCK_B)
        threshold, cut = find_cut(key_a, key_b, off_a, off_b, skip, 16, SEARCH)
        keep_a = ~((key_a < threshold) | ((key_a == threshold) & (off_a >= cut)))
        keep_b = ~((key_b < threshold) | ((key_b == threshold) & (off_b >= cut)))
        tl.store(keep_ptr + row * n + off_a, keep_a.to(tl.int8), mask=in_a)
        tl.store(keep_ptr + row * n + off_b, keep_b.to(tl.int8), mask=in_b)


def lowest_k_keep(scores: torch.Tensor, skip: int, num_warps: int | None = None,
                  search: str | None = None) -> torch.Tensor:
    """Keep-mask (same shape, bool) with exactly `skip` of each row's lowest scores False; 0 < skip < n. search:
    kernels.topk's (bisect, histogram, radix4; default KERNELS_TOPK, else bisect), the same mask every way."""
    n = scores.shape[-1]
    rows = scores.reshape(-1, n)
    if rows.stride(-1) != 1:
        rows = rows.contiguous()
    keep = torch.empty(rows.shape, dtype=torch.int8, device=scores.device)
    block_a, block_b = blocks(n)
    warps = num_warps or warps_for(n)
    _lowest_k_keep_kernel[(rows.shape[0],)](rows, keep, n, rows.stride(0), skip, BLOCK_A=block_a, BLOCK_B=block_b,
                                            SEARCH=search_id(search or SEARCH), num_warps=warps)
    return keep.view(torch.bool).view(scores.shape)


def warm_up(widths, dtype: torch.dtype, device) -> None:
    """Compile the kernel for these row widths before anything is timed (Triton compiles on first use)."""
    probe = torch.empty(0, device=device, dtype=dtype)
    if not enabled() or not available(probe):
        return
    for n in sorted(set(widths)):
        if 1 < n <= MAX_ROW:
            lowest_k_keep(torch.zeros(1, n, device=device, dtype=dtype), n // 2)
