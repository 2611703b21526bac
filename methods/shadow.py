"""shadow (ShadowLLM, Akhauri et al. 2024): one predictor for the whole model.

It reads layer 0's attention output at the current token and predicts the importance of every head and
neuron of every later layer (one hidden layer, 2048 units by default, then separate output heads for heads
and neurons), trained with MSE on per-layer min-max normalised criterion scores (default `plainact`:
|A·∂L/∂A| per head and the weight-based |θ·∂L/∂θ| of fc1 rows per neuron, as in ShadowLLM), AdamW and a
cosine schedule. Layer 0 stays dense. Allocation local or global (the scores of all layers are known once
layer 0's attention has run). The predictor does not depend on the target and is shared across sparsities.
"""
from __future__ import annotations

import torch
from torch import nn

from harness.engine import MaskPolicy
from harness.progress import stage
from harness.traces import collect_scores, collect_traces, trace_key
from methods import Method, register
from methods.criteria import CRITERIA
from methods.predictors import (Predictor, PredictorPolicyMixin, keep_count, layer_report, linear_flops, load,
                                parameter_count, save, seeded, storage_dtype, train_regressor)

DEFAULTS = {"hidden": 2048, "epochs": 20, "lr": 1e-3, "batch_size": 256, "val_fraction": 0.1}


class ShadowNet(nn.Module):
    def __init__(self, dim: int, hidden: int, layers: int, heads: int, ffn: int):
        super().__init__()
        self.shape = (layers, heads, ffn)
        self.trunk = nn.Sequential(nn.Linear(dim, hidden), nn.ReLU())
        self.heads = nn.Linear(hidden, layers * heads)
        self.neurons = nn.Linear(hidden, layers * ffn)

    def forward(self, x):
        z = self.trunk(x)
        return torch.cat([self.heads(z), self.neurons(z)], dim=-1)


def shadow_predictor(config, hidden: int) -> Predictor:
    net = ShadowNet(config.hidden_size, hidden, config.num_hidden_layers, config.num_attention_heads, config.ffn_dim)
    return Predictor(net, config.hidden_size)


def minmax(scores: torch.Tensor) -> torch.Tensor:
    """Per token and layer: (s - min) / (max - min) over the layer's units (0 where the layer's scores are flat)."""
    low, high = scores.amin(-1, keepdim=True), scores.amax(-1, keepdim=True)
    return (scores - low) / (high - low).clamp(min=1e-12)


def split(out: torch.Tensor, config) -> tuple[torch.Tensor, torch.Tensor]:
    layers, heads = config.num_hidden_layers, config.num_attention_heads
    lead = out.shape[:-1]
    return out[..., :layers * heads].reshape(*lead, layers, heads), out[..., layers * heads:].reshape(*lead, layers, -1)


class ShadowPolicy(PredictorPolicyMixin, MaskPolicy):
    needs = frozenset({"attn_output"})

    def __init__(self, predictor: Predictor, config):
        self.predictor, self.config = {0: predictor}, config

    def predictions(self, state) -> dict:
        if "shadow" not in state.captures:
            x = state.captures[("attn_output", 0)]
            heads, neurons = split(self._on(self.predictor, x)[0](x), self.config)
            state.captures["shadow"] = {"heads": heads, "neurons": neurons}
        return state.captures["shadow"]

    def head_scores(self, layer, state, head_out):
        return self.predictions(state)["heads"][:, :, layer]

    def neuron_scores(self, layer, state, act):
        return self.predictions(state)["neurons"][:, :, layer]

    def global_scores(self, unit, state):
        return self.predictions(state)[unit]


@register
class Shadow(Method):
    name = "shadow"
    variants = CRITERIA
    default_variant = "plainact"
    allocations = frozenset({"local", "global"})
    seeded = True
    description = "ShadowLLM: one predictor on layer 0's attention output for every later head and neuron (MSE on criterion)"

    def hp(self) -> dict:
        return {**DEFAULTS, **{k: v for k, v in self.settings.items() if k in DEFAULTS}}

    @property
    def criterion(self) -> str:
        return "plainact_weight" if self.variant == "plainact" else self.variant  # ShadowLLM's neuron plainact

    def adjust(self, allocation):
        from dataclasses import replace

        return replace(allocation, dense_layers=tuple(sorted(set(allocation.dense_layers) | {0})))

    def _targets(self, ctx, index, device="cpu"):
        """Per-layer min-max normalised scores (float32) of the traced tokens `index`: heads (n, L, H), neurons (n, L, F)."""
        scores = collect_scores(ctx, self.criterion)
        index = index.to(scores["heads"].device)
        heads = minmax(scores["heads"][index].to(device).float())
        neurons = minmax(scores["neurons"][index].to(device).float())
        return heads, neurons

    def fit(self, ctx, allocation):
        config, hp = ctx.model.config, self.hp()
        inputs = {**trace_key(ctx), "criterion": self.criterion, "seed": ctx.seed, "hp": hp, "fit_version": 2}

        def build():
            traces = ctx.session.memo("traces", lambda: collect_traces(ctx))
            train, _ = traces.split(hp["val_fraction"], ctx.seed)
            device = ctx.session.device
            width = config.num_hidden_layers * config.num_attention_heads

            scores = {unit: t[train].to(device) for unit, t in collect_scores(ctx, self.criterion).items()}

            def target(batch):  # normalised on the device batch by batch (float32 of all tokens: 3.3 MB a token at 13B)
                batch = batch.to(device)
                heads, neurons = (minmax(scores[unit][batch].float()) for unit in ("heads", "neurons"))
                return torch.cat([heads.flatten(1), neurons.flatten(1)], dim=-1)

            def loss(pred, target):  # heads and neurons weigh the same, whatever their counts
                mse = nn.functional.mse_loss
                return mse(pred[:, :width], target[:, :width]) + mse(pred[:, width:], target[:, width:])

            predictor = seeded(lambda: shadow_predictor(config, hp["hidden"]), ctx.seed)
            with stage("shadow predictor", hp["epochs"], ctx.log, unit="epochs") as bar:
                final = train_regressor(predictor, traces.attn_output0()[train], target, epochs=hp["epochs"], lr=hp["lr"],
                                        batch_size=hp["batch_size"], seed=ctx.seed, device=device, loss_fn=loss,
                                        progress=bar.advance)
            return save("shadow", predictor, storage_dtype(ctx.session.dtype)), {
                "train_loss": final, "params": parameter_count(predictor), "flops_per_token": linear_flops(predictor),
                **traces.sampling}

        return ctx.cache.get_or_build("shadow", inputs, build)

    def footprint(self, model_config, run_config, allocation, seed):
        from harness.footprint import Need, predictor_training_gpu
        from harness.traces import (kept_tokens, run_dtype, score_bytes_per_token, score_need, store_bytes,
                                    trace_need)

        hp = self.hp()
        dtype = run_dtype(run_config)
        d, h = model_config.hidden_size, hp["hidden"]
        outputs = model_config.num_hidden_layers * (model_config.num_attention_heads + model_config.ffn_dim)
        tokens = kept_tokens(model_config, run_config)
        params = d * h + h + h * outputs + outputs
        gpu = predictor_training_gpu(params, hp["batch_size"] * (h + 3 * outputs) * 4,
                                     tokens * (score_bytes_per_token(model_config) + 2 * d))
        return {("traces",): trace_need(model_config, run_config),
                ("trace_scores", self.criterion): score_need(model_config, run_config, self.criterion),
                ("shadow", self.criterion, seed): Need("shadow predictor", disk=params * store_bytes(dtype), gpu=gpu,
                                                       settings="calib_budget_gb,hidden,batch_size")}

    def policy(self, ctx, allocation, artefact):
        config = ctx.model.config
        return ShadowPolicy(load(artefact.tensors, "shadow", shadow_predictor(config, self.hp()["hidden"])), config)

    def quality(self, ctx, allocation, artefact) -> dict:
        config = ctx.model.config
        traces = ctx.session.memo("traces", lambda: collect_traces(ctx))
        _, val = traces.split(self.hp()["val_fraction"], ctx.seed)
        predictor = load(artefact.tensors, "shadow", shadow_predictor(config, self.hp()["hidden"]))
        device = ctx.session.device
        with torch.no_grad():
            heads, neurons = split(predictor.to(device)(traces.attn_output0()[val].to(device)).cpu(), config)
        predictor.cpu()
        true_heads, true_neurons = self._targets(ctx, val)
        layers = [l for l in range(config.num_hidden_layers) if l not in self.adjust(allocation).dense_layers]
        report = {}
        for name, pred, true, fraction, size in (("heads", heads, true_heads, allocation.heads, config.num_attention_heads),
                                                 ("neurons", neurons, true_neurons, allocation.neurons, config.ffn_dim)):
            report[name] = layer_report([pred[:, l] for l in layers], [true[:, l] for l in layers],
                                        keep_count(fraction, size), layers)
        report["predictor"] = {"params": parameter_count(predictor), "flops_per_token": linear_flops(predictor)}
        return report
