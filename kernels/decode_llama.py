"""The sparse decode engine for Llama-family models (Llama-2/3, Mistral, Qwen2): `kernels.decode.SparseDecoder`'s
protocol and API (prefill, step, next_token, generate, weight_bytes, CUDA graph capture, PDL), with RMSNorm, RoPE,
grouped-query attention and a SwiGLU MLP.

    engine = LlamaSparseDecoder(model, StaticMasks(heads, neurons), max_len=256)
    logits = engine.prefill(prompt_ids)          # dense pass over the prompt, fills the static KV cache
    for _ in range(n):
        logits = engine.step(engine.next_token)  # (B, vocab): one token, sparse

Semantics are the masked engine's (harness.engine.MaskedEngine on the Hugging Face model): heads are the query
heads at o_proj's input, neurons the SwiGLU intermediate silu(gate)·up at down_proj's input. K/V heads are shared
by their query-head group, so every K/V head's k/v is computed at every token (kv="all"; there is no Deja Vu
recompute mode); q, attention and o_proj run for the kept query heads only, each reading its group's K/V head.

Two paths, chosen by the mask source:
  head/neuron masks (static, dense, dejavu, shadow, ...: `kernels.decode`'s mask-source protocol, unchanged: called
  with the residual stream entering each layer, `neuron_masks` after attention, `begin_step`, `prefill_layer`,
  `counts`, `static`) — eight launches per layer: RMSNorm; one row gather for q of the kept heads and k/v of every
  K/V head (`kernels.gemv.gather_rows` over [q; k; v] rows, unit-major); RoPE of q and k, k/v into the cache
  (`gemv_llama.rope_to_cache`); split-T attention (`kernels.gemv.attend`, given each kept head's K/V head);
  o_proj of the kept heads adding into the fp32 stream (`gemv.out_proj_add`); RMSNorm; gate+up of the kept neurons
  with SwiGLU fused (`gemv_llama.swiglu_gather`); down_proj of the kept neurons adding into the stream
  (`gemv.fc2_add`, the neuron-major transposed weight).
  input thresholds (TEAL: a source with `input_sparse = True` and `thresholds` (L, 7) for the sites q, k, v, o,
  gate, up, down; t < 0 keeps the site dense) — every projection is input-sparse: it reads the input-major
  transposed weight's rows of the inputs with |x| > t only (`gemv_llama.input_sparse_add`, masked-off rows are not
  loaded), so the number kept varies per token with no host sync. Per layer: RMSNorm; q/k/v (one launch, three
  thresholds) into an fp32 workspace; RoPE (+ bias) and k/v into the cache; attention of every head; o_proj into
  the stream; RMSNorm; gate/up (one launch, two thresholds) into a workspace; down, whose input is SwiGLU of the
  gate/up workspace computed in its prologue, into the stream. The workspaces are zeroed once per step. The kept
  inputs per token, layer and site are counted in the kernels (`input_sparsity()` reads them: the achieved
  sparsity per token). The prompt is thresholded too (as the masked engine does: thresholds are per token), the
  predictor sources' prompts are dense (as in kernels.decode).

Weights are re-laid-out by the family adapter (harness.families.llama.decode_weights): "rows" for the first path,
"inputs" for the second; engines of one model share them (`layers=` another engine's `layers`, which gains the
layout it lacks). RoPE's cos/sin come from the Hugging Face model's own rotary embedding at positions 0..max_len−1
(so rope_theta and the scaling types of the config — "llama3", "linear", "yarn", … — are honoured; types whose
frequencies depend on the sequence length, "dynamic" and "longrope", are refused past their original length).
Mistral's sliding window: refused when max_len exceeds it (inside it, attention is the full causal one).

backend="triton" runs `kernels.gemv` + `kernels.gemv_llama` (CPU: TRITON_INTERPRET=1 first); backend="torch" their
references (`kernels.reference`, `kernels.reference_llama`). CUDA graphs on CUDA only.
"""
from __future__ import annotations


import torch
import torch.nn.functional as F

from harness.families import LINEAR_SITES, family_of
from kernels.decode import Counted, DenseMasks, StaticMasks, StepLoop, kept_counts  # noqa: F401 - shared with OPT's

BACKENDS = ("triton", "torch")
SITE_INDEX = {site: i for i, site in enumerate(LINEAR_SITES)}


class InputThresholdMasks:
    """TEAL-style input thresholds for the decode engine: keep input i of linear site s at layer l where
    |x_i| > thresholds[l, s] (sites in harness.families.LINEAR_SITES order: q, k, v, o, gate, up, down; t < 0: dense).
    Every head and neuron is kept; the engine takes its input-sparse path."""

    static = True  # no per-token predictor: the engine passes its stream as it is
    input_sparse = True
    kind = "teal"

    def __init__(self, thresholds: torch.Tensor, sparse_prefill: bool = True):
        thresholds = torch.as_tensor(thresholds, dtype=torch.float64)
        if thresholds.dim() != 2 or thresholds.shape[1] != len(LINEAR_SITES):
            raise ValueError(f"thresholds must be (layers, {len(LINEAR_SITES)}) for sites {LINEAR_SITES}")
        self.host_thresholds = thresholds
        self.sparse_prefill = sparse_prefill

    def bind(self, engine) -> None:
        if self.host_thresholds.shape[0] != engine.num_layers:
            raise ValueError(f"thresholds for {self.host_thresholds.shape[0]} layers, the model has {engine.num_layers}")
        self.thresholds = self.host_thresholds.to(device=engine.device, dtype=torch.float32).contiguous()
        self.all_heads = torch.arange(engine.num_heads, dtype=torch.int32, device=engine.device)
        self.all_neurons = torch.arange(engine.ffn_dim, dtype=torch.int32, device=engine.device)
        self.counts = [(engine.num_heads, engine.ffn_dim)] * engine.num_layers

    def __call__(self, layer, hidden):
        return self.all_heads, self.all_neurons

    def predictor_bytes(self) -> int:
        return 0


class _Ops:
    """The step's operations of one backend: the Llama-specific ones first, then kernels.gemv's / reference's."""

    def __init__(self, backend):
        if backend == "triton":
            from kernels import gemv, gemv_llama

            self.mods = (gemv_llama, gemv)
        else:
            from kernels import reference, reference_llama

            self.mods = (reference_llama, reference)

    def __getattr__(self, name):
        for mod in self.mods:
            if hasattr(mod, name):
                return getattr(mod, name)
        raise AttributeError(name)


def _sliding_windows(model, family):
    out = []
    for layer in family.layers(model):
        attn = layer.self_attn
        window = getattr(attn, "sliding_window", None) if hasattr(attn, "sliding_window") \
            else getattr(model.config, "sliding_window", None)
        out.append(window)
    return out


class LlamaSparseDecoder(StepLoop):
    def __init__(self, model, masks=None, *, max_len: int, batch: int = 1, kv: str = "all",
                 backend: str | None = None, heads_kept=None, neurons_kept=None, cuda_graph: bool = True,
                 device=None, dtype=None, layers=None):
        family = family_of(model)
        if family.name != "llama":
            raise ValueError(f"LlamaSparseDecoder runs Llama-family models, not {family.name} (use kernels.decode)")
        if kv != "all":
            raise ValueError("the Llama decode engine computes every K/V head at every token (kv='all'): its K/V heads "
                             "are shared by their query-head group, so there is nothing to recompute")
        config = model.config
        shape = family.sizes(config)
        first = next(model.parameters())
        self.device = torch.device(device) if device is not None else first.device
        self.dtype = dtype or first.dtype
        backend = backend or ("triton" if self.device.type == "cuda" else "torch")
        if backend not in BACKENDS:
            raise ValueError(f"unknown backend {backend!r}; valid: {', '.join(BACKENDS)}")
        self.backend, self.ops, self.kv = backend, _Ops(backend), kv
        self.family, self.batch, self.max_len = family, batch, max_len
        self.num_layers, self.num_heads, self.num_kv_heads = shape.layers, shape.heads, shape.kv_heads
        self.head_dim, self.hidden, self.ffn_dim = shape.head_dim, shape.hidden, shape.ffn
        self.group = self.num_heads // self.num_kv_heads
        self.scaling = self.head_dim ** -0.5
        for window in _sliding_windows(model, family):
            if window is not None and max_len > window:
                raise ValueError(f"max_len {max_len} exceeds the sliding window ({window}); the engine's attention is "
                                 "the full causal one, equal to the windowed one only inside the window")
        decoder = family.decoder(model)
        self.cos, self.sin = self._rope_tables(decoder, config, max_len)

        to = dict(device=self.device, dtype=self.dtype)
        self.embed = decoder.embed_tokens.weight.detach().to(**to).contiguous()
        self.final_w, self.final_eps = decoder.norm.weight.detach().to(**to), decoder.norm.variance_epsilon
        self.lm_head = model.lm_head.weight.detach().to(**to)

        self.masks = masks if masks is not None else DenseMasks(self.num_layers)
        if hasattr(self.masks, "bind"):
            self.masks.bind(self)
        self.input_sparse = bool(getattr(self.masks, "input_sparse", False))
        layout = "inputs" if self.input_sparse else "rows"
        if layers is None:
            from harness.families.llama import decode_weights

            layers = decode_weights(model, device=self.device, dtype=self.dtype, layouts=())
        self.layers = layers.ensure(layout)

        H, Hkv, T, hd, B = self.num_heads, self.num_kv_heads, max_len, self.head_dim, batch
        self.cache = [torch.zeros(B, Hkv, T, 2, hd, **to) for _ in range(self.num_layers)]
        self.pos = torch.zeros(1, dtype=torch.long, device=self.device)
        self.length = 0
        self.prompt_len = 0
        self.token = torch.zeros(B, dtype=torch.long, device=self.device)
        self.h = torch.zeros(B, self.hidden, dtype=torch.float32, device=self.device)
        self.kv_units = torch.arange(H, H + 2 * Hkv, dtype=torch.int32, device=self.device)

        self.heads_kept, self.neurons_kept = heads_kept, neurons_kept = kept_counts(
            self.masks, heads_kept, neurons_kept, self.num_layers)
        # per layer: [kept heads | K heads | V heads] units of the QKV gather, and each kept head's K/V head
        self.unit_buf = [torch.cat([torch.zeros(k, dtype=torch.int32, device=self.device), self.kv_units])
                         for k in heads_kept]
        self.kv_buf = [torch.zeros(k, dtype=torch.int32, device=self.device) for k in heads_kept]
        self.neuron_buf = [torch.zeros(k, dtype=torch.int32, device=self.device) for k in neurons_kept]
        self.heads_used = [None] * self.num_layers  # the head indices the last step read (head_change_rate)
        self._fixed_units: dict = {}
        if self.input_sparse:
            if any(k != H for k in heads_kept) or any(k != self.ffn_dim for k in neurons_kept):
                raise ValueError("an input-sparse source keeps every head and neuron")
            self.thresholds = self.masks.thresholds
            self.qkv_cols = (H + 2 * Hkv) * hd
            self.workspace = torch.zeros(self.num_layers, B, self.qkv_cols + 2 * self.ffn_dim, dtype=torch.float32,
                                         device=self.device)
            self.kept_inputs = torch.zeros(T, B, self.num_layers, len(LINEAR_SITES), dtype=torch.int32,
                                           device=self.device)
            self.all_kv = (torch.arange(H, device=self.device) // self.group).to(torch.int32)
        self.use_graph = cuda_graph and self.device.type == "cuda"
        self.graph = None
        self.logits = None

    # -- rotary tables ---------------------------------------------------------------------------------------
    def _rope_tables(self, decoder, config, max_len):
        rotary = decoder.rotary_emb
        rope_type = getattr(rotary, "rope_type", "default")
        original = getattr(rotary, "original_max_seq_len", config.max_position_embeddings)
        if rope_type in ("dynamic", "longrope") and max_len > original:
            raise ValueError(f"rope type {rope_type!r} changes its frequencies past {original} positions; the engine's "
                             f"tables are fixed (max_len {max_len})")
        where = rotary.inv_freq.device
        with torch.no_grad():
            positions = torch.arange(max_len, device=where)[None]
            cos, sin = rotary(torch.zeros(1, device=where, dtype=torch.float32), positions)
        f32 = dict(device=self.device, dtype=torch.float32)
        return cos[0].to(**f32).contiguous(), sin[0].to(**f32).contiguous()

    # -- weights -------------------------------------------------------------------------------------------
    def weight_bytes(self, heads_kept=None, neurons_kept=None) -> int:
        """Bytes of weights one step reads (the weight-streaming floor's numerator), KV cache excluded. For an
        input-sparse engine: the mean over the decoded tokens so far of the kept inputs' weight rows (dense before
        any step)."""
        heads_kept = heads_kept or self.heads_kept
        neurons_kept = neurons_kept or self.neurons_kept
        e = torch.finfo(self.dtype).bits // 8
        d, hd, Hkv = self.hidden, self.head_dim, self.num_kv_heads
        total = self.lm_head.numel() + 2 * d  # lm_head, final norm, the embedding row
        w0 = self.layers[0]
        qkv_bias = w0.bqkv is not None
        if self.input_sparse and self.length > self.prompt_len:
            kept = self.input_sparsity()["kept_per_site_layer"]  # (L, 7) mean kept inputs per decoded token
            for l in range(self.num_layers):
                outs = self._site_outputs()
                total += int(sum(kept[l][s] * outs[s] for s in range(len(LINEAR_SITES))))
                total += 2 * d + (self.qkv_cols if qkv_bias else 0)
            return total * e
        for hk, fk in zip(heads_kept, neurons_kept):
            total += (hk * hd + 2 * Hkv * hd) * (d + (1 if qkv_bias else 0))  # q of kept heads, every k/v (+bias)
            total += hk * hd * d + (d if w0.bo is not None else 0)  # o_proj rows of kept heads
            total += 2 * fk * (d + (1 if w0.bgu is not None else 0))  # gate/up rows of kept neurons
            total += fk * d + (d if w0.b2 is not None else 0)  # down rows of kept neurons
            total += 2 * d  # RMSNorms
        return total * e

    def _site_outputs(self):
        hd, H, Hkv, d, Fd = self.head_dim, self.num_heads, self.num_kv_heads, self.hidden, self.ffn_dim
        return [H * hd, Hkv * hd, Hkv * hd, d, Fd, Fd, d]

    def _site_inputs(self):
        return [self.hidden] * 3 + [self.num_heads * self.head_dim, self.hidden, self.hidden, self.ffn_dim]

    def input_sparsity(self, decode_only: bool = True) -> dict:
        """The achieved input sparsity (input-sparse engines), from the kernels' counts of kept inputs per token,
        layer and site: per token (each sequence's decoded tokens; decode_only=False: the prompt's too) the fraction
        of decoder-layer linear weights skipped (skipped inputs × out_features over all of them, the masked engine's
        `achieved_inputs`), its mean/std/min/max, per site and per layer."""
        if not self.input_sparse:
            raise ValueError("the engine is not input-sparse")
        start = self.prompt_len if decode_only else 0
        kept = self.kept_inputs[start:self.length].double().cpu()  # (T, B, L, 7)
        if kept.shape[0] == 0:
            return {"tokens": 0}
        ins = torch.tensor(self._site_inputs(), dtype=torch.float64)
        outs = torch.tensor(self._site_outputs(), dtype=torch.float64)
        params = ins * outs
        total = params.sum() * self.num_layers
        skipped = (ins - kept) * outs  # (T, B, L, 7) skipped weights
        per_token = (skipped.sum((-1, -2)) / total).reshape(-1)
        per_site = ((ins - kept).sum((0, 1, 2)) / (kept.shape[0] * kept.shape[1] * self.num_layers * ins)).tolist()
        per_layer = (skipped.sum((0, 1, 3)) / (kept.shape[0] * kept.shape[1] * params.sum())).tolist()
        return {"tokens": int(per_token.numel()), "achieved_inputs": float(per_token.mean()),
                "per_token": {"mean": float(per_token.mean()), "std": float(per_token.std(unbiased=False)),
                              "min": float(per_token.min()), "max": float(per_token.max())},
                "per_token_values": per_token.tolist(),
                "achieved_inputs_per_site": dict(zip(LINEAR_SITES, per_site)),
                "achieved_inputs_per_layer": per_layer,
                "kept_per_site_layer": kept.mean((0, 1)).tolist()}

    # -- prefill ---------------------------------------------------------------------------------------------
    def _rms(self, x, weight, eps):
        from kernels.reference_llama import rms_norm

        return rms_norm(x, weight, eps, self.dtype)

    @torch.no_grad()
    def prefill(self, input_ids: torch.Tensor) -> torch.Tensor:
        """Dense pass over the prompt (B, T0) (input-sparse sources: thresholded, as the masked engine does); fills
        the KV cache. Returns the last token's logits."""
        from kernels.reference_llama import rotate

        input_ids = input_ids.to(self.device)
        B, T0 = input_ids.shape
        if B != self.batch or T0 >= self.max_len:
            raise ValueError(f"prompt of shape {(B, T0)} does not fit batch {self.batch}, max_len {self.max_len}")
        H, Hkv, hd, dt = self.num_heads, self.num_kv_heads, self.head_dim, self.dtype
        sparse = self.input_sparse and getattr(self.masks, "sparse_prefill", True)
        if self.input_sparse:
            self.kept_inputs.zero_()
        h = F.embedding(input_ids, self.embed)
        cos, sin = self.cos[:T0].to(dt), self.sin[:T0].to(dt)
        observe = getattr(self.masks, "prefill_layer", None)

        def linear(layer, w, site, x):
            weight, bias = w.dense(site)
            if sparse:
                t = float(self.masks.host_thresholds[layer, SITE_INDEX[site]])
                keep = x.abs() > t
                self.kept_inputs[:T0, :, layer, SITE_INDEX[site]] = keep.sum(-1).transpose(0, 1).to(torch.int32)
                x = x * keep.to(x.dtype)
            return F.linear(x, weight, bias)

        for index, w in enumerate(self.layers):
            if observe is not None:
                observe(index, h)
            xn = self._rms(h, w.ln1, w.eps1)
            q = linear(index, w, "q", xn).view(B, T0, H, hd).transpose(1, 2)
            k = linear(index, w, "k", xn).view(B, T0, Hkv, hd).transpose(1, 2)
            v = linear(index, w, "v", xn).view(B, T0, Hkv, hd).transpose(1, 2)
            q, k = rotate(q, cos, sin), rotate(k, cos, sin)
            self.cache[index][:, :, :T0, 0] = k
            self.cache[index][:, :, :T0, 1] = v
            k, v = k.repeat_interleave(self.group, 1), v.repeat_interleave(self.group, 1)
            attn = F.scaled_dot_product_attention(q, k, v, is_causal=True, scale=self.scaling)
            h = h + linear(index, w, "o", attn.transpose(1, 2).reshape(B, T0, H * hd))
            xn = self._rms(h, w.ln2, w.eps2)
            act = F.silu(linear(index, w, "gate", xn)) * linear(index, w, "up", xn)
            h = h + linear(index, w, "down", act)
        self.pos.fill_(T0)
        self.length = self.prompt_len = T0
        logits = F.linear(self._rms(h[:, -1], self.final_w, self.final_eps), self.lm_head)
        self.token.copy_(logits.argmax(-1))
        return logits

    # -- one token ---------------------------------------------------------------------------------------------
    def _step_state(self) -> list:
        return [self.kept_inputs] if self.input_sparse else []

    def _units(self, layer, heads, static):
        """(units of the QKV gather, the K/V head of each kept head) for this layer's kept heads."""
        key = (heads.data_ptr(), heads.numel())
        if static and self._fixed_units.get(layer, (None,))[0] == key:
            return self._fixed_units[layer][1:]
        units, kv = self.unit_buf[layer], self.kv_buf[layer]
        n = heads.numel()
        units[:n].copy_(heads.reshape(-1))
        if self.group == 1:
            kv = units[:n]
        else:
            torch.floor_divide(units[:n], self.group, out=kv)
        if static:
            self._fixed_units[layer] = (key, units, kv)
        return units, kv

    def _step_impl(self) -> torch.Tensor:
        ops, B, H, hd, dt = self.ops, self.batch, self.num_heads, self.head_dim, self.dtype
        h = self.h
        ops.embed(self.token, self.embed, h)
        if hasattr(self.masks, "begin_step"):
            self.masks.begin_step(self)
        if self.input_sparse:
            self._layers_input_sparse(h)
        else:
            self._layers_rows(h)
        x = ops.rms_norm(h, self.final_w, self.final_eps, dt)
        logits = F.linear(x, self.lm_head)
        ops.argmax(logits, out=self.token)
        self.pos.add_(1)
        return logits

    def _layers_rows(self, h):
        ops, B, hd, dt = self.ops, self.batch, self.head_dim, self.dtype
        static = getattr(self.masks, "static", False)
        raw = static or getattr(self.masks, "reads_stream", False)  # the source copies what it reads itself
        hidden = (lambda: h) if raw else (lambda: h.to(dt))  # noqa: E731
        neurons_hook = getattr(self.masks, "neuron_masks", None)
        for index, w in enumerate(self.layers):
            head_idx, neuron_idx = self.masks(index, hidden())
            heads = self._head_indices(index, head_idx)
            self.heads_used[index] = heads
            units, kv = self._units(index, heads, static)
            n = heads.numel()
            xn = ops.rms_norm(h, w.ln1, w.eps1, dt)
            qkv = ops.gather_rows(xn, w.wqkv, w.bqkv, units, group=hd, row_stride=hd, fixed=static)
            q = ops.rope_to_cache(qkv, None, self.cos, self.sin, self.pos, self.cache[index], n, self.num_heads)
            attn = ops.attend(q, self.cache[index], kv, self.pos, self.scaling, fixed=static)
            ops.out_proj_add(attn, w.wot, w.bo, units[:n], hd, h, fixed=static)
            if neurons_hook is not None:
                neuron_idx = neurons_hook(index, hidden())
            neurons, _ = self._indices(index, neuron_idx, self.neuron_buf, self.ffn_dim, counted=False)
            act = ops.swiglu_gather(ops.rms_norm(h, w.ln2, w.eps2, dt), w.wgu, w.bgu, neurons, fixed=static)
            ops.fc2_add(act, w.w2t, w.b2, neurons, h, fixed=static)
        if hasattr(self.masks, "end_step"):
            self.masks.end_step(self)  # e.g. join the second stream of a lookahead source

    def _head_indices(self, layer, got):
        if got is None:
            raise ValueError(f"the mask source gave no indices for layer {layer}")
        if isinstance(got, Counted):
            self._indices(layer, got, None, self.num_heads, counted=False)  # refuses it
        if got.numel() != self.heads_kept[layer]:
            raise ValueError(f"layer {layer}: the mask source gave {got.numel()} indices, the engine keeps "
                             f"{self.heads_kept[layer]} (counts are fixed per layer)")
        return got.reshape(-1).to(self.device)

    def _layers_input_sparse(self, h):
        ops, B, H, hd, dt = self.ops, self.batch, self.num_heads, self.head_dim, self.dtype
        d, Fd, Hkv = self.hidden, self.ffn_dim, self.num_kv_heads
        self.workspace.zero_()
        qc = self.qkv_cols
        segments_qkv = (0, H * hd, (H + Hkv) * hd, qc)
        for index, w in enumerate(self.layers):
            t = self.thresholds[index]
            counts = self.kept_inputs[:, :, index]
            ws = self.workspace[index]
            xn = ops.rms_norm(h, w.ln1, w.eps1, dt)
            ops.input_sparse_add(xn, w.wqkv_t, t[0:3], ws[:, :qc], segments=segments_qkv, counts=counts[:, :, 0:3],
                                 pos=self.pos)
            q = ops.rope_to_cache(ws[:, :qc].view(B, -1, hd), w.bqkv, self.cos, self.sin, self.pos, self.cache[index],
                                  H, H)
            attn = ops.attend(q, self.cache[index], self.all_kv, self.pos, self.scaling, fixed=True)
            ops.input_sparse_add(attn.reshape(B, H * hd), w.wot, t[3:4], h, segments=(0, d), bias=w.bo,
                                 counts=counts[:, :, 3:4], pos=self.pos)
            xn = ops.rms_norm(h, w.ln2, w.eps2, dt)
            gu = ws[:, qc:]
            ops.input_sparse_add(xn, w.wgu_t, t[4:6], gu, segments=(0, Fd, 2 * Fd), counts=counts[:, :, 4:6],
                                 pos=self.pos)
            ops.input_sparse_add(gu, w.w2t, t[6:7], h, segments=(0, d), bias=w.b2, counts=counts[:, :, 6:7],
                                 pos=self.pos, swiglu=(w.bgu_cat,))


def sparse_decoder(model, masks=None, **kwargs):
    """The sparse decode engine of a model's family: kernels.decode.SparseDecoder (OPT) or LlamaSparseDecoder."""
    if family_of(model).name == "llama":
        kwargs["kv"] = "all"  # every K/V head is computed at every token (shared by its group): no recompute mode
        return LlamaSparseDecoder(model, masks, **kwargs)
    from kernels.decode import SparseDecoder

    return SparseDecoder(model, masks, **kwargs)
