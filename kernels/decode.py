"""The sparse decode engine: a static-KV-cache decode loop for pre-LN OPT whose kernels read only the weights of
the selected heads and neurons, captured once in a CUDA graph and replayed per token (in the spirit of gpt-fast).

    engine = SparseDecoder(model, StaticMasks(heads, neurons), max_len=256, kv="recompute")
    logits = engine.prefill(prompt_ids)          # dense pass over the prompt, fills the static KV cache
    for _ in range(n):
        logits = engine.step(engine.next_token)  # (B, vocab): one token, sparse; next_token = its argmax

Semantics are the masked engine's (harness.engine.MaskedEngine): a skipped head contributes nothing to
out_proj, a skipped neuron nothing to fc2, and attention of a kept head sees the keys/values of *every* past
token. Two ways to have those keys/values:
  kv="all"        K/V of all heads are computed at every token (dense K/V rows; Q, attention and out_proj
                  only for selected heads);
  kv="recompute"  (Deja Vu) only selected heads' K/V are computed at this token; the engine keeps each layer's
                  normed input of every past token and, when a selected head lacks K/V for some past tokens,
                  recomputes exactly those entries from the kept inputs before attention.

The step keeps the residual stream in fp32 and runs seven launches per layer (`kernels.gemv`: LayerNorm, QKV
with k/v routed into the cache, split-T attention (with the recompute inside), out_proj adding into the stream,
LayerNorm, fc1, fc2 adding into the stream), and around the layers one launch each for the embeddings, the final
LayerNorm, lm_head (cuBLAS) and the greedy argmax into `next_token`. Weights are re-laid-out once so that selected
rows are contiguous: fused QKV head-major (H·3·hd, d), out_proj head-major transposed (H·hd, d), fc1 as is (F, d),
fc2 neuron-major (F, d).

Masks come from a *mask source*: a callable `masks(layer, hidden) -> (head_idx, neuron_idx)` called inside the
step at the start of every layer with the residual stream entering that layer (B, d), so a method's predictor
runs inside the step (and inside the CUDA graph: its cost is part of every latency figure). The number of kept
heads/neurons per layer is fixed (index buffers of fixed length); the values may change every token. Optional
extras of a source: `neuron_masks(layer, hidden)` (neuron indices from the MLP input, called after attention; it
overrides the second element), `begin_step(engine)` (called once per step, before layer 0), `prefill_layer(layer,
hidden)` (called in prefill with the residual stream (B, T0, d) entering each layer), `counts` (per-layer
(n_heads, n_neurons), used when the engine is not told the counts) and `static = True` (it ignores `hidden` and
its indices never change, so the engine passes its fp32 residual stream as it is instead of a model-dtype copy,
and the kernels may read weights before the previous kernel ends: KERNELS_PDL=prefetch), `reads_stream = True`
(the engine passes its fp32 residual stream; the source copies what its predictors read, e.g. into buffers a
second CUDA stream reads: kernels.sources.SideStream) and `end_step(engine)` (called once per step after the last
layer, e.g. to join that stream). Indices are shared by the batch; contiguous int32/int64 index tensors on the
device are read in place, anything else is copied into the layer's fixed-size buffer. `heads_used[l]` is the
index tensor layer l read in the last step (under a CUDA graph the same fixed tensor every replay): the recompute
rate of `harness.latency.head_change_rate` reads it.

backend="triton" runs the kernels of `kernels.gemv` (CPU: set TRITON_INTERPRET=1 first); backend="torch" runs
their references (`kernels.reference`), e.g. on a CPU. CUDA graphs are used only on CUDA (cuda_graph=True).
"""
from __future__ import annotations

import contextlib
from dataclasses import dataclass
from typing import NamedTuple

import torch
import torch.nn.functional as F

KV_MODES = ("all", "recompute")
BACKENDS = ("triton", "torch")


class Counted(NamedTuple):
    """Indices whose number varies per token (global allocation, the union of a batch's sets): `idx` is a buffer
    of up to every unit of the layer (int32, on the device), of which the first count[0] entries are chosen;
    `count` is a 1-element int32 device tensor that the kernels read (no host synchronisation)."""

    idx: torch.Tensor
    count: torch.Tensor


# ------------------------------------------------------------------------------------------------------------
# mask sources
# ------------------------------------------------------------------------------------------------------------
class StaticMasks:
    """Fixed per-layer index sets: `heads[l]`, `neurons[l]` (sequences or tensors; None = all of that layer)."""

    static = True

    def __init__(self, heads, neurons):
        self.head_sets, self.neuron_sets = list(heads), list(neurons)
        self._bound = None

    def bind(self, engine: "SparseDecoder") -> None:
        def as_index(values, n):
            values = torch.arange(n) if values is None else torch.as_tensor(values)
            return values.to(device=engine.device, dtype=torch.int32).contiguous()

        self._bound = [(as_index(h, engine.num_heads), as_index(f, engine.ffn_dim))
                       for h, f in zip(self.head_sets, self.neuron_sets)]
        self.counts = [(h.numel(), f.numel()) for h, f in self._bound]

    def __call__(self, layer, hidden):
        return self._bound[layer]


class DenseMasks(StaticMasks):
    """Every head and every neuron: the engine as a dense baseline (same kernels, identity indices)."""

    def __init__(self, num_layers: int):
        super().__init__([None] * num_layers, [None] * num_layers)


# ------------------------------------------------------------------------------------------------------------
# the engine
# ------------------------------------------------------------------------------------------------------------
@dataclass
class LayerWeights:
    ln1_w: torch.Tensor  # self_attn_layer_norm
    ln1_b: torch.Tensor
    eps1: float
    wqkv: torch.Tensor  # (H·3·hd, d): head h's q, k, v rows are [3·hd·h, 3·hd·(h+1))
    bqkv: torch.Tensor
    wot: torch.Tensor  # (H·hd, d) = out_proj.weight.T
    bo: torch.Tensor
    ln2_w: torch.Tensor  # final_layer_norm
    ln2_b: torch.Tensor
    eps2: float
    w1: torch.Tensor  # (F, d) = fc1.weight
    b1: torch.Tensor
    w2t: torch.Tensor  # (F, d) = fc2.weight.T
    b2: torch.Tensor


def _ops(backend: str):
    if backend == "triton":
        from kernels import gemv

        return gemv
    from kernels import reference

    return reference


class StepLoop:
    """What both decode engines (this one and kernels.decode_llama) share around their `_step_impl`: the greedy
    token buffer, index buffers read in place, one step replayed from a CUDA graph, greedy generation. A subclass
    sets device, batch, max_len, length, pos, token, ops, use_graph, graph, logits and defines `prefill` and
    `_step_impl` (and `_step_state` when its step changes more than pos and token)."""

    @property
    def next_token(self) -> torch.Tensor:
        """The greedy token (B,) of the latest logits (prefill's or a step's), computed on the device inside the
        step; `step(engine.next_token)` continues greedy decoding without a copy."""
        return self.token

    def _indices(self, layer, got, buffers, units, counted: bool = True):
        """The source's indices for this layer as the kernels read them, and their device count (None: all of
        them): used in place when they are already a contiguous int32/int64 tensor on the device (inside a CUDA
        graph their address is fixed too), else copied into the layer's fixed-size buffer. `Counted` indices are
        read in place (at most `units` of them)."""
        if got is None:
            raise ValueError(f"the mask source gave no indices for layer {layer}")
        if isinstance(got, Counted):
            if not counted:
                raise ValueError(f"layer {layer}: this engine reads fixed per-layer counts; global allocation and "
                                 "combine='union' decode on the OPT engine (kernels.decode) only")
            idx = got.idx.reshape(-1)
            if idx.numel() > units or idx.dtype != torch.int32 or idx.device != self.device or got.count.numel() != 1:
                raise ValueError(f"layer {layer}: Counted indices must be an int32 device buffer of at most {units} "
                                 "units with a 1-element count")
            return idx, got.count.reshape(1)
        buf = buffers[layer]
        if got.numel() != buf.numel():
            raise ValueError(f"layer {layer}: the mask source gave {got.numel()} indices, the engine keeps "
                             f"{buf.numel()} (counts are fixed per layer)")
        if got.dtype in (torch.int32, torch.int64) and got.device == self.device and got.is_contiguous():
            return got.reshape(-1), None
        buf.copy_(got.reshape(-1))
        return buf, None

    @torch.no_grad()
    def step(self, token) -> torch.Tensor:
        """Decode one token per sequence (B,) → logits (B, vocab). With CUDA graphs the returned tensor is the
        graph's static output, overwritten by the next step (clone it to keep it)."""
        if self.length == 0:
            raise RuntimeError("call prefill() first")
        if self.length >= self.max_len:
            raise RuntimeError(f"the KV cache is full (max_len {self.max_len})")
        if token is not self.token:
            self.token.copy_(torch.as_tensor(token, device=self.device).reshape(-1).expand(self.batch))
        if self.use_graph:
            if self.graph is None:
                self._capture()
            self.graph.replay()
            logits = self.logits
        else:
            logits = self._step_impl()
        self.length += 1
        return logits

    def _step_state(self) -> list:
        """Tensors a step changes besides pos and token (restored after the warm-up and the capture)."""
        return []

    def _capture(self, warmup: int = 2) -> None:
        """Warm up (autotunes the kernels, the first step with PDL off) on a side stream, undo the warm-up's
        effects, capture one step."""
        saved_pos, saved_token = self.pos.clone(), self.token.clone()  # a step overwrites token with its argmax
        state = self._step_state()
        saved = [t.clone() for t in state]

        def restore():
            self.pos.copy_(saved_pos)
            for tensor, value in zip(state, saved):
                tensor.copy_(value)

        stream = torch.cuda.Stream()
        stream.wait_stream(torch.cuda.current_stream())
        tuning = getattr(self.ops, "pdl_off", contextlib.nullcontext)
        with torch.cuda.stream(stream):
            for i in range(warmup):
                with tuning() if i == 0 else contextlib.nullcontext():  # autotune without PDL (see gemv.pdl_off)
                    self._step_impl()
                self.pos.copy_(saved_pos)
                self.token.copy_(saved_token)
        torch.cuda.current_stream().wait_stream(stream)
        restore()
        self.graph = torch.cuda.CUDAGraph()
        with torch.cuda.graph(self.graph):
            self.logits = self._step_impl()
        restore()  # capture runs nothing, but keep pos and the state exact

    @torch.no_grad()
    def generate(self, input_ids: torch.Tensor, new_tokens: int) -> torch.Tensor:
        """Greedy decoding: prefill, then `new_tokens` steps. Returns the generated tokens (B, new_tokens)."""
        self.prefill(input_ids)
        out = []
        for _ in range(new_tokens):
            out.append(self.next_token.clone())
            self.step(self.next_token)
        return torch.stack(out, 1)



class SparseDecoder(StepLoop):
    def __init__(self, model, masks=None, *, max_len: int, batch: int = 1, kv: str = "all",
                 backend: str | None = None, heads_kept=None, neurons_kept=None, cuda_graph: bool = True,
                 device=None, dtype=None, layers=None):
        if kv not in KV_MODES:
            raise ValueError(f"unknown kv mode {kv!r}; valid: {', '.join(KV_MODES)}")
        config = model.config
        if not config.do_layer_norm_before:
            raise ValueError("the sparse decode engine supports pre-LN OPT (do_layer_norm_before=True) only")
        decoder = model.model.decoder
        first = next(model.parameters())
        self.device = torch.device(device) if device is not None else first.device
        self.dtype = dtype or first.dtype
        backend = backend or ("triton" if self.device.type == "cuda" else "torch")
        if backend not in BACKENDS:
            raise ValueError(f"unknown backend {backend!r}; valid: {', '.join(BACKENDS)}")
        self.backend, self.ops, self.kv = backend, _ops(backend), kv
        self.batch, self.max_len = batch, max_len
        self.num_layers = config.num_hidden_layers
        self.num_heads = config.num_attention_heads
        self.hidden = config.hidden_size
        self.head_dim = self.hidden // self.num_heads
        self.ffn_dim = config.ffn_dim
        self.scaling = self.head_dim ** -0.5
        if max_len > config.max_position_embeddings:
            raise ValueError(f"max_len {max_len} exceeds the model's {config.max_position_embeddings} positions")

        to = dict(device=self.device, dtype=self.dtype)
        self.embed = decoder.embed_tokens.weight.to(**to)
        self.pos_embed = decoder.embed_positions.weight.to(**to)
        self.pos_offset = getattr(decoder.embed_positions, "offset", 2)
        self.project_in = decoder.project_in.weight.to(**to) if decoder.project_in is not None else None
        self.project_out = decoder.project_out.weight.to(**to) if decoder.project_out is not None else None
        self.final_ln = decoder.final_layer_norm
        self.final_w = self.final_ln.weight.to(**to) if self.final_ln.weight is not None else None
        self.final_b = self.final_ln.bias.to(**to) if self.final_ln.bias is not None else None
        self.lm_head = model.lm_head.weight.to(**to)
        # `layers`: re-laid-out weights of another engine of the same model, shared instead of copied again
        self.layers = layers if layers is not None else [self._relayout(layer, to) for layer in decoder.layers]

        H, T, hd, B = self.num_heads, max_len, self.head_dim, batch
        self.cache = [torch.zeros(B, H, T, 2, hd, **to) for _ in range(self.num_layers)]
        if kv == "recompute":
            self.xkeep = [torch.zeros(B, T, self.hidden, **to) for _ in range(self.num_layers)]
            self.have = [torch.zeros(H, T, dtype=torch.int8, device=self.device) for _ in range(self.num_layers)]
        self.pos = torch.zeros(1, dtype=torch.long, device=self.device)  # where the next token goes
        self.length = 0  # host copy of pos
        self.token = torch.zeros(B, dtype=torch.long, device=self.device)  # the step's input; then its argmax
        self.all_heads = torch.arange(H, dtype=torch.int32, device=self.device)
        self.h = torch.zeros(B, self.hidden, dtype=torch.float32, device=self.device)  # the step's residual stream

        self.masks = masks if masks is not None else DenseMasks(self.num_layers)
        if hasattr(self.masks, "bind"):
            self.masks.bind(self)
        self.heads_kept, self.neurons_kept = heads_kept, neurons_kept = kept_counts(
            self.masks, heads_kept, neurons_kept, self.num_layers)
        self.head_buf = [torch.zeros(k, dtype=torch.int32, device=self.device) for k in heads_kept]
        self.neuron_buf = [torch.zeros(k, dtype=torch.int32, device=self.device) for k in neurons_kept]
        self.heads_used = [None] * self.num_layers  # the index tensors the last step read (fixed under a graph)
        self.use_graph = cuda_graph and self.device.type == "cuda"
        self.graph = None
        self.logits = None

    # -- weights -------------------------------------------------------------------------------------------
    def _relayout(self, layer, to) -> LayerWeights:
        attn, H, hd, d = layer.self_attn, self.num_heads, self.head_dim, self.hidden

        def heads(w):  # (H·hd, ...) → (H, 1, hd, ...)
            return w.detach().to(**to).reshape(H, 1, hd, *w.shape[1:])

        wqkv = torch.cat([heads(attn.q_proj.weight), heads(attn.k_proj.weight), heads(attn.v_proj.weight)], 1)
        bqkv = torch.cat([heads(attn.q_proj.bias), heads(attn.k_proj.bias), heads(attn.v_proj.bias)], 1)
        cp = lambda t: t.detach().to(**to).contiguous()  # noqa: E731
        wqkv, bqkv = wqkv.reshape(3 * H * hd, d).contiguous(), bqkv.reshape(-1).contiguous()
        w1, b1 = cp(layer.fc1.weight), cp(layer.fc1.bias)
        ln1, ln2 = layer.self_attn_layer_norm, layer.final_layer_norm
        return LayerWeights(
            ln1_w=cp(ln1.weight), ln1_b=cp(ln1.bias), eps1=ln1.eps, wqkv=wqkv, bqkv=bqkv,
            wot=cp(attn.out_proj.weight.T), bo=cp(attn.out_proj.bias),
            ln2_w=cp(ln2.weight), ln2_b=cp(ln2.bias), eps2=ln2.eps, w1=w1, b1=b1,
            w2t=cp(layer.fc2.weight.T), b2=cp(layer.fc2.bias))

    def weight_bytes(self, heads_kept=None, neurons_kept=None) -> int:
        """Bytes of weights one step must read (the weight-streaming floor's numerator), KV cache excluded."""
        heads_kept = heads_kept or self.heads_kept
        neurons_kept = neurons_kept or self.neurons_kept
        e = torch.finfo(self.dtype).bits // 8
        d, hd, H = self.hidden, self.head_dim, self.num_heads
        total = self.lm_head.numel() + 4 * d + (self.project_out.numel() if self.project_out is not None else 0)
        for hk, fk in zip(heads_kept, neurons_kept):
            kv_heads = H if self.kv == "all" else hk
            total += (hk * hd + 2 * kv_heads * hd) * (d + 1)  # q of kept heads, k/v rows (+bias)
            total += hk * hd * d + d  # out_proj rows of kept heads + bias
            total += fk * (d + 1) + fk * d + d  # fc1 rows + bias, fc2 rows + bias
            total += 4 * d  # layer norms
        return total * e

    # -- prefill (dense) -----------------------------------------------------------------------------------
    def _embed(self, ids, positions):
        h = F.embedding(ids, self.embed)
        if self.project_in is not None:
            h = F.linear(h, self.project_in)
        return h + F.embedding(positions + self.pos_offset, self.pos_embed)

    def _head(self, h):
        h = F.layer_norm(h, (h.shape[-1],), self.final_w, self.final_b, self.final_ln.eps)
        if self.project_out is not None:
            h = F.linear(h, self.project_out)
        return F.linear(h, self.lm_head)

    @torch.no_grad()
    def prefill(self, input_ids: torch.Tensor) -> torch.Tensor:
        """Dense pass over the prompt (B, T0) (no padding); fills the KV cache. Returns the last token's logits."""
        input_ids = input_ids.to(self.device)
        B, T0 = input_ids.shape
        if B != self.batch or T0 >= self.max_len:
            raise ValueError(f"prompt of shape {(B, T0)} does not fit batch {self.batch}, max_len {self.max_len}")
        H, hd, d = self.num_heads, self.head_dim, self.hidden
        h = self._embed(input_ids, torch.arange(T0, device=self.device).expand(B, T0))
        observe = getattr(self.masks, "prefill_layer", None)
        for index, w in enumerate(self.layers):
            if observe is not None:  # e.g. timewise:time keeps the last prompt token's layer input
                observe(index, h)
            xn = F.layer_norm(h, (d,), w.ln1_w, w.ln1_b, w.eps1)
            if self.kv == "recompute":
                self.xkeep[index][:, :T0] = xn
                self.have[index].zero_()
                self.have[index][:, :T0] = 1
            qkv = F.linear(xn, w.wqkv, w.bqkv).view(B, T0, H, 3, hd)
            self.cache[index][:, :, :T0] = qkv[:, :, :, 1:].transpose(1, 2)
            q = (qkv[:, :, :, 0] * self.scaling).transpose(1, 2)
            k, v = qkv[:, :, :, 1].transpose(1, 2), qkv[:, :, :, 2].transpose(1, 2)
            attn = F.scaled_dot_product_attention(q, k, v, is_causal=True, scale=1.0)
            h = h + F.linear(attn.transpose(1, 2).reshape(B, T0, d), w.wot.T, w.bo)
            xn = F.layer_norm(h, (d,), w.ln2_w, w.ln2_b, w.eps2)
            h = h + F.linear(torch.relu(F.linear(xn, w.w1, w.b1)), w.w2t.T, w.b2)
        self.pos.fill_(T0)
        self.length = T0
        logits = self._head(h[:, -1])
        self.token.copy_(logits.argmax(-1))
        return logits

    # -- one token -----------------------------------------------------------------------------------------
    def _step_state(self) -> list:
        return list(self.have) if self.kv == "recompute" else []

    def _step_impl(self) -> torch.Tensor:
        """One token (see the module docstring): the residual stream h stays in fp32, k/v go straight into the
        cache, attention is split over positions, and out_proj/fc2 add into h."""
        ops, B, H, hd, dt = self.ops, self.batch, self.num_heads, self.head_dim, self.dtype
        h = self.h
        if self.project_in is None:
            ops.embed(self.token, self.pos, self.embed, self.pos_embed, self.pos_offset, h)
        else:
            h.copy_(self._embed(self.token, self.pos.expand(B)))
        if hasattr(self.masks, "begin_step"):
            self.masks.begin_step(self)
        static = getattr(self.masks, "static", False)
        raw = static or getattr(self.masks, "reads_stream", False)  # the source copies what it reads itself
        hidden = (lambda: h) if raw else (lambda: h.to(dt))  # noqa: E731  (predictors read the model dtype)
        neurons_hook = getattr(self.masks, "neuron_masks", None)
        # static masks: a kept head computed its K/V at every token, so nothing is ever missing (no recompute check)
        recompute = self.kv == "recompute" and not static
        for index, w in enumerate(self.layers):
            head_idx, neuron_idx = self.masks(index, hidden())
            heads, head_count = self._indices(index, head_idx, self.head_buf, H)
            cache = self.cache[index]
            xn = ops.layer_norm(h, w.ln1_w, w.ln1_b, w.eps1, dt, keep=self.xkeep[index] if recompute else None,
                                pos=self.pos)
            part = "qkv"
            if self.kv == "all" and (heads.numel() < H or head_count is not None):  # k/v of every head, q of kept
                ops.qkv_to_cache(xn, w.wqkv, w.bqkv, self.all_heads, hd, cache, self.pos, part="kv", fixed=True)
                part = "q"
            q = ops.qkv_to_cache(xn, w.wqkv, w.bqkv, heads, hd, cache, self.pos, part=part, fixed=static,
                                 count=head_count)
            attn = ops.attend(q, cache, heads, self.pos, self.scaling, fixed=static, count=head_count,
                              recompute=(self.xkeep[index], w.wqkv, w.bqkv, self.have[index]) if recompute else None)
            ops.out_proj_add(attn, w.wot, w.bo, heads, hd, h, fixed=static, count=head_count)
            if neurons_hook is not None:
                neuron_idx = neurons_hook(index, hidden())
            neurons, neuron_count = self._indices(index, neuron_idx, self.neuron_buf, self.ffn_dim)
            act = ops.fc1_gather(ops.layer_norm(h, w.ln2_w, w.ln2_b, w.eps2, dt), w.w1, w.b1, neurons,
                                 fixed=static, count=neuron_count)
            ops.fc2_add(act, w.w2t, w.b2, neurons, h, fixed=static, count=neuron_count)
            self.heads_used[index] = heads if head_count is None else Counted(heads, head_count)
        if hasattr(self.masks, "end_step"):
            self.masks.end_step(self)  # e.g. join a second stream the source forked
        if self.final_w is not None and self.final_b is not None:
            x = ops.layer_norm(h, self.final_w, self.final_b, self.final_ln.eps, dt)
            if self.project_out is not None:
                x = F.linear(x, self.project_out)
            logits = F.linear(x, self.lm_head)
        else:
            logits = self._head(h.to(dt))
        ops.argmax(logits, out=self.token)  # the greedy next token, for step(engine.next_token)
        self.pos.add_(1)
        return logits

def kept_counts(masks, heads_kept, neurons_kept, layers: int) -> tuple[list[int], list[int]]:
    """The kept heads and neurons of every layer (each engine's index buffers are sized by them): the ones given
    (an int for every layer, or one per layer), else the mask source's `counts` [(heads, neurons), ...]."""
    counts = getattr(masks, "counts", None)
    heads_kept = _per_layer(heads_kept, layers) if heads_kept is not None else None
    neurons_kept = _per_layer(neurons_kept, layers) if neurons_kept is not None else None
    if heads_kept is None or neurons_kept is None:
        if counts is None:
            raise ValueError("give heads_kept and neurons_kept, or a mask source with `counts`")
        heads_kept = heads_kept or [c[0] for c in counts]
        neurons_kept = neurons_kept or [c[1] for c in counts]
    return heads_kept, neurons_kept


def _per_layer(value, n):
    if isinstance(value, int):
        return [value] * n
    value = list(value)
    if len(value) != n:
        raise ValueError(f"expected {n} per-layer counts, got {len(value)}")
    return value
