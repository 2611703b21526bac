"""dejavu (Liu et al., ICML 2023): per-layer lookahead predictors of the heads and neurons to keep.

Two linear layers (d → hidden ≈ 1000 → H or F) per layer and unit, trained with class-weighted BCE and
AdamW, early stopping on validation recall, on traces of the dense model:
  heads:   labels = the top-k heads by output norm at the target sparsity (k kept), input = the attention
           input of layer l−1 (layer 0 reads its own), so it can run one layer ahead;
  neurons: labels = fc1 activation > 0, input = layer l's attention input.
At apply time the top-k predicted units are kept (a fixed count per layer, as the sparse engine needs).
Neuron predictors do not depend on the target and are shared across sparsities.
"""
from __future__ import annotations

import torch

from harness.artefacts import Artefact
from harness.engine import MaskPolicy
from harness.progress import stage
from harness.traces import collect_traces, trace_key, unpack_bits
from methods import Method, register
from methods.predictors import (PredictorPolicyMixin, keep_count, layer_report, linear_flops, load, low_rank,
                                parameter_count, save, seeded, storage_dtype, top_k, train_classifiers)

DEFAULTS = {"hidden": 1000, "epochs": 20, "lr": 1e-3, "batch_size": 256, "patience": 3, "val_fraction": 0.1}


def head_source(layer: int) -> int:
    return max(layer - 1, 0)


class DejaVuPolicy(PredictorPolicyMixin, MaskPolicy):
    needs = frozenset({"layer_input"})

    def __init__(self, attn: dict, mlp: dict):
        self.attn, self.mlp = attn, mlp

    def head_scores(self, layer, state, head_out):
        if layer not in self.attn:
            return None
        x = state.captures[("layer_input", head_source(layer))]
        return self._on(self.attn, x)[layer](x)

    def neuron_scores(self, layer, state, act):
        if layer not in self.mlp:
            return None
        x = state.captures[("layer_input", layer)]
        return self._on(self.mlp, x)[layer](x)


@register
class DejaVu(Method):
    name = "dejavu"
    seeded = True
    description = "Deja Vu: per-layer low-rank lookahead predictors (BCE) of heads (top-k by norm) and active neurons"

    def hp(self) -> dict:
        return {**DEFAULTS, **{k: v for k, v in self.settings.items() if k in DEFAULTS}}

    def sparse_layers(self, ctx, allocation) -> list[int]:
        return [l for l in range(ctx.model.config.num_hidden_layers) if l not in allocation.dense_layers]

    def fit(self, ctx, allocation):
        config = ctx.model.config
        hp, layers = self.hp(), self.sparse_layers(ctx, allocation)
        base = {**trace_key(ctx), "seed": ctx.seed, "hp": hp, "layers": layers, "fit_version": 2}
        tensors, meta, path = {}, {"hp": hp}, None
        if allocation.heads > 0:
            k = keep_count(allocation.heads, config.num_attention_heads)
            art = ctx.cache.get_or_build("dejavu-attn", {**base, "keep_heads": k},
                                         lambda: self._train(ctx, "attn", layers, k))
            tensors.update(art.tensors)
            meta["attn"], path = art.meta, art.path
        if allocation.neurons > 0:
            art = ctx.cache.get_or_build("dejavu-mlp", base, lambda: self._train(ctx, "mlp", layers, None))
            tensors.update(art.tensors)
            meta["mlp"], path = art.meta, path or art.path
        return Artefact(tensors, meta, path)

    def footprint(self, model_config, run_config, allocation, seed):
        from harness.footprint import Need, predictor_training_gpu
        from harness.traces import kept_tokens, run_dtype, store_bytes, trace_need

        hp = self.hp()
        dtype = run_dtype(run_config)
        layers = model_config.num_hidden_layers - len(set(allocation.dense_layers))
        d, h = model_config.hidden_size, hp["hidden"]
        tokens = kept_tokens(model_config, run_config)
        needs = {("traces",): trace_need(model_config, run_config)}
        for unit, fraction, out in (("attn", allocation.heads, model_config.num_attention_heads),
                                    ("mlp", allocation.neurons, model_config.ffn_dim)):
            if fraction <= 0:
                continue
            params = layers * (d * h + h * out)
            gpu = predictor_training_gpu(params, layers * hp["batch_size"] * (h + 2 * out) * 4,
                                         layers * tokens * (2 * d + out // 8 + 1))
            label = ("dejavu-" + unit, seed, keep_count(fraction, out) if unit == "attn" else None)
            needs[label] = Need(f"dejavu {unit} predictors", disk=params * store_bytes(dtype), gpu=gpu,
                                settings="calib_budget_gb,hidden,batch_size")
        return needs

    @staticmethod
    def _input(traces, unit, layer):
        return traces.layer_input(head_source(layer) if unit == "attn" else layer)

    def _train(self, ctx, unit, layers, k):
        """All layers' predictors of one unit trained at once (batched matmuls) on the session's device."""
        config = ctx.model.config
        hp, traces = self.hp(), ctx.session.memo("traces", lambda: collect_traces(ctx))
        device = ctx.session.device
        train, val = traces.split(hp["val_fraction"], ctx.seed)
        out = config.num_attention_heads if unit == "attn" else config.ffn_dim
        predictors = [seeded(lambda: low_rank(config.hidden_size, hp["hidden"], out), ctx.seed * 1000 + layer)
                      for layer in layers]
        sources = [head_source(l) for l in layers] if unit == "attn" else list(layers)
        x = traces.layer_input()[:, sources].transpose(0, 1)  # (layers, N, d)
        if unit == "attn":
            labels = top_k(traces.head_norm()[:, layers].float(), k).transpose(0, 1)  # (layers, N, H)
            y, val_y = labels[:, train], labels[:, val]
        else:
            packed = traces.neuron_active_packed()[:, layers]  # (N, layers, F/8)
            train_bits, val_bits = packed[train].to(device), packed[val].to(device)
            y = lambda index: unpack_bits(train_bits[index.to(device)], out).transpose(0, 1)  # noqa: E731
            val_y = lambda index: unpack_bits(val_bits[index.to(device)], out).transpose(0, 1)  # noqa: E731
        with stage(f"dejavu {unit} predictors ({len(layers)} layers at once)", hp["epochs"], ctx.log,
                   unit="epochs") as bar:
            metrics = train_classifiers(predictors, x[:, train], y, x[:, val], val_y, k=k, epochs=hp["epochs"],
                                        lr=hp["lr"], batch_size=hp["batch_size"], patience=hp["patience"],
                                        seed=ctx.seed, device=device, progress=bar.advance)
        metrics = dict(zip(layers, metrics))
        ctx.log(f"dejavu {unit}: trained {len(layers)} predictors, mean validation recall "
                f"{sum(m['recall'] for m in metrics.values()) / len(metrics):.3f}")
        dtype = storage_dtype(ctx.session.dtype)
        tensors = {}
        for layer, predictor in zip(layers, predictors):
            tensors.update(save(f"{unit}.{layer}", predictor, dtype))
        return tensors, {"validation": metrics, "params_per_layer": parameter_count(predictors[0]),
                         "flops_per_token_per_layer": linear_flops(predictors[0]), **traces.sampling}

    def _predictors(self, ctx, artefact, unit):
        config = ctx.model.config
        out = config.num_attention_heads if unit == "attn" else config.ffn_dim
        layers = sorted({int(name.split(".")[1]) for name in artefact.tensors if name.startswith(unit + ".")})
        hidden = self.hp()["hidden"]
        return {l: load(artefact.tensors, f"{unit}.{l}", low_rank(config.hidden_size, hidden, out)) for l in layers}

    def policy(self, ctx, allocation, artefact):
        return DejaVuPolicy(self._predictors(ctx, artefact, "attn"), self._predictors(ctx, artefact, "mlp"))

    def quality(self, ctx, allocation, artefact) -> dict:
        """Selected (top-k) vs oracle sets on the validation tokens, per layer and over all layers."""
        config = ctx.model.config
        traces = ctx.session.memo("traces", lambda: collect_traces(ctx))
        _, val = traces.split(self.hp()["val_fraction"], ctx.seed)
        report = {}
        for unit, name, fraction, size in (("attn", "heads", allocation.heads, config.num_attention_heads),
                                           ("mlp", "neurons", allocation.neurons, config.ffn_dim)):
            predictors = self._predictors(ctx, artefact, unit)
            if not predictors:
                continue
            k = keep_count(fraction, size)
            predicted, oracle = [], []
            device = ctx.session.device
            with torch.no_grad():
                for layer, predictor in predictors.items():
                    x = self._input(traces, unit, layer)
                    predicted.append(predictor.to(device)(x[val].to(device)).cpu())
                    predictor.cpu()
                    oracle.append(traces.head_norm(layer)[val] if unit == "attn" else traces.neuron_active(layer)[val])
            report[name] = layer_report(predicted, oracle, k, list(predictors))
            any_predictor = next(iter(predictors.values()))
            report[name]["predictor"] = {"params": parameter_count(any_predictor) * len(predictors),
                                         "flops_per_token": linear_flops(any_predictor) * len(predictors)}
        return report
