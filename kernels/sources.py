"""Mask sources for the sparse decode engine: the generic parts of running a method's predictor inside the step.

A mask source tells `kernels.decode.SparseDecoder` which heads and neurons each layer keeps at every decode token.
Each method's own source lives in its file in methods/ (`Method.decode_source`, e.g. methods.dejavu.DejaVuSource):
it chooses *the same units* from *the same inputs* as the `MaskPolicy` the method installs on the masked engine
(harness.engine), so both engines give the same logits (tests/test_latency.py proves it method by method) and the
predictor's cost is part of every step (and of its CUDA graph). harness.decoding.source_for dispatches to it
through the method registry. This module holds what every source shares and imports nothing from methods/:

  keep_counts       the per-layer kept counts under a local allocation (the masked engine's skip counts);
  Folded, Group     a predictor with its input standardisation folded into its first linear layer once (computed
                    in float64), and predictors that read the same tensor sharing one first GEMV; a bound Group
                    runs its layers through the engine's own GEMV into persistent buffers, then the top-k;
  SideStream        the second CUDA stream of the lookahead (fork where a predictor's input exists, join where its
                    indices are read; both inside the step's CUDA graph);
  PredictorSource   the base of the per-token sources (counts, identity index sets for dense layers/units,
                    persistent index buffers, the batch `combine` and `lookahead` settings);
  AfterLayerZero    the base of the sources reading layer 0's attention output (shadow, dejavu:shadowllm), with
                    global allocation: one ranking of every layer's scores per token, device-counted index sets;
  reference_source  a static source with a source's per-layer counts: the step without the predictor.

The top-k is `kernels.topk.select` (one Triton launch per row set, heads and neurons alike, on the GPU): exactly
the masked engine's `lowest_k_mask` choice, ties included. With local allocation the number of kept units per
layer is fixed (the allocation's keep count; dense layers keep all); global allocation and combine="union" give
`Counted` index sets whose count the kernels read on the device. Indices are shared by the batch (batch-mean
scores, or the union of the sequences' sets); the masked engine chooses per sequence, so equivalence holds for
batch 1. Not decodable: global allocation with Deja Vu's or timewise's layer-by-layer predictors, and the
non-causal `request` scope.
"""
from __future__ import annotations

from abc import ABC, abstractmethod

import torch
import torch.nn.functional as F
from torch import nn

from harness.engine import Allocation
from kernels.decode import Counted, StaticMasks
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
class Quantized:
    """An 8-bit weight (out, in) with one fp32 scale per output row: weight = q · scale[:, None] (int8 or fp8 codes,
    `methods.predictors.quantize_rows`). The decode step reads the codes (half the bytes of fp16) and applies the
    scale in the GEMV's epilogue; `dense(dtype)` is the weight the masked engine computes with."""

    def __init__(self, q: torch.Tensor, scale: torch.Tensor):
        self.q, self.scale = q, scale.float()

    @property
    def shape(self):
        return self.q.shape

    def __getitem__(self, rows) -> "Quantized":
        return Quantized(self.q[rows], self.scale[rows])

    def to(self, device) -> "Quantized":
        return Quantized(self.q.to(device).contiguous(), self.scale.to(device).contiguous())

    def dense(self, dtype) -> torch.Tensor:
        return (self.q.float() * self.scale[:, None]).to(dtype)

    def nbytes(self) -> int:
        return self.q.numel() * self.q.element_size() + self.scale.numel() * 4


def _cat(weights: list):
    if all(isinstance(w, Quantized) for w in weights):
        return Quantized(torch.cat([w.q for w in weights]), torch.cat([w.scale for w in weights]))
    if any(isinstance(w, Quantized) for w in weights):
        raise TypeError("cannot group 8-bit and model-dtype predictor weights in one GEMV")
    return torch.cat(weights)


def _nbytes(t) -> int:
    if t is None:
        return 0
    return t.nbytes() if isinstance(t, Quantized) else t.numel() * t.element_size()


class Folded:
    """A predictor `tail(first((x − mean) / std))` with the standardisation folded into its first linear layer.

    `tail` is the rest of the network as a list of (relu, weight, bias) steps: each applies ReLU to its input when
    `relu`, then its linear layer. Any stack of Linear and ReLU layers that begins with a Linear folds: Deja Vu's
    low_rank (Linear, Linear), an MLP with one hidden layer (Linear, ReLU, Linear) or two (timewise: Linear, ReLU,
    Linear, ReLU, Linear), and ShadowLLM's ShadowNet (trunk Linear, ReLU, then its head and neuron outputs as one
    linear layer).

    A predictor with 8-bit weights (`predictor_weights: int8|fp8`, the `quantized_weights` its fit leaves on it)
    keeps its codes (`Quantized`) and is not folded, since a per-column 1/std would break the per-row scales: its
    input is standardised in the step instead (`pre` = (mean, std)), exactly as the masked engine computes it."""

    def __init__(self, w1, b1, tail, pre=None):
        self.w1, self.b1, self.tail, self.pre = w1, b1, list(tail), pre

    @classmethod
    def of(cls, predictor) -> "Folded":
        net = predictor.net
        quantized = getattr(predictor, "quantized_weights", None)
        if quantized:
            names = {id(module): name for name, module in predictor.named_modules()}
            by_name = quantized["weights"]

            def codes_of(module):
                name = names[id(module)]
                q, scale = by_name[f"{name}.weight" if name else "weight"]
                return Quantized(q, scale)
        weight = (lambda module: codes_of(module)) if quantized else (lambda module: module.weight.detach())  # noqa: E731
        if hasattr(net, "trunk"):  # methods.shadow.ShadowNet: trunk (Linear, ReLU), heads, neurons
            first = net.trunk[0]
            tail = [(True, _cat([weight(net.heads), weight(net.neurons)]),
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
                    tail.append((relu, weight(module), None if module.bias is None else module.bias.detach()))
                    relu = False
                else:
                    raise TypeError(f"cannot fold a {type(module).__name__} into the decode step")
            if relu or not tail:
                raise TypeError("a predictor must end with a Linear layer")
        if quantized:
            b = first.bias.detach() if first.bias is not None else torch.zeros(first.weight.shape[0])
            return cls(weight(first), b, tail, pre=(predictor.mean.detach(), predictor.std.detach()))
        mean, std = predictor.mean.double(), predictor.std.double()
        w = first.weight.detach().double() / std
        b = -(w @ mean)
        if first.bias is not None:
            b = b + first.bias.detach().double()
        return cls(w, b, tail)

    def to(self, device, dtype) -> "Folded":
        def cast(t):
            if t is None:
                return None
            if isinstance(t, Quantized):
                return t.to(device)
            return t.to(device=device, dtype=dtype).contiguous()

        pre = None if self.pre is None else tuple(cast(t) for t in self.pre)
        return Folded(cast(self.w1), cast(self.b1), [(relu, cast(w), cast(b)) for relu, w, b in self.tail], pre)

    def nbytes(self) -> int:
        tensors = [self.w1, self.b1] + [t for _, w, b in self.tail for t in (w, b)]
        return sum(_nbytes(t) for t in tensors)


def _linear(x, w, b):
    return F.linear(x, w.dense(x.dtype) if isinstance(w, Quantized) else w, b)


def _apply_tail(z, tail):
    for relu, w, b in tail:
        z = _linear(torch.relu(z) if relu else z, w, b)
    return z


class Group:
    """Predictors that read the same input: one GEMV for all their first layers, then each one's tail.

    Unbound (`bind` not called) it runs F.linear (any device). Bound to an engine with the Triton backend it runs
    every layer through the engine's own gathered-row GEMV (`kernels.gemv.gather_rows` over all rows: autotuned
    for these shapes, fp32 accumulation, a ReLU that the next layer applies to its input fused into the
    producer's epilogue) into persistent buffers, so a step allocates nothing and a CUDA graph (or a second
    stream inside it) reads fixed addresses. Each member's scores then go to `select` (kernels.topk) into a
    persistent index buffer: `run(x, counts)` returns {key: indices}."""

    def __init__(self, members: list[tuple[object, Folded]]):
        self.keys = [key for key, _ in members]
        self.w1 = _cat([f.w1 for _, f in members])
        if not isinstance(self.w1, Quantized):
            self.w1 = self.w1.contiguous()
        self.b1 = torch.cat([f.b1 for _, f in members]).contiguous()
        self.parts, start = [], 0
        for _, f in members:
            self.parts.append((start, start + f.w1.shape[0], f.tail))
            start += f.w1.shape[0]
        # 8-bit predictors are not folded: each standardises its own input (one first GEMV per member then)
        self.pres = [f.pre for _, f in members] if any(f.pre is not None for _, f in members) else None
        self.bound = False

    @classmethod
    def shared(cls, first: Folded, tails: list[tuple[object, list]]) -> "Group":
        """Members with one first layer in common (ShadowLLM's trunk), each with its own tail: e.g. the output
        rows of one layer's heads, then of its neurons."""
        group = cls.__new__(cls)
        group.keys = [key for key, _ in tails]
        group.w1, group.b1 = first.w1, first.b1
        group.parts = [(0, first.w1.shape[0], tail) for _, tail in tails]
        group.pres = None if first.pre is None else [first.pre]  # one input, one standardisation
        group.bound = False
        return group

    def bind(self, batch: int, backend: str, combine: str = "mean") -> "Group":
        """Persistent buffers for `batch` sequences; backend "triton" runs the GEMVs through kernels.gemv."""
        device, dtype = self.b1.device, self.b1.dtype
        self.backend, self.combine, self.batch = backend, combine, batch
        firsts = {tail[0][0] for _, _, tail in self.parts}
        self.first_relu = firsts == {True}  # every member's tail starts with a ReLU: fuse it into the first GEMV
        zeros = lambda *shape: torch.zeros(*shape, device=device, dtype=dtype)  # noqa: E731
        self.z = zeros(batch, self.w1.shape[0])
        if self.pres is not None:  # standardised inputs, and per member its own first-layer output
            self.xs = [zeros(batch, pre[0].shape[-1]) for pre in self.pres]
            self.zs = [zeros(batch, b - a) for a, b, _ in self.parts] if len(self.pres) > 1 else [self.z]
        self.steps = []  # per member: [(w, b, relu_out, out buffer)]
        for a, b, tail in self.parts:
            steps = []
            for i, (_, w, bias) in enumerate(tail):
                relu_out = i + 1 < len(tail) and tail[i + 1][0]
                steps.append((w, bias, relu_out, zeros(batch, w.shape[0])))
            self.steps.append(steps)
        sizes = {self.w1.shape[0]} | {b - a for a, b, _ in self.parts}
        self.rows = {n: torch.arange(n, device=device, dtype=torch.int32)
                     for n in sizes | {w.shape[0] for steps in self.steps for w, _, _, _ in steps}}
        self.bound = True
        return self

    def _gemv(self, x, w, bias, relu, out):
        from kernels.gemv import gather_rows

        q, scale = (w.q, w.scale) if isinstance(w, Quantized) else (w, None)
        gather_rows(x, q, bias, self.rows[w.shape[0]], relu=relu, out=out.view(out.shape[0], -1, 1), fixed=True,
                    scale=scale)
        return out

    def _first(self, x, fast: bool):
        """The first layers' outputs: one tensor for the group (folded), or one per member (8-bit, unfolded)."""
        if self.pres is None:
            return (self._gemv(x, self.w1, self.b1, self.first_relu, self.z) if fast
                    else _linear(x, self.w1, self.b1))
        outs = []
        spans = [(0, self.w1.shape[0])] if len(self.pres) == 1 else [(a, b) for a, b, _ in self.parts]
        for i, ((mean, std), (a, b)) in enumerate(zip(self.pres, spans)):
            w, bias = self.w1[a:b], self.b1[a:b]
            if fast:  # the masked engine's (x − mean) / std, into a persistent buffer
                xs = torch.sub(x, mean, out=self.xs[i])
                xs.div_(std)
                outs.append(self._gemv(xs, w, bias, self.first_relu, self.zs[i]))
            else:
                outs.append(_linear((x - mean) / std, w, bias))
        return outs[0] if len(outs) == 1 else outs

    def __call__(self, x, keys=None, first: bool = True) -> dict:
        """Each member's scores (B, n); `keys`: only these members; first=False: reuse the first layer's output
        of the previous call (bound groups only: a later fork of the same step)."""
        fast = self.bound and self.backend == "triton"
        if first or not self.bound:
            self.z_now = self._first(x, fast)
        out = {}
        for index, (key, (a, b, tail)) in enumerate(zip(self.keys, self.parts)):
            if keys is not None and key not in keys:
                continue
            if isinstance(self.z_now, list):
                y = self.z_now[index]
            else:
                z = self.z_now
                y = z[:, a:b] if (a, b) != (0, z.shape[1]) else z
            if not fast:
                out[key] = _apply_tail(y, tail)
                continue
            if tail[0][0] and not self.first_relu:
                y = torch.relu(y)
            for w, bias, relu_out, buf in self.steps[index]:
                y = self._gemv(y, w, bias, relu_out, buf)
            out[key] = y
        return out

    def run(self, x, keep: dict, keys=None, first: bool = True) -> dict:
        """The kept indices of each member (or of `keys`): keep[key] = (k, out buffer or None, counts or None)."""
        chosen = {}
        for key, scores in self(x, keys, first).items():
            k, out, counts = keep[key]
            idx = select(scores, k, combine=self.combine, out=out, counts=counts)
            chosen[key] = idx if counts is None else Counted(idx, counts)
        return chosen

    def nbytes(self) -> int:
        return _nbytes(self.w1) + _nbytes(self.b1) + sum(_nbytes(t) for _, _, tail in self.parts for _, w, b in tail
                                                         for t in (w, b))


class SideStream:
    """Predictor work on a second CUDA stream (Deja Vu's asynchronous lookahead): `fork(key, fn, *args)` runs fn
    on the side stream once everything the main stream has issued so far is done, `join(key)` makes the main
    stream wait for it where its result is read. Inside a CUDA graph capture the fork and the join become graph
    edges, so the predictor of the next unit runs beside the current layer's kernels in every replay. Results
    must live in persistent buffers (`Group.bind`): a tensor allocated on one stream and read on the other could
    be reused by the allocator too early. Off a GPU (or disabled) fn runs inline."""

    def __init__(self, device, enabled: bool = True):
        self.on = bool(enabled) and torch.device(device).type == "cuda"
        self.stream = torch.cuda.Stream(device=device) if self.on else None
        self._ready: dict = {}
        self._done: dict = {}
        self.open: set = set()

    def _event(self, table, key):
        if key not in table:
            table[key] = torch.cuda.Event()
        return table[key]

    def fork(self, key, fn, *args):
        if not self.on:
            return fn(*args)
        ready = self._event(self._ready, key)
        ready.record()
        self.stream.wait_event(ready)
        with torch.cuda.stream(self.stream):
            result = fn(*args)
        self._event(self._done, key).record(self.stream)
        self.open.add(key)
        return result

    def join(self, key) -> None:
        if self.on and key in self.open:
            torch.cuda.current_stream().wait_event(self._done[key])
            self.open.discard(key)

    def join_all(self) -> None:
        for key in list(self.open):
            self.join(key)


# ------------------------------------------------------------------------------------------------------------
# sources
# ------------------------------------------------------------------------------------------------------------
class PredictorSource(ABC):
    """Base of the per-token sources: fixed counts, identity index sets for dense layers/units, persistent index
    buffers, and the second stream their predictors may run on.

    The engine passes its fp32 residual stream itself (`reads_stream`): a source copies what a predictor reads
    into a persistent buffer of the model's dtype (what the masked engine's predictors read), so that work on the
    second stream never reads a tensor the main stream goes on changing. Settings (class defaults, set on the
    instance before the engine binds it): `combine` (batch > 1: how the shared index set is chosen, see
    kernels.topk; "mean"), `lookahead` (run a predictor on the second stream when its input exists before its
    layer runs; on by default, CUDA and the Triton backend only)."""

    static = False
    reads_stream = True
    kind = "predictor"
    combine = "mean"
    lookahead = True

    def __init__(self, counts):
        self.counts = list(counts)

    def bind(self, engine) -> None:
        self.device, self.dtype = engine.device, engine.dtype
        H, Fd = engine.num_heads, engine.ffn_dim
        self.all_heads = torch.arange(H, dtype=torch.int32, device=self.device)
        self.all_neurons = torch.arange(Fd, dtype=torch.int32, device=self.device)
        self.batch, self.hidden, self.backend = engine.batch, engine.hidden, engine.backend
        self.units = {"heads": H, "neurons": Fd}
        self.side = SideStream(self.device, self.lookahead and engine.backend == "triton")
        self.chosen: dict = {}
        self._bind(engine)

    @abstractmethod
    def _bind(self, engine) -> None:
        """Move/fold the method's predictors for this engine (device, dtype, layout)."""

    # -- helpers of the subclasses ---------------------------------------------------------------------------
    def group(self, members) -> Group:
        """A Group of folded predictors on this engine's device and dtype, with its buffers."""
        return Group([(k, f.to(self.device, self.dtype)) for k, f in members]).bind(self.batch, self.backend,
                                                                                     self.combine)

    def keep_spec(self, key) -> tuple:
        """(k, persistent index buffer, count buffer or None) for the member `key` = (unit, layer): k indices,
        or with combine="union" (batch > 1) a buffer of every unit and a device count (`Counted`)."""
        unit, layer = key
        k = self.counts[layer][0 if unit == "heads" else 1]
        if self.combine == "union" and self.batch > 1:
            return (k, torch.zeros(1, self.units[unit], dtype=torch.int32, device=self.device),
                    torch.zeros(1, dtype=torch.int32, device=self.device))
        return k, torch.zeros(1, k, dtype=torch.int32, device=self.device), None

    def buffer(self) -> torch.Tensor:
        """A persistent (batch, hidden) tensor of the model's dtype: a predictor's input."""
        return torch.zeros(self.batch, self.hidden, device=self.device, dtype=self.dtype)

    def end_step(self, engine) -> None:
        self.side.join_all()

    def predictor_bytes(self) -> int:
        """Bytes of predictor weights one step reads (the predictor's share of the weight-streaming floor)."""
        return 0


def counted_sets(keep: torch.Tensor, out: torch.Tensor, counts: torch.Tensor) -> None:
    """Per-row kept indices of a bool mask (L, n) on the device: out[l, :counts[l]] = the kept units of row l in
    ascending order (no host synchronisation: a stable sort puts them first)."""
    out.copy_(torch.sort((~keep).to(torch.int8), dim=-1, stable=True).indices)
    counts.copy_(keep.sum(-1))



class AfterLayerZero(PredictorSource):
    """Sources whose predictors read layer 0's attention output (layer 0 dense): after layer 0's attention the
    engine calls `neuron_masks(0, h)`; the source subtracts the layer input it kept, then forks each later
    layer's predictions in layer order (the first of them the main stream waits for at once, the rest run beside
    the layers before theirs).

    Global allocation (ShadowLLM's setting, `global_allocation` set): every layer's scores are known at that
    point, so the source ranks them all at once, per unit, exactly as the masked engine plans
    (`harness.engine.plan_global`), and each layer gets a device-counted index set (`Counted`): the number of
    kept units of a layer varies per token, the total does not. With batch > 1 the plan is made on the batch-mean
    scores (combine="mean") or is the union of each sequence's plan ("union")."""

    global_allocation = None

    def _bind_common(self):
        self.h0, self.x0 = self.buffer(), self.buffer()
        self.ready: dict = {}
        self.plans = {}
        if self.global_allocation is not None:
            for unit, fraction in (("heads", self.global_allocation.heads), ("neurons", self.global_allocation.neurons)):
                if fraction > 0:
                    n = self.units[unit]
                    self.plans[unit] = (torch.zeros(self.L, n, dtype=torch.int32, device=self.device),
                                        torch.zeros(self.L, dtype=torch.int32, device=self.device))

    @abstractmethod
    def _forks(self):
        """[(layer, fn)] : fn(x0) fills self.chosen for that layer's members."""

    @abstractmethod
    def _all_scores(self, x0) -> dict:
        """{unit: (B, L, n) scores of every layer} (global allocation)."""

    def _plan(self, x0) -> None:
        from harness.engine import plan_global

        scores = self._all_scores(x0)
        for unit, (out, counts) in self.plans.items():
            s = scores[unit]
            if self.combine == "union" and s.shape[0] > 1:
                keep = plan_global(s, self.global_allocation, unit).any(0)
            else:
                keep = plan_global(s.float().mean(0) if s.shape[0] > 1 else s[0], self.global_allocation, unit)
            counted_sets(keep, out, counts)
            for l in range(self.L):
                self.chosen[(unit, l)] = Counted(out[l], counts[l:l + 1])

    def __call__(self, layer, hidden):
        if layer == 0:
            self.h0.copy_(hidden)  # the engine updates the residual stream in place
        else:
            self.side.join(("layer", layer))
        heads = self.chosen.get(("heads", layer))
        return (heads if heads is not None else self.all_heads), None

    def neuron_masks(self, layer, hidden):
        if layer == 0:  # after layer 0's attention: its output is the stream's change
            self.x0.copy_(hidden)
            self.x0.sub_(self.h0)
            if self.plans:
                self._plan(self.x0)
            else:
                for target, fn in self._forks():
                    self.chosen.update(self.side.fork(("layer", target), fn, self.x0))
        neurons = self.chosen.get(("neurons", layer))
        return neurons if neurons is not None else self.all_neurons



def reference_source(source, num_layers: int) -> StaticMasks:
    """A static source with the same per-layer counts (the first k units): the step without the predictor."""
    counts = source.counts
    return StaticMasks([list(range(h)) for h, _ in counts], [list(range(f)) for _, f in counts])
