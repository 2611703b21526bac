"""shadow (ShadowLLM, Akhauri et al. 2024): one predictor for the whole model.

It reads layer 0's attention output at the current token and predicts the importance of every head and
neuron of every later layer (one hidden layer, 2048 units by default, then separate output heads for heads
and neurons), trained with MSE on per-layer min-max normalised criterion scores (default `plainact`:
‖A·∂L/∂A‖₁ per head and the weight-based ‖θ·∂L/∂θ‖₁ of fc1 rows per neuron, as in ShadowLLM), AdamW and a
cosine schedule. Layer 0 stays dense. Allocation local or global (the scores of all layers are known once
layer 0's attention has run). The predictor does not depend on the target and is shared across sparsities.

Calibration (the `calibration` setting):
  fewshot (default): ShadowLLM's own protocol (§5.2, §6, Figure 14): the criteria are collected on few-shot
    examples of the 7 downstream tasks (harness/fewshot.py: about 3000 5-shot examples in lm-eval's prompt format,
    drawn from the tasks' training/validation documents, never the evaluated ones), with the loss on the target
    output only, and read at the last sequence index before the target, per example (methods.criteria
    .score_targets); the predictor's input is layer 0's attention output at that token, its target the example's
    scores. ShadowLLM's training recipe (Table 3): 100 epochs, batch 32.
  lmtext (`shadow:lmtext`, or `calibration: lmtext` with another criterion): the earlier protocol: per-token scores
    of language-model calibration text (`calib_data`, loss = next-token cross-entropy), every traced token a
    training row (20 epochs, batch 256).
"""
from __future__ import annotations

import torch
from torch import nn

from harness.engine import MaskPolicy
from harness.errors import HarnessError
from harness.progress import stage
from harness.traces import collect_scores, collect_traces, trace_key
from kernels.sources import AfterLayerZero, Folded, Group, keep_counts
from methods import Method, register
from methods.criteria import ALIASES, CRITERIA
from methods.predictors import (Predictor, PredictorPolicyMixin, example_split, keep_count, layer_report,
                                linear_flops, load, minmax, parameter_count, predictor_weights, save, seeded,
                                storage_dtype, train_regressor)

DEFAULTS = {"hidden": 2048, "epochs": 20, "lr": 1e-3, "batch_size": 256, "val_fraction": 0.1, "score_tokens": 2048}
#: ShadowLLM's Table 3 for its few-shot examples (3000 rows, not tens of thousands of tokens)
FEWSHOT_TRAINING = {"epochs": 100, "batch_size": 32}
PROTOCOLS = ("fewshot", "lmtext")


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


# ------------------------------------------------------------------------------------------------------------
# the sparse decode engine's mask source
# ------------------------------------------------------------------------------------------------------------
# Layer 0 stays dense; after layer 0's attention the engine calls `neuron_masks(0, h)` with the residual stream
# after attention, the source subtracts the layer input it kept (= layer 0's attention output, the masked engine's
# `attn_output`), runs the one predictor and ranks the heads and neurons of every later layer at once.
class ShadowSource(AfterLayerZero):
    """ShadowLLM: one predictor (trunk, then every later layer's head and neuron outputs) on layer 0's attention
    output. Its output rows are split by layer at bind time, so the trunk runs once and each layer's rows are one
    fork (one GEMV and two selections) that runs beside the layers before it."""

    kind = "shadow"

    def __init__(self, predictor, counts, num_layers: int, num_heads: int, dense_layers):
        super().__init__(counts)
        self.predictor, self.L, self.H = predictor, num_layers, num_heads
        self.dense = set(dense_layers)

    def _bind(self, engine):
        self._bind_common()
        sparse = [l for l in range(self.L) if l not in self.dense]
        kh = {self.counts[l][0] for l in sparse}
        kf = {self.counts[l][1] for l in sparse}
        if len(kh) > 1 or len(kf) > 1:
            raise HarnessError("shadow's mask source needs the same keep count in every sparse layer (local allocation)")
        self.kh, self.kf = next(iter(kh), engine.num_heads), next(iter(kf), engine.ffn_dim)
        if self.predictor is not None:  # folded once; a second engine (e.g. without a CUDA graph) reuses it
            self.folded = Folded.of(self.predictor).to(self.device, self.dtype)
        self.predictor = None  # the folded copy is all the step needs (memory: 2.8 G parameters at opt-30b)
        (relu, w, b), = self.folded.tail
        L, H, Fd = self.L, self.H, engine.ffn_dim
        tails = []
        for l in sparse:  # rows of layer l: its H head outputs, then its F neuron outputs
            if self.kh < H:
                tails.append((("heads", l), [(relu, w[l * H:(l + 1) * H], b[l * H:(l + 1) * H])]))
            if self.kf < Fd:
                rows = slice(L * H + l * Fd, L * H + (l + 1) * Fd)
                tails.append((("neurons", l), [(relu, w[rows], b[rows])]))
        self.trunk = (Group.shared(self.folded, tails).bind(self.batch, self.backend, self.combine)
                      if tails else None)
        self.keep = {key: self.keep_spec(key) for key, _ in tails}
        self.layers = sorted({key[1] for key, _ in tails})
        if self.plans:  # global: every layer's outputs at once, per unit
            whole = {"heads": slice(0, L * H), "neurons": slice(L * H, L * H + L * Fd)}
            self.full = Group.shared(self.folded, [(unit, [(relu, w[whole[unit]], b[whole[unit]])])
                                                   for unit in self.plans]).bind(self.batch, self.backend)

    def _all_scores(self, x0):
        return {unit: scores.view(scores.shape[0], self.L, -1) for unit, scores in self.full(x0).items()}

    def _forks(self):
        if self.trunk is None:
            return []
        run = self.trunk.run
        return [(l, lambda x, l=l, first=(i == 0): run(x, self.keep, keys={("heads", l), ("neurons", l)},
                                                        first=first))
                for i, l in enumerate(self.layers)]

    def predictor_bytes(self):
        return self.folded.nbytes()


@register
class Shadow(Method):
    name = "shadow"
    variants = CRITERIA + ("lmtext",)
    default_variant = "plainact"
    allocations = frozenset({"local", "global"})
    seeded = True
    description = ("ShadowLLM: one predictor on layer 0's attention output for every later head and neuron (MSE on "
                   "criterion), calibrated on few-shot task examples; shadow:lmtext on language-model text")

    @property
    def protocol(self) -> str:
        if self.variant == "lmtext":
            return "lmtext"
        protocol = self.settings.get("calibration", "fewshot")
        if protocol not in PROTOCOLS:
            raise HarnessError(f"shadow: unknown calibration {protocol!r}; valid: {', '.join(PROTOCOLS)}")
        return protocol

    def calibration_tasks(self) -> tuple[str, ...]:
        """The zero-shot tasks whose documents the fit reads (validated before a run starts)."""
        if self.protocol != "fewshot":
            return ()
        from harness.fewshot import settings_of

        return tuple(settings_of(self.settings)["tasks"])

    def hp(self) -> dict:
        fewshot = self.protocol == "fewshot"
        base = {**DEFAULTS, **(FEWSHOT_TRAINING if fewshot else {})}
        hp = {**base, **{k: v for k, v in self.settings.items() if k in DEFAULTS}}
        if fewshot:
            from harness.fewshot import settings_of

            hp["fewshot"] = settings_of(self.settings)
        return hp

    @property
    def criterion(self) -> str:
        if self.variant == "lmtext":
            return "plainact_weight"
        return "plainact_weight" if self.variant == "plainact" else self.variant  # ShadowLLM's neuron plainact

    def adjust(self, allocation):
        from dataclasses import replace

        return replace(allocation, dense_layers=tuple(sorted(set(allocation.dense_layers) | {0})))

    # -- the calibration data: (inputs, scores) of the training rows ------------------------------------------------
    def _rows(self, ctx):
        """(x (N, E) layer 0's attention output, {"heads": (N, L, H), "neurons": (N, L, F)} criterion scores in their
        stored precision, train index, validation index, what the records say about the calibration)."""
        hp = self.hp()
        if self.protocol == "fewshot":
            from harness.fewshot import calibration_set, keep_scores, record_fields
            from methods.criteria import fit_target_scores

            fewshot = calibration_set(ctx, self.settings)
            scores = fit_target_scores(ctx, fewshot, self.criterion, hp["score_tokens"], keep_scores(self.settings))
            train, val = example_split(scores["heads"].shape[0], hp["val_fraction"], ctx.seed)
            return (scores["attn_output0"], {u: scores[u] for u in ("heads", "neurons")}, train, val,
                    record_fields(fewshot))
        traces = ctx.session.memo("traces", lambda: collect_traces(ctx))
        train, val = traces.split(hp["val_fraction"], ctx.seed)
        return traces.attn_output0(), collect_scores(ctx, self.criterion), train, val, {
            "calib_protocol": "lmtext", **traces.sampling}

    def _key(self, ctx) -> dict:
        hp = self.hp()
        if self.protocol == "fewshot":
            from harness.fewshot import calibration_set
            from harness.models import dtype_name
            from methods.criteria import CRITERIA_VERSION

            fewshot = calibration_set(ctx, self.settings)
            return {"model": ctx.session.model_identity, "dtype": dtype_name(ctx.session.dtype),
                    "calibration": "fewshot", "fewshot": fewshot.fingerprint,
                    "criterion": ALIASES.get(self.criterion, self.criterion), "criteria_version": CRITERIA_VERSION,
                    "seed": ctx.seed, "hp": hp, "fit_version": 3}
        return {**trace_key(ctx), "criterion": self.criterion, "seed": ctx.seed, "hp": hp, "fit_version": 2}

    def _targets(self, scores, index, device="cpu"):
        """Per-layer min-max normalised scores (float32) of the rows `index`: heads (n, L, H), neurons (n, L, F)."""
        index = index.to(scores["heads"].device)
        heads = minmax(scores["heads"][index].to(device).float())
        neurons = minmax(scores["neurons"][index].to(device).float())
        return heads, neurons

    def fit(self, ctx, allocation):
        config, hp = ctx.model.config, self.hp()

        def build():
            x, scores, train, _, calibration = self._rows(ctx)
            device = ctx.session.device
            width = config.num_hidden_layers * config.num_attention_heads
            scores = {unit: t[train].to(device) for unit, t in scores.items()}

            def target(batch):  # normalised on the device batch by batch (float32 of all rows: 3.3 MB a row at 13B)
                batch = batch.to(device)
                heads, neurons = (minmax(scores[unit][batch].float()) for unit in ("heads", "neurons"))
                return torch.cat([heads.flatten(1), neurons.flatten(1)], dim=-1)

            def loss(pred, target):  # heads and neurons weigh the same, whatever their counts
                mse = nn.functional.mse_loss
                return mse(pred[:, :width], target[:, :width]) + mse(pred[:, width:], target[:, width:])

            predictor = seeded(lambda: shadow_predictor(config, hp["hidden"]), ctx.seed)
            with stage("shadow predictor", hp["epochs"], ctx.log, unit="epochs") as bar:
                final = train_regressor(predictor, x[train], target, epochs=hp["epochs"], lr=hp["lr"],
                                        batch_size=hp["batch_size"], seed=ctx.seed, device=device, loss_fn=loss,
                                        progress=bar.advance)
            return save("shadow", predictor, storage_dtype(ctx.session.dtype)), {
                "train_loss": final, "params": parameter_count(predictor), "flops_per_token": linear_flops(predictor),
                **calibration}

        return ctx.cache.get_or_build("shadow", self._key(ctx), build)

    def footprint(self, model_config, run_config, allocation, seed):
        from harness.fewshot import keep_scores
        from harness.footprint import Need, predictor_training_gpu
        from harness.traces import (backward_bytes, kept_tokens, run_dtype, score_bytes_per_token, score_need,
                                    store_bytes, trace_need)

        hp = self.hp()
        dtype = run_dtype(run_config)
        d, h = model_config.hidden_size, hp["hidden"]
        outputs = model_config.num_hidden_layers * (model_config.num_attention_heads + model_config.ffn_dim)
        params = d * h + h + h * outputs + outputs
        criterion = ALIASES.get(self.criterion, self.criterion)
        if self.protocol == "fewshot":
            rows = int(hp["fewshot"]["examples"])
            size = rows * (score_bytes_per_token(model_config) + 4 * d)
            needs = {("target_scores", criterion): Need(
                f"{criterion} scores of {rows} few-shot examples", host=size, disk=size if keep_scores(self.settings) else 0,
                gpu=backward_bytes(model_config, hp["score_tokens"]), settings="examples,score_tokens")}
        else:
            rows = kept_tokens(model_config, run_config)
            needs = {("traces",): trace_need(model_config, run_config),
                     ("trace_scores", self.criterion): score_need(model_config, run_config, self.criterion)}
        gpu = predictor_training_gpu(params, hp["batch_size"] * (h + 3 * outputs) * 4,
                                     rows * (score_bytes_per_token(model_config) + 2 * d))
        needs[("shadow", self.protocol, criterion, seed)] = Need(
            "shadow predictor", disk=params * store_bytes(dtype), gpu=gpu,
            settings="examples,hidden,batch_size" if self.protocol == "fewshot" else "calib_budget_gb,hidden,batch_size")
        return needs

    def policy(self, ctx, allocation, artefact):
        config = ctx.model.config
        predictor = load(artefact.tensors, "shadow", shadow_predictor(config, self.hp()["hidden"]),
                         predictor_weights(self.settings))  # 8-bit weights (fake-quantized) when set
        return ShadowPolicy(predictor, config)

    decode_allocations = frozenset({"local", "global"})  # ShadowLLM's own setting is global: one ranking a token

    def decode_source(self, policy, allocation, model):
        config = model.config
        L, H = config.num_hidden_layers, config.num_attention_heads
        counts = keep_counts(allocation, L, H, config.ffn_dim)
        source = ShadowSource(policy.predictor[0], counts, L, H, allocation.dense_layers)
        if allocation.mode == "global":
            source.global_allocation = allocation
        return source

    def quality(self, ctx, allocation, artefact) -> dict:
        config = ctx.model.config
        x, scores, _, val, _ = self._rows(ctx)
        predictor = load(artefact.tensors, "shadow", shadow_predictor(config, self.hp()["hidden"]),
                         predictor_weights(self.settings))
        device = ctx.session.device
        with torch.no_grad():
            heads, neurons = split(predictor.to(device)(x[val].float().to(device)).cpu(), config)
        predictor.cpu()
        true_heads, true_neurons = self._targets(scores, val)
        layers = [l for l in range(config.num_hidden_layers) if l not in self.adjust(allocation).dense_layers]
        report = {}
        for name, pred, true, fraction, size in (("heads", heads, true_heads, allocation.heads, config.num_attention_heads),
                                                 ("neurons", neurons, true_neurons, allocation.neurons, config.ffn_dim)):
            report[name] = layer_report([pred[:, l] for l in layers], [true[:, l] for l in layers],
                                        keep_count(fraction, size), layers)
        report["predictor"] = {"params": parameter_count(predictor), "flops_per_token": linear_flops(predictor)}
        return report
