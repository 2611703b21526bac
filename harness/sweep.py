"""`harness sweep FILE.yaml`: a grid over models × suites (one run folder each, inside one sweep folder)
and, inside each run, methods (with variants) × sparsities × tasks × seeds.

    name: opt-small-grid
    models: [opt-125m, opt-350m]
    weights: random
    suites: [perplexity]                # each suite's tasks and defaults, unless `tasks` is given
    tasks: [wikitext2]                  # optional
    methods: [dense, random, static:plainact, static:l2norm, shadow, replace:head]
    sparsity: [0.25, 0.5, 0.75]
    seeds: [0]
    settings: {limit: 8, calib_samples: 16}   # any run setting (see `harness run --help`)
    executor: ray                       # local or ray (the command line wins)
    retries: 1
    gpus_per_job: null                  # default: from the model's size and dtype
    cache_dir: null                     # the artefact cache every worker reads (default results/cache)
    out: null                           # default results/sweep-<name>-<hash>

The sweep folder holds sweep.json (the plan's input), one run folder per (model, suite) and, after
`harness table SWEEP_DIR`, one table per (model, suite) and the plots of metric vs sparsity per method.
Starting the same sweep again resumes every run where it stopped.
"""
from __future__ import annotations

import hashlib
import json
from pathlib import Path

from harness.errors import HarnessError
from harness.store import RunStore, write_atomic
from harness.suites import load_yaml_mapping

KEYS = {"name", "description", "models", "weights", "suites", "tasks", "methods", "sparsity", "seeds", "settings",
        "executor", "retries", "gpus_per_job", "gpu_memory_gb", "cache_dir", "out", "ray_address", "num_cpus",
        "max_workers"}
GRID = ("models", "suites", "methods")


def _as_list(value, name: str, where: str) -> list:
    if value is None:
        return []
    if isinstance(value, (str, int, float)):
        return [value]
    if not isinstance(value, list):
        raise HarnessError(f"{where}: `{name}` must be a list (got {type(value).__name__})")
    return value


def load_sweep(path: str | Path) -> dict:
    path, sweep = load_yaml_mapping("sweep", path)
    unknown = sorted(set(sweep) - KEYS)
    if unknown:
        raise HarnessError(f"sweep file {path}: unknown key(s) {', '.join(unknown)}; valid: {', '.join(sorted(KEYS))}")
    sweep.setdefault("name", path.stem)
    for name in ("models", "suites", "tasks", "methods", "sparsity", "seeds"):
        sweep[name] = [str(v) if name != "seeds" else v for v in _as_list(sweep.get(name), name, str(path))]
    for name in GRID:
        if not sweep[name]:
            raise HarnessError(f"sweep file {path}: `{name}` is empty; name at least one")
    if not isinstance(sweep.get("settings") or {}, dict):
        raise HarnessError(f"sweep file {path}: `settings` must be a mapping of run settings")
    sweep["settings"] = dict(sweep.get("settings") or {})
    for name in ("model", "methods", "sparsity", "tasks", "seed", "executor"):
        if name in sweep["settings"]:
            raise HarnessError(f"sweep file {path}: set `{name}` in the grid, not in `settings`")
    return sweep


def sweep_digest(sweep: dict) -> str:
    grid = {k: sweep.get(k) for k in ("models", "weights", "suites", "tasks", "methods", "sparsity", "seeds", "settings")}
    return hashlib.sha256(json.dumps(grid, sort_keys=True, default=str).encode()).hexdigest()[:8]


def default_sweep_dir(sweep: dict) -> Path:
    from harness.resources import results_dir

    return results_dir() / f"sweep-{sweep['name']}-{sweep_digest(sweep)}"


def build_units(sweep: dict, sweep_dir: Path, data_dir=None, tokenizer=None, cache_dir=None, log=print,
                executor: str = "local", verify: bool = True):
    """One Unit (session, store, jobs) per (model, suite), each validated before anything is written;
    `claim` binds their run folders."""
    from harness.artefacts import ArtefactCache
    from harness.suites import build_config
    from harness.executors import Unit
    from harness.runner import Session
    from harness.spec import config_dict
    from harness.validate import prepare

    units = []
    cache_dir = cache_dir or sweep.get("cache_dir")
    for model in sweep["models"]:
        for suite in sweep["suites"]:
            overrides = {**sweep["settings"], "model": model, "methods": sweep["methods"], "executor": executor}
            if sweep.get("weights"):
                overrides["weights"] = sweep["weights"]
            if sweep["sparsity"]:
                overrides["sparsity"] = sweep["sparsity"]
            if sweep["tasks"]:
                overrides["tasks"] = sweep["tasks"]
            if sweep["seeds"]:
                overrides["seed"] = [int(s) for s in sweep["seeds"]]
            config = build_config(suite, overrides)
            prepared = prepare(config, data_dir, tokenizer, cache_dir=cache_dir, verify=verify)
            run_dir = sweep_dir / f"{config.suite}-{prepared.model_spec.label}-{config.weights}".replace("/", "_")
            session = Session(config, prepared.data, ArtefactCache(cache_dir, log=log), tokenizer, log=log)
            session.run_dir = run_dir
            units.append(Unit(session, RunStore(run_dir), prepared.jobs, (prepared.identity, config_dict(config))))
    names = [u.store.root.name for u in units]
    if len(set(names)) != len(names):
        raise HarnessError(f"two runs of the sweep would share a folder ({', '.join(names)}); list each model and "
                           "suite once")
    return units


def claim(sweep_dir: Path, sweep: dict, units) -> None:
    """Bind the sweep folder to this grid (sweep.json) and each run folder to its run's identity."""
    write_manifest(sweep_dir, sweep, units)
    for unit in units:
        unit.store.claim(*unit.identity)


def write_manifest(sweep_dir: Path, sweep: dict, units) -> None:
    path = sweep_dir / "sweep.json"
    if path.exists():
        existing = json.loads(path.read_text())
        if existing.get("digest") != sweep_digest(sweep):
            raise HarnessError(f"{sweep_dir} holds another sweep (its grid differs); choose another --out")
    elif sweep_dir.exists() and any(sweep_dir.iterdir()):
        raise HarnessError(f"{sweep_dir} is not empty and is not a sweep folder (no sweep.json); choose another --out")
    write_atomic(path, json.dumps({"sweep": sweep, "digest": sweep_digest(sweep),
                                   "runs": [u.store.root.name for u in units]}, indent=1, sort_keys=True, default=str))


def is_sweep_dir(path: str | Path) -> bool:
    return (Path(path) / "sweep.json").exists()


def run_dirs(sweep_dir: str | Path) -> list[Path]:
    sweep_dir = Path(sweep_dir)
    listed = json.loads((sweep_dir / "sweep.json").read_text()).get("runs", [])
    return [sweep_dir / name for name in listed if (sweep_dir / name / "run.json").exists()]


def collect(sweep_dir: str | Path) -> tuple[list, list, list]:
    """Records, failures and job files of every run of a sweep."""
    records, failures, jobs = [], [], []
    for run_dir in run_dirs(sweep_dir):
        store = RunStore(run_dir)
        records += store.records()
        failures += store.failures()
        jobs += store.jobs()
    return records, failures, jobs


def write_sweep_tables(sweep_dir: str | Path, formats=None) -> list[Path]:
    """Tables of every run folder, and of the whole sweep (one table per (model, suite), plots per task)."""
    from harness.tables import FORMATS, write_tables

    formats = formats or FORMATS
    written = []
    for run_dir in run_dirs(sweep_dir):
        store = RunStore(run_dir)
        written += write_tables(run_dir, store.records(), store.failures(), formats, jobs=store.jobs())
    records, failures, jobs = collect(sweep_dir)
    written += write_tables(Path(sweep_dir), records, failures, formats, jobs=jobs)
    return written
