"""Perplexity with the SparseGPT/Wanda protocol: the whole test text tokenized once, cut into
non-overlapping windows of the model's context length (2048 for OPT), mean token NLL over the
windows, exponentiated. With `stride` < `seqlen` windows overlap and only each window's last
`stride` tokens are scored (every token once, with more context)."""
from __future__ import annotations

import math

import torch
import torch.nn.functional as F


def tokenize_text(tokenizer, text: str) -> torch.Tensor:
    saved = tokenizer.model_max_length
    tokenizer.model_max_length = int(1e12)  # a whole test set at once is intended
    try:
        return tokenizer(text, return_tensors="pt").input_ids[0]
    finally:
        tokenizer.model_max_length = saved


def windows(num_tokens: int, seqlen: int, stride: int) -> list[tuple[int, int, int]]:
    """(start, end, first scored position inside the window) for each window."""
    if stride >= seqlen:  # SparseGPT: nsamples = numel // seqlen, the tail is dropped
        return [(i * seqlen, (i + 1) * seqlen, 0) for i in range(num_tokens // seqlen)]
    spans, end = [(0, seqlen, 0)], seqlen
    while end + stride <= num_tokens:
        spans.append((end + stride - seqlen, end + stride, seqlen - stride))
        end += stride
    return spans if num_tokens >= seqlen else []


@torch.no_grad()
def perplexity(model, ids: torch.Tensor, *, seqlen: int, stride: int | None = None, limit: int | None = None,
               batch_size: int = 1, progress=None) -> dict:
    stride = stride or seqlen
    spans = windows(len(ids), seqlen, stride)
    if limit is not None:
        spans = spans[:limit]
    if not spans:
        raise ValueError(f"the text has {len(ids)} tokens, fewer than one window of {seqlen}")
    device = next(model.parameters()).device
    window_nll, window_tokens = [], []
    for first in range(0, len(spans), batch_size):
        batch = spans[first:first + batch_size]
        inputs = torch.stack([ids[s:e] for s, e, _ in batch]).to(device)
        logits = model(input_ids=inputs, use_cache=False).logits
        for row, (_, _, scored_from) in enumerate(batch):
            # position p predicts token p+1; score the targets from max(1, scored_from) on
            start = max(scored_from, 1) - 1
            nll = F.cross_entropy(logits[row, start:-1].float(), inputs[row, start + 1:], reduction="sum")
            window_nll.append(float(nll))
            window_tokens.append(inputs.shape[1] - 1 - start)
        if progress is not None:
            progress(len(batch))
    total_tokens = sum(window_tokens)
    mean_nll = sum(window_nll) / total_tokens
    per_window = [n / t for n, t in zip(window_nll, window_tokens)]
    stderr = None
    if len(per_window) > 1:  # delta method over windows: se(exp(m)) = exp(m) * se(m)
        mean = sum(per_window) / len(per_window)
        var = sum((x - mean) ** 2 for x in per_window) / (len(per_window) - 1)
        stderr = math.exp(mean_nll) * math.sqrt(var / len(per_window))
    return {"value": math.exp(mean_nll), "stderr": stderr, "n": len(spans), "tokens": total_tokens,
            "mean_nll": mean_nll, "window_nll": per_window}
