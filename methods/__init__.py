"""Method plugins: a registry and the interface every method implements.

A method is one module in this package that defines a `Method` subclass decorated with `@register`.
It has two phases: `fit` (calibration statistics or predictor training, cached by a content hash of
everything it depends on) and `policy` (the `MaskPolicy` the masked engine installs on the model), and two
faces: `policy` for the masked engine (perplexity, zero-shot) and `decode_source` for the sparse decode engine
(latency: the per-token mask source of kernels.decode.SparseDecoder that chooses the units the policy chooses,
dispatched to by harness.decoding.source_for). A method that does not define `decode_source` is `masked_only`.
Modules in this package are imported on first use of the registry, so adding a file adds a method, for every
suite.
"""
from __future__ import annotations

import importlib
import pkgutil
from abc import ABC, abstractmethod
from dataclasses import dataclass
from typing import ClassVar

from harness.errors import HarnessError

REGISTRY: dict[str, type["Method"]] = {}
UNITS = ("heads", "neurons")


@dataclass(frozen=True)
class MethodSpec:
    """A method as users write it: `name` or `name:variant`."""

    name: str
    variant: str | None = None

    @classmethod
    def parse(cls, text: str) -> "MethodSpec":
        name, _, variant = text.strip().partition(":")
        return cls(name, variant or None)

    @property
    def label(self) -> str:
        return f"{self.name}:{self.variant}" if self.variant else self.name


class Method(ABC):
    """Base class of method plugins.

    Class attributes a plugin sets:
      name: the registered name users type.
      variants: the accepted variants; default_variant is used when none is given.
      units: what a plain sparsity value sparsifies ({"heads"}, {"neurons"}, both, or {"inputs"}: the input entries
        of every linear layer, TEAL-style).
      supports: what an explicit target (h0.5, n0.9) may sparsify; defaults to `units`.
      allocations: the allocation modes its scores allow: `local` always; `global` only when the scores of every
        layer are known before the first sparse layer runs (its policy implements `global_scores`).
      seeded: whether results depend on the seed (random masks, trained predictors); `--seed 0,1,2`
        repeats only seeded methods.
      masked_only: the method has no mask source for the sparse decode engine (latency tasks refuse it). Derived
        at registration: True exactly when the class does not override `decode_source`; a plugin that sets it
        must agree with that (register refuses it otherwise).
      decode_families: the model families whose sparse decode engine its source runs on (default both).
      decode_allocations: the allocation modes its decode source handles: `local` (fixed per-layer counts, as a
        per-token source needs); a fixed ranking (static) handles `global` too.
      training_free: a training-free activation-sparsity baseline (TEAL, CATS, WINA): listed apart in messages.
      description: one line for `harness list methods`.
    """

    name: ClassVar[str]
    variants: ClassVar[tuple[str, ...]] = ()
    default_variant: ClassVar[str | None] = None
    units: ClassVar[frozenset] = frozenset(UNITS)
    supports: ClassVar[frozenset | None] = None
    allocations: ClassVar[frozenset] = frozenset({"local"})
    seeded: ClassVar[bool] = False
    masked_only: ClassVar[bool] = False
    decode_allocations: ClassVar[frozenset] = frozenset({"local"})
    decode_families: ClassVar[frozenset] = frozenset({"opt", "llama"})
    training_free: ClassVar[bool] = False
    description: ClassVar[str] = ""

    def __init__(self, variant: str | None, settings: dict | None = None):
        self.variant = variant or self.default_variant
        self.settings = dict(settings or {})

    @property
    def label(self) -> str:
        return f"{self.name}:{self.variant}" if self.variant else self.name

    @property
    def sparsifiable(self) -> frozenset:
        return self.supports if self.supports is not None else self.units

    def adjust(self, allocation):
        """The allocation this method runs under (e.g. ShadowLLM keeps layer 0 dense); default unchanged."""
        return allocation

    def fit(self, ctx, allocation):
        """Calibrate or train; return an artefact (see harness.artefacts) or None when nothing is fitted.

        `ctx` is a harness.runner.FitContext: model, tokenizer, data, settings and the artefact cache.
        Implementations go through `ctx.cache.get_or_build(...)` so that work is reused.
        """
        return None

    def footprint(self, model_config, run_config, allocation, seed: int) -> dict:
        """{label: harness.footprint.Need} of the artefacts `fit` makes, estimated from the config alone
        (checked before a run starts). Artefacts that several jobs share use the same label. Default: none."""
        return {}

    @abstractmethod
    def policy(self, ctx, allocation, artefact):
        """The MaskPolicy for the masked engine (None: run the model unchanged). Every plugin defines it."""

    def decode_source(self, policy, allocation, model):
        """The sparse decode engine's mask source for `policy` (what this method's `policy()` returned) under
        `allocation` on `model`: an object kernels.decode.SparseDecoder reads (kernels.decode.StaticMasks for fixed
        sets, a kernels.sources.PredictorSource subclass for per-token predictors) that keeps, at every decode token,
        the units the policy keeps on the masked engine. Called through harness.decoding.source_for, which has
        already refused non-token scopes and allocation modes not in `decode_allocations`, and handled a None
        policy and zero sparsity (dense). Masked-only methods leave this default, which refuses."""
        with_source = sorted(name for name, cls in REGISTRY.items() if has_decode_source(cls))
        raise HarnessError(f"{self.label} has no mask source for the sparse decode engine: it runs on the masked "
                           f"engine only (perplexity, zero-shot); methods with one: {', '.join(with_source)}")

    def quality(self, ctx, allocation, artefact) -> dict | None:
        """Predictor methods: recall/precision of the selected set against the oracle set and Spearman ρ,
        per layer and over all layers, on held-out calibration tokens (see methods.predictors)."""
        return None


def has_decode_source(cls: type[Method]) -> bool:
    """Whether a method class defines its sparse decode engine's mask source (overrides `Method.decode_source`)."""
    return getattr(cls, "decode_source") is not Method.decode_source


def register(cls: type[Method]) -> type[Method]:
    if cls.name in REGISTRY and REGISTRY[cls.name] is not cls:
        raise RuntimeError(f"two methods registered as {cls.name!r}")
    declared = next((klass.__dict__["masked_only"] for klass in cls.__mro__
                     if klass is not Method and "masked_only" in klass.__dict__), None)
    if declared is None:
        cls.masked_only = not has_decode_source(cls)
    elif declared == has_decode_source(cls):
        raise RuntimeError(f"method {cls.name!r}: masked_only = {declared} but it "
                           f"{'defines' if declared else 'does not define'} decode_source (the sparse engine's "
                           "mask source); leave masked_only out, it follows from decode_source")
    REGISTRY[cls.name] = cls
    return cls


def discover() -> dict[str, type[Method]]:
    """Import every module of this package once, so their @register decorators run."""
    for info in pkgutil.iter_modules(__path__):
        importlib.import_module(f"{__name__}.{info.name}")
    return REGISTRY


def get_method(spec: MethodSpec, settings: dict | None = None) -> Method:
    methods = discover()
    if spec.name not in methods:
        contextual = sorted(name for name, cls in methods.items() if not cls.training_free)
        baselines = sorted(name for name, cls in methods.items() if cls.training_free)
        raise HarnessError(f"unknown method {spec.name!r}; valid methods: {', '.join(contextual)}"
                           + (f"; training-free baselines: {', '.join(baselines)}" if baselines else ""))
    cls = methods[spec.name]
    if spec.variant is not None and spec.variant not in cls.variants:
        valid = ", ".join(f"{cls.name}:{v}" for v in cls.variants) or f"{cls.name} (it takes no variant)"
        raise HarnessError(f"unknown variant {spec.label!r}; valid: {valid}")
    return cls(spec.variant, settings)
