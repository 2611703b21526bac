"""Run configuration, sparsity targets and the expansion of a run into jobs with stable keys."""
from __future__ import annotations

import hashlib
import json
import re
from dataclasses import asdict, dataclass, field, fields

from harness.engine import ALLOCATIONS, SCOPES, Allocation
from harness.errors import HarnessError
from methods import MethodSpec, get_method

EXECUTORS = ("local", "ray")


LETTERS = {"h": "heads", "n": "neurons", "i": "inputs"}


def parse_sparsity(text: str, units) -> dict:
    """`0.5` -> every unit the method sparsifies at 0.5; `h0.5`, `n0.9`, `i0.4`, `h0.5/n0.9` -> explicit units
    (h: attention heads, n: FFN neurons, i: the input entries of every linear layer, TEAL/WINA)."""
    text = str(text).strip()
    targets = {"heads": 0.0, "neurons": 0.0, "inputs": 0.0}
    try:
        if re.fullmatch(r"[hni][0-9.eE+-]+(/[hni][0-9.eE+-]+){0,2}", text):
            for part in text.split("/"):
                targets[LETTERS[part[0]]] = float(part[1:])
        else:
            value = float(text)
            for unit in units:
                targets[unit] = value
    except ValueError:
        raise HarnessError(f"cannot read sparsity {text!r}; write a fraction like 0.5, or h0.5/n0.9 for heads/neurons "
                           "(i0.5: linear-layer inputs)") from None
    for unit, value in targets.items():
        if not 0.0 <= value < 1.0:
            raise HarnessError(f"sparsity {text!r}: {unit} fraction {value} is outside [0, 1)")
    return targets


@dataclass
class RunConfig:
    """Everything a run needs; the fields in IDENTITY decide whether two runs may share a folder."""

    suite: str = "custom"
    model: str = "opt-125m"
    weights: str = "random"
    methods: list = field(default_factory=lambda: ["dense"])
    sparsity: list = field(default_factory=lambda: ["0.5"])
    tasks: list = field(default_factory=lambda: ["wikitext2"])
    limit: int | None = None  # perplexity: windows; other tasks: examples
    seed: int | list = 0  # method seeds (random masks, predictor training); a list makes one job per seed
    weight_seed: int = 0  # seed of random weights
    dtype: str = "auto"
    device: str = "auto"
    attn: str = "sdpa"
    seqlen: int | None = None  # default: the model's context length
    stride: int | None = None  # default: seqlen (non-overlapping windows)
    allocation: str = "local"
    scope: str = "token"
    dense_layers: list = field(default_factory=list)
    min_keep: float = 0.0
    calib_data: str = "wikitext2-valid"
    calib_samples: int = 32
    calib_seqlen: int = 512
    calib_budget_gb: float = 3.0  # traces + criterion scores kept per model (tokens are sampled to fit; harness/traces.py)
    method_settings: dict = field(default_factory=dict)
    executor: str = "local"
    clip_units: bool = False  # a target naming units a method cannot skip runs it at 0 for them (else: an error)
    # zero-shot (lm-eval)
    num_fewshot: int = 0
    lmeval_source: str = "auto"  # auto (lm-eval's own data if cached, else local), local, hf
    bootstrap_iters: int | None = None
    batch_size: int | None = None
    log_samples: bool = False

    IDENTITY = ("suite", "model", "weights", "weight_seed", "limit", "dtype", "attn", "seqlen", "stride", "allocation",
                "scope", "dense_layers", "min_keep", "calib_data", "calib_samples", "calib_seqlen", "calib_budget_gb",
                "method_settings",
                "num_fewshot", "lmeval_source", "bootstrap_iters", "clip_units")

    @property
    def seeds(self) -> list[int]:
        return [int(s) for s in (self.seed if isinstance(self.seed, (list, tuple)) else [self.seed])]

    @classmethod
    def from_mapping(cls, values: dict, where: str) -> "RunConfig":
        known = {f.name for f in fields(cls)}
        unknown = sorted(set(values) - known)
        if unknown:
            raise HarnessError(f"{where}: unknown setting(s) {', '.join(unknown)}; valid: {', '.join(sorted(known))}")
        return cls(**values)

    def validate(self) -> None:
        if self.allocation not in ALLOCATIONS:
            raise HarnessError(f"unknown allocation {self.allocation!r}; valid: {', '.join(ALLOCATIONS)}")
        if self.scope not in SCOPES:
            raise HarnessError(f"unknown mask scope {self.scope!r}; valid: {', '.join(SCOPES)}")
        if self.executor not in EXECUTORS:
            raise HarnessError(f"unknown executor {self.executor!r}; valid: {', '.join(EXECUTORS)}")
        if self.limit is not None and self.limit < 1:
            raise HarnessError(f"--limit must be at least 1 (got {self.limit})")
        for name in ("seqlen", "stride", "calib_samples", "calib_seqlen"):
            value = getattr(self, name)
            if value is not None and value < 1:
                raise HarnessError(f"{name} must be at least 1 (got {value})")
        if not self.calib_budget_gb > 0:
            raise HarnessError(f"calib_budget_gb must be positive (got {self.calib_budget_gb})")
        if not self.methods:
            raise HarnessError("no methods given")
        if self.lmeval_source not in ("auto", "local", "hf"):
            raise HarnessError(f"unknown lmeval_source {self.lmeval_source!r}; valid: auto, local, hf")
        if self.num_fewshot < 0:
            raise HarnessError(f"num_fewshot must be >= 0 (got {self.num_fewshot})")
        if not self.seeds:
            raise HarnessError("no seed given")

    def identity(self, model_identity: str, data_fingerprint: str, dtype: str) -> dict:
        values = {name: getattr(self, name) for name in self.IDENTITY}
        values.update(model_identity=model_identity, data=data_fingerprint, dtype=dtype)
        return values


@dataclass(frozen=True)
class JobSpec:
    """One (model, method, sparsity, task) unit of a run."""

    method: str  # label: name or name:variant
    sparsity: str  # the requested target as written (e.g. 0.5, h0.5/n0.9); "0" for dense
    heads: float
    neurons: float
    task: str
    seed: int
    run: tuple  # sorted items of the run identity
    inputs: float = 0.0  # linear-layer inputs (TEAL, WINA)

    @property
    def key(self) -> str:
        payload = json.dumps(self.describe(), sort_keys=True, default=str)
        return hashlib.sha256(payload.encode()).hexdigest()[:16]

    def describe(self) -> dict:
        out = {"method": self.method, "sparsity": self.sparsity, "heads": self.heads, "neurons": self.neurons,
               "task": self.task, "seed": self.seed, "run": dict(self.run)}
        if self.inputs:  # only then: the keys of jobs without input masks stay what they were
            out["inputs"] = self.inputs
        return out

    def allocation(self, config: RunConfig) -> Allocation:
        return Allocation(heads=self.heads, neurons=self.neurons, inputs=self.inputs, mode=config.allocation,
                          dense_layers=tuple(config.dense_layers), min_keep=config.min_keep, scope=config.scope)


def job_targets(config: RunConfig) -> list[tuple]:
    """(method label, sparsity label, heads, neurons, task, seed, inputs) for every job of the run, deduplicated; a method
    without units (dense) gets one sparsity, a method whose result does not depend on the seed (not `seeded`)
    gets the first seed only. Unknown methods, unreadable sparsities and units a method cannot skip raise here."""
    targets_out, seen = [], set()
    for method_text in config.methods:
        spec = MethodSpec.parse(method_text)
        method = get_method(spec)
        targets = [("0", {"heads": 0.0, "neurons": 0.0, "inputs": 0.0})] if not method.units else [
            (str(s).strip(), parse_sparsity(s, method.units)) for s in config.sparsity]
        for label, target in targets:
            for unit, value in target.items():
                if value and unit not in method.sparsifiable:
                    if not config.clip_units:
                        raise HarnessError(f"method {method.label} does not sparsify {unit} (sparsity {label}); "
                                           "set clip_units to run it at 0 for that unit")
                    target = {**target, unit: 0.0}  # recorded as requested 0; the achieved column shows it
            for task in config.tasks:
                for seed in config.seeds if method.seeded else config.seeds[:1]:
                    item = (method.label, label, target["heads"], target["neurons"], task, seed, target["inputs"])
                    if item not in seen:
                        seen.add(item)
                        targets_out.append(item)
    return targets_out


def expand_jobs(config: RunConfig, identity: dict) -> list[JobSpec]:
    """method × sparsity × task × seed (see `job_targets`), each a JobSpec keyed by the run identity."""
    run = tuple(sorted((k, json.dumps(v, sort_keys=True, default=str)) for k, v in identity.items()))
    return [JobSpec(*target[:6], run, inputs=target[6]) for target in job_targets(config)]


def config_dict(config: RunConfig) -> dict:
    return asdict(config)
