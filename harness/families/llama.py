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
