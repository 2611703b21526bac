"""Running one job: load (or reuse) the model, fit the method, install its policy, evaluate the task,
and turn the metrics into records that say how they were made."""
from __future__ import annotations

import time
import traceback
from dataclasses import dataclass
from datetime import datetime, timezone
from functools import cached_property

import torch

from harness.artefacts import ArtefactCache
from harness.data import DataDir
from harness.engine import MaskedEngine
from harness.families import family_of
from harness.models import ModelSpec, dtype_name, load_model, load_tokenizer, resolve_device, resolve_dtype
from harness.tokens import token_ids
from harness.provenance import provenance
import harness.reference_model  # noqa: E402,F401 - registers the reference-holdout calibration text (harness.data)
from harness.spec import JobSpec, RunConfig
from harness.tasks import get_task
from methods import MethodSpec, get_method


class Session:
    """What an executor keeps across the jobs of a run: data, the loaded model and tokenizer, token ids."""

    def __init__(self, config: RunConfig, data: DataDir, cache: ArtefactCache, tokenizer_dir=None, log=print):
        self.config = config
        self.data = data
        self.cache = cache
        self.tokenizer_dir = tokenizer_dir
        self.log = log
        self.run_dir = None  # set by the CLI: tasks that write beside the records (lm-eval results) use it
        self.model_spec = ModelSpec(config.model, config.weights)
        self.device = resolve_device(config.device)
        self.dtype = resolve_dtype(config.dtype, self.device)
        self._memo: dict = {}
        self.device_map = None  # set by an executor that shards the model over several GPUs (harness.placement)
        self.placement: dict = {}  # where the jobs ran (executor, node, GPUs, sharding): copied into every record

    @cached_property
    def model(self):
        return load_model(self.model_spec, device=self.device, dtype=self.dtype, seed=self.config.weight_seed,
                          attn_implementation=self.config.attn, device_map=self.device_map)

    @cached_property
    def tokenizer(self):
        return load_tokenizer(self.model_spec, self.tokenizer_dir, self.data)

    @cached_property
    def model_identity(self) -> str:
        return self.model_spec.identity(self.config.weight_seed, self.cache.root)

    def memo(self, name, make):
        """Values kept for the whole session (token ids, traces, adapters, reports), made once by `make()`."""
        if name not in self._memo:
            self._memo[name] = make()
        return self._memo[name]

    def fit_context(self, method_name: str, seed: int | None = None) -> "FitContext":
        seed = self.config.seeds[0] if seed is None else seed
        return FitContext(self, self.config.method_settings.get(method_name, {}), seed)


@dataclass
class FitContext:
    """What a method sees when it fits and builds its policy."""

    session: Session
    settings: dict
    seed: int

    @property
    def model(self):
        return self.session.model

    @property
    def tokenizer(self):
        return self.session.tokenizer

    @property
    def data(self) -> DataDir:
        return self.session.data

    @property
    def cache(self) -> ArtefactCache:
        return self.session.cache

    @property
    def config(self) -> RunConfig:
        return self.session.config

    def log(self, message: str) -> None:
        self.session.log(message)

    @property
    def budget_gb(self) -> float:
        """Traces and criterion scores kept for predictor training (calibration tokens are sampled to fit)."""
        return float(self.config.calib_budget_gb)

    def calibration_ids(self) -> torch.Tensor:
        """(samples, calib_seqlen) token ids cut from the calibration text (never the evaluation splits)."""
        config = self.config
        ids = self.session.memo(f"calib:{config.calib_data}", lambda: token_ids(
            self.session, f"calib:{config.calib_data}", lambda: self.data.calibration_text(config.calib_data)))
        count = min(config.calib_samples, len(ids) // config.calib_seqlen)
        return ids[: count * config.calib_seqlen].view(count, config.calib_seqlen)

    def base_key(self) -> dict:
        """What every fitted artefact of this model and calibration set depends on. Methods whose fit is
        random (predictor training) add `seed` themselves; deterministic fits are shared across seeds."""
        config = self.config
        return {"model": self.session.model_identity, "dtype": dtype_name(self.session.dtype),
                "data": self.data.fingerprint, "calib_data": config.calib_data,
                "calib_samples": config.calib_samples, "calib_seqlen": config.calib_seqlen}


@dataclass
class JobContext:
    """The job being run, for tasks that build their own engine (latency)."""

    spec: JobSpec
    method: object
    allocation: object
    artefact: object
    policy: object
    fit: FitContext


def now() -> str:
    return datetime.now(timezone.utc).isoformat(timespec="seconds")


def execute_job(session: Session, job: JobSpec, progress=None) -> dict:
    """Run one job and return its result document (status ok, with records)."""
    config = session.config
    started = now()
    spec = MethodSpec.parse(job.method)
    task = get_task(job.task)
    ctx = session.fit_context(spec.name, job.seed)
    method = get_method(spec, ctx.settings)
    allocation = method.adjust(job.allocation(config))
    timings = {}
    on_gpu = session.device.startswith("cuda")
    if on_gpu:
        torch.cuda.reset_peak_memory_stats()
    clock = time.perf_counter()
    model = session.model
    timings["load_s"] = time.perf_counter() - clock
    clock = time.perf_counter()
    artefact = method.fit(ctx, allocation)
    timings["fit_s"] = time.perf_counter() - clock
    policy = method.policy(ctx, allocation, artefact)
    # the jobs of several tasks share one predictor: its report is computed once per session
    quality = session.memo(("quality", method.label, repr(allocation), job.seed, getattr(artefact, "path", None)),
                           lambda: method.quality(ctx, allocation, artefact)) if artefact is not None else None
    if quality:  # the predictors' cost is reported next to the model's
        from methods.predictors import linear_flops, parameter_count

        quality["model"] = {"params": parameter_count(model), "flops_per_token": linear_flops(model)}
    engine = MaskedEngine(model, policy, allocation)
    session.job = JobContext(job, method, allocation, artefact, policy, ctx)
    if task.prepare is not None:  # e.g. tokenizing the test set: not part of the evaluation time
        clock = time.perf_counter()
        task.prepare(session, job, config)
        timings["prepare_s"] = time.perf_counter() - clock
    if task.masked:  # predictors to the device, kernels compiled: not part of the evaluation time
        clock = time.perf_counter()
        engine.prepare()
        timings["engine_prepare_s"] = time.perf_counter() - clock
    if on_gpu:
        torch.cuda.synchronize()
    clock = time.perf_counter()
    if task.masked:
        with engine.applied():
            metrics = task.evaluate(session, job, config, progress)
    else:
        metrics = task.evaluate(session, job, config, progress)
    if on_gpu:
        torch.cuda.synchronize()
    timings["eval_s"] = time.perf_counter() - clock
    achieved = engine.achieved() if task.masked else metrics_achieved(metrics)
    family = family_of(model)
    shape = family.sizes(model.config)
    base = {
        "job": job.key, "suite": config.suite, "model": session.model_spec.label, "model_id": session.model_identity,
        "model_family": family.name, "model_layers": shape.layers, "model_heads": shape.heads,
        "model_kv_heads": shape.kv_heads, "model_ffn": shape.ffn,
        "weights": config.weights, "dtype": dtype_name(session.dtype), "device": session.device,
        "data_verified": session.data.verify, "data_source": getattr(session.data, "kind", "bundle"),
        "method": spec.name, "variant": method.variant, "method_label": method.label,
        "scope": config.scope, "allocation": config.allocation, "dense_layers": list(config.dense_layers),
        "sparsity": job.sparsity, "sparsity_heads": job.heads, "sparsity_neurons": job.neurons,
        "achieved_heads": achieved["achieved_heads"], "achieved_neurons": achieved["achieved_neurons"],
        "task": job.task, "seed": job.seed, "weight_seed": config.weight_seed, "limit": config.limit,
        "timings": {k: round(v, 3) for k, v in timings.items()}, "provenance": provenance(),
        "peak_gpu_gb": round(torch.cuda.max_memory_allocated() / 2**30, 3) if on_gpu else None,
        **session.placement,
    }
    if job.inputs or "achieved_inputs" in achieved:  # input masks (TEAL, WINA): fractions of matrix inputs
        base.update({"sparsity_inputs": job.inputs, "achieved_inputs": achieved.get("achieved_inputs"),
                     "achieved_inputs_per_site": achieved.get("achieved_inputs_per_site")})
    if achieved.get("achieved_per_token"):  # thresholds: the fraction each token skipped varies
        base["achieved_per_token"] = achieved["achieved_per_token"]
    if artefact is not None and artefact.path is not None:
        base["artefact"] = str(artefact.path)
    from methods.predictors import PREDICTOR_METHODS, predictor_weights

    if spec.name in PREDICTOR_METHODS:  # the weight format the predictors ran with (model, int8, fp8)
        base["predictor_weights"] = predictor_weights(ctx.settings)
    if artefact is not None:  # what calibration data the fit saw, and how much of it
        base.update({"calib_data": config.calib_data, "calib_samples": config.calib_samples,
                     "calib_seqlen": config.calib_seqlen, "calib_budget_gb": config.calib_budget_gb,
                     **calibration_sampling(artefact.meta)})
    if quality:
        base["dense_layers"] = list(allocation.dense_layers)
        for unit in ("heads", "neurons"):
            if unit in quality:
                base[f"predictor_recall_{unit}"] = quality[unit]["mean"]["recall"]
    records, details = [], []
    for metric in metrics:
        metric = dict(metric)
        window_nll = metric.pop("window_nll", None)  # per-window detail stays in the job file
        if window_nll is not None:
            details.append({"metric": metric["metric"], "window_nll": window_nll})
        records.append({**base, **metric})
    return {"key": job.key, "status": "ok", "spec": job.describe(), "records": records, "details": details,
            "achieved": achieved, "predictor_quality": quality, "started_at": started, "finished_at": now()}


#: What a fit's metadata may say about its calibration, copied into its records: the protocol (`lmtext`: language-model
#: text, `fewshot`: ShadowLLM's few-shot task examples, harness/fewshot.py), how much of it was used and, for few-shot
#: examples, which (calib_data, calib_samples and calib_seqlen then describe the examples, not the text settings).
CALIBRATION_FIELDS = ("calib_protocol", "calib_tokens", "calib_tokens_total", "calib_sampling", "calib_data",
                      "calib_samples", "calib_seqlen", "calib_examples", "calib_shots", "calib_tasks", "calib_left_out",
                      "calib_fingerprint")


def calibration_sampling(meta: dict) -> dict:
    """The calibration fields (CALIBRATION_FIELDS) a fit's metadata reports, its parts' (nested dicts) included."""
    found = {k: meta[k] for k in CALIBRATION_FIELDS if k in meta}
    for value in meta.values():
        if isinstance(value, dict):
            for key, item in calibration_sampling(value).items():
                found.setdefault(key, item)
    return found


def metrics_achieved(metrics: list[dict]) -> dict:
    """Tasks that run their own engine report what they skipped in their first metric."""
    first = metrics[0] if metrics else {}
    return {key: first.pop(key, None) for key in ("achieved_heads", "achieved_neurons", "achieved_heads_per_layer",
                                                  "achieved_neurons_per_layer")}


def failed_result(job: JobSpec, exc: BaseException, started: str) -> dict:
    return {"key": job.key, "status": "failed", "spec": job.describe(), "error": f"{type(exc).__name__}: {exc}",
            "traceback": traceback.format_exc(), "started_at": started, "finished_at": now()}
