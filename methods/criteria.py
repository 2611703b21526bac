"""Importance criteria for attention heads and FFN neurons (a library module, not a registered method).

Every criterion comes from ONE forward-backward pass per calibration example, all criteria from the same
pass, so every criterion sees exactly the same samples. The loss L of an example is its language-modelling
loss: the mean cross-entropy of predicting tokens 1..T-1 from their prefixes (what Hugging Face computes
with `labels=input_ids`). A batch of B examples is scored with the sum of the B per-example losses, so
every example's gradients are exactly those of its own loss (examples do not interact in a forward pass).

Notation, for layer l and token t of an example:
  A[t, h, :]   the output of head h: the slice h of the input of `self_attn.out_proj` (head_dim values),
  G = ∂L/∂A    its gradient,
  W, gY        out_proj's weight (E × E, columns (h, d)) and the gradient at out_proj's output,
  x[t, :]      fc1's input (the normalised MLP input),  W1, b1  fc1's weight (F × E) and bias,
  act[t, j]    fc1's activation after ReLU (the input of fc2),  g[t, j] = ∂L/∂act[t, j],
  gp[t, j]     the gradient at fc1's pre-activation output: g[t, j] · 1[act[t, j] > 0] (ReLU).

Per-token scores (higher = more important), heads | neurons:
  l2norm    ‖A[t,h]‖₂                         | |act[t,j]|
  gradnorm  ‖G[t,h]‖₂                         | |g[t,j]|
  plainact  |A[t,h]·G[t,h]|  (ShadowLLM)      | |act[t,j]·g[t,j]|  (activation-based)
  fisher    (A[t,h]·G[t,h])²                  | (act[t,j]·g[t,j])²
  snip      Σ_{i,d} |W[i,(h,d)]·gY[t,i]·A[t,(h,d)]|   (|θ ⊙ ∂L/∂θ| over the head's out_proj columns,
                                                        the token's share of the weight gradient)
            | |gp[t,j]| · (Σ_k |W1[j,k]·x[t,k]| + |b1[j]|)   (|θ ⊙ ∂L/∂θ| over fc1 row j and its bias)
  plainact_weight (ShadowLLM's `plainact` for FFNs, weight-based):
            heads as `plainact` | |gp[t,j]| · Σ_k |W1[j,k]·x[t,k]|  (Σ_k |W1[j,k]·∂L/∂W1[j,k]|, the token's
            share of ∂L/∂W1, no bias)
`A·G` is the dot product over the head dimension. The weight-based scores use the token's share of the
weight gradient (∂L/∂W1[j,k] = Σ_t gp[t,j]·x[t,k]); ShadowLLM's code takes the absolute value after summing
over an example's tokens, which is at most the sum of our per-token values. Per-token values are what a
predictor trains on. Note |act·g| = |gp·pre| = |Σ_k W1[j,k]x[t,k]gp + b1[j]gp|: the activation-based
plainact is the absolute value of the sum whose absolute terms `plainact_weight` (and `snip`) add up.

The gradient-based scores of a sequence's last token are 0 (it predicts nothing inside the example).
"""
from __future__ import annotations

from typing import Iterable

import torch
import torch.nn.functional as F

from harness.engine import opt_layers
from harness.errors import HarnessError

#: The criteria of the papers (ShadowLLM's study), for heads and neurons alike.
CRITERIA = ("l2norm", "gradnorm", "plainact", "fisher", "snip")
#: CRITERIA plus ShadowLLM's weight-based FFN plainact (heads: the activation-based plainact).
ALL_CRITERIA = CRITERIA + ("plainact_weight",)
UNITS = ("heads", "neurons")


def _check(criteria) -> tuple[str, ...]:
    criteria = tuple(criteria)
    unknown = [c for c in criteria if c not in ALL_CRITERIA]
    if unknown or not criteria:
        raise HarnessError(f"unknown importance criteria {unknown or criteria}; valid: {', '.join(ALL_CRITERIA)}")
    return criteria


def example_loss(logits: torch.Tensor, input_ids: torch.Tensor) -> torch.Tensor:
    """Sum over the batch of each example's mean next-token cross-entropy (float32 or wider)."""
    logits = logits[:, :-1].to(torch.promote_types(logits.dtype, torch.float32))
    targets = input_ids[:, 1:]
    nll = F.cross_entropy(logits.reshape(-1, logits.shape[-1]), targets.reshape(-1), reduction="none")
    return nll.view(targets.shape).mean(dim=1).sum()


class _Capture:
    """Temporary hooks that capture, per layer, out_proj's input A and output Y, fc1's input x and fc2's
    input act (all as (B, T, ·)). A of a layer that would not be tracked by autograd (layer 0 with frozen
    parameters) is made a leaf that requires grad, so that every captured tensor is part of the graph."""

    def __init__(self, model):
        self.decoder, self.layers = opt_layers(model)
        self.store: dict = {}
        self.handles: list = []
        self.shape = None

    def __enter__(self):
        try:
            for index, layer in enumerate(self.layers):
                attn = layer.self_attn
                self.handles.append(attn.out_proj.register_forward_pre_hook(self._pre_a(index)))
                self.handles.append(attn.out_proj.register_forward_hook(self._post("Y", index)))
                self.handles.append(layer.fc1.register_forward_pre_hook(self._pre_plain("x", index)))
                self.handles.append(layer.fc2.register_forward_pre_hook(self._pre_plain("act", index)))
        except BaseException:
            self.__exit__()
            raise
        return self

    def __exit__(self, *exc):
        for handle in self.handles:
            handle.remove()
        self.handles.clear()

    def _view(self, tensor):
        batch, seq = self.shape
        return tensor.view(batch, seq, -1)

    def _pre_a(self, index):
        def hook(module, args):
            x = args[0]
            if not x.requires_grad:
                x = x.detach().requires_grad_(True)
                self.store[("A", index)] = x
                return (x,) + tuple(args[1:])
            self.store[("A", index)] = x
            return None
        return hook

    def _pre_plain(self, name, index):
        def hook(module, args):
            self.store[(name, index)] = args[0]
        return hook

    def _post(self, name, index):
        def hook(module, args, output):
            self.store[(name, index)] = output
        return hook


def _layer_scores(model, input_ids: torch.Tensor, criteria: tuple[str, ...]):
    """One forward-backward pass; yields (layer, {criterion: {"heads": (B,T,H), "neurons": (B,T,F)}})
    in float32 (float64 for a float64 model) on the model's device."""
    config = model.config
    if getattr(config, "activation_function", "relu") != "relu":
        raise HarnessError(f"importance criteria assume OPT's ReLU FFN (got {config.activation_function!r})")
    num_heads = config.num_attention_heads
    head_dim = config.hidden_size // num_heads
    if input_ids.dim() == 1:
        input_ids = input_ids.unsqueeze(0)
    if input_ids.shape[1] < 2:
        raise HarnessError("an example needs at least 2 tokens to have a language-modelling loss")
    device = next(model.parameters()).device
    input_ids = input_ids.to(device)
    params = list(model.parameters())
    saved_grad = [p.requires_grad for p in params]
    was_training = model.training
    capture = _Capture(model)
    capture.shape = tuple(input_ids.shape)
    try:
        model.eval()
        for p in params:
            p.requires_grad_(False)
        with torch.enable_grad(), capture:
            logits = model(input_ids=input_ids, use_cache=False).logits
            loss = example_loss(logits, input_ids)
        layers = range(len(capture.layers))
        wanted = [capture.store[(n, l)] for l in layers for n in ("A", "Y", "act")]
        # backward on the per-example token sums (the means times T-1): the same gradients up to a
        # factor undone below in float32, without fp16 underflow of gradients scaled by 1/(T-1)
        scale = input_ids.shape[1] - 1
        grads = torch.autograd.grad(loss * scale, wanted, allow_unused=True)
        grad = {}
        for i, (l, n) in enumerate((l, n) for l in layers for n in ("A", "Y", "act")):
            g = grads[i]
            grad[(n, l)] = torch.zeros_like(wanted[i]) if g is None else g
        del logits, loss, grads, wanted
    finally:
        for p, flag in zip(params, saved_grad):
            p.requires_grad_(flag)
        model.train(was_training)

    work = torch.promote_types(next(model.parameters()).dtype, torch.float32)
    batch, seq = input_ids.shape
    with torch.no_grad():
        for l, layer in enumerate(capture.layers):
            view = lambda t: t.detach().to(work).reshape(batch, seq, -1)  # noqa: E731
            a, ga = view(capture.store[("A", l)]), view(grad[("A", l)]) / scale
            act, gact = view(capture.store[("act", l)]), view(grad[("act", l)]) / scale
            a4, ga4 = a.view(batch, seq, num_heads, head_dim), ga.view(batch, seq, num_heads, head_dim)
            dot = (a4 * ga4).sum(-1)  # (B, T, H)
            prod = act * gact  # (B, T, F)
            out = {}
            for c in criteria:
                if c == "l2norm":
                    out[c] = {"heads": a4.norm(dim=-1), "neurons": act.abs()}
                elif c == "gradnorm":
                    out[c] = {"heads": ga4.norm(dim=-1), "neurons": gact.abs()}
                elif c == "plainact":
                    out[c] = {"heads": dot.abs(), "neurons": prod.abs()}
                elif c == "fisher":
                    out[c] = {"heads": dot.square(), "neurons": prod.square()}
            if "snip" in criteria or "plainact_weight" in criteria:
                fc1 = layer.fc1
                x = view(capture.store[("x", l)])
                gpre = (gact * (act > 0)).abs()  # |∂L/∂pre|, ReLU
                row = x.abs() @ fc1.weight.detach().to(work).abs().t()  # Σ_k |W1[j,k] x[t,k]|
                if "plainact_weight" in criteria:
                    out["plainact_weight"] = {"heads": dot.abs(), "neurons": gpre * row}
                if "snip" in criteria:
                    bias = fc1.bias.detach().to(work).abs() if fc1.bias is not None else 0.0
                    gy = view(grad[("Y", l)]) / scale
                    w = layer.self_attn.out_proj.weight.detach().to(work)
                    col = gy.abs() @ w.abs()  # Σ_i |gY[t,i]| |W[i,c]|
                    heads = (col * a.abs()).view(batch, seq, num_heads, head_dim).sum(-1)
                    out["snip"] = {"heads": heads, "neurons": gpre * (row + bias)}
            yield l, {c: out[c] for c in criteria}
    capture.store.clear()


def score_example(model, input_ids: torch.Tensor, criteria: Iterable[str] = CRITERIA) -> dict:
    """Per-token scores of one example from one forward-backward pass.

    input_ids: (T,) for one example -> {criterion: {"heads": (T, L, H), "neurons": (T, L, F)}};
    (B, T) for B examples (each with its own loss) -> shapes (B, T, L, ·). float32 (float64 for a float64
    model), on the model's device. The model is left as it was (no hooks, parameters' requires_grad and
    train/eval mode restored; it runs in eval mode).
    """
    criteria = _check(criteria)
    single = input_ids.dim() == 1
    per_layer: dict = {c: {u: [] for u in UNITS} for c in criteria}
    for _, scores in _layer_scores(model, input_ids, criteria):
        for c in criteria:
            for u in UNITS:
                per_layer[c][u].append(scores[c][u])
    result = {c: {u: torch.stack(per_layer[c][u], dim=-2) for u in UNITS} for c in criteria}
    if single:
        result = {c: {u: t[0] for u, t in units.items()} for c, units in result.items()}
    return result


def aggregate(model, batches, criteria: Iterable[str] = CRITERIA, log=None) -> dict:
    """Mean per-token scores over every token of the calibration examples.

    batches: a (N, T) tensor (one example per pass) or an iterable of (T,) / (B, T) tensors.
    Returns {criterion: {"heads": (L, H), "neurons": (L, F)}} float32 on the CPU (sums kept in float64).
    Per-token score tensors are never held for all layers at once.
    """
    criteria = _check(criteria)
    config = model.config
    num_layers = config.num_hidden_layers
    sizes = {"heads": config.num_attention_heads, "neurons": config.ffn_dim}
    sums = {c: {u: torch.zeros(num_layers, sizes[u], dtype=torch.float64) for u in UNITS} for c in criteria}
    tokens = 0
    for index, batch in enumerate(batches):
        batch = batch.reshape(-1, batch.shape[-1])
        for l, scores in _layer_scores(model, batch, criteria):
            for c in criteria:
                for u in UNITS:
                    sums[c][u][l] += scores[c][u].double().sum(dim=(0, 1)).cpu()
        tokens += batch.numel()
        if log is not None:
            log(f"importance: example batch {index + 1} ({tokens} tokens)")
    if tokens == 0:
        raise HarnessError("no calibration examples to compute importance from")
    return {c: {u: (sums[c][u] / tokens).float() for u in UNITS} for c in criteria}


IMPORTANCE_VERSION = 1


def fit_importance(ctx):
    """Aggregated importance of every criterion from one pass over the calibration data, cached.

    One artefact (kind `importance`) holds `<criterion>.heads` (L, H) and `<criterion>.neurons` (L, F) for
    all of ALL_CRITERIA, so every static variant (and any method that ranks by a criterion) shares it.
    """
    inputs = {**ctx.base_key(), "criteria": list(ALL_CRITERIA), "version": IMPORTANCE_VERSION}

    def build():
        ids = ctx.calibration_ids()
        ctx.log(f"importance: {len(ALL_CRITERIA)} criteria over {ids.shape[0]} calibration examples of {ids.shape[1]} tokens")
        scores = aggregate(ctx.model, ids, ALL_CRITERIA)
        tensors = {f"{c}.{unit}": scores[c][unit] for c in ALL_CRITERIA for unit in UNITS}
        return tensors, {"criteria": list(ALL_CRITERIA), "examples": int(ids.shape[0]), "tokens": int(ids.numel())}

    return ctx.cache.get_or_build("importance", inputs, build)
