"""Predictor networks, their training, and the quality report (recall, precision, Spearman ρ).

Shared by dejavu, shadow and timewise. A predictor standardises its input with statistics of the
training data (stored as buffers, so the artefact is self-contained), then applies its network.
"""
from __future__ import annotations

import math

import torch
import torch.nn.functional as F
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


def mlp(dim: int, hidden: int, out: int, hidden_layers: int = 1) -> Predictor:
    """MLP with `hidden_layers` hidden layers of `hidden` units, each Linear then ReLU, and a Linear output
    (biases everywhere): Linear, ReLU, Linear for one hidden layer (ShadowLLM's Deja Vu-style predictors);
    Linear, ReLU, Linear, ReLU, Linear for two (timewise). The sigmoid of a classifier is in its loss / at
    selection."""
    if hidden_layers < 1:
        raise ValueError(f"an MLP predictor needs at least one hidden layer (got {hidden_layers})")
    layers, width = [], dim
    for _ in range(hidden_layers):
        layers += [nn.Linear(width, hidden), nn.ReLU()]
        width = hidden
    return Predictor(nn.Sequential(*layers, nn.Linear(width, out)), dim)


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


def seeded(make, seed: int):
    """Build a module under its own seed (its initial weights do not depend on what ran before)."""
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed)
        return make()


class Stacked(nn.Module):
    """L predictors of one architecture (Linear/ReLU layers) evaluated together as batched matmuls:
    (L, B, d) -> (L, B, out). Built from per-layer Predictors and written back into them after training."""

    def __init__(self, predictors: list[Predictor]):
        super().__init__()
        first = predictors[0].net
        self.plan, self.weights, self.biases = [], nn.ParameterList(), nn.ParameterList()
        for index, module in enumerate(first):
            if isinstance(module, nn.Linear):
                self.weights.append(nn.Parameter(torch.stack([p.net[index].weight.detach().t() for p in predictors])))
                if module.bias is not None:
                    self.biases.append(nn.Parameter(torch.stack([p.net[index].bias.detach()[None] for p in predictors])))
                self.plan.append(("linear", index, len(self.weights) - 1, len(self.biases) - 1 if module.bias is not None else None))
            elif isinstance(module, nn.ReLU):
                self.plan.append(("relu", index, None, None))
            else:
                raise TypeError(f"cannot stack a {type(module).__name__}")
        self.register_buffer("mean", torch.stack([p.mean for p in predictors])[:, None])
        self.register_buffer("std", torch.stack([p.std for p in predictors])[:, None])

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        z = (x.to(self.mean.dtype) - self.mean) / self.std
        for kind, _, w, b in self.plan:
            if kind == "relu":
                z = torch.relu(z)
            elif b is None:
                z = torch.bmm(z, self.weights[w])
            else:
                z = torch.baddbmm(self.biases[b], z, self.weights[w])
        return z

    def standardise(self, x: torch.Tensor) -> None:
        """Per layer: the mean and std (floored at 1e-3) of the training inputs x (L, N, d)."""
        with torch.no_grad():
            for layer in range(x.shape[0]):
                column = x[layer].float()
                self.mean[layer, 0] = column.mean(0)
                self.std[layer, 0] = column.std(0).clamp(min=1e-3)

    @torch.no_grad()
    def write_back(self, predictors: list[Predictor]) -> None:
        for layer, predictor in enumerate(predictors):
            predictor.mean.copy_(self.mean[layer, 0])
            predictor.std.copy_(self.std[layer, 0])
            for kind, index, w, b in self.plan:
                if kind == "linear":
                    predictor.net[index].weight.copy_(self.weights[w][layer].t())
                    if b is not None:
                        predictor.net[index].bias.copy_(self.biases[b][layer, 0])


def _predict(model, x: torch.Tensor, chunk: int = 4096) -> torch.Tensor:
    with torch.no_grad():
        return torch.cat([model(x[:, i:i + chunk]) for i in range(0, x.shape[1], chunk)], dim=1)


def train_classifiers(predictors: list[Predictor], x, y, val_x, val_y, *, k: int | None, epochs: int = 20,
                      lr: float = 1e-3, batch_size: int = 256, patience: int = 3, seed: int = 0, device: str = "cpu",
                      progress=None) -> list[dict]:
    """Train L per-layer classifiers at once (one batched matmul per linear layer for all of them).

    x: (L, N, d) inputs (any float dtype; moved to `device` once). y: (L, N, n) bool labels (1 = keep), or a
    function (L, index) -> that for a batch of token indices (labels too large to unpack at once).
    val_x, val_y: the same for validation tokens. Per layer: class-weighted BCE (the weight of a unit's
    positives is its negatives/positives ratio), AdamW, early stopping on validation recall (of the top-k,
    or of logits > 0) with `patience` epochs; each layer keeps the weights of its own best epoch. The
    layers' losses are summed, so each layer's gradients are those of its own loss. Returns the per-layer
    validation metrics of the best epoch; the predictors are left with the best weights, on the CPU.
    """
    label = y if callable(y) else (lambda index, labels=y: labels[:, index])
    val_label = val_y if callable(val_y) else (lambda index, labels=val_y: labels[:, index])
    count, layers = x.shape[1], x.shape[0]
    generator = torch.Generator().manual_seed(seed)
    stacked = Stacked(predictors).to(device)
    x, val_x = x.to(device), val_x.to(device)
    stacked.standardise(x)
    truth_val = val_label(torch.arange(val_x.shape[1])).cpu()
    positives = torch.zeros(layers, truth_val.shape[-1], device=device)
    for index in torch.arange(count).split(8192):
        positives += label(index).to(device).float().sum(1)
    positives = (positives / count).clamp(1e-3, 1 - 1e-3)
    pos_weight = ((1 - positives) / positives)[:, None]
    optimizer = adamw(stacked.parameters(), lr, device)
    best = torch.full((layers,), -1.0)
    stale = torch.zeros(layers, dtype=torch.long)
    stopped_at = torch.zeros(layers, dtype=torch.long)
    best_state = {name: t.detach().clone() for name, t in stacked.state_dict().items()}
    for epoch in range(epochs):
        stacked.train()
        for index in _batches(count, batch_size, generator):
            optimizer.zero_grad()
            logits = stacked(x[:, index.to(device)])
            target = label(index).to(device).float()
            loss = F.binary_cross_entropy_with_logits(logits, target, pos_weight=pos_weight, reduction="none")
            loss.mean(dim=(1, 2)).sum().backward()
            optimizer.step()
        stacked.eval()
        logits = _predict(stacked, val_x).cpu()
        recall = torch.tensor([selection_quality(logits[l], truth_val[l], k)["recall"] for l in range(layers)])
        improved = (recall > best + 1e-6) & (stale < patience)
        best = torch.where(improved, recall, best)
        stale = torch.where(improved, torch.zeros_like(stale), stale + (stale < patience).long())
        stopped_at = torch.where(stale < patience, torch.full_like(stopped_at, epoch + 1), stopped_at)
        if improved.any():
            rows = improved.nonzero().squeeze(1).to(device)
            for name, tensor in stacked.state_dict().items():
                best_state[name].index_copy_(0, rows, tensor.detach().index_select(0, rows))
        if progress is not None:
            progress(1)
        if bool((stale >= patience).all()):
            break
    stacked.load_state_dict(best_state)
    stacked.eval()
    logits = _predict(stacked, val_x).cpu()
    stacked.cpu().write_back(predictors)
    for predictor in predictors:
        predictor.eval()
    return [{**selection_quality(logits[l], truth_val[l], k), "epochs": int(stopped_at[l])} for l in range(layers)]


def adamw(parameters, lr: float, device) -> torch.optim.AdamW:
    """AdamW (weight decay 0.01) for the predictors; on CUDA its fused form, one kernel over all parameters (the
    same update). ShadowLLM's predictor has 1.7G parameters at OPT-13B, so each step's update moves about 47 GB
    of fp32 parameters, gradients and moments (an estimate; not yet timed)."""
    return torch.optim.AdamW(parameters, lr=lr, weight_decay=0.01, fused=str(device).startswith("cuda"))


def train_regressor(predictor: Predictor, x, y, *, epochs: int = 20, lr: float = 1e-3, batch_size: int = 256,
                    seed: int = 0, device: str = "cpu", loss_fn=nn.functional.mse_loss, progress=None) -> float:
    """Regression (MSE by default) with AdamW and a cosine schedule; returns the last epoch's mean training loss.

    x: (N, d). y: (N, n) targets, or a function (token indices) -> targets of a batch (targets too large to
    hold in float32 at once). The predictor is left on the CPU."""
    target = y if callable(y) else (lambda index, values=y: values[index])
    torch.manual_seed(seed)
    generator = torch.Generator().manual_seed(seed)
    _standardise(predictor, x.float())
    predictor.to(device)
    optimizer = adamw(predictor.parameters(), lr, device)
    steps = epochs * math.ceil(len(x) / batch_size)
    schedule = torch.optim.lr_scheduler.CosineAnnealingLR(optimizer, T_max=max(1, steps))
    x = x.to(device)
    predictor.train()
    total = torch.zeros((), device=device)
    for epoch in range(epochs):
        total.zero_()
        for index in _batches(len(x), batch_size, generator):
            optimizer.zero_grad()
            loss = loss_fn(predictor(x[index.to(device)].float()), target(index).to(device).float())
            loss.backward()
            optimizer.step()
            schedule.step()
            total += loss.detach() * len(index)
        if progress is not None:
            progress(1)
    predictor.eval().cpu()
    return float(total) / max(len(x), 1)


def train_regressors(predictors: list[Predictor], x, y, *, epochs: int = 20, lr: float = 1e-3, batch_size: int = 256,
                     seed: int = 0, device: str = "cpu", progress=None) -> list[float]:
    """Train L per-layer regressors at once (batched matmuls, as `train_classifiers`) with MSE, AdamW and a cosine
    schedule (ShadowLLM's recipe for its predictors). x: (N, d) one input for every layer, or (L, N, d). y: a
    function (token indices) -> (L, B, n) float targets of a batch. The layers' losses are summed, so each layer's
    gradients are those of its own loss. Returns each layer's mean training loss of the last epoch; the predictors
    are left on the CPU."""
    layers = len(predictors)
    x = x.to(device)
    x = x.unsqueeze(0).expand(layers, *x.shape) if x.dim() == 2 else x
    count = x.shape[1]
    torch.manual_seed(seed)
    generator = torch.Generator().manual_seed(seed)
    stacked = Stacked(predictors).to(device)
    stacked.standardise(x)
    optimizer = adamw(stacked.parameters(), lr, device)
    schedule = torch.optim.lr_scheduler.CosineAnnealingLR(optimizer, T_max=max(1, epochs * math.ceil(count / batch_size)))
    total = torch.zeros(layers, device=device)
    stacked.train()
    for epoch in range(epochs):
        total.zero_()
        for index in _batches(count, batch_size, generator):
            optimizer.zero_grad()
            pred = stacked(x[:, index.to(device)])
            loss = (pred - y(index).to(device).float()).square().mean(dim=(1, 2))  # (L,)
            loss.sum().backward()
            optimizer.step()
            schedule.step()
            total += loss.detach() * len(index)
        if progress is not None:
            progress(1)
    stacked.eval()
    stacked.cpu().write_back(predictors)
    for predictor in predictors:
        predictor.eval()
    return (total.cpu() / max(count, 1)).tolist()


def example_split(count: int, val_fraction: float, seed: int) -> tuple[torch.Tensor, torch.Tensor]:
    """Train/validation indices of `count` examples (one row each), seeded; one example alone trains and validates."""
    order = torch.randperm(count, generator=torch.Generator().manual_seed(seed))
    val_count = max(1, int(round(val_fraction * count))) if count > 1 else 0
    if val_count == 0:
        return order, order
    return order[val_count:].sort().values, order[:val_count].sort().values


def minmax(scores: torch.Tensor) -> torch.Tensor:
    """Per row and layer: (s - min) / (max - min) over the last dim (0 where the scores are flat); ShadowLLM's
    per-layer normalisation of its predictors' targets."""
    low, high = scores.amin(-1, keepdim=True), scores.amax(-1, keepdim=True)
    return (scores - low) / (high - low).clamp(min=1e-12)


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


def save(prefix: str, predictor: Predictor, dtype: torch.dtype | None = None) -> dict:
    """The predictor's tensors under `prefix`; floating ones cast to `dtype` when given (half-precision
    models store their predictors in their own dtype: half the disk, and the precision they run in)."""
    def cast(t):
        t = t.detach().cpu()
        return t.to(dtype) if dtype is not None and t.is_floating_point() else t

    return {f"{prefix}.{name}": cast(t) for name, t in predictor.state_dict().items()}


def storage_dtype(model_dtype: torch.dtype) -> torch.dtype | None:
    """Predictors of half-precision models are stored in the model's dtype; others in float32."""
    return model_dtype if model_dtype in (torch.float16, torch.bfloat16) else None


def load(tensors: dict, prefix: str, predictor: Predictor, weights: str = "model") -> Predictor:
    """The predictor's fitted tensors under `prefix`; with `weights` int8 or fp8 every Linear weight is then held
    as its dequantized 8-bit form (`quantize_predictor`)."""
    predictor.load_state_dict({name[len(prefix) + 1:]: t for name, t in tensors.items() if name.startswith(prefix + ".")})
    return quantize_predictor(predictor, weights).eval()


# -- 8-bit predictor weights (the `predictor_weights` setting of dejavu, shadow and timewise) ------------------------
#: `model`: the fitted weights as stored (the model's dtype for half-precision models, else float32); `int8`: int8
#: with one absmax scale per output row; `fp8`: float8 e4m3 (torch.float8_e4m3fn) with one scale per output row.
PREDICTOR_WEIGHTS = ("model", "int8", "fp8")
#: the methods whose predictors the setting applies to (every variant of each)
PREDICTOR_METHODS = ("dejavu", "shadow", "timewise")
INT8_MAX = 127
FP8_DTYPE = torch.float8_e4m3fn
FP8_MAX = float(torch.finfo(torch.float8_e4m3fn).max)  # 448


def predictor_weights(settings: dict | None) -> str:
    """The `predictor_weights` setting of a method's settings (default `model`); an unknown value is a HarnessError."""
    value = (settings or {}).get("predictor_weights", "model")
    if value not in PREDICTOR_WEIGHTS:
        from harness.errors import HarnessError

        raise HarnessError(f"predictor_weights {value!r} is not a predictor weight format; valid: model (the fitted "
                           "weights in the model's dtype), int8 (per-output-row absmax scale), fp8 (float8 e4m3, "
                           "per-output-row scale)")
    return value


def quantize_rows(weight: torch.Tensor, kind: str) -> tuple[torch.Tensor, torch.Tensor]:
    """(q, scale) of a (out, in) weight, one scale per output row, so that weight ≈ q * scale[:, None].

    int8: scale = absmax(row) / 127, q = round(weight / scale) in int8 (−127 … 127); the error of an entry is at most
    scale / 2. fp8: scale = absmax(row) / 448 (e4m3's largest value), q = weight / scale rounded to float8_e4m3fn (3
    mantissa bits: a relative error of at most 2⁻⁴, or 2⁻¹⁰·scale among its subnormals). Scales are float32; a row of
    zeros has scale 0 and q 0. The quantization is computed in float32 whatever the weight's dtype."""
    if kind not in ("int8", "fp8"):
        raise ValueError(f"quantize_rows: unknown kind {kind!r}; valid: int8, fp8")
    if weight.dim() != 2:
        raise ValueError(f"quantize_rows: a (out, in) weight is needed (got shape {tuple(weight.shape)})")
    w = weight.detach().float()
    top = INT8_MAX if kind == "int8" else FP8_MAX
    scale = w.abs().amax(dim=1) / top
    scaled = w / torch.where(scale > 0, scale, torch.ones_like(scale))[:, None]
    if kind == "int8":
        q = scaled.round().clamp(-INT8_MAX, INT8_MAX).to(torch.int8)
    else:
        q = scaled.clamp(-FP8_MAX, FP8_MAX).to(FP8_DTYPE)
    return q, scale


def dequantize(q: torch.Tensor, scale: torch.Tensor, dtype: torch.dtype = torch.float32) -> torch.Tensor:
    """The weight that (q, scale) of `quantize_rows` stands for: q * scale per output row, in `dtype`."""
    return (q.float() * scale.float()[:, None]).to(dtype)


def quantize_predictor(predictor: nn.Module, kind: str) -> nn.Module:
    """Fake quantization, in place: the weight of every nn.Linear of `predictor` is replaced by
    dequantize(*quantize_rows(weight, kind)) in its own dtype (biases, and the input standardisation, stay as they
    are), so the masked engine computes exactly what the 8-bit weights give. The 8-bit tensors and their scales stay
    on the module: `quantized_weights(predictor)`. `model` leaves the predictor unchanged."""
    if kind == "model":
        return predictor
    if kind not in PREDICTOR_WEIGHTS:
        raise ValueError(f"unknown predictor weight format {kind!r}; valid: {', '.join(PREDICTOR_WEIGHTS)}")
    found = {}
    with torch.no_grad():
        for name, module in predictor.named_modules():
            if isinstance(module, nn.Linear):
                q, scale = quantize_rows(module.weight, kind)
                module.weight.copy_(dequantize(q, scale, module.weight.dtype))
                found[f"{name}.weight" if name else "weight"] = (q, scale)
    # a plain attribute, not buffers: Module.to(dtype) would cast float8 buffers, and they must stay 8-bit
    predictor.quantized_weights = {"kind": kind, "weights": found}
    return predictor


def quantized_weights(predictor: nn.Module) -> dict | None:
    """{"kind": int8|fp8, "weights": {parameter name: (q (out, in) int8/float8_e4m3fn, scale (out,) float32)}} of a
    predictor quantized by `quantize_predictor` (names as in its state_dict, e.g. `net.0.weight`); None otherwise.
    The masked engine's weights are exactly dequantize(q, scale) cast to the predictor's dtype."""
    return getattr(predictor, "quantized_weights", None)


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

    def prepare(self, like: torch.Tensor) -> None:
        """Move every predictor set (a dict attribute of predictor modules) now, before anything is timed."""
        for value in list(vars(self).values()):
            if isinstance(value, dict) and value and all(isinstance(p, nn.Module) for p in value.values()):
                self._on(value, like)

    def _on(self, predictors: dict, like: torch.Tensor) -> dict:
        key = (id(predictors), like.device, like.dtype)
        cache = self.__dict__.setdefault("_moved", {})
        if key not in cache:
            cache[key] = {l: _copy_to(p, like) for l, p in predictors.items()}
        return cache[key]


def _copy_to(predictor: Predictor, like: torch.Tensor) -> Predictor:
    import copy

    return copy.deepcopy(predictor).to(device=like.device, dtype=like.dtype)
