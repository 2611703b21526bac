"""Torch references of `kernels.gemv_llama` (and of the `kernels.gemv` operations the Llama step uses, where
`kernels.reference`'s assume OPT's biases): same arguments, same results, any device and dtype. They are the
`backend="torch"` path of `kernels.decode_llama`; float32 accumulation (float64 for float64 inputs), casts to the
model dtype where the kernels cast.
"""
from __future__ import annotations

import torch
import torch.nn.functional as F

from kernels.reference import _acc, _rows


def _round(t, dtype):
    return t.to(dtype).to(t.dtype)


def rms_norm(h, weight, eps, dtype):
    x = h.float() if h.dtype != torch.float64 else h
    n = (x * torch.rsqrt(x.pow(2).mean(-1, keepdim=True) + eps)).to(dtype)
    return (weight.to(dtype) * n).to(dtype)


def embed(token, table, h):
    h.copy_(F.embedding(token, table))
    return h


def gather_rows(x, w, bias, idx, *, group=1, row_stride=1, row_offset=0, relu=False, out=None, fixed=False):
    """out[b, slot, g] = x[b] · w[idx[slot]·row_stride + row_offset + g] + bias[...] → (B, len(idx), group)."""
    rows = _rows(w, idx, group, row_stride, row_offset)
    c = _acc(x)
    y = x.to(c) @ w.index_select(0, rows).to(c).T
    if bias is not None:
        y = y + bias.index_select(0, rows).to(c)
    if relu:
        y = torch.relu(y)
    y = y.to(x.dtype).view(x.shape[0], idx.numel(), group)
    if out is not None:
        out.copy_(y)
        return out
    return y


def rotate(x, cos, sin):
    """RoPE over the last dim: x·cos + rotate_half(x)·sin (Hugging Face's rotate_half)."""
    half = x.shape[-1] // 2
    return x * cos + torch.cat([-x[..., half:], x[..., :half]], -1) * sin


def rope_to_cache(src, bias, cos, sin, pos, cache, n_q, num_heads):
    B, units, HD = src.shape
    n_kv = cache.shape[1]
    p = pos.reshape(-1)[:1].long()
    c = _acc(src) if src.dtype != torch.float32 else torch.float32
    x = src.to(c)
    if bias is not None:
        x = _round(x + bias.to(c).view(units, HD), cache.dtype)
    cs, sn = cos.index_select(0, p).to(c), sin.index_select(0, p).to(c)  # (1, HD)
    q = rotate(x[:, :n_q], cs, sn).to(cache.dtype)
    k = rotate(x[:, n_q:n_q + n_kv], cs, sn)
    v = x[:, n_q + n_kv:]
    cache[:, :, p] = torch.stack([k, v], 2).unsqueeze(2).to(cache.dtype)
    return q


def swiglu_gather(x, wgu, bgu, idx, *, fixed=False):
    c = _acc(x)
    gu = gather_rows(x, wgu, bgu, idx, group=2, row_stride=2).to(c)  # (B, n, 2), rounded to x's dtype
    g, u = gu[..., 0], gu[..., 1]
    return (_round(F.silu(g), x.dtype) * u).to(x.dtype)


def out_proj_add(attn, wot, bo, head_idx, head_dim, h, *, fixed=False):
    rows = _rows(wot, head_idx, head_dim, head_dim, 0)
    h += attn.reshape(h.shape[0], -1).to(h.dtype) @ wot.index_select(0, rows).to(h.dtype)
    if bo is not None:
        h += bo.to(h.dtype)
    return h


def fc2_add(act, w2t, b2, idx, h, *, fixed=False):
    h += act.to(h.dtype) @ w2t.index_select(0, idx.long()).to(h.dtype)
    if b2 is not None:
        h += b2.to(h.dtype)
    return h


def swiglu_of(acc, xbias, dtype):
    """act = cast(cast(silu(g)) · u) of gate/up values acc (B, 2F) (+ their bias), cast to `dtype` at each step."""
    F_ = acc.shape[-1] // 2
    x = acc.float() if acc.dtype != torch.float64 else acc
    if xbias is not None:
        x = x + xbias.to(x.dtype)
    g, u = _round(x[..., :F_], dtype), _round(x[..., F_:], dtype)
    return _round(_round(F.silu(g), dtype) * u, dtype)


def input_sparse_add(x, wt, thresholds, acc, *, segments, bias=None, counts=None, pos=None, swiglu=None):
    R, NCOL = wt.shape
    c = _acc(acc)
    xs = swiglu_of(x, swiglu[0], wt.dtype) if swiglu is not None else x.to(c)
    xs = xs.to(c)
    for s, (a, b) in enumerate(zip(segments, segments[1:])):
        keep = xs.abs() > thresholds[s].to(c)
        acc[:, a:b] += (xs * keep) @ wt[:, a:b].to(c)
        if counts is not None:
            counts[pos.reshape(-1)[:1].long(), :, s] += keep.sum(-1).to(counts.dtype)
    if bias is not None:
        acc += bias.to(c)
    return acc
