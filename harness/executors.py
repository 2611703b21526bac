"""Executors run a run's jobs and hand each result to the store as soon as it finishes.

`local`: in-process and sequential, reusing the loaded model across jobs. A job that raises (including
running out of memory) is recorded as failed with its traceback and the others go on.

`ray`: every job runs on a Ray actor that holds the GPUs its model needs (harness.placement: GPUs from the
model's size and dtype, `--gpus-per-job` overrides; several GPUs are reserved on one node through a
placement group, STRICT_PACK, and the model is sharded over them). An actor keeps its loaded model
(a Session per run config) across jobs, and an idle actor takes the next job of the run it already holds.
Fits run first, once per distinct artefact (jobs whose method's `fit` would build the same artefact share
it: see `fit_keys`), into the artefact cache, a storage path every worker reads; the evaluation jobs that
need a fit wait for it. Results stream back as jobs finish and the driver writes them through
RunStore.write_job (atomic). A job that raises, runs out of memory or loses its worker is retried
`retries` times, then recorded as failed with its error; the others go on. Bad input is not retried: what
planning finds (a method's fit refusing its settings) refuses the run before anything is written, and a job
that fails with an input error (HarnessError: the same on every attempt) is recorded at once.
"""
from __future__ import annotations

import gc
import importlib
import json
import os
import socket
import time
from collections import deque
from dataclasses import dataclass, field

import torch

from harness.errors import HarnessError
from harness.runner import FitContext, Session, execute_job, failed_result, now
from harness.spec import JobSpec
from harness.store import RunStore


@dataclass
class Summary:
    ran: int = 0
    skipped: int = 0
    failed: int = 0


class LocalExecutor:
    name = "local"

    def __init__(self, **options):
        self.options = options  # Ray's options; the validation pass (harness.validate) refuses them for local

    def plan(self, units: list["Unit"]):
        """Nothing to plan: jobs run one after another, each fitting what it needs."""
        return None

    def run(self, jobs: list[JobSpec], session: Session, store: RunStore, ui) -> Summary:
        summary = Summary()
        pending = []
        for job in jobs:
            if store.is_done(job.key):
                summary.skipped += 1
            else:
                pending.append(job)
        ui.start(len(jobs), summary.skipped)
        for job in pending:
            started = now()
            progress = ui.job_started(job)
            try:
                result = execute_job(session, job, progress)
            except Exception as exc:  # noqa: BLE001 - a failing job must not stop the run
                result = failed_result(job, exc, started)
                if torch.cuda.is_available():
                    torch.cuda.empty_cache()
            store.write_job(result)
            ok = result["status"] == "ok"
            summary.ran += ok
            summary.failed += not ok
            ui.job_finished(job, result)
        return summary

    def run_units(self, units: list["Unit"], ui, plan=None) -> Summary:
        total = Summary()
        for unit in units:
            summary = self.run(unit.jobs, unit.session, unit.store, ui)
            total.ran, total.skipped, total.failed = (total.ran + summary.ran, total.skipped + summary.skipped,
                                                      total.failed + summary.failed)
        return total


# -- planning: which jobs share a fit, how many GPUs each job takes ------------------------------------------


@dataclass
class Unit:
    """One run of a sweep (or the only run of `harness run`): its driver-side session, store and jobs."""

    session: Session
    store: RunStore
    jobs: list[JobSpec]
    identity: dict | None = None  # what the run folder is claimed with (sweeps claim after the plan is shown)


@dataclass
class Task:
    id: int
    kind: str  # "fit" or "eval"
    unit: int
    job: JobSpec
    gpus: int
    shard: bool
    fit: tuple | None = None  # the fit key this eval job waits for / this fit task builds
    dependents: list = field(default_factory=list)  # fit tasks: the eval task ids waiting for it
    after: list = field(default_factory=list)  # fit tasks: earlier fits that build one of its artefacts too
    attempts: int = 0


@dataclass
class Plan:
    tasks: list[Task]
    skipped: int
    cached_fits: int

    @property
    def fits(self) -> list[Task]:
        return [t for t in self.tasks if t.kind == "fit"]

    @property
    def evals(self) -> list[Task]:
        return [t for t in self.tasks if t.kind == "eval"]


class _NeedsModel(Exception):
    """The probe cannot tell a method's fit key without the model's weights or data."""


class _ConfigOnlyModel:
    def __init__(self, config):
        self.config = config

    def __getattr__(self, name):
        raise _NeedsModel(name)


class _ProbeCache:
    """Records what `get_or_build` would load or build, builds nothing."""

    def __init__(self, root):
        self.root = root
        self.keys: list[tuple[str, str]] = []

    def folder(self, kind, inputs):
        from harness.artefacts import content_key

        return self.root / kind / content_key(inputs)

    def get_or_build(self, kind, inputs, build, fit=True):
        from harness.artefacts import Artefact, content_key

        if fit:
            self.keys.append((kind, content_key(inputs)))
        return Artefact({}, {}, self.folder(kind, inputs))


class _ProbeSession:
    def __init__(self, session: Session, model_config):
        self.config, self.data, self.model_spec = session.config, session.data, session.model_spec
        self.dtype, self.device, self.model_identity = session.dtype, session.device, session.model_identity
        self.model = _ConfigOnlyModel(model_config)
        self.cache = _ProbeCache(session.cache.root)
        self.log = lambda *args, **kwargs: None
        self._session = session

    @property
    def tokenizer(self):
        return self._session.tokenizer  # no weights: ShadowLLM's few-shot examples key their fits (their content hash)

    def memo(self, name, make):
        if isinstance(name, tuple) and name[:1] == ("fewshot",):  # examples built without the model; nothing written
            return self._session.memo(name, make)
        raise _NeedsModel(name)


def fit_keys(session: Session, job: JobSpec, model_config=None) -> tuple | None:
    """The artefacts (kind, content key) the job's method fits, found by running its `fit` against a cache
    that records instead of building: jobs with the same keys share one fit. None: nothing to fit."""
    from methods import Method, MethodSpec, get_method

    spec = MethodSpec.parse(job.method)
    probe = _ProbeSession(session, model_config or session.model_spec.config())
    ctx = FitContext(probe, session.config.method_settings.get(spec.name, {}), job.seed)
    method = get_method(spec, ctx.settings)
    if type(method).fit is Method.fit:  # the base class's fit: nothing to fit
        return None
    try:
        method.fit(ctx, method.adjust(job.allocation(session.config)))
    except HarnessError as exc:  # bad input: the same on every attempt, so refused now, before any work
        raise HarnessError(f"{job.method} (sparsity {job.sparsity}): {exc}") from None
    except Exception:  # noqa: BLE001 - needs the weights or data (or fails): a fit of its own, run for real
        return ("job", job.key)
    return tuple(probe.cache.keys) or None


def cached(session: Session, keys: tuple) -> bool:
    return keys[0] != "job" and all((session.cache.root / kind / key / "meta.json").exists() for kind, key in keys)


def job_gpus(session: Session, job: JobSpec, model_config, gpus_per_job=None, gpu_memory_gb=None) -> int:
    from harness.models import dtype_name, resolve_dtype
    from harness.placement import gpus_for
    from harness.tasks import get_task

    dtype = dtype_name(resolve_dtype(session.config.dtype, "cuda"))  # the dtype the job will have on a GPU
    return gpus_for(model_config, dtype, latency=not get_task(job.task).masked, override=gpus_per_job,
                    gpu_memory_gb=gpu_memory_gb)


def plan_units(units: list[Unit], gpus_per_job=None, gpu_memory_gb=None, skip_done=True) -> Plan:
    """Eval tasks for the jobs not done yet, and one fit task per distinct fit key not in the cache yet."""
    tasks, fits, skipped, cached_fits = [], {}, 0, 0
    for index, unit in enumerate(units):
        model_config = unit.session.model_spec.config()
        for job in unit.jobs:
            if skip_done and unit.store.is_done(job.key):
                skipped += 1
                continue
            gpus = job_gpus(unit.session, job, model_config, gpus_per_job, gpu_memory_gb)
            task = Task(len(tasks), "eval", index, job, gpus, shard=gpus > 1)
            keys = fit_keys(unit.session, job, model_config)
            if keys is not None and not cached(unit.session, keys):
                task.fit = keys
                if keys not in fits:
                    fits[keys] = Task(-1, "fit", index, job, gpus, shard=gpus > 1, fit=keys)
                fit = fits[keys]
                fit.gpus = min(fit.gpus, gpus)  # runs in the first phase that needs it
                fit.shard = fit.gpus > 1
                fit.dependents.append(task.id)
            elif keys is not None:
                cached_fits += 1
            tasks.append(task)
    for fit in fits.values():
        fit.id = len(tasks)
        # two fits that share an artefact (e.g. Deja Vu's MLP predictors at two sparsities) run one after the other
        fit.after = [other.fit for other in tasks if other.kind == "fit" and set(other.fit) & set(fit.fit)]
        tasks.append(fit)
    return Plan(tasks, skipped, cached_fits)


def describe_plan(units: list[Unit], plan: Plan) -> str:
    """The plan as text: jobs per run, GPUs per job, and which fits are shared by which jobs."""
    lines = [f"{len(plan.evals)} evaluation jobs to run ({plan.skipped} already done), {len(plan.fits)} fit jobs "
             f"({plan.cached_fits} evaluation jobs find their fit in the artefact cache)"]
    for index, unit in enumerate(units):
        evals = [t for t in plan.evals if t.unit == index]
        gpus = sorted({t.gpus for t in evals})
        name = unit.store.root.name
        lines.append(f"  run {name}: {len(evals)} jobs of {len(unit.jobs)}, GPUs per job: "
                     f"{', '.join(map(str, gpus)) or '-'}")
    for fit in plan.fits:
        users = [plan.tasks[i].job for i in fit.dependents]
        shared = "shared by" if len(users) > 1 else "used by"
        kinds = ", ".join(sorted({kind for kind, _ in fit.fit})) if fit.fit[0] != "job" else "per job"
        who = ", ".join(f"{j.method}@{j.sparsity}/{j.task}/s{j.seed}" for j in users)
        lines.append(f"  fit {fit.job.method} ({kinds}) on {fit.gpus} GPU(s), {shared} {len(users)} jobs: {who}")
    return "\n".join(lines)


# -- the worker --------------------------------------------------------------------------------------------


def _is_oom(exc: BaseException) -> bool:
    return isinstance(exc, torch.OutOfMemoryError) or "out of memory" in str(exc).lower()


class JobWorker:
    """A Ray actor: runs jobs on the GPUs it holds, keeping one Session (the loaded model) between jobs."""

    def __init__(self, plugins: list[str]):
        for module in plugins:  # method plugins registered outside the methods package (tests, user code)
            importlib.import_module(module)
        self.key = None
        self.session = None

    def where(self) -> dict:
        import ray

        return {"executor": "ray", "node": socket.gethostname(), "gpus": [str(g) for g in ray.get_gpu_ids()],
                "worker_pid": os.getpid()}

    def _session(self, payload: dict) -> Session:
        from harness.artefacts import ArtefactCache
        from harness.data import DataDir

        key = json.dumps([payload["config"].__dict__, payload["shard"], payload["data_root"], payload["data_verify"],
                          payload["cache_root"], payload["tokenizer_dir"]], sort_keys=True, default=str)
        if key != self.key:
            self.session = None  # free the previous model before loading the next
            gc.collect()
            if torch.cuda.is_available():
                torch.cuda.empty_cache()
            log = lambda *args, **kwargs: None  # noqa: E731 - results carry what matters back to the driver
            data = DataDir(payload["data_root"], "the driver's data directory", verify=payload["data_verify"])
            session = Session(payload["config"], data,
                              ArtefactCache(payload["cache_root"], log=log), payload["tokenizer_dir"], log=log)
            session.run_dir = payload["run_dir"]
            placement = self.where()
            devices = [f"cuda:{i}" for i in range(torch.cuda.device_count())]
            placement["sharding"] = None
            if payload["shard"] and len(devices) > 1 and session.device.startswith("cuda"):
                from harness.placement import layer_device_map, sharding_record

                session.device_map, per_device = layer_device_map(session.model_spec.config(), devices)
                session.device = devices[0]
                placement["sharding"] = sharding_record(per_device, devices)
            if torch.cuda.is_available():
                placement["gpu_names"] = sorted({torch.cuda.get_device_name(i) for i in range(len(devices))})
            session.placement = placement
            self.session, self.key = session, key
        return self.session

    def run(self, payload: dict) -> dict:
        job: JobSpec = payload["job"]
        started = now()
        try:
            session = self._session(payload)
            if payload["kind"] == "fit":
                result = self._fit(session, job, started)
            else:
                result = execute_job(session, job)
            result["placement"] = session.placement
            return result
        except Exception as exc:  # noqa: BLE001 - reported to the driver, which retries or records it
            result = failed_result(job, exc, started)
            if _is_oom(exc):  # a model that ran out of memory is dropped: the retry starts clean
                self.session, self.key = None, None
                gc.collect()
                if torch.cuda.is_available():
                    torch.cuda.empty_cache()
            result["oom"] = _is_oom(exc)
            result["input_error"] = isinstance(exc, HarnessError)  # deterministic: not retried
            return result

    @staticmethod
    def _fit(session: Session, job: JobSpec, started: str) -> dict:
        from methods import MethodSpec, get_method

        spec = MethodSpec.parse(job.method)
        ctx = session.fit_context(spec.name, job.seed)
        method = get_method(spec, ctx.settings)
        clock = time.perf_counter()
        artefact = method.fit(ctx, method.adjust(job.allocation(session.config)))
        return {"key": job.key, "status": "ok", "kind": "fit", "spec": job.describe(),
                "artefact": None if artefact is None or artefact.path is None else str(artefact.path),
                "fit_s": round(time.perf_counter() - clock, 3), "started_at": started, "finished_at": now()}


# -- the driver --------------------------------------------------------------------------------------------


class RayExecutor:
    name = "ray"

    def __init__(self, address: str | None = None, gpus_per_job: int | None = None, retries: int = 1,
                 num_cpus: int | None = None, num_gpus: int | None = None, gpu_memory_gb: float | None = None, max_workers: int | None = None,
                 log=None, **_ignored):
        if retries is not None and retries < 0:
            raise HarnessError(f"--retries must be >= 0 (got {retries})")
        if gpus_per_job is not None and gpus_per_job < 1:
            raise HarnessError(f"--gpus-per-job must be at least 1 (got {gpus_per_job})")
        self.address = address
        self.gpus_per_job = gpus_per_job
        self.retries = 1 if retries is None else retries
        self.num_cpus, self.num_gpus = num_cpus, num_gpus  # of a local cluster this executor starts
        self.gpu_memory_gb = gpu_memory_gb
        self.max_workers = max_workers
        self.log = log or (lambda *args, **kwargs: None)
        self._started = False

    # connection
    def connect(self):
        try:
            import ray
        except ImportError:
            raise HarnessError("--executor ray needs Ray: pip install 'sparsity-harness[ray]'") from None
        if ray.is_initialized():
            return ray
        os.environ.setdefault("RAY_USAGE_STATS_ENABLED", "0")
        address = self.address or os.environ.get("RAY_ADDRESS")
        try:
            if address:
                ray.init(address=address, log_to_driver=False)
            else:
                ray.init(num_cpus=self.num_cpus, num_gpus=self.num_gpus, include_dashboard=False, log_to_driver=False)
                self._started = True
        except Exception as exc:  # noqa: BLE001 - a cluster that cannot be reached is bad input
            raise HarnessError(f"cannot start or reach the Ray cluster ({address or 'local'}): {exc}") from exc
        return ray

    def run(self, jobs: list[JobSpec], session: Session, store: RunStore, ui) -> Summary:
        return self.run_units([Unit(session, store, jobs)], ui)

    def plan(self, units: list[Unit]) -> Plan:
        """Fits and evaluations, GPUs per job (see `plan_units`); raises for bad input the probes find."""
        return plan_units(units, self.gpus_per_job, self.gpu_memory_gb)

    def run_units(self, units: list[Unit], ui, plan: Plan | None = None) -> Summary:
        plan = plan or self.plan(units)
        summary = Summary(skipped=plan.skipped)
        ui.start(sum(len(u.jobs) for u in units), plan.skipped)
        if not plan.tasks:  # everything is done: no cluster needed
            return summary
        ray = self.connect()
        try:
            return self._run(ray, units, ui, plan, summary)
        finally:
            if self._started:
                ray.shutdown()
                self._started = False

    def _run(self, ray, units: list[Unit], ui, plan: Plan, summary: Summary) -> Summary:
        resources = ray.cluster_resources()
        cluster_gpus = int(resources.get("GPU", 0))
        if not cluster_gpus:  # a CPU cluster: every job takes one CPU
            for task in plan.tasks:
                task.gpus, task.shard = 0, False
        too_big = sorted({t.gpus for t in plan.tasks if t.gpus > cluster_gpus and cluster_gpus})
        if too_big:
            raise HarnessError(f"jobs need {too_big[-1]} GPUs each; the Ray cluster has {cluster_gpus}: "
                               "set --gpus-per-job lower or use a larger cluster")
        status = _Status(ui, len(plan.evals))
        plugins = sorted({cls.__module__ for cls in _registry().values() if not cls.__module__.startswith("methods.")})
        done_fits: dict[tuple, dict] = {}
        remote = ray.remote(JobWorker)
        for gpus in sorted({t.gpus for t in plan.tasks}):
            phase = [t for t in plan.tasks if t.gpus == gpus]
            self._phase(ray, remote, units, plan, phase, gpus, cluster_gpus, resources, plugins, done_fits,
                        summary, status, ui)
        status.close()
        return summary

    def _actor_options(self, ray, gpus: int, resources: dict, pool: int, task: Task, units: list[Unit]) -> dict:
        from harness.placement import model_bytes
        from harness.models import dtype_name, resolve_dtype

        session = units[task.unit].session
        dtype = dtype_name(resolve_dtype(session.config.dtype, "cuda" if gpus else "cpu"))
        host = model_bytes(session.model_spec.config(), dtype)
        cap = 0.8 * resources.get("memory", 0) / max(1, pool)
        options = {"num_cpus": 1, "num_gpus": gpus, "max_restarts": 0, "max_concurrency": 1}
        if cap >= 1 << 20:
            options["memory"] = int(min(host, cap))
        if gpus > 1:
            from ray.util.placement_group import placement_group
            from ray.util.scheduling_strategies import PlacementGroupSchedulingStrategy

            group = placement_group([{"GPU": gpus, "CPU": 1}], strategy="STRICT_PACK")
            options["scheduling_strategy"] = PlacementGroupSchedulingStrategy(
                group, placement_group_bundle_index=0, placement_group_capture_child_tasks=True)
            options.pop("memory", None)
        return options

    def _phase(self, ray, remote, units, plan, phase, gpus, cluster_gpus, resources, plugins, done_fits, summary,
               status, ui):
        blocked = [t for t in phase if t.kind == "fit" and t.after]  # fits waiting for an earlier fit
        queue = deque(sorted((t for t in phase if t.kind == "fit" and not t.after), key=lambda t: t.id))
        waiting = [t for t in phase if t.kind == "eval"]
        finished_fits: set = set()
        if gpus:
            pool_size = cluster_gpus // gpus
        else:
            pool_size = int(resources.get("CPU", 1))
        if self.max_workers:
            pool_size = min(pool_size, self.max_workers)
        pool_size = max(1, min(pool_size, len(phase)))
        actors: list[dict] = []  # {"handle", "unit", "task", "ref", "options"}

        def new_actor(task):
            options = self._actor_options(ray, gpus, resources, pool_size, task, units)
            return {"handle": remote.options(**options).remote(plugins), "unit": None, "task": None, "ref": None,
                    "options": options}

        def release(actor):
            try:
                ray.kill(actor["handle"])
            except Exception:  # noqa: BLE001
                pass
            strategy = actor["options"].get("scheduling_strategy")
            if strategy is not None:
                from ray.util.placement_group import remove_placement_group

                remove_placement_group(strategy.placement_group)

        def ready_evals():
            """Eval tasks whose fit is done; those whose fit failed (in this or an earlier phase) fail here."""
            for fit_key, result in done_fits.items():
                if result["status"] != "ok":
                    fail_dependents(fit_key, result)
            ready = [t for t in waiting if t.fit is None or t.fit in done_fits]
            for t in ready:
                waiting.remove(t)
            return ready

        def release_fits(fit: Task):
            finished_fits.add(fit.fit)
            for t in list(blocked):
                if all(key in finished_fits for key in t.after):
                    blocked.remove(t)
                    queue.appendleft(t)

        def next_task(actor):
            if not queue:
                return None
            for task in queue:  # the run whose model the actor already holds
                if task.unit == actor["unit"]:
                    queue.remove(task)
                    return task
            return queue.popleft()

        def fail_dependents(fit_key: tuple, result: dict):
            for task in list(waiting):
                if task.fit == fit_key:
                    waiting.remove(task)
                    failed = failed_result_from(task.job, f"its fit ({result['spec']['method']}) failed: "
                                                          f"{result.get('error')}", result.get("traceback", ""))
                    self._finish(units, task, failed, summary, status, ui)

        queue.extend(ready_evals())
        while queue or any(a["ref"] is not None for a in actors) or waiting or blocked:
            for actor in actors + [None] * (pool_size - len(actors)):
                if not queue:
                    break
                if actor is None:
                    actor = new_actor(queue[0])
                    actors.append(actor)
                if actor["ref"] is not None:
                    continue
                task = next_task(actor)
                task.attempts += 1
                session = units[task.unit].session
                payload = {"kind": task.kind, "job": task.job, "config": session.config, "shard": task.shard,
                           "data_root": str(session.data.root), "data_verify": session.data.verify,
                           "cache_root": str(session.cache.root),
                           "tokenizer_dir": None if session.tokenizer_dir is None else str(session.tokenizer_dir),
                           "run_dir": None if session.run_dir is None else str(session.run_dir)}
                actor.update(task=task, unit=task.unit, ref=actor["handle"].run.remote(payload), started=now())
                status.running(+1)
            busy = [a for a in actors if a["ref"] is not None]
            if not busy:
                if blocked and not queue:  # an earlier fit ran in another phase
                    queue.extend(blocked)
                    blocked.clear()
                    continue
                if waiting and not queue:  # nothing can make progress: a dependency is outside this phase
                    for task in list(waiting):
                        waiting.remove(task)
                        self._finish(units, task, failed_result_from(task.job, "its fit did not run", ""),
                                     summary, status, ui)
                continue
            done, _ = ray.wait([a["ref"] for a in busy], num_returns=1, timeout=1.0)
            for ref in done:
                actor = next(a for a in busy if a["ref"] == ref)
                task, actor["ref"] = actor["task"], None
                status.running(-1)
                try:
                    result = ray.get(ref)
                except Exception as exc:  # noqa: BLE001 - the worker died (crash, host OOM, node lost)
                    result = failed_result_from(task.job, f"worker lost: {type(exc).__name__}: {exc}", "")
                    release(actor)
                    actors[actors.index(actor)] = new_actor(task)
                result["attempts"] = task.attempts
                if result["status"] != "ok" and task.attempts <= self.retries and not result.get("input_error"):
                    status.note(f"[yellow]retry[/] {_name(task)} (attempt {task.attempts} failed: "
                                f"{result.get('error')})")
                    queue.append(task)
                    continue
                if task.kind == "fit":
                    release_fits(task)
                    done_fits[task.fit] = result
                    if result["status"] == "ok":
                        status.note(f"[green]fit[/] {task.job.method} for {len(task.dependents)} jobs "
                                    f"({result.get('fit_s')} s)")
                    else:
                        status.note(f"[red]fit failed[/] {task.job.method}: {result.get('error')}")
                    queue.extend(ready_evals())
                else:
                    self._finish(units, task, result, summary, status, ui)
        for actor in actors:
            release(actor)

    @staticmethod
    def _finish(units, task, result, summary, status, ui):
        units[task.unit].store.write_job(result)
        ok = result["status"] == "ok"
        summary.ran += ok
        summary.failed += not ok
        status.finished(ok)
        ui.job_finished(task.job, result)


def _registry():
    from methods import discover

    return discover()


def _name(task: Task) -> str:
    return f"{task.kind} {task.job.method} @ {task.job.sparsity} · {task.job.task} · seed {task.job.seed}"


def failed_result_from(job: JobSpec, error: str, trace: str) -> dict:
    return {"key": job.key, "status": "failed", "spec": job.describe(), "error": error, "traceback": trace,
            "started_at": now(), "finished_at": now()}


class _Status:
    """The live view: a line done / running / failed / pending on the run's rich progress display."""

    def __init__(self, ui, total: int):
        self.progress = getattr(ui, "progress", None)
        self.total, self.done, self.failed, self.busy = total, 0, 0, 0
        self.task = self.progress.add_task("", total=None) if self.progress is not None else None
        self.update()

    def update(self):
        if self.task is not None:
            pending = self.total - self.done - self.failed - self.busy
            self.progress.update(self.task, description=f"ray: done {self.done} · running {self.busy} · "
                                                        f"failed {self.failed} · pending {max(0, pending)}")

    def running(self, delta: int):
        self.busy += delta
        self.update()

    def finished(self, ok: bool):
        self.done += ok
        self.failed += not ok
        self.update()

    def note(self, text: str):
        if self.progress is not None:
            self.progress.console.print(text)

    def close(self):
        if self.task is not None:
            self.progress.remove_task(self.task)


EXECUTORS = {"local": LocalExecutor, "ray": RayExecutor}


def make_executor(name: str, **options):
    """An executor by name; options that do not apply to it (e.g. a Ray address for local) are ignored."""
    if name not in EXECUTORS:
        raise HarnessError(f"unknown executor {name!r}; valid: {', '.join(EXECUTORS)}")
    return EXECUTORS[name](**options)
