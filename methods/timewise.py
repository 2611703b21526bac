"""timewise (Sedghi et al., "Early Prediction of Dynamic Sparsity in LLMs"): per-layer head predictors.

A two-layer MLP (256 hidden, ReLU, sigmoid output) per layer predicts which heads to keep, trained with BCE
on labels = the lowest-norm heads at the target sparsity are skipped (the top-k by norm kept). Its input:
  timewise:current  this layer's embedding (the residual stream entering layer l) at the current token;
  timewise:last     the embedding M layers earlier (M a setting, default 1; layers < M read layer 0's);
  timewise:time     this layer's embedding at the previous token (the first token of a sequence uses its
                    own), so the mask of token t is known before token t is processed.
"""
from __future__ import annotations

import torch

from harness.engine import MaskPolicy
from harness.traces import collect_traces
from methods import Method, register
from methods.predictors import (PredictorPolicyMixin, keep_count, layer_report, linear_flops, load, mlp,
                                parameter_count, save, top_k, train_classifier)

DEFAULTS = {"hidden": 256, "epochs": 20, "lr": 1e-3, "batch_size": 256, "patience": 3, "val_fraction": 0.1, "M": 1}


def source_layer(variant: str, layer: int, lookback: int) -> int:
    return max(layer - lookback, 0) if variant == "last" else layer


class TimewisePolicy(PredictorPolicyMixin, MaskPolicy):
    needs = frozenset({"layer_input"})

    def __init__(self, variant: str, predictors: dict, lookback: int):
        self.variant, self.predictors, self.lookback = variant, predictors, lookback
        self.previous: dict[int, torch.Tensor] = {}  # layer -> (B, d) last token's embedding of the previous call

    def begin(self, state):
        if bool((state.positions[:, 0] <= 0).all()):  # a new sequence: nothing carried over
            self.previous = {}

    def predictor_input(self, layer, state) -> torch.Tensor:
        x = state.captures[("layer_input", source_layer(self.variant, layer, self.lookback))]
        if self.variant != "time":
            return x
        carried = self.previous.get(layer)
        first = carried[:, None] if carried is not None and carried.shape[0] == x.shape[0] else x[:, :1]
        shifted = torch.cat([first, x[:, :-1]], dim=1)  # token t reads token t-1
        shifted = torch.where((state.positions <= 0)[..., None], x, shifted)  # a sequence's first token: its own
        self.previous[layer] = x[:, -1]
        return shifted

    def head_scores(self, layer, state, head_out):
        if layer not in self.predictors:
            return None
        x = self.predictor_input(layer, state)
        return self._on(self.predictors, x)[layer](x)


@register
class Timewise(Method):
    name = "timewise"
    variants = ("current", "last", "time")
    default_variant = "current"
    units = frozenset({"heads"})
    seeded = True
    description = "Sedghi et al.: per-layer MLP head predictors from this layer (current), M layers back (last) or the previous token (time)"

    def hp(self) -> dict:
        return {**DEFAULTS, **{k: v for k, v in self.settings.items() if k in DEFAULTS}}

    def _inputs(self, traces, layer: int) -> torch.Tensor:
        x = traces.layer_input(source_layer(self.variant, layer, self.hp()["M"]))
        return x[traces.previous()] if self.variant == "time" else x

    def _layers(self, ctx, allocation):
        return [l for l in range(ctx.model.config.num_hidden_layers) if l not in allocation.dense_layers]

    def fit(self, ctx, allocation):
        if allocation.heads == 0:
            return None
        config, hp = ctx.model.config, self.hp()
        k = keep_count(allocation.heads, config.num_attention_heads)
        layers = self._layers(ctx, allocation)
        inputs = {**ctx.base_key(), "variant": self.variant, "seed": ctx.seed, "hp": hp, "keep_heads": k,
                  "layers": layers, "version": 1}

        def build():
            traces = ctx.session.memo("traces", lambda: collect_traces(ctx))
            train, val = traces.split(hp["val_fraction"], ctx.seed)
            tensors, metrics = {}, {}
            for layer in layers:
                x, y = self._inputs(traces, layer), top_k(traces.head_norm(layer), k)
                predictor = mlp(config.hidden_size, hp["hidden"], config.num_attention_heads)
                metrics[layer] = train_classifier(predictor, x[train], y[train], x[val], y[val], k=k, epochs=hp["epochs"],
                                                  lr=hp["lr"], batch_size=hp["batch_size"], patience=hp["patience"],
                                                  seed=ctx.seed + layer, device=ctx.session.device)
                tensors.update(save(f"heads.{layer}", predictor))
            return tensors, {"validation": metrics}

        return ctx.cache.get_or_build("timewise", inputs, build)

    def _predictors(self, ctx, artefact) -> dict:
        config = ctx.model.config
        layers = sorted({int(name.split(".")[1]) for name in artefact.tensors})
        return {l: load(artefact.tensors, f"heads.{l}", mlp(config.hidden_size, self.hp()["hidden"],
                                                             config.num_attention_heads)) for l in layers}

    def policy(self, ctx, allocation, artefact):
        if artefact is None:
            return None
        return TimewisePolicy(self.variant, self._predictors(ctx, artefact), self.hp()["M"])

    def quality(self, ctx, allocation, artefact) -> dict:
        if artefact is None:
            return {}
        config = ctx.model.config
        traces = ctx.session.memo("traces", lambda: collect_traces(ctx))
        _, val = traces.split(self.hp()["val_fraction"], ctx.seed)
        predictors = self._predictors(ctx, artefact)
        k = keep_count(allocation.heads, config.num_attention_heads)
        with torch.no_grad():
            predicted = [p(self._inputs(traces, l)[val]) for l, p in predictors.items()]
        report = {"heads": layer_report(predicted, [traces.head_norm(l)[val] for l in predictors], k, list(predictors))}
        one = next(iter(predictors.values()))
        report["heads"]["predictor"] = {"params": parameter_count(one) * len(predictors),
                                        "flops_per_token": linear_flops(one) * len(predictors)}
        return report
