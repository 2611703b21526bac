"""Mask sources for the sparse decode engine: the generic parts of running a method's predictor inside the step.

A mask source tells `kernels.decode.SparseDecoder` which heads and neurons each layer keeps at every decode token.
Each method's own source lives in its file in methods/ (`Method.decode_source`, e.g. methods.dejavu.DejaVuSource):
it chooses *the same units* from *the same inputs* as the `MaskPolicy` the method installs on the masked engine
(harness.engine), so both engines give the same logits (tests/test_latency.py proves it method by method) and the
predictor's cost is part of every step (and of its CUDA graph). harness.decoding.source_for dispatches to it
through the method registry. This module holds what every source shares and imports nothing from methods/:

  keep_counts       the per-layer kept counts under a local allocation (the masked engine's skip counts);
  Folded, Group     a predictor with its input standardisation folded into its first linear layer once (computed
                    in float64), and predictors that read the same tensor sharing one first matmul;
  PredictorSource   the base of the per-token sources (fixed counts, identity index sets for dense layers/units);
  reference_source  a static source with a source's per-layer counts: the step without the predictor.

The top-k is `kernels.topk.select` (on the GPU one Triton launch for head rows, torch.topk for neuron rows; the
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

from harness.engine import Allocation
from kernels.decode import StaticMasks


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


def reference_source(source, num_layers: int) -> StaticMasks:
    """A static source with the same per-layer counts (the first k units): the step without the predictor."""
    counts = source.counts
    return StaticMasks([list(range(h)) for h, _ in counts], [list(range(f)) for _, f in counts])
