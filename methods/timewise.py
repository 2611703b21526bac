"""timewise (Sedghi et al., "Early Prediction of Dynamic Sparsity in LLMs"): per-layer head predictors.

An MLP with two hidden layers of 256 units ("a two-layer MLP with 256 hidden units per layer": Linear, ReLU,
Linear, ReLU, Linear, sigmoid output) per layer predicts which heads to keep, trained with BCE
on labels = the lowest-norm heads at the target sparsity are skipped (the top-k by norm kept). Its input:
  timewise:current  this layer's embedding (the residual stream entering layer l) at the current token;
  timewise:last     the embedding M layers earlier (M a setting, default 1; layers < M read layer 0's);
  timewise:time     this layer's embedding at the previous token (the first token of a sequence uses its
                    own), so the mask of token t is known before token t is processed.
"""
from __future__ import annotations

import torch

from harness.engine import MaskPolicy
from harness.progress import stage
from harness.traces import collect_traces, trace_key
from kernels.sources import Folded, keep_counts
from methods import Method, register
from methods.dejavu import DejaVuSource
from methods.predictors import (PredictorPolicyMixin, keep_count, layer_report, linear_flops, load, mlp,
                                parameter_count, predictor_weights, save, seeded, storage_dtype, top_k,
                                train_classifiers)

DEFAULTS = {"hidden": 256, "hidden_layers": 2, "epochs": 20, "lr": 1e-3, "batch_size": 256, "patience": 3,
            "val_fraction": 0.1, "M": 1}


def timewise_predictor(dim: int, heads: int, hp: dict):
    """Sedghi et al.'s head predictor: `hidden_layers` (2) hidden layers of `hidden` (256) units with ReLU."""
    return mlp(dim, hp["hidden"], heads, hidden_layers=hp["hidden_layers"])


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


# ------------------------------------------------------------------------------------------------------------
# the sparse decode engine's mask source
# ------------------------------------------------------------------------------------------------------------
# current: layer l's input; last: layer l−M's input (predictions made M layers ahead); time: layer l's input at the
# previous token, kept across steps in a persistent buffer (and taken from the last prompt token after prefill, as
# the masked engine carries it).
class TimewiseSource(DejaVuSource):
    """Head predictors only (neurons dense). current/last: as dejavu's with source layer l or l−M (the residual
    stream entering it; `last` runs M layers ahead on the second stream); time: each layer's predictor reads that
    layer's input at the previous token (persistent buffers), so every layer's prediction can start at the
    beginning of the step, on the second stream, layer by layer."""

    kind = "timewise"

    def __init__(self, variant: str, predictors: dict, lookback: int, counts):
        super().__init__(predictors, {}, counts, lambda layer: ("layer_input", source_layer(variant, layer, lookback)))
        self.variant = variant

    def _bind(self, engine):
        if self.variant != "time":
            return super()._bind(engine)
        self.groups = {l: self.group([(("heads", l), Folded.of(p))]) for l, p in self.attn.items()}
        self.previous = {l: self.buffer() for l in self.attn}
        self.keep = {("heads", l): self.keep_spec(("heads", l)) for l in self.attn}

    def prefill_layer(self, layer, hidden):
        if self.variant == "time" and layer in self.attn:
            self.previous[layer].copy_(hidden[:, -1])

    def begin_step(self, engine):
        if self.variant == "time":
            for l in sorted(self.groups):
                self.chosen.update(self.side.fork(("time", l), self.groups[l].run, self.previous[l], self.keep))

    def __call__(self, layer, hidden):
        if self.variant != "time":
            return super().__call__(layer, hidden)
        if layer not in self.attn:
            return self.all_heads, None
        self.side.join(("time", layer))
        self.previous[layer].copy_(hidden)  # after its use: the next token reads this one
        return self.chosen[("heads", layer)], None

    def neuron_masks(self, layer, hidden):
        if self.variant != "time":
            super().neuron_masks(layer, hidden)  # head predictors reading this layer's MLP input (none today)
        return self.all_neurons  # timewise predicts heads only


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
        """(N, d) predictor inputs of every traced token (for `time`: its previous token's; rows of tokens
        whose previous token was not traced are not used, see `_usable`)."""
        x = traces.layer_input(source_layer(self.variant, layer, self.hp()["M"]))
        return x[traces.previous().clamp(min=0)] if self.variant == "time" else x

    def _usable(self, traces, index: torch.Tensor) -> torch.Tensor:
        """The tokens of `index` a predictor can be trained or judged on (`time` needs the previous token)."""
        return index[traces.previous()[index] >= 0] if self.variant == "time" else index

    def _layers(self, ctx, allocation):
        return [l for l in range(ctx.model.config.num_hidden_layers) if l not in allocation.dense_layers]

    def fit(self, ctx, allocation):
        if allocation.heads == 0:
            return None
        config, hp = ctx.model.config, self.hp()
        k = keep_count(allocation.heads, config.num_attention_heads)
        layers = self._layers(ctx, allocation)
        inputs = {**trace_key(ctx), "variant": self.variant, "seed": ctx.seed, "hp": hp, "keep_heads": k,
                  "layers": layers, "fit_version": 3}

        def build():
            traces = ctx.session.memo("traces", lambda: collect_traces(ctx))
            train, val = (self._usable(traces, index) for index in traces.split(hp["val_fraction"], ctx.seed))
            predictors = [seeded(lambda: timewise_predictor(config.hidden_size, config.num_attention_heads, hp),
                                 ctx.seed * 1000 + layer) for layer in layers]
            x = torch.stack([self._inputs(traces, layer).half() for layer in layers])  # (layers, N, d)
            labels = top_k(traces.head_norm()[:, layers].float(), k).transpose(0, 1)  # (layers, N, H)
            with stage(f"timewise:{self.variant} predictors ({len(layers)} layers at once)", hp["epochs"], ctx.log,
                       unit="epochs") as bar:
                metrics = train_classifiers(predictors, x[:, train], labels[:, train], x[:, val], labels[:, val], k=k,
                                            epochs=hp["epochs"], lr=hp["lr"], batch_size=hp["batch_size"],
                                            patience=hp["patience"], seed=ctx.seed, device=ctx.session.device,
                                            progress=bar.advance)
            dtype = storage_dtype(ctx.session.dtype)
            tensors = {}
            for layer, predictor in zip(layers, predictors):
                tensors.update(save(f"heads.{layer}", predictor, dtype))
            return tensors, {"validation": dict(zip(layers, metrics)), "calib_protocol": "lmtext", **traces.sampling}

        return ctx.cache.get_or_build("timewise", inputs, build)

    def footprint(self, model_config, run_config, allocation, seed):
        from harness.footprint import Need, predictor_training_gpu
        from harness.traces import kept_tokens, run_dtype, store_bytes, trace_need

        if allocation.heads == 0:
            return {}
        hp, heads = self.hp(), model_config.num_attention_heads
        dtype = run_dtype(run_config)
        layers = model_config.num_hidden_layers - len(set(allocation.dense_layers))
        d, h = model_config.hidden_size, hp["hidden"]
        tokens = kept_tokens(model_config, run_config)
        params = layers * (d * h + h + (hp["hidden_layers"] - 1) * (h * h + h) + h * heads + heads)
        gpu = predictor_training_gpu(params, layers * hp["batch_size"] * (hp["hidden_layers"] * h + 2 * heads) * 4,
                                     layers * tokens * (2 * d + heads))
        label = ("timewise", self.variant, seed, keep_count(allocation.heads, heads))
        return {("traces",): trace_need(model_config, run_config),
                label: Need(f"timewise:{self.variant} predictors", disk=params * store_bytes(dtype), gpu=gpu,
                            settings="calib_budget_gb,hidden,batch_size")}

    def _predictors(self, ctx, artefact) -> dict:
        config = ctx.model.config
        layers = sorted({int(name.split(".")[1]) for name in artefact.tensors})
        hp = self.hp()
        weights = predictor_weights(self.settings)  # 8-bit weights (fake-quantized) when set
        return {l: load(artefact.tensors, f"heads.{l}", timewise_predictor(config.hidden_size, config.num_attention_heads,
                                                                            hp), weights) for l in layers}

    def policy(self, ctx, allocation, artefact):
        if artefact is None:
            return None
        return TimewisePolicy(self.variant, self._predictors(ctx, artefact), self.hp()["M"])

    def decode_source(self, policy, allocation, model):
        config = model.config
        counts = keep_counts(allocation, config.num_hidden_layers, config.num_attention_heads, config.ffn_dim,
                             neurons=False)
        return TimewiseSource(policy.variant, policy.predictors, policy.lookback, counts)

    def quality(self, ctx, allocation, artefact) -> dict:
        if artefact is None:
            return {}
        config = ctx.model.config
        traces = ctx.session.memo("traces", lambda: collect_traces(ctx))
        _, val = traces.split(self.hp()["val_fraction"], ctx.seed)
        val = self._usable(traces, val)
        predictors = self._predictors(ctx, artefact)
        k = keep_count(allocation.heads, config.num_attention_heads)
        with torch.no_grad():
            predicted = [p(self._inputs(traces, l)[val]) for l, p in predictors.items()]
        report = {"heads": layer_report(predicted, [traces.head_norm(l)[val] for l in predictors], k, list(predictors))}
        one = next(iter(predictors.values()))
        report["heads"]["predictor"] = {"params": parameter_count(one) * len(predictors),
                                        "flops_per_token": linear_flops(one) * len(predictors)}
        return report
