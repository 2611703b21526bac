"""dejavu (Liu et al., ICML 2023): per-layer lookahead predictors of the heads and neurons to keep.

Two linear layers (d → hidden ≈ 1000 → H or F) per layer and unit, trained with class-weighted BCE and
AdamW, early stopping on validation recall, on traces of the dense model (language-model calibration text):
  heads:   labels = the top-k heads by output norm at the target sparsity (k kept). The input is Deja Vu's
           lookahead (the slides' Figure 2: "given the input to the MLP at block k, they predict the sparsity for
           the attention head at the next layer"): the heads of layer l are predicted from the MLP input of layer
           l−1 (the residual stream after l−1's attention); layer 0's from its own attention input.
           `dejavu:attn-input` reads the attention input of layer l−1 instead (the residual stream entering l−1).
  neurons: labels = fc1 activation > 0, input = layer l's attention input (the slides: "given the input to the
           attention layer at block k, they predict the contextual sparsity for the MLP at block k").
At apply time the top-k predicted units are kept (a fixed count per layer, as the sparse engine needs).
Neuron predictors do not depend on the target and are shared across sparsities and by both variants.

`dejavu:shadowllm` is ShadowLLM's own Deja Vu-style baseline (Akhauri et al. 2024, §4-5, Table 3, Figures 5, 7-8,
Table 2): per-layer predictors (one hidden layer of 2048 units, ReLU) of the heads and of the neurons of every
layer, trained with MSE (AdamW, cosine schedule, 100 epochs, batch 32) on per-layer min-max normalised L2Norm
(head output norm, |fc1 activation|) on ShadowLLM's few-shot calibration examples (harness/fewshot.py, read at
the last context token). Every per-layer predictor reads layer 0's attention output, as ShadowLLM's own
predictor does, so the scores of all layers are known once layer 0 has run: it allocates locally or globally
(global allocation ranks all layers' units at the first sparse layer, before later layers' inputs exist). Layer 0
stays dense. What separates it from `shadow:l2norm` is the predictor: one network per layer and unit
(N(E·p + p(H+F)) FLOPs a token, ShadowLLM's Table 1) instead of one for the whole model (E·p + p·N(H+F)).
"""
from __future__ import annotations

import torch

from harness.artefacts import Artefact
from harness.engine import MaskPolicy
from harness.errors import HarnessError
from harness.progress import stage
from harness.traces import collect_traces, trace_key, unpack_bits
from kernels.sources import AfterLayerZero, Folded, PredictorSource, keep_counts
from methods import Method, register
from methods.predictors import (PredictorPolicyMixin, example_split, keep_count, layer_report, linear_flops, load,
                                low_rank, minmax, mlp, parameter_count, predictor_weights, save, seeded, storage_dtype,
                                top_k, train_classifiers, train_regressors)

DEFAULTS = {"hidden": 1000, "epochs": 20, "lr": 1e-3, "batch_size": 256, "patience": 3, "val_fraction": 0.1}
#: dejavu:shadowllm: ShadowLLM's Table 3 (hidden layers 1, 2048 units, ReLU, 100 epochs, batch 32, AdamW 1e-3,
#: CosineAnnealingLR, MSELoss) and its calibration (harness.fewshot.SETTINGS: 3000 5-shot examples)
SHADOWLLM_DEFAULTS = {"hidden": 2048, "epochs": 100, "lr": 1e-3, "batch_size": 32, "val_fraction": 0.1,
                      "score_tokens": 2048}
SHADOWLLM_CRITERION = "l2norm"
#: where each variant's head predictor of layer l ≥ 1 reads (the masked engine's capture names), in layer l − 1
HEAD_INPUTS = {None: "mlp_input", "attn-input": "layer_input"}


def head_source(layer: int, head_input: str = "mlp_input") -> tuple[str, int]:
    """(capture name, layer) that the head predictor of `layer` reads: `head_input` of layer − 1; layer 0 reads its
    own attention input (nothing runs before it)."""
    return ("layer_input", 0) if layer == 0 else (head_input, layer - 1)


class DejaVuPolicy(PredictorPolicyMixin, MaskPolicy):
    def __init__(self, attn: dict, mlp: dict, head_input: str = "mlp_input"):
        if head_input not in ("mlp_input", "layer_input"):
            raise ValueError(f"unknown head predictor input {head_input!r}")
        self.attn, self.mlp, self.head_input = attn, mlp, head_input
        self.needs = frozenset({"layer_input", head_input})

    def head_reads(self, layer: int) -> tuple[str, int]:
        return head_source(layer, self.head_input)

    def head_scores(self, layer, state, head_out):
        if layer not in self.attn:
            return None
        x = state.captures[self.head_reads(layer)]
        return self._on(self.attn, x)[layer](x)

    def neuron_scores(self, layer, state, act):
        if layer not in self.mlp:
            return None
        x = state.captures[("layer_input", layer)]
        return self._on(self.mlp, x)[layer](x)


class LayerwiseShadowPolicy(PredictorPolicyMixin, MaskPolicy):
    """dejavu:shadowllm: per-layer predictors, all reading layer 0's attention output at the current token."""

    needs = frozenset({"attn_output"})

    def __init__(self, attn: dict, mlp: dict, num_layers: int):
        self.attn, self.mlp, self.num_layers = attn, mlp, num_layers

    def predictions(self, state, unit: str) -> dict:
        key = ("dejavu:shadowllm", unit)
        if key not in state.captures:
            x = state.captures[("attn_output", 0)]
            predictors = self.attn if unit == "heads" else self.mlp
            state.captures[key] = {l: p(x) for l, p in self._on(predictors, x).items()}
        return state.captures[key]

    def head_scores(self, layer, state, head_out):
        return self.predictions(state, "heads").get(layer) if layer in self.attn else None

    def neuron_scores(self, layer, state, act):
        return self.predictions(state, "neurons").get(layer) if layer in self.mlp else None

    def global_scores(self, unit, state):
        scores = self.predictions(state, unit)
        any_layer = next(iter(scores.values()))
        zero = torch.zeros_like(any_layer)  # layers without a predictor are dense (the engine protects them)
        return torch.stack([scores.get(l, zero) for l in range(self.num_layers)], dim=2)


# ------------------------------------------------------------------------------------------------------------
# the sparse decode engine's mask sources
# ------------------------------------------------------------------------------------------------------------
# dejavu: the lookahead (Deja Vu's Figure 2): at layer l the source reads the residual stream entering l (the
#   masked engine's `layer_input`) and runs layer l's MLP predictor (neurons of l); after l's attention it reads
#   the stream entering l's MLP (`mlp_input`, the engine's `neuron_masks` call) and runs layer l+1's attention
#   predictor (heads of l+1). Layer 0's heads come from layer 0's own input. `dejavu:attn-input` runs layer l+1's
#   attention predictor on layer l's input instead. Predictors that read the same tensor share one first matmul.
# dejavu:shadowllm: per-layer predictors that all read layer 0's attention output (as shadow's one predictor).
class DejaVuSource(PredictorSource):
    """Per-layer predictors run where their input exists in the step.

    attn / mlp: {layer: predictor} of heads / neurons. `head_reads(layer)` says where the head predictor of `layer`
    reads: ("layer_input", j) is the residual stream entering layer j (the engine's call at layer j), ("mlp_input",
    j) the stream entering layer j's MLP, after its attention (the engine's `neuron_masks(j)` call). Deja Vu's
    default reads ("mlp_input", l − 1) (layer 0: ("layer_input", 0)); `dejavu:attn-input` ("layer_input", l − 1).
    Neuron predictors of layer l read ("layer_input", l). Predictors that read the same tensor share one first
    GEMV. With `lookahead` the predictors of a read point run on the second stream from the moment their input
    exists, and the main stream waits for them only where their layer needs the indices: the neuron predictor
    of layer l beside l's attention, the head predictor of l + 1 beside l's MLP (Deja Vu's asynchronous
    lookahead)."""

    kind = "dejavu"

    def __init__(self, attn: dict, mlp: dict, counts, head_reads=None):
        super().__init__(counts)
        self.attn, self.mlp = attn, mlp
        self.head_reads = head_reads if head_reads is not None else head_source

    def _bind(self, engine):
        groups: dict[tuple, list] = {}
        for layer, predictor in sorted(self.attn.items()):
            point = tuple(self.head_reads(layer))
            if point[0] not in ("layer_input", "mlp_input") or (point[0] == "mlp_input" and point[1] >= layer) \
                    or point[1] > layer:
                raise HarnessError(f"the head predictor of layer {layer} reads {point}, which the decode step has "
                                   "not computed when that layer's heads are chosen")
            groups.setdefault(point, []).append((("heads", layer), Folded.of(predictor)))
        for layer, predictor in sorted(self.mlp.items()):
            groups.setdefault(("layer_input", layer), []).append((("neurons", layer), Folded.of(predictor)))
        self.groups = {point: self.group(members) for point, members in groups.items()}
        self.inputs = {point: self.buffer() for point in self.groups}  # one per point: a fork may outlive a layer
        self.keep = {key: self.keep_spec(key) for group in self.groups.values() for key in group.keys}
        self.ready: dict = {}  # member → the point whose fork computes it

    def _run(self, point, hidden) -> None:
        group = self.groups.get(point)
        if group is not None:
            x = self.inputs[point]
            x.copy_(hidden)  # the model-dtype copy the predictor reads (on the main stream, before the fork)
            self.chosen.update(self.side.fork(point, group.run, x, self.keep))
            self.ready.update((key, point) for key in group.keys)

    def _take(self, key):
        point = self.ready.pop(key, None)
        if point is None:
            return None
        self.side.join(point)
        return self.chosen[key]

    def __call__(self, layer, hidden):
        self._run(("layer_input", layer), hidden)
        heads = self._take(("heads", layer))
        return (heads if heads is not None else self.all_heads), None

    def neuron_masks(self, layer, hidden):
        """After layer `layer`'s attention: the predictors reading its MLP input start (heads of layer + 1)."""
        self._run(("mlp_input", layer), hidden)
        neurons = self._take(("neurons", layer))
        return neurons if neurons is not None else self.all_neurons

    def predictor_bytes(self):
        return sum(g.nbytes() for g in self.groups.values())


class LayerwiseShadowSource(AfterLayerZero):
    """ShadowLLM's Deja Vu-style baseline (`dejavu:shadowllm`): per-layer head and neuron predictors that all read
    layer 0's attention output (layer 0 dense); layer l's two predictors are one group (one first GEMV)."""

    kind = "dejavu:shadowllm"

    def __init__(self, attn: dict, mlp: dict, counts, dense_layers):
        super().__init__(counts)
        self.attn, self.mlp, self.dense = attn, mlp, set(dense_layers)
        if 0 not in self.dense:
            raise HarnessError("dejavu:shadowllm reads layer 0's attention output: layer 0 must stay dense")

    def _bind(self, engine):
        self.L = engine.num_layers
        self._bind_common()
        self.groups = {}
        for l in sorted(set(self.attn) | set(self.mlp)):
            if l in self.dense:
                continue
            members = [(("heads", l), Folded.of(self.attn[l]))] if l in self.attn else []
            members += [(("neurons", l), Folded.of(self.mlp[l]))] if l in self.mlp else []
            self.groups[l] = self.group(members)
        self.keep = {key: self.keep_spec(key) for g in self.groups.values() for key in g.keys}

    def _forks(self):
        return [(l, lambda x, g=g: g.run(x, self.keep)) for l, g in self.groups.items()]

    def _all_scores(self, x0):
        found = {}
        for g in self.groups.values():
            found.update(g(x0))
        out = {}
        for unit in self.plans:
            zero = torch.zeros(self.batch, self.units[unit], device=self.device, dtype=self.dtype)
            out[unit] = torch.stack([found.get((unit, l), zero) for l in range(self.L)], dim=1)  # dense: protected
        return out

    def predictor_bytes(self):
        return sum(g.nbytes() for g in self.groups.values())


@register
class DejaVu(Method):
    name = "dejavu"
    variants = ("attn-input", "shadowllm")
    seeded = True
    description = ("Deja Vu: per-layer low-rank lookahead predictors (BCE) of heads (top-k by norm, from the previous "
                   "layer's MLP input) and active neurons; :attn-input, :shadowllm (ShadowLLM's Deja Vu-style baseline)")

    def __init__(self, variant: str | None, settings: dict | None = None):
        super().__init__(variant, settings)
        if self.variant == "shadowllm":  # its scores of every layer are known after layer 0's attention
            self.allocations = frozenset({"local", "global"})

    def hp(self) -> dict:
        if self.variant == "shadowllm":
            from harness.fewshot import settings_of

            base = {**SHADOWLLM_DEFAULTS, **{k: v for k, v in self.settings.items() if k in SHADOWLLM_DEFAULTS}}
            return {**base, "fewshot": settings_of(self.settings)}
        return {**DEFAULTS, **{k: v for k, v in self.settings.items() if k in DEFAULTS}}

    def calibration_tasks(self) -> tuple[str, ...]:
        """The zero-shot tasks whose documents the fit reads (dejavu:shadowllm's few-shot examples)."""
        if self.variant != "shadowllm":
            return ()
        from harness.fewshot import settings_of

        return tuple(settings_of(self.settings)["tasks"])

    @property
    def head_input(self) -> str:
        return HEAD_INPUTS[self.variant]

    def adjust(self, allocation):
        if self.variant != "shadowllm":
            return allocation
        from dataclasses import replace

        return replace(allocation, dense_layers=tuple(sorted(set(allocation.dense_layers) | {0})))

    def sparse_layers(self, ctx, allocation) -> list[int]:
        return [l for l in range(ctx.model.config.num_hidden_layers) if l not in allocation.dense_layers]

    def fit(self, ctx, allocation):
        if self.variant == "shadowllm":
            return self._fit_shadowllm(ctx, allocation)
        config = ctx.model.config
        hp, layers = self.hp(), self.sparse_layers(ctx, allocation)
        base = {**trace_key(ctx), "seed": ctx.seed, "hp": hp, "layers": layers, "fit_version": 2}
        tensors, meta, path = {}, {"hp": hp, "calib_protocol": "lmtext"}, None
        if allocation.heads > 0:
            k = keep_count(allocation.heads, config.num_attention_heads)
            art = ctx.cache.get_or_build("dejavu-attn", {**base, "keep_heads": k, "head_input": self.head_input,
                                                         "fit_version": 3},
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

        if self.variant == "shadowllm":
            return self._footprint_shadowllm(model_config, run_config, allocation, seed)
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
            label = ("dejavu-" + unit, seed, keep_count(fraction, out) if unit == "attn" else None,
                     self.head_input if unit == "attn" else None)
            needs[label] = Need(f"dejavu {unit} predictors", disk=params * store_bytes(dtype), gpu=gpu,
                                settings="calib_budget_gb,hidden,batch_size")
        return needs

    def _input(self, traces, unit, layer):
        """(N, d) float32 input of the predictor of `layer` and `unit` for every traced token."""
        if unit != "attn":
            return traces.layer_input(layer)
        name, source = head_source(layer, self.head_input)
        return traces.layer_input(source) if name == "layer_input" else traces.mlp_input(source)

    def _stacked_input(self, traces, unit, layers) -> torch.Tensor:
        """(layers, N, d) inputs in their stored precision."""
        if unit != "attn":
            return traces.layer_input()[:, layers].transpose(0, 1)
        stored = {"layer_input": traces.layer_input(), "mlp_input": traces.mlp_input()}
        return torch.stack([stored[name][:, source] for name, source in (head_source(l, self.head_input)
                                                                          for l in layers)])

    def _train(self, ctx, unit, layers, k):
        """All layers' predictors of one unit trained at once (batched matmuls) on the session's device."""
        config = ctx.model.config
        hp, traces = self.hp(), ctx.session.memo("traces", lambda: collect_traces(ctx))
        device = ctx.session.device
        train, val = traces.split(hp["val_fraction"], ctx.seed)
        out = config.num_attention_heads if unit == "attn" else config.ffn_dim
        predictors = [seeded(lambda: low_rank(config.hidden_size, hp["hidden"], out), ctx.seed * 1000 + layer)
                      for layer in layers]
        x = self._stacked_input(traces, unit, layers)  # (layers, N, d)
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
                         "flops_per_token_per_layer": linear_flops(predictors[0]),
                         **({"head_input": self.head_input} if unit == "attn" else {}), "calib_protocol": "lmtext",
                         **traces.sampling}

    def _architecture(self, config, out: int):
        hidden = self.hp()["hidden"]
        if self.variant == "shadowllm":
            return mlp(config.hidden_size, hidden, out)
        return low_rank(config.hidden_size, hidden, out)

    def _predictors(self, ctx, artefact, unit):
        config = ctx.model.config
        out = config.num_attention_heads if unit == "attn" else config.ffn_dim
        layers = sorted({int(name.split(".")[1]) for name in artefact.tensors if name.startswith(unit + ".")})
        weights = predictor_weights(self.settings)  # 8-bit weights (fake-quantized) when set
        return {l: load(artefact.tensors, f"{unit}.{l}", self._architecture(config, out), weights) for l in layers}

    def policy(self, ctx, allocation, artefact):
        attn, mlp_ = self._predictors(ctx, artefact, "attn"), self._predictors(ctx, artefact, "mlp")
        if self.variant == "shadowllm":
            return LayerwiseShadowPolicy(attn, mlp_, ctx.model.config.num_hidden_layers)
        return DejaVuPolicy(attn, mlp_, self.head_input)

    decode_allocations = frozenset({"local", "global"})  # global: dejavu:shadowllm only (decode_source says why)

    def decode_source(self, policy, allocation, model):
        config = model.config
        counts = keep_counts(allocation, config.num_hidden_layers, config.num_attention_heads, config.ffn_dim)
        attn = policy.attn if allocation.heads > 0 else {}
        mlp_ = policy.mlp if allocation.neurons > 0 else {}
        if isinstance(policy, LayerwiseShadowPolicy):
            source = LayerwiseShadowSource(attn, mlp_, counts, allocation.dense_layers)
            if allocation.mode == "global":  # every layer's predictors read layer 0's output: one ranking per token
                source.global_allocation = allocation
            return source
        if allocation.mode != "local":
            raise HarnessError("DejaVuPolicy: the sparse decode engine runs Deja Vu's lookahead predictors with local "
                               "allocation only (a layer's scores exist only once the layer before it has run, so "
                               "there is no ranking over all layers per token); dejavu:shadowllm decodes globally")
        return DejaVuSource(attn, mlp_, counts, policy.head_reads)

    # -- dejavu:shadowllm ----------------------------------------------------------------------------------------
    def _fit_shadowllm(self, ctx, allocation):
        from harness.fewshot import calibration_set, record_fields
        from harness.models import dtype_name
        from methods.criteria import CRITERIA_VERSION

        hp, layers = self.hp(), self.sparse_layers(ctx, allocation)
        fewshot = calibration_set(ctx, self.settings)
        base = {"model": ctx.session.model_identity, "dtype": dtype_name(ctx.session.dtype), "calibration": "fewshot",
                "fewshot": fewshot.fingerprint, "criterion": SHADOWLLM_CRITERION, "criteria_version": CRITERIA_VERSION,
                "seed": ctx.seed, "hp": hp, "layers": layers, "fit_version": 1}
        tensors, meta, path = {}, {"hp": hp, **record_fields(fewshot)}, None
        for unit, fraction in (("attn", allocation.heads), ("mlp", allocation.neurons)):
            if fraction <= 0:
                continue
            art = ctx.cache.get_or_build(f"dejavu-shadowllm-{unit}", {**base, "unit": unit},
                                         lambda unit=unit: self._train_shadowllm(ctx, fewshot, unit, layers))
            tensors.update(art.tensors)
            meta[unit], path = art.meta, path or art.path
        return Artefact(tensors, meta, path)

    def _fewshot_targets(self, ctx, fewshot, unit, layers):
        """(N, layers, n) per-layer min-max normalised L2Norm of every example (stored precision) and (N, E) inputs."""
        from harness.fewshot import keep_scores
        from methods.criteria import fit_target_scores

        scores = fit_target_scores(ctx, fewshot, SHADOWLLM_CRITERION, self.hp()["score_tokens"],
                                   keep_scores(self.settings))
        return scores["heads" if unit == "attn" else "neurons"][:, layers], scores["attn_output0"]

    def _train_shadowllm(self, ctx, fewshot, unit, layers):
        from harness.fewshot import record_fields
        config, hp = ctx.model.config, self.hp()
        device = ctx.session.device
        targets, x = self._fewshot_targets(ctx, fewshot, unit, layers)
        train, _ = example_split(x.shape[0], hp["val_fraction"], ctx.seed)
        out = config.num_attention_heads if unit == "attn" else config.ffn_dim
        predictors = [seeded(lambda: self._architecture(config, out), ctx.seed * 1000 + layer) for layer in layers]
        y_train = targets[train].to(device)

        def y(index):  # (layers, B, n), normalised on the device batch by batch
            return minmax(y_train[index.to(device)].float()).transpose(0, 1)

        with stage(f"dejavu:shadowllm {unit} predictors ({len(layers)} layers at once)", hp["epochs"], ctx.log,
                   unit="epochs") as bar:
            losses = train_regressors(predictors, x[train], y, epochs=hp["epochs"], lr=hp["lr"],
                                      batch_size=hp["batch_size"], seed=ctx.seed, device=device, progress=bar.advance)
        dtype = storage_dtype(ctx.session.dtype)
        tensors = {}
        for layer, predictor in zip(layers, predictors):
            tensors.update(save(f"{unit}.{layer}", predictor, dtype))
        return tensors, {"train_loss": dict(zip(layers, losses)), "params_per_layer": parameter_count(predictors[0]),
                         "flops_per_token_per_layer": linear_flops(predictors[0]), **record_fields(fewshot)}

    def _quality_shadowllm(self, ctx, allocation, artefact) -> dict:
        from harness.fewshot import calibration_set
        config, hp = ctx.model.config, self.hp()
        fewshot = calibration_set(ctx, self.settings)
        report = {}
        for unit, name, fraction, size in (("attn", "heads", allocation.heads, config.num_attention_heads),
                                           ("mlp", "neurons", allocation.neurons, config.ffn_dim)):
            predictors = self._predictors(ctx, artefact, unit)
            if not predictors:
                continue
            layers = list(predictors)
            targets, x = self._fewshot_targets(ctx, fewshot, unit, layers)
            _, val = example_split(x.shape[0], hp["val_fraction"], ctx.seed)
            true = minmax(targets[val].float())
            with torch.no_grad():
                predicted = [predictors[l](x[val]) for l in layers]
            report[name] = layer_report(predicted, [true[:, i] for i in range(len(layers))],
                                        keep_count(fraction, size), layers)
            one = next(iter(predictors.values()))
            report[name]["predictor"] = {"params": parameter_count(one) * len(predictors),
                                         "flops_per_token": linear_flops(one) * len(predictors)}
        return report

    def _footprint_shadowllm(self, model_config, run_config, allocation, seed):
        from harness.fewshot import keep_scores
        from harness.footprint import Need, predictor_training_gpu
        from harness.traces import backward_bytes, run_dtype, score_bytes_per_token, store_bytes

        hp = self.hp()
        examples = int(hp["fewshot"]["examples"])
        d, h = model_config.hidden_size, hp["hidden"]
        layers = model_config.num_hidden_layers - len(set(allocation.dense_layers))
        scores = examples * (score_bytes_per_token(model_config) + 4 * d)
        needs = {("target_scores", SHADOWLLM_CRITERION): Need(
            f"{SHADOWLLM_CRITERION} scores of {examples} few-shot examples", host=scores, disk=scores if keep_scores(self.settings) else 0,
            gpu=backward_bytes(model_config, hp["score_tokens"]), settings="examples,score_tokens")}
        for unit, fraction, out in (("attn", allocation.heads, model_config.num_attention_heads),
                                    ("mlp", allocation.neurons, model_config.ffn_dim)):
            if fraction <= 0:
                continue
            params = layers * (d * h + h + h * out + out)
            gpu = predictor_training_gpu(params, layers * hp["batch_size"] * (h + 2 * out) * 4,
                                         layers * examples * (d + out) * 4)
            needs[("dejavu-shadowllm-" + unit, seed)] = Need(
                f"dejavu:shadowllm {unit} predictors", disk=params * store_bytes(run_dtype(run_config)), gpu=gpu,
                settings="examples,hidden,batch_size")
        return needs

    def quality(self, ctx, allocation, artefact) -> dict:
        """Selected (top-k) vs oracle sets on the validation tokens, per layer and over all layers."""
        if self.variant == "shadowllm":
            return self._quality_shadowllm(ctx, allocation, artefact)
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
