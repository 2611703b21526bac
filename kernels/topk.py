"""Top-k selection for the predictors inside the decode step, one Triton program per score row.

    idx = select(scores, k)                          # (B, ..., n) → (1, ..., k) int32, ascending indices
    idx = select(scores, k, combine="union", out=buf, counts=c)   # variable counts, see below

Half-precision rows (the predictors run in the model's dtype) are read once as order-preserving 16-bit keys held
in registers as two power-of-two blocks (a 20480-wide row pads nothing); the key of the k-th largest score is
found by a 16-step bisection on the key's bits (each step one count), ties at it go to the lowest indices (one
prefix sum over the tie flags), and the chosen indices are compacted in ascending order with one prefix sum.
This is exactly the masked engine's `lowest_k_mask` (the kept units are the complement of the n − k lowest, same
tie rule), so both engines choose the same units. It replaces torch.topk's several launches (and its int64 →
int32 copy) for neuron rows as for head rows. fp32 rows use the same search on 32-bit keys (32 steps). On the
H200 one 20480-wide row took 76 µs, the largest part of a Deja Vu decode step (results/reports/latency-h200.md),
when ties were still cut by a second bisection on the index (up to 15 more block-wide counts; the prefix sum
replaced it, not yet timed). Two other searches find the same threshold (KERNELS_TOPK; tested, not yet timed):
`radix4` takes two bits a step with the three candidates counted in one reduction (half the serial
reductions), and `histogram` uses two 256-bin histograms for 16-bit keys instead of 16 counts.

The batch shares one index set (the engine's kernels read one index list). `combine` says how it is chosen
from the batch's scores, and is part of every latency record:
  mean   the k highest batch-mean scores (exactly k units; for batch 1 the sequence's own top-k);
  union  the union of every sequence's own top-k: between k and min(n, B·k) units, so the count varies per
         token: `out` is an (…, n) buffer whose first counts[…] entries are the chosen indices, `counts` the
         device tensor the engine's kernels read.
On a CPU (no Triton device) the same sets come from the torch form, `lowest_k_keep_torch`.
"""
from __future__ import annotations

import os

import torch

try:
    import triton
    import triton.language as tl
except ImportError:  # pragma: no cover - the CPU install has triton; keep the torch path importable without it
    triton = None

COMBINE = ("mean", "union")
SEARCHES = ("bisect", "histogram", "radix4")
#: how a half-precision row's threshold key is found. On the H200 the bisection took 76 µs on a 20480-wide row
#: (results/reports/latency-h200.md, run 2), when ties were still cut by a second, 15-step bisection on the index
#: (now one prefix sum, not yet timed); the histogram and radix4 searches are built and tested (CPU interpreter,
#: PTX) but not yet timed, so neither is the default (`python -m kernels.bench.gpu --part topk` times all three).
SEARCH = os.environ.get("KERNELS_TOPK", "bisect")
MAX_ROW = 65536  #: longest row one program holds in registers


if triton is not None:
    @triton.jit
    def keys16(raw):
        """Order-preserving unsigned keys of 16-bit float bit patterns (int32 holding 0..0xFFFF): negatives
        flipped whole, -0.0 tied with +0.0 (fp16 and bf16 alike: both are sign-magnitude)."""
        key = tl.where((raw & 0x8000) != 0, (~raw) & 0xFFFF, raw | 0x8000)
        return tl.where(raw == 0x8000, 0x8000, key)

    @triton.jit
    def load_keys16(row_ptr, start, n, BLOCK: tl.constexpr):
        """Keys of scores[start : start + BLOCK] (padding: 0x10000, above every key)."""
        offsets = start + tl.arange(0, BLOCK)
        inside = offsets < n
        raw = tl.load(row_ptr + offsets, mask=inside, other=0).to(tl.int16, bitcast=True).to(tl.int32) & 0xFFFF
        return tl.where(inside, keys16(raw), 0x10000), offsets, inside

    @triton.jit
    def count2(a, b):
        return tl.sum(a.to(tl.int32), axis=0) + tl.sum(b.to(tl.int32), axis=0)

    @triton.jit
    def tie_cut(key_a, key_b, off_a, off_b, threshold, skip):
        """Given the key of the skip-th smallest, the cut among the keys tied at it: the `missing` tied units of
        highest index are skipped, i.e. those whose count of ties at or after them is <= missing. One prefix sum
        over the tie flags (no serial search): the cut is the lowest index of a skipped tie."""
        tied_a, tied_b = key_a == threshold, key_b == threshold
        missing = skip - count2(key_a < threshold, key_b < threshold)  # ties to skip (>= 1)
        ta, tb = tied_a.to(tl.int32), tied_b.to(tl.int32)
        in_a = tl.sum(ta, axis=0)
        total = in_a + tl.sum(tb, axis=0)
        after_a = total - (tl.cumsum(ta, axis=0) - ta)  # ties at or after each unit, itself included
        after_b = total - in_a - (tl.cumsum(tb, axis=0) - tb)
        cut_a = tl.min(tl.where(tied_a & (after_a <= missing), off_a, 0x7FFFFFFF), axis=0)  # above every index
        cut_b = tl.min(tl.where(tied_b & (after_b <= missing), off_b, 0x7FFFFFFF), axis=0)
        return tl.minimum(cut_a, cut_b)

    @triton.jit
    def skip_cut(key_a, key_b, off_a, off_b, skip, KEY_BITS: tl.constexpr):
        """The `skip` lowest of the keys (two blocks), ties at the threshold skipped from the highest index:
        returns (threshold, cut); unit i is skipped iff key < threshold or (key == threshold and i >= cut).
        The threshold by bisection on the key's bits: KEY_BITS block-wide counts (int32 for 16-bit keys)."""
        if KEY_BITS == 32:
            threshold = (skip * 0).to(tl.int64)
        else:
            threshold = skip * 0
        for bit in tl.static_range(KEY_BITS):  # the largest t with count(key < t) < skip
            candidate = threshold | (1 << (KEY_BITS - 1 - bit))
            below = count2(key_a < candidate, key_b < candidate)
            threshold = tl.where(below < skip, candidate, threshold)
        return threshold, tie_cut(key_a, key_b, off_a, off_b, threshold, skip)

    @triton.jit
    def _add3(a0, a1, a2, b0, b1, b2):
        return a0 + b0, a1 + b1, a2 + b2

    @triton.jit
    def _below3(keys, c1, c2, c3):
        """(count(keys < c1), count(keys < c2), count(keys < c3)) in one block-wide reduction."""
        return tl.reduce(((keys < c1).to(tl.int32), (keys < c2).to(tl.int32), (keys < c3).to(tl.int32)), 0, _add3)

    @triton.jit
    def skip_cut_radix4(key_a, key_b, off_a, off_b, skip):
        """`skip_cut` for 16-bit keys, two bits a step: the three candidates of a step are counted in one
        reduction (of three sums), so 8 reductions per block instead of 16; the same threshold and cut."""
        KEY_BITS: tl.constexpr = 16
        threshold = skip * 0
        for step in tl.static_range(KEY_BITS // 2):  # the largest t with count(key < t) < skip, two bits at a time
            unit = 1 << (KEY_BITS - 2 - 2 * step)  # a compile-time constant (step is one)
            c1, c2, c3 = threshold | unit, threshold | (2 * unit), threshold | (3 * unit)
            a1, a2, a3 = _below3(key_a, c1, c2, c3)
            b1, b2, b3 = _below3(key_b, c1, c2, c3)
            threshold = tl.where(a3 + b3 < skip, c3, tl.where(a2 + b2 < skip, c2, tl.where(a1 + b1 < skip, c1,
                                                                                           threshold)))
        return threshold, tie_cut(key_a, key_b, off_a, off_b, threshold, skip)

    @triton.jit
    def skip_cut_hist(key_a, key_b, off_a, off_b, skip):
        """`skip_cut` for 16-bit keys by two 256-bin histograms (the high byte, then the low byte within the
        threshold's high-byte bin) instead of 16 counts; the same threshold and cut."""
        bins = tl.arange(0, 256)
        in_a, in_b = key_a < 0x10000, key_b < 0x10000  # the padding is no key
        hi_a, hi_b = key_a >> 8, key_b >> 8
        hist = tl.histogram(hi_a, 256, mask=in_a) + tl.histogram(hi_b, 256, mask=in_b)
        high = tl.sum((tl.cumsum(hist, 0) < skip).to(tl.int32), 0)  # the first bin reaching skip
        below = tl.sum(tl.where(bins < high, hist, 0), 0)
        lo_a, lo_b = key_a & 0xFF, key_b & 0xFF
        hist = tl.histogram(lo_a, 256, mask=in_a & (hi_a == high)) + tl.histogram(lo_b, 256, mask=in_b & (hi_b == high))
        low = tl.sum((tl.cumsum(hist, 0) < skip - below).to(tl.int32), 0)
        threshold = high * 256 + low
        return threshold, tie_cut(key_a, key_b, off_a, off_b, threshold, skip)

    @triton.jit
    def find_cut(key_a, key_b, off_a, off_b, skip, KEY_BITS: tl.constexpr, SEARCH: tl.constexpr):
        """(threshold, cut) of the `skip` lowest keys by SEARCH: 0 bisection, 1 two histograms, 2 bisection two
        bits a step (SEARCHES' order; 1 and 2 for 16-bit keys only, see `search_id`)."""
        if SEARCH == 1:
            threshold, cut = skip_cut_hist(key_a, key_b, off_a, off_b, skip)
        elif SEARCH == 2:
            threshold, cut = skip_cut_radix4(key_a, key_b, off_a, off_b, skip)
        else:
            threshold, cut = skip_cut(key_a, key_b, off_a, off_b, skip, KEY_BITS)
        return threshold, cut

    @triton.jit
    def _row_keys(s_ptr, stride_b, b0, B, start, n, BLOCK: tl.constexpr, MEAN: tl.constexpr,
                  KIND: tl.constexpr):
        """Keys of one block of a row: sequence b0's scores, or (MEAN) the batch mean rounded to the scores'
        dtype. KIND: 0 fp16, 1 bf16 (16-bit keys), 2 fp32 (32-bit keys, as int64 to keep the padding above)."""
        offsets = start + tl.arange(0, BLOCK)
        inside = offsets < n
        if MEAN:
            x = tl.zeros((BLOCK,), dtype=tl.float32)
            for b in range(0, B):
                x += tl.load(s_ptr + b * stride_b + offsets, mask=inside, other=0.0).to(tl.float32)
            x = x / B
            if KIND == 0:
                x = x.to(tl.float16)
            if KIND == 1:
                x = x.to(tl.bfloat16)
        else:
            x = tl.load(s_ptr + b0 * stride_b + offsets, mask=inside, other=0.0)
        if KIND == 2:  # signed order of the flipped bits = order of the floats; -0.0 with +0.0
            bits = x.to(tl.int32, bitcast=True)
            bits = tl.where(bits == -2147483648, 0, bits)
            key = tl.where(inside, tl.where(bits < 0, bits ^ 0x7FFFFFFF, bits).to(tl.int64) + 2147483648, 4294967296)
        else:
            raw = x.to(tl.int16, bitcast=True).to(tl.int32) & 0xFFFF
            key = tl.where(inside, keys16(raw), 0x10000)
        return key, offsets, inside

    @triton.jit
    def _topk_kernel(s_ptr, out_ptr, count_ptr, B, n, k, stride_b, stride_r, stride_o,
                     UNION: tl.constexpr, MEAN: tl.constexpr, KIND: tl.constexpr, KEY_BITS: tl.constexpr,
                     BLOCK_A: tl.constexpr, BLOCK_B: tl.constexpr, SEARCH: tl.constexpr):
        row = tl.program_id(0).to(tl.int64)
        base = s_ptr + row * stride_r
        skip = n - k
        off_a = tl.arange(0, BLOCK_A)
        off_b = BLOCK_A + tl.arange(0, BLOCK_B)
        if UNION:
            keep_a = tl.zeros((BLOCK_A,), dtype=tl.int1)
            keep_b = tl.zeros((BLOCK_B,), dtype=tl.int1)
            for b in range(0, B):
                key_a, _, in_a = _row_keys(base, stride_b, b, B, 0, n, BLOCK_A, False, KIND)
                key_b, _, in_b = _row_keys(base, stride_b, b, B, BLOCK_A, n, BLOCK_B, False, KIND)
                threshold, cut = find_cut(key_a, key_b, off_a, off_b, skip, KEY_BITS, SEARCH)
                keep_a |= ~((key_a < threshold) | ((key_a == threshold) & (off_a >= cut))) & in_a
                keep_b |= ~((key_b < threshold) | ((key_b == threshold) & (off_b >= cut))) & in_b
        else:
            key_a, off_a, in_a = _row_keys(base, stride_b, 0, B, 0, n, BLOCK_A, MEAN, KIND)
            key_b, off_b, in_b = _row_keys(base, stride_b, 0, B, BLOCK_A, n, BLOCK_B, MEAN, KIND)
            threshold, cut = find_cut(key_a, key_b, off_a, off_b, skip, KEY_BITS, SEARCH)
            keep_a = ~((key_a < threshold) | ((key_a == threshold) & (off_a >= cut))) & in_a
            keep_b = ~((key_b < threshold) | ((key_b == threshold) & (off_b >= cut))) & in_b
        first = tl.sum(keep_a.to(tl.int32), axis=0)
        slot_a = tl.cumsum(keep_a.to(tl.int32), axis=0) - 1
        slot_b = first + tl.cumsum(keep_b.to(tl.int32), axis=0) - 1
        tl.store(out_ptr + row * stride_o + slot_a, off_a.to(tl.int32), mask=keep_a)
        tl.store(out_ptr + row * stride_o + slot_b, off_b.to(tl.int32), mask=keep_b)
        if UNION:
            tl.store(count_ptr + row, first + tl.sum(keep_b.to(tl.int32), axis=0))


def search_id(search: str, key_bits: int = 16) -> int:
    """The kernels' SEARCH constant of a search name. 32-bit keys (fp32 rows) always bisect: the histogram search
    is for 16-bit keys, and radix4's three-sum reduction on int64 keys gave wrong sets (and a heap error) in the
    CPU interpreter, so it is not used there."""
    if search not in SEARCHES:
        raise ValueError(f"unknown top-k search {search!r}; valid: {', '.join(SEARCHES)}")
    return SEARCHES.index(search) if key_bits == 16 else 0


def blocks(n: int) -> tuple[int, int]:
    """Two power-of-two blocks covering n with little padding: the largest power of two <= n, then the rest."""
    first = 1 << (n.bit_length() - 1)
    rest = n - first
    return first, max(16, triton.next_power_of_2(rest)) if rest else 16


def warps_for(n: int) -> int:
    return 1 if n <= 256 else 4 if n <= 4096 else 8 if n <= 16384 else 16


_KIND = {torch.float16: (0, 16), torch.bfloat16: (1, 16), torch.float32: (2, 32)}


def _on_triton(scores: torch.Tensor) -> bool:
    return (triton is not None and scores.is_cuda and scores.dtype in _KIND and scores.shape[-1] <= MAX_ROW)


def select(scores: torch.Tensor, k: int, *, combine: str = "mean", out: torch.Tensor | None = None,
           counts: torch.Tensor | None = None, triton_kernel: bool | None = None,
           search: str | None = None) -> torch.Tensor:
    """The top-k indices of each row over the last dim, shared by the batch: (B, ..., n) → (1, ..., k) int32.

    combine="union": `out` (…, n) int32 and `counts` (…) int32 are required; the first counts[r] entries of
    row r of `out` are the union of the batch's top-k sets, ascending. `out` is written in place either way.
    `triton_kernel`: force the kernel (True; the CPU interpreter runs it on CPU tensors) or the torch form.
    `search`: "bisect" (one block-wide count per key bit), "radix4" (two bits a step, three counts in one
    reduction) or "histogram" (half-precision rows: two 256-bin histograms); the same sets every way; default
    KERNELS_TOPK, else "bisect"."""
    if combine not in COMBINE:
        raise ValueError(f"unknown batch combine {combine!r}; valid: {', '.join(COMBINE)}")
    if scores.dim() == 1:
        scores = scores.unsqueeze(0)
    B, n = scores.shape[0], scores.shape[-1]
    if not 0 < k <= n:
        raise ValueError(f"k={k} outside 1..{n}")
    union = combine == "union" and B > 1
    if combine == "union" and (out is None or counts is None):
        raise ValueError("combine='union' needs `out` (…, n) and `counts` buffers (the count varies per token)")
    if not (_on_triton(scores) if triton_kernel is None else triton_kernel):
        return _select_torch(scores, k, union, out, counts)
    flat = scores.reshape(B, -1, n)
    if flat.stride(-1) != 1 or flat.stride(0) != flat.shape[1] * n:
        flat = flat.contiguous()
    rows = flat.shape[1]
    width = n if combine == "union" else k
    if out is None:
        out = torch.empty(rows, width, dtype=torch.int32, device=scores.device)
    view = out.view(rows, width)
    if combine == "union" and B == 1:
        counts.fill_(k)
    kind, key_bits = _KIND[scores.dtype]
    search = search or SEARCH
    block_a, block_b = blocks(n)
    _topk_kernel[(rows,)](flat, view, counts if union else view, B, n, k, flat.stride(0), flat.stride(1),
                          view.stride(0), UNION=union, MEAN=B > 1 and not union, KIND=kind, KEY_BITS=key_bits,
                          BLOCK_A=block_a, BLOCK_B=block_b, SEARCH=search_id(search, key_bits), num_warps=warps_for(n))
    return out.view(1, *scores.shape[1:-1], width) if combine == "mean" else out


def select_triton(scores: torch.Tensor, k: int, **kwargs) -> torch.Tensor:
    """`select` through the Triton kernel whatever the device (tests run it in the CPU interpreter)."""
    return select(scores, k, triton_kernel=True, **kwargs)


def lowest_k_keep_torch(scores: torch.Tensor, skip: int) -> torch.Tensor:
    """Keep-mask with exactly `skip` of each row's lowest scores False, ties at the threshold skipped from the
    highest index (0 < skip < n): one kthvalue and a few elementwise passes (harness.engine.lowest_k_mask's torch
    form)."""
    values = scores.float()
    threshold = values.kthvalue(skip, dim=-1, keepdim=True).values
    below = values < threshold
    tied = values == threshold
    missing = skip - below.sum(-1, keepdim=True)  # ties to skip in each row (>= 1)
    from_end = tied.flip(-1).cumsum(-1).flip(-1)  # ties at or after each position
    return ~(below | (tied & (from_end <= missing)))


def _lowest_k(scores: torch.Tensor, skip: int) -> torch.Tensor:
    if skip <= 0:
        return torch.ones_like(scores, dtype=torch.bool)
    return lowest_k_keep_torch(scores, skip)


def _select_torch(scores, k, union, out, counts):
    n = scores.shape[-1]
    if union:
        keep = _lowest_k(scores, n - k).any(0)
    else:
        mean = scores.float().mean(0).to(scores.dtype) if scores.shape[0] > 1 else scores[0]  # as the kernel rounds
        keep = _lowest_k(mean, n - k)
    keep = keep.reshape(-1, n)
    if out is None and counts is None:  # exactly k a row: the kept indices in ascending order
        idx = keep.nonzero()[:, 1].to(torch.int32).view(*scores.shape[1:-1], k)
        return idx.unsqueeze(0)
    counts_now = keep.sum(-1)
    order = torch.sort((~keep).to(torch.int8), dim=-1, stable=True).indices.to(torch.int32)  # kept first, ascending
    view = out.view(keep.shape[0], -1)
    view.copy_(order[:, :view.shape[1]])
    if counts is not None:
        counts.view(-1).copy_(counts_now)
    return out
