"""One validation pass before any work: `harness run`, `fit` and `sweep` call it before a model is built or a
folder is created, so bad input exits 2 with what was wrong and what is valid, and nothing is left on disk.

It checks, in order: executor-only options and installed extras (lm-eval for lm-eval tasks, Ray for
`--executor ray`), the device, the model (its config: built in for OPT sizes, read from a local directory or
the hub otherwise) and the ranges that depend on it (dense layers, seqlen, stride, calibration length),
methods × sparsity × allocation × scope, the data files every job reads (calibration included) against
their sha256, and the folders the run writes (`--out`, the artefact cache). Only then is the model's content
identity computed (it reads the checkpoint once and remembers it in the cache folder) and the jobs expanded.
"""
from __future__ import annotations

import importlib.util
import os
import tempfile
from dataclasses import dataclass
from pathlib import Path

from harness.errors import HarnessError

EXECUTOR_ONLY = {"gpus_per_job": "--gpus-per-job", "ray_address": "--ray-address", "retries": "--retries"}
DEVICE_TYPES = ("cpu", "cuda", "mps")


@dataclass
class Prepared:
    """What the validation pass found: everything a run needs, nothing built or written yet."""

    config: object  # RunConfig
    data: object  # DataDir
    model_spec: object  # ModelSpec
    model_config: object  # the model's transformers config
    identity: dict  # the run identity (run.json)
    jobs: list  # JobSpec


# -- the pieces -----------------------------------------------------------------------------------------------


def check_executor(executor: str, options: dict) -> None:
    """Ray installed for `ray`; no Ray-only option given to the local executor (it would be ignored)."""
    if executor == "ray":
        if importlib.util.find_spec("ray") is None:
            raise HarnessError("--executor ray needs Ray, which is not installed: pip install 'sparsity-harness[ray]'")
        return
    given = [EXECUTOR_ONLY[name] for name, value in options.items() if value is not None]
    if given:
        raise HarnessError(f"{', '.join(given)} only appl{'ies' if len(given) == 1 else 'y'} to --executor ray; the "
                           f"local executor runs one job at a time in this process on --device. Drop "
                           f"{'it' if len(given) == 1 else 'them'}, or add --executor ray")


RAY_SWEEP_KEYS = ("gpus_per_job", "ray_address", "retries", "num_cpus", "max_workers", "gpu_memory_gb")


def check_sweep_executor(sweep: dict, executor: str, options: dict) -> list[str]:
    """`check_executor` for a sweep, whose file may hold Ray settings too: refused on the local executor
    unless the file itself runs on Ray (then `--executor local` overrides it, and the keys it leaves unused
    are returned for the CLI to say so)."""
    check_executor(executor, options)
    if executor != "local":
        return []
    in_file = [key for key in RAY_SWEEP_KEYS if sweep.get(key) is not None]
    if in_file and sweep.get("executor", "local") != "ray":
        raise HarnessError(f"sweep file sets {', '.join(in_file)}, which only apply to executor ray, and runs on the "
                           "local executor; add `executor: ray` to the file (or pass --executor ray), or drop them")
    return in_file


def check_device(device: str | None, executor: str = "local") -> None:
    """A device torch knows and this machine has (with Ray, the workers' GPUs are the cluster's to check)."""
    import torch

    if device in (None, "", "auto"):
        return
    valid = "auto, cpu, cuda, cuda:N"
    try:
        parsed = torch.device(device)
    except (RuntimeError, TypeError):
        parsed = None
    if parsed is None or parsed.type not in DEVICE_TYPES:
        raise HarnessError(f"unknown device {device!r}; valid: {valid}")
    if executor == "ray" or parsed.type == "cpu":
        return
    if parsed.type == "mps":
        if not torch.backends.mps.is_available():
            raise HarnessError(f"--device {device}: this machine has no Apple GPU (MPS); valid here: auto, cpu")
        return
    count = torch.cuda.device_count() if torch.cuda.is_available() else 0
    if count == 0:
        build = f"CUDA {torch.version.cuda}" if torch.version.cuda else "a CPU-only build"
        raise HarnessError(f"--device {device}: no CUDA GPU is available on this machine (torch {torch.__version__}, "
                           f"{build}); valid here: auto, cpu")
    if parsed.index is not None and parsed.index >= count:
        raise HarnessError(f"--device {device}: this machine has {count} CUDA GPU(s); valid: auto, cpu, cuda, "
                           f"cuda:0 … cuda:{count - 1}")


def check_model(spec):
    """The model's config (no weights loaded); refuses an unknown name and a family without an adapter."""
    from harness.families import family_of, supported

    spec.kind  # noqa: B018 - raises for an unknown model
    config = spec.config()
    try:
        family_of(config)
    except HarnessError:
        raise HarnessError(f"model {spec.name!r} is a {getattr(config, 'model_type', '?')!r} model; the harness "
                           f"supports {supported()}; see `harness list models`") from None
    return config


def check_ranges(config, model_config, label: str) -> None:
    """Settings whose valid range is the model's: layers, positions, and the window and stride of perplexity."""
    layers, positions = model_config.num_hidden_layers, model_config.max_position_embeddings
    bad = [layer for layer in config.dense_layers if not 0 <= int(layer) < layers]
    if bad:
        raise HarnessError(f"--dense-layers {','.join(map(str, bad))}: {label} has {layers} decoder layers; valid: "
                           f"0 … {layers - 1}")
    if config.seqlen is not None and config.seqlen > positions:
        raise HarnessError(f"--seqlen {config.seqlen} is longer than {label}'s {positions} positions "
                           f"(max_position_embeddings); valid: 1 … {positions}")
    seqlen = config.seqlen or positions
    if config.stride is not None and config.stride > seqlen:
        where = "--seqlen" if config.seqlen else "the model's context, the default window"
        raise HarnessError(f"--stride {config.stride} is larger than the window of {seqlen} tokens ({where}): windows "
                           f"would jump over the tokens between them; valid: 1 … {seqlen} (= {seqlen}: "
                           "non-overlapping windows, the SparseGPT protocol; less: overlapping windows)")
    if config.calib_seqlen > positions:
        raise HarnessError(f"calib_seqlen {config.calib_seqlen} is longer than {label}'s {positions} positions; "
                           f"valid: 1 … {positions}")


def check_methods(config, labels: list[str], tasks: list, model_config=None) -> None:
    """Method × allocation × scope × family: global allocation needs scores of every layer up front; the sparse
    decode engine (latency tasks) runs causal masks only, of OPT models, for methods that have a decode mask
    source (not the masked-engine-only methods: `Method.masked_only`)."""
    from methods import MethodSpec, discover, get_method

    if config.allocation == "global":
        refused = [label for label in labels
                   if (method := get_method(MethodSpec.parse(label))).units and "global" not in method.allocations]
        if refused:
            whole, variants = [], []  # methods whose every variant can, then single variants that can
            for name, cls in sorted(discover().items()):
                if not cls.units:
                    continue
                methods = [cls(v) for v in dict.fromkeys((cls.default_variant, *cls.variants))]
                chosen = [m.label for m in methods if "global" in m.allocations]
                whole += [name] if len(chosen) == len(methods) else []
                variants += chosen if len(chosen) < len(methods) else []
            able = whole + variants
            raise HarnessError(
                f"--allocation global ranks the units of all layers at once, before the first sparse layer runs; "
                f"{', '.join(refused)} scores units layer by layer, from that layer's own activations. Valid with "
                f"global: {', '.join(able)}; or use --allocation local")
    engine_tasks = [task.name for task in tasks if not task.masked]
    if engine_tasks and model_config is not None:
        from harness.families import family_of

        family = family_of(model_config).name
        if family not in DECODE_FAMILIES:
            raise HarnessError(f"{', '.join(engine_tasks)} runs on the sparse decode engine, which supports the "
                               f"{', '.join(DECODE_FAMILIES)} families; this is a {family}-family model. Valid here: "
                               "the masked-engine tasks (perplexity, zero-shot)")
        wrong = [label for label in labels
                 if family not in getattr(get_method(MethodSpec.parse(label)), "decode_families", DECODE_FAMILIES)]
        if wrong:
            raise HarnessError(f"{', '.join(wrong)} decodes on the sparse engine of the "
                               f"{', '.join(sorted(get_method(MethodSpec.parse(wrong[0])).decode_families))} family "
                               f"only, not on {family} ({', '.join(engine_tasks)})")
    if engine_tasks:
        masked_only = [label for label in labels if getattr(get_method(MethodSpec.parse(label)), "masked_only", False)]
        if masked_only:
            raise HarnessError(f"{', '.join(masked_only)} has no mask source for the sparse decode engine "
                               f"({', '.join(engine_tasks)}): it runs on the masked engine only (perplexity, zero-shot)")
    if config.scope != "token":
        if engine_tasks:
            raise HarnessError(f"--scope {config.scope}: {', '.join(engine_tasks)} runs on the sparse decode engine, "
                               "which applies causal masks only; valid there: --scope token")


DECODE_FAMILIES = ("opt", "llama")  #: families with a sparse decode engine (kernels.decode, kernels.decode_llama)


def check_method_settings(config) -> None:
    """Method settings with a fixed set of values: `predictor_weights` (model, int8, fp8) of the predictor methods
    (dejavu, shadow, timewise), and only for them."""
    from methods.predictors import PREDICTOR_METHODS, predictor_weights

    for name, settings in (config.method_settings or {}).items():
        if isinstance(settings, dict) and "predictor_weights" in settings:
            if name not in PREDICTOR_METHODS:
                raise HarnessError(f"method_settings {{{name}: {{predictor_weights: ...}}}}: {name} has no predictors; "
                                   f"predictor_weights applies to {', '.join(PREDICTOR_METHODS)}")
            predictor_weights(settings)


def check_extras(tasks: list) -> None:
    from harness.lmeval import ZERO_SHOT, require_lm_eval

    needs = [task.name for task in tasks if task.name in ZERO_SHOT]
    if needs:
        require_lm_eval(needs)


def calibration_tasks(config, labels: list[str]) -> list[str]:
    """The zero-shot tasks whose documents the methods' fits read (ShadowLLM's few-shot calibration examples,
    harness/fewshot.py): shadow's default and dejavu:shadowllm."""
    from methods import MethodSpec, get_method

    found: dict = {}
    for label in labels:
        spec = MethodSpec.parse(label)
        method = get_method(spec, config.method_settings.get(spec.name, {}))
        for task in getattr(method, "calibration_tasks", lambda: ())():
            found[task] = True
    return list(found)


def check_calibration_extras(tasks: list[str]) -> None:
    import importlib.util

    if tasks and importlib.util.find_spec("lm_eval") is None:
        raise HarnessError(f"few-shot calibration (shadow's default, dejavu:shadowllm; tasks {', '.join(tasks)}) builds "
                           "its examples with lm-eval's prompts, and lm-eval is not installed: pip install "
                           "'sparsity-harness[zero-shot]'; or calibrate on language-model text (shadow:lmtext, or "
                           "method_settings {shadow: {calibration: lmtext}})")


def fitting_methods(labels: list[str]) -> list[str]:
    """The methods among `labels` that fit something (calibration statistics, predictors)."""
    from methods import Method, MethodSpec, get_method

    return [label for label in labels if type(get_method(MethodSpec.parse(label))).fit is not Method.fit]


def check_data(data, config, tasks: list, fits: bool, model_spec, tokenizer, calibration: list[str] = ()) -> None:
    """Every file the jobs read exists and matches the manifest: the tasks', the calibration set (when a
    method fits; `calibration`: the zero-shot tasks whose documents few-shot calibration reads) and the tokenizer's
    (unless --tokenizer or the model directory has one)."""
    from harness.data import calibration_file
    from harness.models import tokenizer_dir_for
    from harness.tasks import get_task

    for task in tasks:
        task.check(data)
    for name in calibration:
        get_task(name).check(data)
    if fits:
        if config.calib_data == "reference-holdout":
            from harness.reference_model import HOLDOUT_READS

            data.check(list(HOLDOUT_READS))
        else:
            data.check([calibration_file(config.calib_data)])
    tokenizer_dir_for(model_spec, tokenizer, data)


def check_writable(path: str | Path, flag: str) -> None:
    """`path` is a folder this process can write, or can be created: an existing folder that takes a file,
    or a missing one whose nearest existing parent is such a folder. Nothing is left behind."""
    path = Path(path)
    if path.exists() and not path.is_dir():
        raise HarnessError(f"{flag} {path} is a file, not a folder; choose a folder (it is created if missing)")
    probe = path
    while not probe.exists():
        probe = probe.parent
    if not probe.is_dir():
        raise HarnessError(f"{flag} {path}: {probe} is a file, so the folder cannot be created there; choose another")
    try:
        os.rmdir(tempfile.mkdtemp(prefix=".harness-write-check-", dir=probe))
    except OSError as exc:
        raise HarnessError(f"{flag} {path}: cannot write in {probe} ({exc.strerror or exc}); choose a folder you can "
                           "write") from None


# -- the pass -------------------------------------------------------------------------------------------------


def prepare(config, data_dir=None, tokenizer=None, *, cache_dir=None, out=None, verify: bool = True,
            executor_options: dict | None = None) -> Prepared:
    """Validate a run (see the module docstring), then compute its identity and jobs. `out`: the run folder
    the caller will claim (None: the caller checks its own folder). Raises HarnessError; writes nothing
    until every check has passed (then only the model digest cache)."""
    from harness.artefacts import ArtefactCache
    from harness.data import resolve_data
    from harness.footprint import check as check_footprint
    from harness.footprint import run_needs
    from harness.models import ModelSpec, dtype_name, resolve_device, resolve_dtype
    from harness.spec import expand_jobs, job_targets
    from harness.tasks import get_task
    from methods import MethodSpec, get_method

    config.validate()
    check_executor(config.executor, executor_options or {})
    tasks = [get_task(name) for name in config.tasks]
    check_extras(tasks)
    job_targets(config)  # methods, variants, sparsities, units
    check_device(config.device, config.executor)
    dtype = dtype_name(resolve_dtype(config.dtype, resolve_device(config.device)))
    model_spec = ModelSpec(config.model, config.weights)
    model_config = check_model(model_spec)
    check_ranges(config, model_config, model_spec.label)
    labels = list(dict.fromkeys(get_method(MethodSpec.parse(text)).label for text in config.methods))
    check_methods(config, labels, tasks, model_config)
    check_method_settings(config)
    data = resolve_data(data_dir, verify=verify)  # a bundle, else the Hugging Face hub (harness/data.py)
    fits = fitting_methods(labels)
    few_shot = calibration_tasks(config, labels)
    check_calibration_extras(few_shot)
    check_data(data, config, tasks, bool(fits), model_spec, tokenizer, few_shot)
    if fits or any(task.masked for task in tasks):  # text is tokenized: the token ids must fit the embedding
        from harness.models import check_vocabulary

        check_vocabulary(model_spec, model_config, tokenizer, data)
    cache = ArtefactCache(cache_dir)
    if cache.root.exists() and not cache.root.is_dir():
        raise HarnessError(f"--cache-dir {cache.root} is a file, not a folder; choose a folder")
    if fits and config.executor == "local":  # with Ray the workers write the cache, on their own machines
        check_writable(cache.root, "--cache-dir")
    if out is not None:
        check_writable(out, "--out")
    if model_spec.weights == "pretrained" and model_spec.kind != "local":
        model_spec.checkpoint_dir()  # the snapshot it loads from: cached, else downloaded (or a clear error)
    identity = config.identity(model_spec.identity(config.weight_seed, cache.root), data.fingerprint, dtype)
    jobs = expand_jobs(config, identity)
    check_footprint(run_needs(jobs, model_config, config), model_config=model_config, run_config=config,
                    device=resolve_device(config.device), dtype=dtype, cache_root=cache.root)  # memory and disk of the fits
    return Prepared(config, data, model_spec, model_config, identity, jobs)
