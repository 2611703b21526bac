"""Architecture adapters: one module per model family, found by the config's `model_type`.

A family names what the harness hooks (hookpoints), gives the sizes of a config, builds its built-in configs and
finishes random weights. Everything that hooks a model (the masked engine, traces, criteria, replace, the
training-free methods) goes through `family_of(model)` and `install`, never through a family's module paths.

Hookpoints (`Family.hookpoint(layer, name)` -> (module, side, transform)); `side` is "input" (the module's first
argument, or its `hidden_states` keyword) or "output" (its output, the first element of a tuple):
  layer_input   the residual stream entering a decoder layer (before its attention norm)
  attn_input    the attention block's input (after the attention norm of a pre-norm layer)
  attn_output   the attention block's output (after the output projection, before the residual add)
  mlp_input     the residual stream entering the MLP block (after attention, before the MLP norm)
  head_output   the per-head attention outputs: the input of the output projection (B, T, H·D), query heads
  attn_proj_output  the output projection's output (what `attn_output` holds, seen at the projection)
  neuron_input  the MLP's input as its up projection(s) see it (after the MLP norm)
  neuron_act    the neuron activations: the input of the down projection (B, T, F)
  neuron_gate   the gate activation that thresholds a neuron: act(gate_proj x) for SwiGLU, ReLU(fc1 x) for OPT
  q, k, v, o, gate, up, down   the input of that linear layer (TEAL-style input sparsity): `linear_sites`

Adding a family: one module in this package defining a `Family` subclass decorated with `@register` (see opt.py
and llama.py), with its built-in configs in `builtin` (name -> (Hugging Face id, config factory)).
"""
from __future__ import annotations

import importlib
import pkgutil
from abc import ABC, abstractmethod
from dataclasses import dataclass
from typing import Callable, ClassVar

from harness.errors import HarnessError

FAMILIES: dict[str, type["Family"]] = {}
#: every hookpoint a family must name (linear sites are listed by `linear_sites`)
HOOKPOINTS = ("layer_input", "attn_input", "attn_output", "mlp_input", "head_output", "attn_proj_output",
              "neuron_input", "neuron_act", "neuron_gate")
#: the linear sites of TEAL-style input masks, in the order of a layer's forward
LINEAR_SITES = ("q", "k", "v", "o", "gate", "up", "down")


@dataclass(frozen=True)
class Sizes:
    """The shape of a model: layers, hidden width, query heads, K/V heads (GQA), head dim, FFN width."""

    layers: int
    hidden: int
    heads: int
    kv_heads: int
    head_dim: int
    ffn: int

    def units(self) -> dict[str, int]:
        """Units per layer of the head/neuron masks."""
        return {"heads": self.heads, "neurons": self.ffn}


class Family(ABC):
    """The adapter of one model family. Subclasses set `name`, `model_types` and `builtin` and implement the
    abstract accessors (`register` refuses a family that leaves one out); the rest has defaults."""

    name: ClassVar[str]
    #: how messages name the family's models
    label: ClassVar[str] = ""
    model_types: ClassVar[tuple[str, ...]]
    #: built-in configs: name -> (Hugging Face id of the pretrained checkpoint, config factory)
    builtin: ClassVar[dict[str, tuple[str, Callable]]] = {}
    #: linear sites this family has (subset of LINEAR_SITES)
    linear_sites: ClassVar[tuple[str, ...]] = LINEAR_SITES

    # -- sizes -----------------------------------------------------------------------------------------------
    @staticmethod
    @abstractmethod
    def sizes(config) -> Sizes:
        ...

    @staticmethod
    @abstractmethod
    def parameter_count(config) -> int:
        ...

    # -- modules ---------------------------------------------------------------------------------------------
    @staticmethod
    @abstractmethod
    def decoder(model):
        """The module that takes `input_ids` and runs the decoder layers (no LM head)."""

    @classmethod
    def layers(cls, model) -> list:
        return list(cls.decoder(model).layers)

    @classmethod
    @abstractmethod
    def hookpoint(cls, layer, name: str):
        """(module, side, transform or None) of a hookpoint of one decoder layer."""

    @classmethod
    def linear(cls, layer, site: str):
        """The nn.Linear of a linear site (its weight is (out, in): an input mask skips columns)."""
        module, side, _ = cls.hookpoint(layer, site)
        return module

    @classmethod
    @abstractmethod
    def up_parts(cls, layer) -> list[tuple[str, object]]:
        """The linears whose rows j are neuron j's up-projection parameters θ_j, with the hookpoint of their
        output: [("up", fc1)] for OPT, [("gate", gate_proj), ("up", up_proj)] for SwiGLU."""

    @classmethod
    @abstractmethod
    def pre_activation_grads(cls, layer, outputs: dict, act, gact) -> list:
        """The gradient of the loss at the output of each of `up_parts`, in the same order, from the neuron
        activation `act`, its gradient `gact` and the parts' captured outputs {name: tensor}."""

    @staticmethod
    @abstractmethod
    def neuron_active(act):
        """Which neurons count as active in traces (Deja Vu's labels): bool of act's shape."""

    @staticmethod
    def check_criteria(config) -> None:
        """Raise when the importance criteria's formulas do not hold for this config."""

    @staticmethod
    def normalise_config(config):
        """Called on every config the harness loads (harness.models): a family may add aliases that code written
        for OPT reads. Returns the config."""
        return config

    # -- loading ---------------------------------------------------------------------------------------------
    @staticmethod
    @abstractmethod
    def init_std(config) -> float:
        ...

    @staticmethod
    def buffers(model, device_of) -> dict:
        """Values of the non-parameter buffers a model built on the meta device needs: {buffer name: tensor},
        each on `device_of(buffer name)`."""
        return {}

    @staticmethod
    @abstractmethod
    def device_map(config, layer_devices: list, first, last) -> dict:
        """device_map entries for the modules around the decoder layers (layer i on layer_devices[i])."""


def register(cls: type[Family]) -> type[Family]:
    missing = sorted(getattr(cls, "__abstractmethods__", ()))
    if missing:
        raise TypeError(f"model family {cls.__name__} does not define {', '.join(missing)} (harness.families.Family)")
    for model_type in cls.model_types:
        if model_type in FAMILIES and FAMILIES[model_type] is not cls:
            raise RuntimeError(f"two families claim model_type {model_type!r}")
        FAMILIES[model_type] = cls
    return cls


_discovered = False


def discover() -> dict[str, type[Family]]:
    """Import every module of this package once (their @register decorators run): model_type -> Family."""
    global _discovered
    if not _discovered:
        for info in pkgutil.iter_modules(__path__):
            importlib.import_module(f"{__name__}.{info.name}")
        _discovered = True
    return FAMILIES


def families() -> list[type[Family]]:
    """The families, OPT (the harness's first) first, then by name."""
    return sorted(set(discover().values()), key=lambda f: (f.name != "opt", f.name))


def supported_types() -> list[str]:
    return sorted(discover())


def supported() -> str:
    """What the harness supports, for messages: the families' labels and the model types."""
    labels = " and ".join(f.label or f.name for f in families())
    return f"{labels} models (model types: {', '.join(supported_types())})"


def family_of(model_or_config) -> type[Family]:
    """The family of a model or config, by its `model_type`."""
    config = getattr(model_or_config, "config", model_or_config)
    model_type = getattr(config, "model_type", None)
    found = discover().get(model_type)
    if found is None:
        raise HarnessError(f"a {model_type!r} model is not supported; the harness supports {supported()}")
    return found


def sizes_of(model_or_config) -> Sizes:
    config = getattr(model_or_config, "config", model_or_config)
    return family_of(config).sizes(config)


def builtin_models() -> dict[str, tuple[type[Family], str, Callable]]:
    """Every built-in model name -> (family, Hugging Face id, config factory)."""
    out = {}
    for family in families():
        for name, (hub_id, make) in family.builtin.items():
            out[name] = (family, hub_id, make)
    return out


def _first(output):
    return output[0] if isinstance(output, tuple) else output


def install(family: type[Family], layer, name: str, fn):
    """The one hook installer. `fn(x)` sees the hookpoint's tensor (as the module sees it: OPT's MLP runs on
    (B·T, ·) rows); on an input it may return a replacement (None: unchanged); on an output its result is
    ignored. Returns the handle (`handle.remove()`)."""
    module, side, transform = family.hookpoint(layer, name)
    if side == "input":
        def pre(mod, args, kwargs):
            keyword = not args and "hidden_states" in kwargs
            x = kwargs["hidden_states"] if keyword else args[0]
            new = fn(x if transform is None else transform(x))
            if new is None:
                return None
            if keyword:
                return args, {**kwargs, "hidden_states": new}
            return (new,) + tuple(args[1:]), kwargs
        return module.register_forward_pre_hook(pre, with_kwargs=True)

    def post(mod, args, output):
        y = _first(output)
        fn(y if transform is None else transform(y))
    return module.register_forward_hook(post)
