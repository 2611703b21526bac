"""Top-k selection for the predictors inside the decode step: one Triton program per row finds the k-th largest
(batch-mean) score by a bitwise search on order-preserving integer keys and writes the indices of the k
largest scores, in ascending index order, as int32 (what the engine's GEMVs read). Ties at the threshold go to
the lowest indices, so exactly k indices come back. One launch replaces torch.topk's several, and no int64 →
int32 copy follows.

    idx = select(scores, k)   # scores (B, ..., n) → (1, ..., k) int32: top-k of the mean over the batch

On a CPU (or without a GPU), and for rows longer than `TRITON_MAX` (neurons), `select` is torch.topk of the
batch mean (the same set, ties aside; its int64 indices are read in place too): one program walking 32 768
scores 32 times took ~80 µs on the H200, several times torch's radix select (`kernels.profile_step`).
"""
from __future__ import annotations

import torch

try:
    import triton
    import triton.language as tl
except ImportError:  # pragma: no cover - the CPU install has triton; keep the torch path importable without it
    triton = None


if triton is not None:
    @triton.jit
    def _topk_kernel(s_ptr, out_ptr, B, n, k, stride_b, stride_r, stride_o, BLOCK: tl.constexpr):
        row = tl.program_id(0).to(tl.int64)
        offs = tl.arange(0, BLOCK)
        mask = offs < n
        v = tl.zeros((BLOCK,), dtype=tl.float32)
        for b in range(0, B):
            v += tl.load(s_ptr + b * stride_b + row * stride_r + offs, mask=mask, other=0.0).to(tl.float32)
        v = tl.where(mask, v / B, float("-inf"))
        bits = v.to(tl.int32, bitcast=True)
        key = tl.where(bits < 0, bits ^ 0x7FFFFFFF, bits)  # signed order of the keys = order of the floats
        ukey = (key ^ -2147483648).to(tl.uint32, bitcast=True)  # … and unsigned order of these
        threshold = tl.zeros((), dtype=tl.uint32)
        one = tl.full((), 1, tl.uint32)
        for bit in tl.static_range(31, -1, -1):
            candidate = threshold | (one << bit)
            if tl.sum((ukey >= candidate).to(tl.int32), axis=0) >= k:
                threshold = candidate
        above = ukey > threshold
        at = (ukey == threshold) & mask
        room = k - tl.sum(above.to(tl.int32), axis=0)
        chosen = above | (at & (tl.cumsum(at.to(tl.int32), axis=0) <= room))
        slot = tl.cumsum(chosen.to(tl.int32), axis=0) - 1
        tl.store(out_ptr + row * stride_o + slot, offs.to(tl.int32), mask=chosen)


TRITON_MAX = 4096  #: longest row the one-program kernel selects from (heads); longer rows go to torch.topk


def select(scores: torch.Tensor, k: int) -> torch.Tensor:
    """Indices of the k highest batch-mean scores over the last dim: (B, ..., n) → (1, ..., k)."""
    if scores.dim() == 1:
        scores = scores.unsqueeze(0)
    if triton is None or not scores.is_cuda or scores.shape[-1] > TRITON_MAX:
        mean = scores.float().mean(0, keepdim=True) if scores.shape[0] > 1 else scores
        return torch.topk(mean, k, dim=-1, sorted=False).indices
    return select_triton(scores, k)


def select_triton(scores: torch.Tensor, k: int) -> torch.Tensor:
    B, n = scores.shape[0], scores.shape[-1]
    flat = scores.reshape(B, -1, n)
    if flat.stride(-1) != 1:
        flat = flat.contiguous()
    rows = flat.shape[1]
    out = torch.empty(rows, k, dtype=torch.int32, device=scores.device)
    block = max(16, triton.next_power_of_2(n))
    _topk_kernel[(rows,)](flat, out, B, n, k, flat.stride(0), flat.stride(1), out.stride(0), BLOCK=block,
                          num_warps=max(1, min(32, block // 1024)))
    return out.view(1, *scores.shape[1:-1], k)
