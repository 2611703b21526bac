"""The `harness` command line (Typer): run, fit, table, list."""
from __future__ import annotations

import functools
import hashlib
import json
import sys
from pathlib import Path
from typing import Optional

import typer
from rich.console import Console
from rich.progress import BarColumn, MofNCompleteColumn, Progress, TextColumn, TimeElapsedColumn
from rich.table import Table

from harness.errors import HarnessError

app = typer.Typer(add_completion=False, no_args_is_help=True, pretty_exceptions_enable=False,
                  help="Benchmark contextual sparsity methods on OPT models: perplexity, zero-shot and latency suites.")
console = Console(stderr=True)
LISTABLE = ("methods", "suites", "models", "tasks")
NO_VERIFY_HELP = ("Use the data directory's files without checking their sha256 against its MANIFEST.tsv (a directory "
                  "without one is refused otherwise); records say data_verified: false.")
VERBOSE_HELP = "Show the libraries' own progress bars and warnings (transformers, datasets, lm-eval)."
WANDB_HELP = ("Also log every finished job to this Weights & Biases project (one W&B run per job, grouped by run folder; "
              "needs `pip install wandb` and `wandb login`). Off by default.")


def handle_errors(command):
    """Bad input exits with code 2 and the message; nothing written so far is touched."""

    @functools.wraps(command)
    def wrapper(*args, **kwargs):
        try:
            return command(*args, **kwargs)
        except HarnessError as exc:
            console.print("[bold red]error:[/]", end=" ")
            console.print(str(exc), markup=False, highlight=False, soft_wrap=True)
            raise typer.Exit(2) from None

    return wrapper


def _split(text: Optional[str]) -> Optional[list]:
    return None if text is None else [part.strip() for part in text.split(",") if part.strip()]


def _layers(text: Optional[str]) -> Optional[list]:
    if not text:
        return None
    try:
        return [int(part) for part in _split(text)]
    except ValueError:
        raise HarnessError(f"cannot read --dense-layers {text!r}; write layer indices like 0 or 0,1") from None


def _seeds(text: Optional[str]):
    if text is None:
        return None
    try:
        seeds = [int(part) for part in _split(text)]
    except ValueError:
        raise HarnessError(f"cannot read --seed {text!r}; write an integer or a list like 0,1,2") from None
    return seeds[0] if len(seeds) == 1 else seeds


class RunUI:
    """Rich progress bars: one for the run's jobs, one for the windows/examples of the current job."""

    def __init__(self):
        self.progress = Progress(TextColumn("{task.description}"), BarColumn(), MofNCompleteColumn(),
                                 TimeElapsedColumn(), console=console, transient=False)
        self.jobs = None
        self.inner = None

    def __enter__(self):
        self.progress.start()
        return self

    def __exit__(self, *exc):
        self.progress.stop()

    def start(self, total: int, skipped: int) -> None:
        if skipped:
            console.print(f"resuming: {skipped} of {total} jobs already done")
        self.jobs = self.progress.add_task("jobs", total=total, completed=skipped)

    def job_started(self, job):
        if self.inner is not None:
            self.progress.remove_task(self.inner)
        self.inner = self.progress.add_task(f"  {job.method} @ {job.sparsity} · {job.task}", total=None)
        ui = self

        class JobProgress:
            def total(self, n):
                ui.progress.update(ui.inner, total=n)

            def advance(self, n=1):
                ui.progress.advance(ui.inner, n)

        return JobProgress()

    def job_finished(self, job, result) -> None:
        self.progress.advance(self.jobs)
        if result["status"] == "ok":
            values = ", ".join(f"{r['metric']}={r['value']:.4g}" for r in result["records"])
            self.progress.console.print(f"[green]done[/] {job.method} @ {job.sparsity} · {job.task}: {values}")
        else:
            self.progress.console.print(f"[red]failed[/] {job.method} @ {job.sparsity} · {job.task}: {result['error']}")


def build_config(suite_name: str, overrides: dict):
    """The run configuration of a suite with command-line overrides (harness.suites.build_config)."""
    from harness.suites import build_config as build

    return build(suite_name, overrides)


def configure_output(verbose: bool, tasks) -> None:
    """The libraries' own bars and warnings, quiet unless --verbose (lm-eval's when a task runs through it)."""
    from harness.lmeval import ZERO_SHOT
    from harness.verbosity import configure

    configure(verbose, lm_eval=any(task in ZERO_SHOT for task in tasks))


def default_run_dir(config, identity: dict, model_label: str) -> Path:
    from harness.resources import results_dir

    digest = hashlib.sha256(json.dumps(identity, sort_keys=True, default=str).encode()).hexdigest()[:8]
    return results_dir() / f"{config.suite}-{model_label}-{config.weights}-{digest}"


def summary_line(summary) -> str:
    line = f"{summary.ran} ran, {summary.skipped} already done, {summary.failed} failed"
    if summary.elsewhere:
        line += (f"; {summary.elsewhere} claimed by another process on this folder (it writes their results here; "
                 "`harness table` once it has finished)")
    return line


def wandb_sink(project: str):
    from harness.tracking import WandbSink

    return WandbSink(project)


@app.command()
@handle_errors
def run(
    suite: str = typer.Option("smoke", help="Suite name (see `harness list suites`) or path to a suite YAML."),
    methods: Optional[str] = typer.Option(None, help="Comma-separated methods, e.g. dense,random,replace:head."),
    model: Optional[str] = typer.Option(None, help="opt-125m … opt-66b, a local model directory or a Hugging Face id."),
    weights: Optional[str] = typer.Option(None, help="pretrained or random (seeded, no download)."),
    sparsity: Optional[str] = typer.Option(None, help="Comma-separated targets: 0.5 (all units the method sparsifies), "
                                                      "h0.5 (heads), n0.9 (neurons), h0.5/n0.9."),
    tasks: Optional[str] = typer.Option(None, help="Comma-separated tasks (see `harness list tasks`)."),
    limit: Optional[int] = typer.Option(None, help="Perplexity: number of windows; other tasks: examples."),
    seed: Optional[str] = typer.Option(None, help="Seed(s) of random masks and predictor training; 0,1,2 runs seeded "
                                                  "methods once per seed (tables: mean ± std over seeds)."),
    weight_seed: Optional[int] = typer.Option(None, help="Seed of --weights random."),
    executor: Optional[str] = typer.Option(None, help="Where jobs run: local (in-process) or ray (a Ray cluster: "
                                                      "--ray-address, else RAY_ADDRESS, else a local one)."),
    ray_address: Optional[str] = typer.Option(None, help="--executor ray: the cluster to connect to (else RAY_ADDRESS, "
                                                         "else a local cluster is started)."),
    gpus_per_job: Optional[int] = typer.Option(None, help="--executor ray: GPUs per quality job (default: from the "
                                                          "model's size and dtype); more than one shards the model."),
    retries: Optional[int] = typer.Option(None, help="--executor ray: times a failed job (out of memory, lost worker, "
                                                     "an error) is retried before it is recorded as failed (default 1); "
                                                     "bad input is never retried."),
    out: Optional[Path] = typer.Option(None, help="Run folder (default: results/<suite>-<model>-<weights>-<hash>)."),
    data_dir: Optional[Path] = typer.Option(None, help="Data directory (else HARNESS_DATA_DIR, else ../shared/data)."),
    tokenizer: Optional[Path] = typer.Option(None, help="Tokenizer directory (default: the model's, else OPT's in the data directory)."),
    device: Optional[str] = typer.Option(None, help="auto, cpu, cuda, cuda:1 …"),
    dtype: Optional[str] = typer.Option(None, help="auto (fp16 on GPU, fp32 on CPU), float32, float16, bfloat16."),
    seqlen: Optional[int] = typer.Option(None, help="Perplexity window length (default: the model's context, 2048)."),
    stride: Optional[int] = typer.Option(None, help="Perplexity stride (default: seqlen, non-overlapping windows)."),
    allocation: Optional[str] = typer.Option(None, help="local (same fraction per layer) or global (one ranking)."),
    scope: Optional[str] = typer.Option(None, help="Mask scope: token (causal, default) or request (ShadowLLM eval)."),
    dense_layers: Optional[str] = typer.Option(None, help="Comma-separated layers kept dense, e.g. 0."),
    calib_samples: Optional[int] = typer.Option(None, help="Calibration samples for methods that fit."),
    calib_budget_gb: Optional[float] = typer.Option(None, help="Host memory and disk for the predictors' traces and "
                                                               "criterion scores (default 3.0); calibration tokens "
                                                               "are sampled to fit it, and records say how many."),
    cache_dir: Optional[Path] = typer.Option(None, help="Artefact cache (else HARNESS_CACHE_DIR, else results/cache)."),
    num_fewshot: Optional[int] = typer.Option(None, help="Zero-shot tasks: few-shot examples (0 = zero-shot)."),
    batch_size: Optional[int] = typer.Option(None, help="Zero-shot tasks: lm-eval batch size (default 16)."),
    lmeval_source: Optional[str] = typer.Option(None, help="Zero-shot data: auto (lm-eval's own if cached, else the "
                                                           "offline copies), local or hf."),
    log_samples: Optional[bool] = typer.Option(None, "--log-samples/--no-log-samples",
                                               help="Zero-shot tasks: also write lm-eval's per-sample logs "
                                                    "(RUN/lm_eval/<job>/samples_<task>_<date>.jsonl)."),
    wandb: Optional[str] = typer.Option(None, "--wandb", metavar="PROJECT", help=WANDB_HELP),
    no_verify: bool = typer.Option(False, "--no-verify", help=NO_VERIFY_HELP),
    verbose: bool = typer.Option(False, "--verbose", help=VERBOSE_HELP),
):
    """Run a suite: expand model × method × sparsity × task into jobs, run them, write records and tables.

    Starting the same command again resumes: finished jobs are skipped. A failing job is recorded with its
    traceback and the others go on; the exit code is 1 when any job failed, 2 on bad input."""
    from harness.artefacts import ArtefactCache
    from harness.executors import Unit, make_executor
    from harness.resources import results_dir
    from harness.runner import Session
    from harness.spec import config_dict
    from harness.store import RunStore
    from harness.tables import write_tables
    from harness.validate import prepare

    overrides = dict(methods=_split(methods), model=model, weights=weights, sparsity=_split(sparsity),
                     tasks=_split(tasks), limit=limit, seed=_seeds(seed), weight_seed=weight_seed, executor=executor,
                     device=device, dtype=dtype, num_fewshot=num_fewshot, batch_size=batch_size,
                     lmeval_source=lmeval_source, log_samples=log_samples,
                     seqlen=seqlen, stride=stride, allocation=allocation, scope=scope,
                     dense_layers=_layers(dense_layers), calib_samples=calib_samples,
                     calib_budget_gb=calib_budget_gb)
    config = build_config(suite, overrides)
    prepared = prepare(config, data_dir, tokenizer, cache_dir=cache_dir, out=out or results_dir(),
                       verify=not no_verify,
                       executor_options=dict(gpus_per_job=gpus_per_job, ray_address=ray_address, retries=retries))
    sinks = [wandb_sink(wandb)] if wandb else []  # refused now (exit 2) when wandb is not installed
    configure_output(verbose, config.tasks)
    run_dir = out or default_run_dir(config, prepared.identity, prepared.model_spec.label)
    executor_ = make_executor(config.executor, address=ray_address, gpus_per_job=gpus_per_job, retries=retries)
    session = Session(config, prepared.data, ArtefactCache(cache_dir, log=console.print), tokenizer, log=console.print)
    session.run_dir = run_dir
    unit = Unit(session, RunStore(run_dir, sinks=sinks), prepared.jobs)
    plan = executor_.plan([unit])  # Ray: shared fits and GPUs per job; refuses bad input its probes find
    store = unit.store
    store.claim(prepared.identity, config_dict(config))
    jobs = prepared.jobs
    console.print(f"run folder: {run_dir} · {len(jobs)} jobs · executor {config.executor} · data: "
                  f"{prepared.data.describe()}" + ("" if prepared.data.verify else " · data not verified (--no-verify)"))
    with RunUI() as ui:
        summary = executor_.run_units([unit], ui, plan)
    with store.lock:  # tables of what every process on this folder has written so far
        written = write_tables(run_dir, store.records(), store.failures(), jobs=store.jobs())
    console.print(summary_line(summary))
    for path in written:
        console.print(f"wrote {path}")
    if summary.failed or store.failures():
        raise typer.Exit(1)


@app.command()
@handle_errors
def fit(
    method: str = typer.Option(..., help="Method to fit, e.g. static:plainact or replace:ranked."),
    model: str = typer.Option("opt-125m", help="Model spec."),
    weights: str = typer.Option("random", help="pretrained or random."),
    sparsity: str = typer.Option("0.5", help="Target the fit is for (some methods' labels depend on it)."),
    seed: int = typer.Option(0), data_dir: Optional[Path] = typer.Option(None),
    tokenizer: Optional[Path] = typer.Option(None), device: Optional[str] = typer.Option(None),
    dtype: Optional[str] = typer.Option(None), calib_samples: Optional[int] = typer.Option(None),
    calib_budget_gb: Optional[float] = typer.Option(None, help="Host memory and disk for traces and criterion scores."),
    allocation: str = typer.Option("local", help="local or global (methods whose scores are known ahead)."),
    cache_dir: Optional[Path] = typer.Option(None, help="Artefact cache (else HARNESS_CACHE_DIR, else results/cache)."),
    no_verify: bool = typer.Option(False, "--no-verify", help=NO_VERIFY_HELP),
    verbose: bool = typer.Option(False, "--verbose", help=VERBOSE_HELP),
):
    """Calibrate or train a method alone and cache the artefact (`harness run` reuses it)."""
    from harness.artefacts import ArtefactCache
    from harness.engine import Allocation
    from harness.runner import Session
    from harness.spec import RunConfig, parse_sparsity
    from harness.validate import prepare
    from methods import MethodSpec, get_method

    values = dict(model=model, weights=weights, seed=seed, methods=[method], sparsity=[sparsity], allocation=allocation,
                  tasks=[])
    for name, value in dict(device=device, dtype=dtype, calib_samples=calib_samples,
                            calib_budget_gb=calib_budget_gb).items():
        if value is not None:
            values[name] = value
    config = RunConfig.from_mapping(values, "harness fit")
    prepared = prepare(config, data_dir, tokenizer, cache_dir=cache_dir, verify=not no_verify)
    configure_output(verbose, ())
    plugin = get_method(MethodSpec.parse(method))
    target = parse_sparsity(sparsity, plugin.units)
    alloc = plugin.adjust(Allocation(heads=target["heads"], neurons=target["neurons"], inputs=target["inputs"],
                                     mode=allocation))
    from harness.footprint import check, run_needs
    from harness.models import dtype_name, resolve_device, resolve_dtype
    from harness.spec import JobSpec

    job = JobSpec(plugin.label, sparsity, alloc.heads, alloc.neurons, "fit", seed, (), inputs=alloc.inputs)
    device_ = resolve_device(config.device)
    check(run_needs([job], prepared.model_config, config), model_config=prepared.model_config, run_config=config,
          device=device_, dtype=dtype_name(resolve_dtype(config.dtype, device_)), cache_root=ArtefactCache(cache_dir).root)
    session = Session(config, prepared.data, ArtefactCache(cache_dir, log=console.print), tokenizer, log=console.print)
    artefact = plugin.fit(session.fit_context(plugin.name, seed), alloc)
    if artefact is None:
        console.print(f"{plugin.label} has nothing to fit")
        return
    print(artefact.path)


@app.command()
@handle_errors
def table(
    run_dir: Path = typer.Argument(..., help="A run folder (holds records.jsonl)."),
    format: str = typer.Option("all", "--format", help="md, latex or all."),
):
    """Regenerate table.md / table.tex (and plots) of a run folder from its records, and print it."""
    from harness.store import RunStore, read_records
    from harness.tables import FORMATS, latex, write_tables

    formats = FORMATS if format == "all" else (format,)
    if format != "all" and format not in FORMATS:
        raise HarnessError(f"unknown format {format!r}; valid: md, latex, all")
    from harness.sweep import collect, is_sweep_dir, write_sweep_tables

    if is_sweep_dir(run_dir):  # a sweep folder: one table per (model, suite) over all its runs
        write_sweep_tables(run_dir, formats)
        records = collect(run_dir)[0]
        print(latex(records) if formats == ("latex",) else (run_dir / "table.md").read_text())
        return
    records = read_records(run_dir)
    store = RunStore(run_dir)
    with store.lock:  # a run still going on this folder writes its tables too
        write_tables(run_dir, records, store.failures(), formats, jobs=store.jobs())
    print(latex(records) if formats == ("latex",) else (run_dir / "table.md").read_text())


@app.command()
@handle_errors
def sweep(
    file: Path = typer.Argument(..., help="Sweep file (YAML): models, suites, methods, sparsity, seeds, settings."),
    executor: Optional[str] = typer.Option(None, help="local or ray (default: the file's, else local)."),
    dry_run: bool = typer.Option(False, "--dry-run", help="Print the plan (jobs, GPUs per job, shared fits) and stop."),
    out: Optional[Path] = typer.Option(None, help="Sweep folder (default: the file's `out`, else "
                                                  "results/sweep-<name>-<hash>)."),
    data_dir: Optional[Path] = typer.Option(None, help="Data directory (else HARNESS_DATA_DIR, else ../shared/data)."),
    tokenizer: Optional[Path] = typer.Option(None, help="Tokenizer directory."),
    cache_dir: Optional[Path] = typer.Option(None, help="Artefact cache shared by all workers (a path every worker "
                                                        "can read; else the file's, else HARNESS_CACHE_DIR)."),
    ray_address: Optional[str] = typer.Option(None, help="Ray cluster address (else the file's, else RAY_ADDRESS, "
                                                         "else a local cluster)."),
    gpus_per_job: Optional[int] = typer.Option(None, help="GPUs per quality job (default: from model size and dtype)."),
    retries: Optional[int] = typer.Option(None, help="Retries of a failed job (default: the file's, else 1)."),
    wandb: Optional[str] = typer.Option(None, "--wandb", metavar="PROJECT", help=WANDB_HELP),
    no_verify: bool = typer.Option(False, "--no-verify", help=NO_VERIFY_HELP),
    verbose: bool = typer.Option(False, "--verbose", help=VERBOSE_HELP),
):
    """Run a grid: models × suites (one run folder each) × methods × sparsities × seeds, fits first and shared.

    Starting the same command again resumes; the exit code is 1 when any job failed, 2 on bad input."""
    from harness.executors import describe_plan, make_executor, plan_units
    from harness.spec import EXECUTORS
    from harness.sweep import build_units, claim, default_sweep_dir, load_sweep, write_sweep_tables
    from harness.validate import check_sweep_executor, check_writable

    spec = load_sweep(file)
    executor = executor or spec.get("executor") or "local"
    if executor not in EXECUTORS:
        raise HarnessError(f"unknown executor {executor!r}; valid: {', '.join(EXECUTORS)}")
    unused = check_sweep_executor(spec, executor, dict(gpus_per_job=gpus_per_job, ray_address=ray_address,
                                                       retries=retries))
    sweep_dir = out or (Path(spec["out"]) if spec.get("out") else default_sweep_dir(spec))
    check_writable(sweep_dir, "--out")
    gpus_per_job = gpus_per_job or spec.get("gpus_per_job")
    units = build_units(spec, sweep_dir, data_dir, tokenizer, cache_dir, log=console.print, executor=executor,
                        verify=not no_verify)
    plan = plan_units(units, gpus_per_job, spec.get("gpu_memory_gb"))  # refuses bad input its probes find
    if wandb:
        sink = wandb_sink(wandb)
        for unit in units:
            unit.store.sinks.append(sink)
    configure_output(verbose, [task for unit in units for task in unit.session.config.tasks])
    console.print(f"sweep {spec['name']} → {sweep_dir} · executor {executor}"
                  + ("" if not no_verify else " · data not verified (--no-verify)"))
    if unused:
        console.print(f"executor local: the sweep file's Ray settings ({', '.join(unused)}) are not used")
    console.print(describe_plan(units, plan), markup=False, highlight=False, soft_wrap=True)
    if dry_run:
        return
    claim(sweep_dir, spec, units)
    runner = make_executor(executor, address=ray_address or spec.get("ray_address"), gpus_per_job=gpus_per_job,
                           retries=spec.get("retries", 1) if retries is None else retries,
                           num_cpus=spec.get("num_cpus"), gpu_memory_gb=spec.get("gpu_memory_gb"),
                           max_workers=spec.get("max_workers"))
    with RunUI() as ui:
        summary = runner.run_units(units, ui, plan)
    written = write_sweep_tables(sweep_dir)
    console.print(summary_line(summary))
    console.print(f"wrote {sweep_dir / 'table.md'} and {len(written) - 1} more files")
    if summary.failed or any(u.store.failures() for u in units):
        raise typer.Exit(1)


data_app = typer.Typer(add_completion=False, no_args_is_help=True,
                       help="The offline data bundle: export one from the available source, check one.")
app.add_typer(data_app, name="data")


@data_app.command("export")
@handle_errors
def data_export(
    dest: Path = typer.Argument(..., help="A new (or empty) folder to write the bundle into."),
    data_dir: Optional[Path] = typer.Option(None, help="Export from this bundle (else HARNESS_DATA_DIR, else a "
                                                       "checkout's ../shared/data, else the Hugging Face hub)."),
    only: Optional[str] = typer.Option(None, help="Comma-separated groups (default all): "
                                                  "wikitext-2, ptb, lambada, piqa, copa, openbookqa, winogrande, rte, "
                                                  "hellaswag, arc_easy, tokenizer."),
    no_verify: bool = typer.Option(False, "--no-verify", help="Copy a source bundle's files without checking them."),
    verbose: bool = typer.Option(False, "--verbose", help=VERBOSE_HELP),
):
    """Write an offline bundle (the data files and MANIFEST.tsv with their sha256) from whatever source is available:
    a bundle, else the Hugging Face hub through `datasets`. Copy it to a machine without a network and point
    --data-dir or HARNESS_DATA_DIR at it."""
    from harness.bundle import export, groups
    from harness.data import resolve_data
    from harness.verbosity import configure

    chosen = groups(_split(only))
    source = resolve_data(data_dir, verify=not no_verify)
    configure(verbose)
    done = export(dest, source, chosen, log=console.print)
    console.print(f"wrote {len(done.files)} files and {done.root / 'MANIFEST.tsv'} from {done.source}")


@data_app.command("check")
@handle_errors
def data_check(
    bundle: Optional[Path] = typer.Argument(None, help="The bundle (default: --data-dir's rules: HARNESS_DATA_DIR, "
                                                       "else a checkout's ../shared/data)."),
):
    """Verify a bundle: every file MANIFEST.tsv lists exists with its size and sha256. Exit 2 when one is missing or
    altered; lists the complete groups and the files the manifest does not list (never read)."""
    import os

    from harness.bundle import check
    from harness.data import DataDir
    from harness.resources import source_checkout

    if bundle is None and not os.environ.get("HARNESS_DATA_DIR") and source_checkout() is None:
        raise HarnessError("no bundle to check: name one (harness data check DIR) or set HARNESS_DATA_DIR")
    root = bundle or DataDir.resolve(None, verify=False).root
    found = check(root)
    out = Table(show_header=True, header_style="bold")
    out.add_column("group"), out.add_column("complete")
    for name, complete in found.groups.items():
        out.add_row(name, "yes" if complete else "no")
    Console().print(out)
    console.print(f"{root}: {len(found.ok)} files match MANIFEST.tsv")
    for rel in found.unlisted:
        console.print(f"not in the manifest (never read): {rel}", markup=False)
    if found.problems:
        raise HarnessError(f"bundle {root} has {len(found.problems)} problem(s): " + "; ".join(found.problems)
                           + ". Restore the files (or write a new bundle with `harness data export DIR`)")


@app.command("list")
@handle_errors
def list_(what: str = typer.Argument(..., help="methods, suites, models or tasks.")):
    """List the registered methods, suites, built-in models or tasks."""
    if what not in LISTABLE:
        raise HarnessError(f"cannot list {what!r}; valid: {', '.join(LISTABLE)}")
    out = Table(show_header=True, header_style="bold")
    if what == "methods":
        from methods import discover

        out.add_column("method"), out.add_column("variants"), out.add_column("sparsifies"), out.add_column("description")
        for name, cls in sorted(discover().items()):
            out.add_row(name, ", ".join(cls.variants) or "-", ", ".join(sorted(cls.units)) or "-", cls.description)
    elif what == "suites":
        from harness.suites import available, load_suite

        out.add_column("suite"), out.add_column("description")
        for name in available():
            out.add_row(name, load_suite(name)["description"])
    elif what == "models":
        from harness.families import builtin_models

        for column in ("model", "family", "layers", "hidden", "heads", "kv heads", "ffn", "checkpoint"):
            out.add_column(column)
        for name, (family, hub_id, make) in builtin_models().items():
            s = family.sizes(make())
            out.add_row(name, family.name, str(s.layers), str(s.hidden), str(s.heads), str(s.kv_heads), str(s.ffn),
                        hub_id or "- (test config)")
    else:
        from harness.tasks import TASKS

        out.add_column("task"), out.add_column("kind"), out.add_column("description")
        for name, task in sorted(TASKS.items()):
            out.add_row(name, task.kind, task.description)
    Console().print(out)


@app.command()
@handle_errors
def compare(
    run_dir: Path = typer.Argument(..., help="A run folder (holds records.jsonl)."),
    reference: str = typer.Option(..., help="Published numbers: a name in suites/references (e.g. sedghi-table1) or a YAML path."),
    out: Optional[Path] = typer.Option(None, help="Also write the comparison (markdown) to this file."),
):
    """Put a run beside the numbers printed in a paper, matched on model, method, sparsity, task and metric,
    with differences; rows without a counterpart are listed, not dropped."""
    from harness.compare import run_compare
    from harness.store import write_atomic

    text = run_compare(run_dir, reference)
    if out is not None:
        write_atomic(out, text)
    print(text)


def main():  # pragma: no cover - console entry point
    sys.exit(app())
