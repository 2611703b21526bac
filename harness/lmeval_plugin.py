"""`harness-masked`: the masked engine as an lm-eval model, for lm-eval's own command line and Python API.

    harness-lm-eval run --model harness-masked \\
        --model_args pretrained=facebook/opt-1.3b,method=dejavu,sparsity=0.5 --tasks piqa,copa --device cuda
    harness-lm-eval ls models          # lm-eval's models, harness-masked among them

    import harness.lmeval_plugin        # Python: registers the model, then
    lm_eval.simple_evaluate(model="harness-masked", model_args="pretrained=…,method=random,sparsity=0.5", …)

How lm-eval finds it. The distribution declares the entry point `harness-masked` in the group `lm_eval.models`
(pyproject.toml), for lm-eval versions that discover model plugins through entry points. lm-eval 0.4.13 has no
such discovery (its model registry holds its own MODEL_MAPPING and what is registered by import), so for 0.4.13
`register()` adds every `lm_eval.models` entry point to lm-eval's registry as a lazy placeholder (the registry
takes `importlib.metadata.EntryPoint`s), and `harness-lm-eval` is lm-eval's own command line (`cli_evaluate`) run
after `register()`: the same subcommands and options as `lm-eval`, plus `ls models`. Plain `lm-eval run --model
harness-masked` does not find the plugin on 0.4.13.

Model arguments (beside lm-eval's own HFLM arguments such as batch_size, max_length, add_bos_token):
pretrained (an OPT size, a local checkpoint or a Hugging Face id), weights (pretrained, the default, or random),
method (a method label, e.g. dejavu, static:plainact, replace:head; default dense), sparsity (0.5, h0.5/n0.9 …),
allocation, scope, dense_layers (`0` or `0+1`), seed, weight_seed, dtype, device (lm-eval's --device), data_dir,
tokenizer, cache_dir, calib_samples, calib_seqlen, calib_data, calib_budget_gb, no_verify. Fits are cached in the
harness artefact cache (--cache-dir, HARNESS_CACHE_DIR, else ./results/cache), as for `harness run`.

lm-eval's caches never mix configurations: its request cache (`--cache_requests`) is keyed by task, shots and
`tokenizer_name`, which carries the configuration's digest; its response cache (`--use_cache PATH`) is keyed by
the request alone, so for this model the database file gets the digest in its name (`cache_scoping`).
"""
from __future__ import annotations

import hashlib
import json
import sys
from contextlib import ExitStack
from dataclasses import dataclass, field

from harness.errors import HarnessError

NAME = "harness-masked"
GROUP = "lm_eval.models"
#: model_args that configure the harness (the rest go to lm-eval's HFLM)
HARNESS_ARGS = ("method", "sparsity", "weights", "allocation", "scope", "dense_layers", "seed", "weight_seed", "dtype",
                "device", "data_dir", "cache_dir", "calib_samples", "calib_seqlen", "calib_data", "calib_budget_gb",
                "no_verify")


@dataclass
class Built:
    """A model built from model_args, with its method fitted and ready to apply."""

    model: object
    tokenizer: object
    engine: object
    describe: dict
    scope: str  # the configuration's digest: lm-eval's cache keys carry it
    hflm_kwargs: dict = field(default_factory=dict)
    _stack: ExitStack | None = None

    def apply(self) -> None:
        if self._stack is None:
            self._stack = ExitStack()
            self._stack.enter_context(self.engine.applied())

    def info(self) -> dict:
        achieved = self.engine.achieved() if self._stack is not None else {}
        return {**self.describe, **{k: v for k, v in achieved.items() if not k.endswith("per_layer")}}


def _layers(value) -> list[int]:
    if value in (None, ""):
        return []
    try:
        return [int(part) for part in str(value).replace("+", " ").replace(";", " ").split()]
    except ValueError:
        raise HarnessError(f"{NAME}: cannot read dense_layers={value!r}; write 0, or 0+1 for several") from None


def _bool(value) -> bool:
    return value if isinstance(value, bool) else str(value).strip().lower() in ("1", "true", "yes", "on")


def build_masked(pretrained: str, *, tokenizer=None, log=None, **kwargs) -> Built:
    """The model, tokenizer and masked engine of one configuration (model_args), validated like `harness run`
    (bad input: HarnessError naming what is valid), its method fitted (cached)."""
    from harness.artefacts import ArtefactCache
    from harness.engine import Allocation, MaskedEngine
    from harness.runner import Session
    from harness.spec import RunConfig, parse_sparsity
    from harness.validate import prepare
    from methods import MethodSpec, get_method

    log = log or (lambda *args, **_: print(*args, file=sys.stderr))
    ours = {name: kwargs.pop(name) for name in HARNESS_ARGS if name in kwargs}
    method_text = str(ours.get("method") or "dense")
    plugin = get_method(MethodSpec.parse(method_text))
    sparsity = ours.get("sparsity")
    if plugin.units and sparsity in (None, ""):
        raise HarnessError(f"{NAME}: method {plugin.label} needs sparsity= in model_args (e.g. sparsity=0.5, or "
                           "h0.5/n0.9 for heads/neurons)")
    values = dict(suite="lm-eval", model=str(pretrained), weights=str(ours.get("weights") or "pretrained"),
                  methods=[method_text], sparsity=[str(sparsity if sparsity not in (None, "") else "0")], tasks=[],
                  seed=int(ours.get("seed") or 0), weight_seed=int(ours.get("weight_seed") or 0),
                  dtype=str(ours.get("dtype") or "auto"), device=str(ours.get("device") or "auto"),
                  allocation=str(ours.get("allocation") or "local"), scope=str(ours.get("scope") or "token"),
                  dense_layers=_layers(ours.get("dense_layers")))
    for name, cast in (("calib_samples", int), ("calib_seqlen", int), ("calib_data", str), ("calib_budget_gb", float)):
        if ours.get(name) not in (None, ""):
            values[name] = cast(ours[name])
    config = RunConfig.from_mapping(values, f"{NAME} model_args")
    verify = not _bool(ours.get("no_verify", False))
    prepared = prepare(config, ours.get("data_dir"), tokenizer if isinstance(tokenizer, str) else None,
                       cache_dir=ours.get("cache_dir"), verify=verify)
    session = Session(config, prepared.data, ArtefactCache(ours.get("cache_dir"), log=log),
                      tokenizer if isinstance(tokenizer, str) else None, log=log)
    method = get_method(MethodSpec.parse(method_text), config.method_settings.get(plugin.name, {}))
    target = parse_sparsity(config.sparsity[0], method.units) if method.units else {"heads": 0.0, "neurons": 0.0}
    allocation = method.adjust(Allocation(heads=target["heads"], neurons=target["neurons"], mode=config.allocation,
                                          dense_layers=tuple(config.dense_layers), min_keep=config.min_keep,
                                          scope=config.scope))
    ctx = session.fit_context(method.name, config.seeds[0])
    artefact = method.fit(ctx, allocation)
    policy = method.policy(ctx, allocation, artefact)
    engine = MaskedEngine(session.model, policy, allocation)
    describe = {"model": prepared.model_spec.label, "model_id": session.model_identity, "weights": config.weights,
                "method": method.label, "sparsity": config.sparsity[0], "sparsity_heads": allocation.heads,
                "sparsity_neurons": allocation.neurons, "allocation": config.allocation, "scope": config.scope,
                "dense_layers": list(allocation.dense_layers), "seed": config.seeds[0], "dtype": str(session.dtype),
                "data": prepared.data.fingerprint, "data_source": prepared.data.kind}
    scope = hashlib.sha256(json.dumps(describe, sort_keys=True, default=str).encode()).hexdigest()[:12]
    model_tokenizer = tokenizer if tokenizer is not None and not isinstance(tokenizer, str) else session.tokenizer
    return Built(session.model, model_tokenizer, engine, describe, scope, kwargs)


# -- lm-eval's caches ----------------------------------------------------------------------------------------
def _hand_over() -> None:
    """Give harness.lmeval's adapter the builder of models named by model_args (it does not import this module)."""
    import harness.lmeval as adapter

    adapter.NAMED_MODEL_BUILDER = build_masked


_hand_over()


def cache_scoping() -> None:
    """lm-eval's response cache (`use_cache`) keys answers by the request alone: make its database file, for a model
    that carries `harness_cache_scope`, one per configuration. Other models are left as they are."""
    import lm_eval.api.model as api

    if getattr(api.CachingLM, "_harness_scoped", False):
        return
    base = api.CachingLM

    class ScopedCachingLM(base):
        _harness_scoped = True

        def __init__(self, lm, cache_db: str) -> None:
            scope = getattr(lm, "harness_cache_scope", None)
            if scope:
                stem, dot, ext = cache_db.rpartition(".")
                cache_db = f"{stem}-{NAME}-{scope}.{ext}" if dot else f"{cache_db}-{NAME}-{scope}"
            super().__init__(lm, cache_db)

    api.CachingLM = ScopedCachingLM


# -- registration --------------------------------------------------------------------------------------------
def entry_points() -> list:
    from importlib.metadata import entry_points as found

    return list(found(group=GROUP))


def register() -> None:
    """Put every `lm_eval.models` entry point (ours: harness-masked) into lm-eval's model registry as a lazy
    placeholder; without the distribution's metadata (a checkout on PYTHONPATH), register ours by module path."""
    from lm_eval.api.registry import model_registry

    import lm_eval.models  # noqa: F401 - lm-eval's own models first

    for point in entry_points():
        if point.name not in model_registry:
            model_registry.register(point.name, target=point)
    if NAME not in model_registry:
        model_registry.register(NAME, target=f"{__name__}:HarnessMaskedLM")
    cache_scoping()


def list_models() -> list[str]:
    from lm_eval.api.registry import model_registry

    register()
    return sorted(model_registry.keys())


def main(argv: list[str] | None = None) -> None:
    """`harness-lm-eval`: lm-eval's command line with the plugin registered (and `ls models`)."""
    from harness.lmeval import require_lm_eval

    argv = list(sys.argv[1:] if argv is None else argv)
    try:
        require_lm_eval()
    except HarnessError as exc:
        print(f"error: {exc}", file=sys.stderr)
        raise SystemExit(2) from None
    register()
    if argv[:2] == ["ls", "models"]:
        for name in list_models():
            print(name)
        return
    from lm_eval.__main__ import cli_evaluate

    sys.argv = ["lm-eval", *argv]
    try:
        cli_evaluate()
    except HarnessError as exc:  # bad model_args: the harness's message, exit 2
        print(f"error: {exc}", file=sys.stderr)
        raise SystemExit(2) from None


def __getattr__(name: str):
    """`HarnessMaskedLM`, the class the entry point names (the adapter of harness.lmeval), built on first use."""
    if name == "HarnessMaskedLM":
        from harness.lmeval import adapter_class

        cache_scoping()
        return adapter_class()
    raise AttributeError(name)


if __name__ == "__main__":  # pragma: no cover
    main()
