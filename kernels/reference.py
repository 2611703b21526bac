"""Torch references of the kernels in `kernels.gemv`: same arguments, same results, any device and dtype.

They compute in float32 (float64 for float64 inputs) and cast back, as the kernels do, and they are the
`backend="torch"` path of the decode engine. They gather weight rows with `index_select`, so they read (and
copy) only the selected rows, but they make no claim to speed.
"""
from __future__ import annotations

import torch
import torch.nn.functional as F

QKV_PARTS = {"qkv": (0, 3), "q": (0, 1), "k": (1, 2), "v": (2, 3), "kv": (1, 3)}


def _acc(t: torch.Tensor) -> torch.dtype:
    return torch.float64 if t.dtype == torch.float64 else torch.float32


def _rows(w, idx, group, row_stride, row_offset):
    idx = idx.long()
    return (idx[:, None] * row_stride + row_offset + torch.arange(group, device=idx.device)).reshape(-1)


def _live(idx, count):
    """The live units of an index buffer whose first count[0] entries are chosen (None: all of it)."""
    return idx.reshape(-1) if count is None else idx.reshape(-1)[:int(count.reshape(-1)[0])]


def fc1_gather(x, w1, b1, idx, out=None, *, fixed=False, count=None):
    idx = _live(idx, count)
    c = _acc(x)
    rows = idx.long()
    y = torch.relu(x.to(c) @ w1.index_select(0, rows).to(c).T + b1.index_select(0, rows).to(c))
    return _into(out, y.to(x.dtype))


def fc2_gather(a, w2t, b2, idx, out=None, residual=None, workspace=None):
    c = _acc(a)
    y = a.to(c) @ w2t.index_select(0, idx.long()).to(c)
    return _finish(y, b2, residual, out, a.dtype)


def qkv_heads(x, wqkv, bqkv, head_idx, head_dim, part="qkv", out=None):
    first, last = QKV_PARTS[part]
    rows = _rows(wqkv, head_idx, (last - first) * head_dim, 3 * head_dim, first * head_dim)
    c = _acc(x)
    y = x.to(c) @ wqkv.index_select(0, rows).to(c).T + bqkv.index_select(0, rows).to(c)
    y = y.to(x.dtype).view(x.shape[0], head_idx.numel(), last - first, head_dim)
    return _into(out, y)


def kv_to_cache(x, wqkv, bqkv, head_idx, head_dim, cache, pos):
    qkv_to_cache(x, wqkv, bqkv, head_idx, head_dim, cache, pos, part="kv")
    return cache


def out_proj_heads(attn, wot, bo, head_idx, head_dim, out=None, residual=None, workspace=None):
    rows = _rows(wot, head_idx, head_dim, head_dim, 0)
    c = _acc(attn)
    y = attn.to(c) @ wot.index_select(0, rows).to(c)
    return _finish(y, bo, residual, out, attn.dtype)


def head_attention(q, cache, head_idx, pos, scale, out=None):
    """q (B, n, hd); cache (B, H, T, 2, hd); attends to positions [0, pos] (pos: 1-element tensor)."""
    c = _acc(q)
    kv = cache.index_select(1, head_idx.long()).to(c)  # (B, n, T, 2, hd)
    scores = torch.einsum("bnd,bntd->bnt", q.to(c), kv[..., 0, :]) * scale
    t = torch.arange(cache.shape[2], device=q.device)
    scores = scores.masked_fill(t > pos.reshape(-1)[0], float("-inf"))
    y = torch.einsum("bnt,bntd->bnd", torch.softmax(scores, dim=-1), kv[..., 1, :]).to(q.dtype)
    return _into(out, y)


def kv_recompute(xkeep, wqkv, bqkv, head_idx, head_dim, cache, have, pos):
    """Recompute missing entries (have == 0 and t < pos) of selected heads from xkeep (B, T, d); mark t ≤ pos."""
    B, H, T = cache.shape[:3]
    heads = head_idx.long()
    t = torch.arange(T, device=cache.device)
    p = pos.reshape(-1)[0]
    need = (have.index_select(0, heads) == 0) & (t < p)  # (n, T)
    rows = _rows(wqkv, head_idx, 2 * head_dim, 3 * head_dim, head_dim)
    c = _acc(xkeep)
    kv = xkeep.to(c) @ wqkv.index_select(0, rows).to(c).T + bqkv.index_select(0, rows).to(c)  # (B, T, n·2hd)
    kv = kv.view(B, T, heads.numel(), 2, head_dim).permute(0, 2, 1, 3, 4).to(cache.dtype)  # (B, n, T, 2, hd)
    old = cache.index_select(1, heads)
    cache.index_copy_(1, heads, torch.where(need[None, :, :, None, None], kv, old))
    have.index_copy_(0, heads, torch.where(t <= p, torch.ones_like(have[:1]), have.index_select(0, heads)))
    return cache


# -- the decode step's fused operations (same signatures as kernels.gemv's) -----------------------------------
# (`fixed`, a hint that lets the GPU kernels prefetch weights under PDL, changes nothing here.)
def layer_norm(h, weight, bias, eps, dtype, *, keep=None, pos=None):
    y = F.layer_norm(h, (h.shape[-1],), weight.to(h.dtype), bias.to(h.dtype), eps).to(dtype)
    if keep is not None:
        keep[:, pos.reshape(-1)[:1].long()] = y.unsqueeze(1).to(keep.dtype)
    return y


def qkv_to_cache(x, wqkv, bqkv, head_idx, head_dim, cache, pos, *, part="qkv", fixed=False, count=None):
    head_idx = _live(head_idx, count)
    first, last = QKV_PARTS[part]
    y = qkv_heads(x, wqkv, bqkv, head_idx, head_dim, part=part)
    if last > 1:
        cache[:, head_idx.long(), pos.reshape(-1)[:1].long()] = y[:, :, 1 - first:].to(cache.dtype)
    return y[:, :, 0].to(cache.dtype) if first == 0 else None


def attend(q, cache, head_idx, pos, scale, *, recompute=None, fixed=False, count=None):
    """The attention output (B, n, hd) (the kernel's is fp32; this one the model dtype)."""
    head_idx = _live(head_idx, count)
    if recompute is not None:
        xkeep, wqkv, bqkv, have = recompute
        kv_recompute(xkeep, wqkv, bqkv, head_idx, q.shape[-1], cache, have, pos)
    return head_attention(q, cache, head_idx, pos, scale)


def out_proj_add(attn, wot, bo, head_idx, head_dim, h, *, fixed=False, count=None):
    head_idx = _live(head_idx, count)
    rows = _rows(wot, head_idx, head_dim, head_dim, 0)
    h += attn.reshape(h.shape[0], -1).to(h.dtype) @ wot.index_select(0, rows).to(h.dtype) + bo.to(h.dtype)
    return h


def fc2_add(act, w2t, b2, idx, h, *, fixed=False, count=None):
    idx = _live(idx, count)
    h += act.to(h.dtype) @ w2t.index_select(0, idx.long()).to(h.dtype) + b2.to(h.dtype)
    return h


def embed(token, pos, table, pos_table, offset, h):
    h.copy_(F.embedding(token, table) + F.embedding(pos.reshape(-1)[:1] + offset, pos_table))
    return h


def argmax(logits, out=None):
    return _into(out, logits.argmax(-1))


def _finish(y, bias, residual, out, dtype):
    if bias is not None:
        y = y + bias.to(y.dtype)
    if residual is not None:
        y = y + residual.to(y.dtype)
    return _into(out, y.to(dtype))


def _into(out, y):
    if out is None:
        return y
    out.copy_(y.view(out.shape))
    return out
