"""OPT (Zhang et al. 2022): LayerNorm, learned positions, multi-head attention, a ReLU FFN (fc1 → ReLU → fc2).

Heads are the slices of `out_proj`'s input; neurons are fc1's outputs after ReLU (the input of fc2). OPT-350M
normalises after each block (`do_layer_norm_before=False`), so its MLP input is fc1's input.
"""
from __future__ import annotations

from harness.families import Family, Sizes, register

# Exact architectures of the published OPT checkpoints (facebook/opt-*/config.json); the rest of each
# config is shared and listed in OPT_COMMON.
OPT_SIZES: dict[str, dict] = {
    "opt-125m": dict(hidden_size=768, num_hidden_layers=12, num_attention_heads=12, ffn_dim=3072, word_embed_proj_dim=768),
    "opt-350m": dict(hidden_size=1024, num_hidden_layers=24, num_attention_heads=16, ffn_dim=4096,
                     word_embed_proj_dim=512, do_layer_norm_before=False),
    "opt-1.3b": dict(hidden_size=2048, num_hidden_layers=24, num_attention_heads=32, ffn_dim=8192, word_embed_proj_dim=2048),
    "opt-2.7b": dict(hidden_size=2560, num_hidden_layers=32, num_attention_heads=32, ffn_dim=10240, word_embed_proj_dim=2560),
    "opt-6.7b": dict(hidden_size=4096, num_hidden_layers=32, num_attention_heads=32, ffn_dim=16384, word_embed_proj_dim=4096),
    "opt-13b": dict(hidden_size=5120, num_hidden_layers=40, num_attention_heads=40, ffn_dim=20480, word_embed_proj_dim=5120),
    "opt-30b": dict(hidden_size=7168, num_hidden_layers=48, num_attention_heads=56, ffn_dim=28672, word_embed_proj_dim=7168),
    "opt-66b": dict(hidden_size=9216, num_hidden_layers=64, num_attention_heads=72, ffn_dim=36864, word_embed_proj_dim=9216),
}
OPT_COMMON = dict(
    vocab_size=50272, max_position_embeddings=2048, activation_function="relu", do_layer_norm_before=True,
    dropout=0.1, attention_dropout=0.0, layerdrop=0.0, init_std=0.02, enable_bias=True,
    layer_norm_elementwise_affine=True, bos_token_id=2, eos_token_id=2, pad_token_id=1, use_cache=True,
)


def opt_config(name: str):
    from transformers import OPTConfig

    return OPTConfig(**{**OPT_COMMON, **OPT_SIZES[name]}, _name_or_path=f"facebook/{name}")


#: a tiny OPT for tests and smoke runs (random weights only; the shape of tests/conftest.py's tiny model)
OPT_TINY = dict(hidden_size=32, num_hidden_layers=2, num_attention_heads=4, ffn_dim=64, word_embed_proj_dim=32)


def _maker(name):
    return lambda: opt_config(name)


def _tiny():
    from transformers import OPTConfig

    return OPTConfig(**{**OPT_COMMON, **OPT_TINY, "dropout": 0.0}, _name_or_path="opt-tiny")


@register
class OPT(Family):
    name = "opt"
    label = "OPT"
    model_types = ("opt",)
    builtin = {**{name: (f"facebook/{name}", _maker(name)) for name in OPT_SIZES}, "opt-tiny": (None, _tiny)}
    linear_sites = ("q", "k", "v", "o", "up", "down")

    @staticmethod
    def sizes(config) -> Sizes:
        heads = config.num_attention_heads
        return Sizes(layers=config.num_hidden_layers, hidden=config.hidden_size, heads=heads, kv_heads=heads,
                     head_dim=config.hidden_size // heads, ffn=config.ffn_dim)

    @staticmethod
    def parameter_count(config) -> int:
        """Parameters of an OPT config (tied LM head counted once)."""
        d, f, layers = config.hidden_size, config.ffn_dim, config.num_hidden_layers
        proj = getattr(config, "word_embed_proj_dim", d) or d
        per_layer = 4 * d * d + 4 * d + 2 * d * f + f + d + 4 * d
        embed = config.vocab_size * proj + (config.max_position_embeddings + 2) * d
        extra = 2 * d * proj if proj != d else 0
        return layers * per_layer + embed + extra + 2 * d

    @staticmethod
    def decoder(model):
        """The decoder of an OPTForCausalLM or OPTModel."""
        return model.model.decoder if hasattr(model, "model") else model.decoder

    @classmethod
    def hookpoint(cls, layer, name: str):
        attn = layer.self_attn
        pre_ln = layer.do_layer_norm_before
        points = {
            "layer_input": (layer, "input", None),
            "attn_input": (attn, "input", None),
            "attn_output": (attn, "output", None),
            "mlp_input": (layer.final_layer_norm if pre_ln else layer.fc1, "input", None),
            "head_output": (attn.out_proj, "input", None),
            "attn_proj_output": (attn.out_proj, "output", None),
            "neuron_input": (layer.fc1, "input", None),
            "neuron_act": (layer.fc2, "input", None),
            "neuron_gate": (layer.fc1, "output", layer.activation_fn),
            "up_output": (layer.fc1, "output", None),
            "q": (attn.q_proj, "input", None), "k": (attn.k_proj, "input", None), "v": (attn.v_proj, "input", None),
            "o": (attn.out_proj, "input", None), "up": (layer.fc1, "input", None), "down": (layer.fc2, "input", None),
        }
        if name not in points:
            raise KeyError(f"OPT has no hookpoint {name!r}")
        return points[name]

    @classmethod
    def up_parts(cls, layer):
        return [("up", layer.fc1)]

    @classmethod
    def pre_activation_grads(cls, layer, outputs, act, gact):
        return [gact * (act > 0)]  # ReLU: the gradient passes where the activation is positive

    @staticmethod
    def neuron_active(act):
        return act > 0

    @staticmethod
    def check_criteria(config) -> None:
        from harness.errors import HarnessError

        if getattr(config, "activation_function", "relu") != "relu":
            raise HarnessError(f"importance criteria assume OPT's ReLU FFN (got {config.activation_function!r})")

    @staticmethod
    def init_std(config) -> float:
        return config.init_std

    @staticmethod
    def device_map(config, layer_devices, first, last) -> dict:
        device_map = {f"model.decoder.layers.{i}": device for i, device in enumerate(layer_devices)}
        device_map.update({"model.decoder.embed_tokens": first, "model.decoder.embed_positions": first,
                           "lm_head": first, "model.decoder.final_layer_norm": last})
        proj = getattr(config, "word_embed_proj_dim", config.hidden_size)
        if proj != config.hidden_size:
            device_map.update({"model.decoder.project_in": first, "model.decoder.project_out": last})
        if not getattr(config, "do_layer_norm_before", True):  # OPT-350M has no final layer norm
            device_map.pop("model.decoder.final_layer_norm")
        return device_map
