"""Llama-family models (Llama-2/3, Mistral, Qwen2): RMSNorm, RoPE, grouped-query attention, a SwiGLU MLP.

Heads are the query heads at the input of `o_proj` (B, T, H·D); the K/V heads are shared by their group and kept
for every token, as OPT's keys and values are. Neurons are the SwiGLU intermediate act(gate_proj x) · up_proj x at
the input of `down_proj`: there is no ReLU zero, so magnitude decides (Deja Vu's "active" labels in traces are the
top half of a token's neurons by |activation|, `neuron_active`). Mistral's and Qwen2's modules have Llama's names;
Qwen2 adds biases to q/k/v.
"""
from __future__ import annotations

import torch

from harness.families import Family, Sizes, register

# Exact architectures of the published checkpoints (their config.json); `common` fills in what they share.
LLAMA_SIZES: dict[str, dict] = {
    "llama-2-7b": dict(model_type="llama", hub="meta-llama/Llama-2-7b-hf", hidden_size=4096, intermediate_size=11008,
                       num_hidden_layers=32, num_attention_heads=32, num_key_value_heads=32, vocab_size=32000,
                       max_position_embeddings=4096, rms_norm_eps=1e-5, rope_theta=10000.0, bos_token_id=1,
                       eos_token_id=2),
    "llama-2-13b": dict(model_type="llama", hub="meta-llama/Llama-2-13b-hf", hidden_size=5120, intermediate_size=13824,
                        num_hidden_layers=40, num_attention_heads=40, num_key_value_heads=40, vocab_size=32000,
                        max_position_embeddings=4096, rms_norm_eps=1e-5, rope_theta=10000.0, bos_token_id=1,
                        eos_token_id=2),
    "llama-3-8b": dict(model_type="llama", hub="meta-llama/Meta-Llama-3-8B", hidden_size=4096, intermediate_size=14336,
                       num_hidden_layers=32, num_attention_heads=32, num_key_value_heads=8, vocab_size=128256,
                       max_position_embeddings=8192, rms_norm_eps=1e-5, rope_theta=500000.0, bos_token_id=128000,
                       eos_token_id=128001),
    "mistral-7b": dict(model_type="mistral", hub="mistralai/Mistral-7B-v0.1", hidden_size=4096, intermediate_size=14336,
                       num_hidden_layers=32, num_attention_heads=32, num_key_value_heads=8, vocab_size=32000,
                       max_position_embeddings=32768, rms_norm_eps=1e-5, rope_theta=10000.0, sliding_window=4096,
                       bos_token_id=1, eos_token_id=2),
    "qwen2-7b": dict(model_type="qwen2", hub="Qwen/Qwen2-7B", hidden_size=3584, intermediate_size=18944,
                     num_hidden_layers=28, num_attention_heads=28, num_key_value_heads=4, vocab_size=152064,
                     max_position_embeddings=131072, rms_norm_eps=1e-6, rope_theta=1000000.0, sliding_window=131072,
                     use_sliding_window=False, max_window_layers=28, bos_token_id=151643, eos_token_id=151643),
    # tiny configs for tests (GQA: 4 query heads, 2 K/V heads); OPT's vocabulary so that OPT's tokenizer fits
    "llama-tiny": dict(model_type="llama", hub=None, hidden_size=32, intermediate_size=64, num_hidden_layers=2,
                       num_attention_heads=4, num_key_value_heads=2, vocab_size=50272, max_position_embeddings=2048,
                       rms_norm_eps=1e-6, rope_theta=10000.0, bos_token_id=2, eos_token_id=2, pad_token_id=1),
    "mistral-tiny": dict(model_type="mistral", hub=None, hidden_size=32, intermediate_size=64, num_hidden_layers=2,
                         num_attention_heads=4, num_key_value_heads=2, vocab_size=50272, max_position_embeddings=2048,
                         rms_norm_eps=1e-6, rope_theta=10000.0, sliding_window=16, bos_token_id=2, eos_token_id=2,
                         pad_token_id=1),
    "qwen2-tiny": dict(model_type="qwen2", hub=None, hidden_size=32, intermediate_size=64, num_hidden_layers=2,
                       num_attention_heads=4, num_key_value_heads=2, vocab_size=50272, max_position_embeddings=2048,
                       rms_norm_eps=1e-6, rope_theta=10000.0, bos_token_id=2, eos_token_id=2, pad_token_id=1),
}
COMMON = dict(hidden_act="silu", initializer_range=0.02, tie_word_embeddings=False, use_cache=True,
              attention_dropout=0.0)


def llama_config(name: str):
    """The built-in config `name` (LlamaConfig, MistralConfig or Qwen2Config)."""
    from transformers import AutoConfig

    values = dict(LLAMA_SIZES[name])
    model_type, hub = values.pop("model_type"), values.pop("hub")
    theta = values.pop("rope_theta")
    config = AutoConfig.for_model(model_type, **COMMON, **values,
                                  rope_parameters={"rope_type": "default", "rope_theta": theta})
    config._name_or_path = hub or name
    return config


def _maker(name):
    return lambda: llama_config(name)


@register
class Llama(Family):
    name = "llama"
    label = "Llama-family (Llama-2/3, Mistral, Qwen2)"
    model_types = ("llama", "mistral", "qwen2")
    builtin = {name: (values["hub"], _maker(name)) for name, values in LLAMA_SIZES.items()}

    @staticmethod
    def sizes(config) -> Sizes:
        heads = config.num_attention_heads
        head_dim = getattr(config, "head_dim", None) or config.hidden_size // heads
        return Sizes(layers=config.num_hidden_layers, hidden=config.hidden_size, heads=heads,
                     kv_heads=getattr(config, "num_key_value_heads", None) or heads, head_dim=head_dim,
                     ffn=config.intermediate_size)

    @staticmethod
    def _qkv_bias(config) -> bool:
        return bool(getattr(config, "attention_bias", config.model_type == "qwen2"))

    @classmethod
    def parameter_count(cls, config) -> int:
        s = cls.sizes(config)
        d, q, kv = s.hidden, s.heads * s.head_dim, s.kv_heads * s.head_dim
        attn = d * q + 2 * d * kv + q * d + ((q + 2 * kv) if cls._qkv_bias(config) else 0)
        mlp = 3 * d * s.ffn + ((2 * s.ffn + d) if getattr(config, "mlp_bias", False) else 0)
        per_layer = attn + mlp + 2 * d  # two RMSNorm weights
        embed = config.vocab_size * d
        head = 0 if config.tie_word_embeddings else config.vocab_size * d
        return s.layers * per_layer + embed + head + d

    @staticmethod
    def decoder(model):
        """The LlamaModel (MistralModel, Qwen2Model) of a causal LM, or the model itself."""
        return model.model if hasattr(model, "model") and hasattr(model.model, "layers") else model

    @classmethod
    def hookpoint(cls, layer, name: str):
        attn, mlp = layer.self_attn, layer.mlp
        points = {
            "layer_input": (layer, "input", None),
            "attn_input": (attn, "input", None),
            "attn_output": (attn, "output", None),
            "mlp_input": (layer.post_attention_layernorm, "input", None),
            "head_output": (attn.o_proj, "input", None),
            "attn_proj_output": (attn.o_proj, "output", None),
            "neuron_input": (mlp.gate_proj, "input", None),
            "neuron_act": (mlp.down_proj, "input", None),
            "neuron_gate": (mlp.gate_proj, "output", mlp.act_fn),
            "gate_output": (mlp.gate_proj, "output", None),
            "up_output": (mlp.up_proj, "output", None),
            "q": (attn.q_proj, "input", None), "k": (attn.k_proj, "input", None), "v": (attn.v_proj, "input", None),
            "o": (attn.o_proj, "input", None), "gate": (mlp.gate_proj, "input", None),
            "up": (mlp.up_proj, "input", None), "down": (mlp.down_proj, "input", None),
        }
        if name not in points:
            raise KeyError(f"the Llama family has no hookpoint {name!r}")
        return points[name]

    @classmethod
    def up_parts(cls, layer):
        return [("gate", layer.mlp.gate_proj), ("up", layer.mlp.up_proj)]

    @classmethod
    def pre_activation_grads(cls, layer, outputs, act, gact):
        """act = f(g) · u at the down projection's input: ∂L/∂u = gact · f(g), ∂L/∂g = gact · u · f'(g)."""
        g, u = outputs["gate"], outputs["up"]
        with torch.enable_grad():
            leaf = g.detach().requires_grad_(True)
            fg = layer.mlp.act_fn(leaf)
            (dg,) = torch.autograd.grad(fg, leaf, grad_outputs=gact * u)
        return [dg.detach(), gact * fg.detach()]

    @staticmethod
    def neuron_active(act):
        """The top half of each token's neurons by |activation| (SwiGLU has no exact zeros)."""
        magnitude = act.abs()
        return magnitude > magnitude.median(dim=-1, keepdim=True).values

    @staticmethod
    def normalise_config(config):
        """`ffn_dim` as an alias of `intermediate_size`: the predictor methods (dejavu, shadow, timewise) and the
        decode engine still read OPT's name for the FFN width (`sizes(config).ffn` is the adapter's way)."""
        config.ffn_dim = config.intermediate_size
        return config

    @staticmethod
    def init_std(config) -> float:
        return config.initializer_range

    @staticmethod
    def buffers(model, device_of) -> dict:
        """The rotary embeddings' inverse frequencies (non-persistent buffers, not in a checkpoint)."""
        out = {}
        for name, module in model.named_modules():
            if name.endswith("rotary_emb"):
                fresh = type(module)(config=module.config)
                for buffer, value in fresh.named_buffers():
                    full = f"{name}.{buffer}"
                    out[full] = value.to(device_of(full))
        return out

    @staticmethod
    def device_map(config, layer_devices, first, last) -> dict:
        device_map = {f"model.layers.{i}": device for i, device in enumerate(layer_devices)}
        device_map.update({"model.embed_tokens": first, "model.rotary_emb": first, "model.norm": last,
                           "lm_head": first if config.tie_word_embeddings else last})
        return device_map


# ------------------------------------------------------------------------------------------------------------
# the weight re-layout of the sparse decode engine (kernels.decode_llama)
# ------------------------------------------------------------------------------------------------------------
#: the layouts: "rows" for row gathers (kept heads and neurons), "inputs" for input-sparse GEMVs (TEAL)
DECODE_LAYOUTS = ("rows", "inputs")


class DecodeLayer:
    """One decoder layer's weights as the decode step reads them (model dtype, on the engine's device).

    Shared by both layouts: RMSNorm weights `ln1`/`ln2` (eps1/eps2); `wot` (H·hd, d) = o_proj.weight.T and `w2t`
    (F, d) = down_proj.weight.T, whose rows are a head's / a neuron's (row gathers) and equally an input's
    (input sparsity); the biases `bqkv` ([q; k; v]), `bo`, `b2` (None when the model has none).
    "rows": `wqkv` (H·hd + 2·Hkv·hd, d) = [q_proj; k_proj; v_proj].weight, unit u's rows [u·hd, (u+1)·hd) (query
    heads are units 0..H−1, K heads H.., V heads H+Hkv..); `wgu` (2F, d), neuron j's gate row 2j and up row 2j+1
    (`bgu` alike).
    "inputs": `wqkv_t` (d, H·hd + 2·Hkv·hd) = wqkvᵀ and `wgu_t` (d, 2F) = [gate_proj; up_proj].weight.T (gate columns
    then up columns; `bgu_cat` alike): input i's weights are one contiguous row."""

    def __init__(self, layer, to):
        attn, mlp = layer.self_attn, layer.mlp
        self._layer, self._to = layer, to
        cp = lambda t: None if t is None else t.detach().to(**to).contiguous()  # noqa: E731
        self.ln1, self.eps1 = cp(layer.input_layernorm.weight), layer.input_layernorm.variance_epsilon
        self.ln2, self.eps2 = cp(layer.post_attention_layernorm.weight), layer.post_attention_layernorm.variance_epsilon
        self.wot, self.bo = cp(attn.o_proj.weight.T), cp(attn.o_proj.bias)
        self.w2t, self.b2 = cp(mlp.down_proj.weight.T), cp(mlp.down_proj.bias)
        parts = (attn.q_proj, attn.k_proj, attn.v_proj)
        self.q_rows, self.kv_rows = attn.q_proj.weight.shape[0], attn.k_proj.weight.shape[0]
        self.ffn = mlp.gate_proj.weight.shape[0]
        self.bqkv = cp(torch.cat([p.bias for p in parts])) if all(p.bias is not None for p in parts) else None
        if self.bqkv is None and any(p.bias is not None for p in parts):
            raise ValueError("q/k/v projections with biases on some of them only are not supported")
        gate, up = mlp.gate_proj, mlp.up_proj
        self.bgu = cp(torch.stack([gate.bias, up.bias], 1).reshape(-1)) if gate.bias is not None else None
        self.bgu_cat = cp(torch.cat([gate.bias, up.bias])) if gate.bias is not None else None
        self.wqkv = self.wgu = self.wqkv_t = self.wgu_t = None
        self.layouts: set = set()

    def ensure(self, layout: str) -> "DecodeLayer":
        if layout not in DECODE_LAYOUTS:
            raise ValueError(f"unknown decode layout {layout!r}; valid: {', '.join(DECODE_LAYOUTS)}")
        if layout in self.layouts:
            return self
        attn, mlp, to = self._layer.self_attn, self._layer.mlp, self._to
        with torch.no_grad():
            qkv = torch.cat([attn.q_proj.weight, attn.k_proj.weight, attn.v_proj.weight]).detach().to(**to)
            if layout == "rows":
                self.wqkv = qkv.contiguous()
                self.wgu = torch.stack([mlp.gate_proj.weight, mlp.up_proj.weight], 1).detach().to(**to) \
                    .reshape(2 * self.ffn, -1).contiguous()
            else:
                self.wqkv_t = qkv.T.contiguous()
                self.wgu_t = torch.cat([mlp.gate_proj.weight, mlp.up_proj.weight]).detach().to(**to).T.contiguous()
            del qkv
        self.layouts.add(layout)
        return self

    def dense(self, site: str):
        """(weight (out, in), bias) of a linear site as views of whichever layout exists (the prefill's matmuls)."""
        q, kv, f = self.q_rows, self.kv_rows, self.ffn
        if site in ("q", "k", "v"):
            a, b = {"q": (0, q), "k": (q, q + kv), "v": (q + kv, q + 2 * kv)}[site]
            w = self.wqkv[a:b] if self.wqkv is not None else self.wqkv_t[:, a:b].T
            return w, None if self.bqkv is None else self.bqkv[a:b]
        if site in ("gate", "up"):
            j = 0 if site == "gate" else 1
            if self.wgu is not None:
                w = self.wgu.view(f, 2, -1)[:, j]
            else:
                w = self.wgu_t[:, j * f:(j + 1) * f].T
            return w, None if self.bgu_cat is None else self.bgu_cat[j * f:(j + 1) * f]
        if site == "o":
            return self.wot.T, self.bo
        if site == "down":
            return self.w2t.T, self.b2
        raise KeyError(site)

    def nbytes(self) -> int:
        tensors = [t for t in vars(self).values() if isinstance(t, torch.Tensor)]
        return sum(t.numel() * t.element_size() for t in tensors)


class DecodeWeights(list):
    """The re-laid-out layers of a model (a list of DecodeLayer); `ensure(layout)` adds a layout to every layer
    (engines of one model share one DecodeWeights, each adding the layout its mask source needs)."""

    def ensure(self, layout: str) -> "DecodeWeights":
        for layer in self:
            layer.ensure(layout)
        return self


def decode_weights(model, *, device, dtype, layouts=("rows",)) -> DecodeWeights:
    """The decode engine's weights of a Llama-family model (see DecodeLayer)."""
    to = dict(device=device, dtype=dtype)
    out = DecodeWeights(DecodeLayer(layer, to) for layer in Llama.layers(model))
    for layout in layouts:
        out.ensure(layout)
    return out


Llama.decode_weights = staticmethod(decode_weights)
