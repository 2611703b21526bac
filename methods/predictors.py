"""Predictor networks, their training, and the quality report (recall, precision, Spearman ρ).

Shared by dejavu, shadow and timewise. A predictor standardises its input with statistics of the
training data (stored as buffers, so the artefact is self-contained), then applies its network.
"""
from __future__ import annotations

import math

import torch
from torch import nn


class Predictor(nn.Module):
    def __init__(self, net: nn.Module, dim: int):
        super().__init__()
        self.net = net
        self.register_buffer("mean", torch.zeros(dim))
        self.register_buffer("std", torch.ones(dim))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.net((x - self.mean) / self.std)


def low_rank(dim: int, hidden: int, out: int) -> Predictor:
    """Deja Vu: two linear layers, d → hidden → out."""
    return Predictor(nn.Sequential(nn.Linear(dim, hidden, bias=False), nn.Linear(hidden, out, bias=False)), dim)


def mlp(dim: int, hidden: int, out: int) -> Predictor:
    """Two-layer MLP with ReLU (timewise: 256 hidden; the sigmoid is in the loss / at selection)."""
    return Predictor(nn.Sequential(nn.Linear(dim, hidden), nn.ReLU(), nn.Linear(hidden, out)), dim)


def parameter_count(module: nn.Module) -> int:
    return sum(p.numel() for p in module.parameters())


def linear_flops(module: nn.Module) -> int:
    """Multiply-adds ×2 of all Linear layers for one token."""
    return sum(2 * m.in_features * m.out_features for m in module.modules() if isinstance(m, nn.Linear))


def _standardise(predictor: Predictor, x: torch.Tensor) -> None:
    predictor.mean.copy_(x.mean(0))
    predictor.std.copy_(x.std(0).clamp(min=1e-3))


def _batches(count: int, size: int, generator: torch.Generator):
    order = torch.randperm(count, generator=generator)
    for start in range(0, count, size):
        yield order[start:start + size]


def train_classifier(predictor: Predictor, x, y, val_x, val_y, *, k: int | None, epochs: int = 20, lr: float = 1e-3,
                     batch_size: int = 256, patience: int = 3, seed: int = 0, device: str = "cpu") -> dict:
    """Class-weighted BCE with AdamW, early stopping on validation recall (of the top-k, or of logits > 0).

    y: (N, n) bool labels (1 = keep). Returns the validation metrics of the best epoch; the predictor is left
    with the best weights.
    """
    torch.manual_seed(seed)
    generator = torch.Generator().manual_seed(seed)
    _standardise(predictor, x)
    predictor.to(device)
    positives = y.float().mean(0).clamp(1e-3, 1 - 1e-3)
    loss_fn = nn.BCEWithLogitsLoss(pos_weight=((1 - positives) / positives).to(device))
    optimizer = torch.optim.AdamW(predictor.parameters(), lr=lr, weight_decay=0.01)
    best, best_state, stale = -1.0, None, 0
    x, y = x.to(device), y.float().to(device)
    for epoch in range(epochs):
        predictor.train()
        for index in _batches(len(x), batch_size, generator):
            optimizer.zero_grad()
            loss_fn(predictor(x[index]), y[index]).backward()
            optimizer.step()
        predictor.eval()
        with torch.no_grad():
            logits = predictor(val_x.to(device)).cpu()
        recall = selection_quality(logits, val_y, k)["recall"]
        if recall > best + 1e-6:
            best, stale = recall, 0
            best_state = {name: t.detach().clone() for name, t in predictor.state_dict().items()}
        else:
            stale += 1
            if stale >= patience:
                break
    predictor.load_state_dict(best_state)
    predictor.eval().cpu()
    with torch.no_grad():
        metrics = selection_quality(predictor(val_x), val_y, k)
    metrics["epochs"] = epoch + 1
    return metrics


def train_regressor(predictor: Predictor, x, y, *, epochs: int = 20, lr: float = 1e-3, batch_size: int = 256,
                    seed: int = 0, device: str = "cpu", loss_fn=nn.functional.mse_loss) -> float:
    """Regression (MSE by default) with AdamW and a cosine schedule; returns the last epoch's mean training loss."""
    torch.manual_seed(seed)
    generator = torch.Generator().manual_seed(seed)
    _standardise(predictor, x)
    predictor.to(device)
    optimizer = torch.optim.AdamW(predictor.parameters(), lr=lr, weight_decay=0.01)
    steps = epochs * math.ceil(len(x) / batch_size)
    schedule = torch.optim.lr_scheduler.CosineAnnealingLR(optimizer, T_max=max(1, steps))
    x, y = x.to(device), y.to(device)
    predictor.train()
    for epoch in range(epochs):
        total, count = 0.0, 0
        for index in _batches(len(x), batch_size, generator):
            optimizer.zero_grad()
            loss = loss_fn(predictor(x[index]), y[index].float())
            loss.backward()
            optimizer.step()
            schedule.step()
            total, count = total + loss.item() * len(index), count + len(index)
    predictor.eval().cpu()
    return total / max(count, 1)


def top_k(scores: torch.Tensor, k: int) -> torch.Tensor:
    keep = torch.zeros_like(scores, dtype=torch.bool)
    return keep.scatter_(-1, scores.topk(k, dim=-1).indices, True)


def _ranks(x: torch.Tensor) -> torch.Tensor:
    return x.argsort(-1).argsort(-1).float()


def spearman(predicted: torch.Tensor, true: torch.Tensor) -> float:
    """Mean over rows (tokens) of the rank correlation across units (ties broken by order)."""
    a, b = _ranks(predicted.float()), _ranks(true.float())
    a, b = a - a.mean(-1, keepdim=True), b - b.mean(-1, keepdim=True)
    rho = (a * b).sum(-1) / (a.norm(dim=-1) * b.norm(dim=-1)).clamp(min=1e-12)
    return float(rho.mean())


def selection_quality(predicted: torch.Tensor, oracle: torch.Tensor, k: int | None) -> dict:
    """Recall and precision of the selected (kept) set against the oracle set, plus Spearman ρ.

    predicted: (N, n) scores. oracle: (N, n) bool set to keep, or float importance (its top-k is the set).
    k: how many units are selected (None: predicted > 0).
    """
    selected = top_k(predicted, k) if k is not None else predicted > 0
    if oracle.dtype == torch.bool:
        truth, rho = oracle, None
    else:
        truth, rho = top_k(oracle, k if k is not None else int((predicted > 0).sum(-1).float().mean())), spearman(predicted, oracle)
    hit = (selected & truth).sum().float()
    return {"recall": float(hit / truth.sum().clamp(min=1)), "precision": float(hit / selected.sum().clamp(min=1)),
            **({"spearman": rho} if rho is not None else {})}


def keep_count(allocation_fraction: float, size: int) -> int:
    """Units kept per token at a target: the same rounding as the engine's skip count."""
    return size - int(round(allocation_fraction * size))


def save(prefix: str, predictor: Predictor) -> dict:
    return {f"{prefix}.{name}": t.detach().cpu() for name, t in predictor.state_dict().items()}


def load(tensors: dict, prefix: str, predictor: Predictor) -> Predictor:
    predictor.load_state_dict({name[len(prefix) + 1:]: t for name, t in tensors.items() if name.startswith(prefix + ".")})
    return predictor.eval()


def layer_report(predicted: list, oracle: list, k: int | None, layers: list[int]) -> dict:
    """Quality per layer and over all layers at once (the global ranking) for one unit."""
    per_layer = [{"layer": l, **selection_quality(p, o, k)} for l, p, o in zip(layers, predicted, oracle)]
    mean = {key: sum(r[key] for r in per_layer) / len(per_layer) for key in per_layer[0] if key != "layer"}
    report = {"per_layer": per_layer, "mean": mean}
    if oracle[0].dtype != torch.bool:  # global: one ranking over every layer's units
        report["global"] = selection_quality(torch.cat(predicted, -1), torch.cat(oracle, -1),
                                             None if k is None else k * len(layers))
    return report


class PredictorPolicyMixin:
    """Moves predictors to the activations' device and dtype once, and reuses them."""

    def _on(self, predictors: dict, like: torch.Tensor) -> dict:
        key = (id(predictors), like.device, like.dtype)
        cache = self.__dict__.setdefault("_moved", {})
        if key not in cache:
            cache[key] = {l: _copy_to(p, like) for l, p in predictors.items()}
        return cache[key]


def _copy_to(predictor: Predictor, like: torch.Tensor) -> Predictor:
    import copy

    return copy.deepcopy(predictor).to(device=like.device, dtype=like.dtype)
