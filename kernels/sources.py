"""Mask sources for the sparse decode engine: each method's predictor run inside the decode step.

`source_for(policy, allocation, model)` turns the `MaskPolicy` a method installs on the masked engine
(harness.engine) into a mask source of `kernels.decode.SparseDecoder` that chooses *the same units* from *the
same inputs* at every decode token, so both engines give the same logits (tests/test_latency.py proves it
method by method) and the predictor's cost is part of every step (and of its CUDA graph):

  static    the kept sets are fixed: the policy's score tables ranked once under the allocation (local or
            global, dense layers, min_keep) exactly as the masked engine ranks them; no per-token work.
  dejavu    the lookahead (Deja Vu's Figure 2): at layer l the source reads the residual stream entering l (the
            masked engine's `layer_input`) and runs layer l's MLP predictor (neurons of l); after l's attention
            it reads the stream entering l's MLP (`mlp_input`, the engine's `neuron_masks` call) and runs layer
            l+1's attention predictor (heads of l+1). Layer 0's heads come from layer 0's own input.
            `dejavu:attn-input` runs layer l+1's attention predictor on layer l's input instead. Predictors that
            read the same tensor share one first matmul.
  dejavu:shadowllm  per-layer predictors that all read layer 0's attention output (as shadow, below).
  shadow    layer 0 stays dense; after layer 0's attention the engine calls `neuron_masks(0, h)` with the
            residual stream after attention, the source subtracts the layer input it kept (= layer 0's
            attention output, the masked engine's `attn_output`), runs the one predictor and ranks the heads
            and neurons of every later layer at once.
  timewise  current: layer l's input; last: layer l−M's input (predictions made M layers ahead); time: layer
            l's input at the previous token, kept across steps in a persistent buffer (and taken from the
            last prompt token after prefill, as the masked engine carries it).

Each predictor's input standardisation is folded into its first linear layer once (computed in float64), and
the top-k is `kernels.topk.select` (on the GPU one Triton launch for head rows, torch.topk for neuron rows; the
engine reads either index tensor in place): the same selection as the masked engine's `lowest_k_mask` (ties
aside).
The number of kept units per layer is fixed (the allocation's keep count; dense layers keep all), as the
engine's index buffers need. Indices are shared by the batch: with batch > 1 the batch-mean score is ranked
(the masked engine would choose per sequence; equivalence holds for batch 1). Not decodable with fixed counts:
`global` allocation with a per-token method, and the non-causal `request` scope.
"""
from __future__ import annotations

from abc import ABC, abstractmethod

import torch
import torch.nn.functional as F
from torch import nn

from harness.engine import Allocation, ForwardState, MaskedEngine, lowest_k_mask
from harness.errors import HarnessError
from kernels.decode import DenseMasks, StaticMasks
from kernels.topk import select


def keep_counts(allocation: Allocation, num_layers: int, num_heads: int, ffn_dim: int, *, heads=True, neurons=True):
    """Per-layer (kept heads, kept neurons) under a local allocation: the masked engine's skip counts."""
    counts = []
    for layer in range(num_layers):
        dense = layer in allocation.dense_layers
        kh = num_heads - (0 if dense or not heads else int(round(allocation.heads * num_heads)))
        kf = ffn_dim - (0 if dense or not neurons else int(round(allocation.neurons * ffn_dim)))
        counts.append((kh, kf))
    return counts


# ------------------------------------------------------------------------------------------------------------
# predictors, folded for decoding
# ------------------------------------------------------------------------------------------------------------
class Folded:
    """A predictor `tail(first((x − mean) / std))` with the standardisation folded into its first linear layer.

    `tail` is the rest of the network as a list of (relu, weight, bias) steps: each applies ReLU to its input when
    `relu`, then its linear layer. Any stack of Linear and ReLU layers that begins with a Linear folds: Deja Vu's
    low_rank (Linear, Linear), an MLP with one hidden layer (Linear, ReLU, Linear) or two (timewise: Linear, ReLU,
    Linear, ReLU, Linear), and ShadowLLM's ShadowNet (trunk Linear, ReLU, then its head and neuron outputs as one
    linear layer)."""

    def __init__(self, w1, b1, tail):
        self.w1, self.b1, self.tail = w1, b1, list(tail)

    @classmethod
    def of(cls, predictor) -> "Folded":
        net = predictor.net
        mean, std = predictor.mean.double(), predictor.std.double()
        if hasattr(net, "trunk"):  # methods.shadow.ShadowNet: trunk (Linear, ReLU), heads, neurons
            first = net.trunk[0]
            tail = [(True, torch.cat([net.heads.weight, net.neurons.weight]).detach(),
                     torch.cat([net.heads.bias, net.neurons.bias]).detach())]
        else:  # a Sequential of Linear and ReLU layers (methods.predictors.low_rank, mlp)
            layers = list(net)
            if not layers or not isinstance(layers[0], nn.Linear):
                raise TypeError("a predictor folds when its network starts with a Linear layer")
            first, tail, relu = layers[0], [], False
            for module in layers[1:]:
                if isinstance(module, nn.ReLU):
                    if relu:
                        raise TypeError("two ReLUs in a row")
                    relu = True
                elif isinstance(module, nn.Linear):
                    tail.append((relu, module.weight.detach(), None if module.bias is None else module.bias.detach()))
                    relu = False
                else:
                    raise TypeError(f"cannot fold a {type(module).__name__} into the decode step")
            if relu or not tail:
                raise TypeError("a predictor must end with a Linear layer")
        w = first.weight.detach().double() / std
        b = -(w @ mean)
        if first.bias is not None:
            b = b + first.bias.detach().double()
        return cls(w, b, tail)

    def to(self, device, dtype) -> "Folded":
        cast = lambda t: None if t is None else t.to(device=device, dtype=dtype).contiguous()  # noqa: E731
        return Folded(cast(self.w1), cast(self.b1), [(relu, cast(w), cast(b)) for relu, w, b in self.tail])

    def nbytes(self) -> int:
        tensors = [self.w1, self.b1] + [t for _, w, b in self.tail for t in (w, b)]
        return sum(t.numel() * t.element_size() for t in tensors if t is not None)


def _apply_tail(z, tail):
    for relu, w, b in tail:
        z = F.linear(torch.relu(z) if relu else z, w, b)
    return z


class Group:
    """Predictors that read the same input: one matmul for all their first layers, then each one's tail."""

    def __init__(self, members: list[tuple[object, Folded]]):
        self.keys = [key for key, _ in members]
        self.w1 = torch.cat([f.w1 for _, f in members]).contiguous()
        self.b1 = torch.cat([f.b1 for _, f in members]).contiguous()
        self.parts, start = [], 0
        for _, f in members:
            self.parts.append((start, start + f.w1.shape[0], f.tail))
            start += f.w1.shape[0]

    def __call__(self, x) -> dict:
        z = F.linear(x, self.w1, self.b1)
        out = {}
        for key, (a, b, tail) in zip(self.keys, self.parts):
            out[key] = _apply_tail(z[:, a:b] if len(self.parts) > 1 else z, tail)
        return out

    def nbytes(self) -> int:
        first = sum(t.numel() * t.element_size() for t in (self.w1, self.b1) if t is not None)
        return first + sum(t.numel() * t.element_size() for _, _, tail in self.parts for _, w, b in tail
                           for t in (w, b) if t is not None)


# ------------------------------------------------------------------------------------------------------------
# sources
# ------------------------------------------------------------------------------------------------------------
class PredictorSource(ABC):
    """Base of the per-token sources: fixed counts, identity index sets for dense layers/units."""

    static = False
    kind = "predictor"

    def __init__(self, counts):
        self.counts = list(counts)

    def bind(self, engine) -> None:
        self.device, self.dtype = engine.device, engine.dtype
        H, Fd = engine.num_heads, engine.ffn_dim
        self.all_heads = torch.arange(H, dtype=torch.int32, device=self.device)
        self.all_neurons = torch.arange(Fd, dtype=torch.int32, device=self.device)
        self._bind(engine)

    @abstractmethod
    def _bind(self, engine) -> None:
        """Move/fold the method's predictors for this engine (device, dtype, layout)."""

    def predictor_bytes(self) -> int:
        """Bytes of predictor weights one step reads (the predictor's share of the weight-streaming floor)."""
        return 0


class DejaVuSource(PredictorSource):
    """Per-layer predictors run where their input exists in the step.

    attn / mlp: {layer: predictor} of heads / neurons. `head_reads(layer)` says where the head predictor of `layer`
    reads: ("layer_input", j) is the residual stream entering layer j (the engine's call at layer j), ("mlp_input",
    j) the stream entering layer j's MLP, after its attention (the engine's `neuron_masks(j)` call). Deja Vu's
    default reads ("mlp_input", l − 1) (layer 0: ("layer_input", 0)); `dejavu:attn-input` ("layer_input", l − 1).
    Neuron predictors of layer l read ("layer_input", l). Predictors that read the same tensor share one first
    matmul; the indices a predictor chooses wait in `pending` until their layer runs."""

    kind = "dejavu"

    def __init__(self, attn: dict, mlp: dict, counts, head_reads=None):
        from methods.dejavu import head_source

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
        self.groups = {point: Group([(k, f.to(self.device, self.dtype)) for k, f in members])
                       for point, members in groups.items()}
        self.pending: dict = {}
        self.neurons_now = None

    def _run(self, point, hidden) -> None:
        group = self.groups.get(point)
        if group is not None:
            for (unit, target), scores in group(hidden).items():
                k = self.counts[target][0 if unit == "heads" else 1]
                self.pending[(unit, target)] = select(scores, k)

    def __call__(self, layer, hidden):
        self._run(("layer_input", layer), hidden)
        heads = self.pending.pop(("heads", layer), None) if layer in self.attn else None
        self.neurons_now = self.pending.pop(("neurons", layer), None) if layer in self.mlp else None
        return (heads if heads is not None else self.all_heads,
                self.neurons_now if self.neurons_now is not None else self.all_neurons)

    def neuron_masks(self, layer, hidden):
        """After layer `layer`'s attention: the predictors reading its MLP input run (heads of layer + 1)."""
        self._run(("mlp_input", layer), hidden)
        return self.neurons_now if self.neurons_now is not None else self.all_neurons

    def predictor_bytes(self):
        return sum(g.nbytes() for g in self.groups.values())


class TimewiseSource(DejaVuSource):
    """Head predictors only (neurons dense). current/last: as dejavu's with source layer l or l−M (the residual
    stream entering it); time: each layer's predictor reads that layer's input at the previous token (persistent
    buffers)."""

    kind = "timewise"

    def __init__(self, variant: str, predictors: dict, lookback: int, counts):
        from methods.timewise import source_layer

        super().__init__(predictors, {}, counts, lambda layer: ("layer_input", source_layer(variant, layer, lookback)))
        self.variant = variant

    def _bind(self, engine):
        if self.variant != "time":
            return super()._bind(engine)
        self.folded = {l: Folded.of(p).to(self.device, self.dtype) for l, p in self.attn.items()}
        self.groups = {l: Group([(("heads", l), f)]) for l, f in self.folded.items()}
        self.previous = {l: torch.zeros(engine.batch, engine.hidden, device=self.device, dtype=self.dtype)
                         for l in self.attn}
        self.pending = {}
        self.neurons_now = None

    def prefill_layer(self, layer, hidden):
        if self.variant == "time" and layer in self.attn:
            self.previous[layer].copy_(hidden[:, -1])

    def __call__(self, layer, hidden):
        if self.variant != "time":
            return super().__call__(layer, hidden)
        if layer not in self.attn:
            return self.all_heads, self.all_neurons
        scores = self.groups[layer](self.previous[layer])[("heads", layer)]
        heads = select(scores, self.counts[layer][0])
        self.previous[layer].copy_(hidden)  # after its use: the next token reads this one
        return heads, self.all_neurons

    def neuron_masks(self, layer, hidden):
        return self.all_neurons  # timewise predicts heads only


class LayerwiseShadowSource(PredictorSource):
    """ShadowLLM's Deja Vu-style baseline (`dejavu:shadowllm`): per-layer head and neuron predictors that all read
    layer 0's attention output (layer 0 dense). After layer 0's attention the engine calls `neuron_masks(0, h)`;
    the source subtracts the layer input it kept (= layer 0's attention output), runs every predictor (their first
    layers as one matmul) and chooses the kept heads and neurons of every later layer."""

    kind = "dejavu:shadowllm"

    def __init__(self, attn: dict, mlp: dict, counts, dense_layers):
        super().__init__(counts)
        self.attn, self.mlp, self.dense = attn, mlp, set(dense_layers)
        if 0 not in self.dense:
            raise HarnessError("dejavu:shadowllm reads layer 0's attention output: layer 0 must stay dense")

    def _bind(self, engine):
        members = [(("heads", l), Folded.of(p)) for l, p in sorted(self.attn.items()) if l not in self.dense]
        members += [(("neurons", l), Folded.of(p)) for l, p in sorted(self.mlp.items()) if l not in self.dense]
        self.group = Group([(k, f.to(self.device, self.dtype)) for k, f in members]) if members else None
        self.h0 = torch.zeros(engine.batch, engine.hidden, device=self.device, dtype=self.dtype)
        self.chosen: dict = {}

    def __call__(self, layer, hidden):
        if layer == 0:
            self.h0.copy_(hidden)  # the engine updates the residual stream in place
        heads = self.chosen.get(("heads", layer))
        return (heads if heads is not None else self.all_heads), None

    def neuron_masks(self, layer, hidden):
        if layer == 0 and self.group is not None:  # after layer 0's attention: its output is the stream's change
            for (unit, target), scores in self.group(hidden - self.h0).items():
                self.chosen[(unit, target)] = select(scores, self.counts[target][0 if unit == "heads" else 1])
        neurons = self.chosen.get(("neurons", layer))
        return neurons if neurons is not None else self.all_neurons

    def predictor_bytes(self):
        return self.group.nbytes() if self.group is not None else 0


class ShadowSource(PredictorSource):
    kind = "shadow"

    def __init__(self, predictor, counts, num_layers: int, num_heads: int, dense_layers):
        super().__init__(counts)
        self.predictor, self.L, self.H = predictor, num_layers, num_heads
        self.dense = set(dense_layers)

    def _bind(self, engine):
        if self.predictor is not None:  # bound once; a second engine (e.g. without a CUDA graph) reuses it
            self.group = Group([("all", Folded.of(self.predictor).to(self.device, self.dtype))])
        self.predictor = None  # the folded copy is all the step needs (memory: 2.8 G parameters at opt-30b)
        self.h0 = torch.zeros(engine.batch, engine.hidden, device=self.device, dtype=self.dtype)
        self.heads = self.neurons = None
        sparse = [l for l in range(self.L) if l not in self.dense]
        self.kh = {self.counts[l][0] for l in sparse}
        self.kf = {self.counts[l][1] for l in sparse}
        if len(self.kh) > 1 or len(self.kf) > 1:
            raise HarnessError("shadow's mask source needs the same keep count in every sparse layer (local allocation)")
        self.kh, self.kf = next(iter(self.kh), engine.num_heads), next(iter(self.kf), engine.ffn_dim)

    def __call__(self, layer, hidden):
        if layer == 0:
            self.h0.copy_(hidden)  # the engine updates the residual stream in place
        if layer in self.dense or self.heads is None:
            return self.all_heads, None
        return (self.heads[layer] if self.kh < self.H else self.all_heads), None

    def neuron_masks(self, layer, hidden):
        if layer == 0:  # after layer 0's attention: its output is the residual stream's change
            out = self.group(hidden - self.h0)["all"]
            LH = self.L * self.H
            heads, neurons = out[:, :LH].view(-1, self.L, self.H), out[:, LH:].view(out.shape[0], self.L, -1)
            self.heads = select(heads, self.kh)[0] if self.kh < self.H else None
            self.neurons = select(neurons, self.kf)[0] if self.kf < neurons.shape[-1] else None
        if layer in self.dense or self.neurons is None:
            return self.all_neurons
        return self.neurons[layer]

    def predictor_bytes(self):
        return self.group.nbytes()


# ------------------------------------------------------------------------------------------------------------
# from a method's policy
# ------------------------------------------------------------------------------------------------------------
def static_source(policy, allocation: Allocation, model) -> StaticMasks:
    """The fixed kept sets of a StaticPolicy, ranked by the masked engine's own code (local or global)."""
    engine = MaskedEngine(model, policy, allocation)
    engine.state = ForwardState(input_ids=None, positions=torch.zeros(1, 1, dtype=torch.long),
                                valid=torch.ones(1, 1, dtype=torch.bool))
    sets = {}
    for unit in ("heads", "neurons"):
        n = engine.sizes[unit]
        table = policy.tables[unit]
        if not engine.active(unit):
            sets[unit] = [None] * engine.num_layers
            continue
        if allocation.mode == "global":
            keep = engine._plan_global(unit)[0, 0]  # (L, n)
        else:
            keep = torch.stack([lowest_k_mask(table[l], engine.skip_count(unit)) for l in range(engine.num_layers)])
        sets[unit] = [None if l in allocation.dense_layers else keep[l].nonzero().flatten().tolist()
                      for l in range(engine.num_layers)]
        for l in range(engine.num_layers):
            if sets[unit][l] is not None and len(sets[unit][l]) == n:
                sets[unit][l] = None
    return StaticMasks(sets["heads"], sets["neurons"])


def source_for(policy, allocation: Allocation, model):
    """The sparse engine's mask source for a method's masked-engine policy (None: dense)."""
    from methods.dejavu import DejaVuPolicy, LayerwiseShadowPolicy
    from methods.shadow import ShadowPolicy
    from methods.static import StaticPolicy
    from methods.timewise import TimewisePolicy

    config = model.config
    L, H, Fd = config.num_hidden_layers, config.num_attention_heads, config.ffn_dim
    if allocation.scope != "token":
        raise HarnessError(f"the sparse decode engine runs causal (token-scope) masks only, not scope "
                           f"{allocation.scope!r} (one mask per request chosen from its last token)")
    if policy is None or (allocation.heads == 0 and allocation.neurons == 0):
        return DenseMasks(L)
    if isinstance(policy, StaticPolicy):
        return static_source(policy, allocation, model)
    if allocation.mode != "local":
        raise HarnessError(f"{type(policy).__name__}: the sparse decode engine needs a fixed number of kept units "
                           f"per layer, i.e. local allocation (a per-token global ranking changes the counts)")
    if isinstance(policy, LayerwiseShadowPolicy):
        counts = keep_counts(allocation, L, H, Fd)
        return LayerwiseShadowSource(policy.attn if allocation.heads > 0 else {},
                                     policy.mlp if allocation.neurons > 0 else {}, counts, allocation.dense_layers)
    if isinstance(policy, DejaVuPolicy):
        counts = keep_counts(allocation, L, H, Fd)
        return DejaVuSource(policy.attn if allocation.heads > 0 else {}, policy.mlp if allocation.neurons > 0 else {},
                            counts, policy.head_reads)
    if isinstance(policy, TimewisePolicy):
        counts = keep_counts(allocation, L, H, Fd, neurons=False)
        return TimewiseSource(policy.variant, policy.predictors, policy.lookback, counts)
    if isinstance(policy, ShadowPolicy):
        counts = keep_counts(allocation, L, H, Fd)
        return ShadowSource(policy.predictor[0], counts, L, H, allocation.dense_layers)
    raise HarnessError(f"no mask source for the sparse decode engine for policy {type(policy).__name__}; "
                       f"sources exist for static, dejavu, shadow and timewise")


def reference_source(source, num_layers: int) -> StaticMasks:
    """A static source with the same per-layer counts (the first k units): the step without the predictor."""
    counts = source.counts
    return StaticMasks([list(range(h)) for h, _ in counts], [list(range(f)) for _, f in counts])
