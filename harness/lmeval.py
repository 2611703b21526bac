"""Zero-shot evaluation through lm-eval-harness, with the masked engine applied.

* `MaskedHFLM` (registered with lm-eval as `harness-masked`): lm-eval's HFLM built from the already-loaded
  model and tokenizer. The runner applies the method's masks around the task (`engine.applied()`), so the
  adapter only makes sure the hooks see which tokens are real and where each request's context ends:
  lm-eval right-pads loglikelihood batches and calls the model without an attention mask; the adapter
  records the true lengths and passes the mask, so padding is never a "token" (the sparsity meter skips it).
  A loglikelihood input is (context + continuation)[:-1]; the adapter tells the engine how many of each
  row's tokens are context (`harness.engine.request_contexts`), so that `request` scope takes the mask of
  the last context token, never one chosen from the continuation being scored. Rolling loglikelihood
  windows go through the same path (each window's context is what lm-eval's window gives as context).
  `generate_until` passes lm-eval's left-padding mask to `generate`; the whole prompt is the context, and
  the decode steps (single-token forwards with the KV cache) keep the request's mask.
* No response cache: lm-eval's `use_cache` (sqlite of answers) and `cache_requests` are always off, so two
  configurations (method, variant, sparsity, scope, seed…) can never share answers.
* Tasks: `ZERO_SHOT` lists the harness tasks. Where lm-eval's own data set is in the Hugging Face cache, or no
  offline bundle was given (the data comes from the hub), lm-eval's own task runs; otherwise the offline copy in
  `suites/lm_eval_tasks/` (same templates and functions, data from the bundle). The records say which (`data_source`) and how
  faithful the offline data is (`fidelity`: exact, subset (exact documents, some left out: those lent to
  calibration, harness/lmeval_data.py HOLDOUT), reconstructed or approximate, with `fidelity_note`).
* Per job, lm-eval's own results go to `<run_dir>/lm_eval/<job key>/results_<date>.json` in lm-eval's schema
  (what `lm-eval run --output_path` writes, through lm-eval's EvaluationTracker), and with the `log_samples` setting
  (`--log-samples`) its per-sample logs to `samples_<task>_<date>.jsonl` beside it.
* The same class is lm-eval's `harness-masked` model for lm-eval's own command line and Python API
  (harness/lmeval_plugin.py): given `pretrained=<name>` instead of a loaded model, it builds the model, fits the
  method and applies it for the whole evaluation.
"""
from __future__ import annotations

import json
import logging
import os
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path

import torch

from harness.data import hf_dataset_cached
from harness.engine import request_contexts
from harness.errors import HarnessError
from harness.resources import lm_eval_tasks_dir

LOCAL_TASKS_DIR = lm_eval_tasks_dir()
ADAPTER_NAME = "harness-masked"
SOURCES = ("auto", "local", "hf")
DEFAULT_BATCH_SIZE = 16
DEFAULT_BOOTSTRAP_ITERS = 1000


@dataclass(frozen=True)
class ZeroShotTask:
    name: str  # harness task name
    lm_eval_task: str  # lm-eval's own task
    local_task: str | None  # the offline task in suites/lm_eval_tasks (None: the hub only)
    converter: str | None  # key in harness.lmeval_data.CONVERTERS
    hf_dataset: tuple  # (path, config name) of the data set lm-eval's task loads
    files: tuple  # data files of the offline task
    metrics: tuple  # (lm-eval metric, our metric name), in table order
    kind: str = "zero-shot"
    description: str = ""


ZERO_SHOT: dict[str, ZeroShotTask] = {t.name: t for t in (
    ZeroShotTask("piqa", "piqa", "piqa_local", "piqa", ("baber/piqa", None),
                 ("piqa/valid.jsonl", "piqa/valid-labels.lst"), (("acc", "acc"), ("acc_norm", "acc_norm")),
                 description="PIQA validation (lm-eval piqa, 0-shot): acc, acc_norm"),
    ZeroShotTask("copa", "copa", "copa_local", "copa", ("aps/super_glue", "copa"), ("copa/val.jsonl",),
                 (("acc", "acc"),), description="COPA, SuperGLUE validation (lm-eval copa): acc"),
    ZeroShotTask("openbookqa", "openbookqa", "openbookqa_local", "openbookqa", ("allenai/openbookqa", "main"),
                 ("openbookqa/test.tsv",), (("acc", "acc"), ("acc_norm", "acc_norm")),
                 description="OpenBookQA main test (lm-eval openbookqa): acc, acc_norm"),
    ZeroShotTask("winogrande", "winogrande", "winogrande_local", "winogrande", ("allenai/winogrande", "winogrande_xl"),
                 ("winogrande/dev.jsonl", "winogrande/dev-labels.lst"), (("acc", "acc"),),
                 description="WinoGrande xl validation (lm-eval winogrande, partial scoring): acc"),
    ZeroShotTask("rte", "rte", "rte_local", "rte", ("nyu-mll/glue", "rte"), ("rte/val.jsonl",), (("acc", "acc"),),
                 description="RTE validation (lm-eval rte, GLUE prompt): acc"),
    ZeroShotTask("hellaswag", "hellaswag", "hellaswag_local", "hellaswag", ("Rowan/hellaswag", None),
                 ("hellaswag/hellaswag_val_full.txt.bz2",), (("acc", "acc"), ("acc_norm", "acc_norm")),
                 description="HellaSwag validation (lm-eval hellaswag): acc, acc_norm"),
    ZeroShotTask("arc_easy", "arc_easy", "arc_easy_local", "arc_easy", ("allenai/ai2_arc", "ARC-Easy"),
                 ("arc_easy/test.llm_adapters_format.json",), (("acc", "acc"), ("acc_norm", "acc_norm")),
                 description="ARC-Easy test (lm-eval arc_easy): acc, acc_norm"),
    ZeroShotTask("lambada_openai", "lambada_openai", "lambada_openai_local", "lambada_openai",
                 ("EleutherAI/lambada_openai", "default"), ("lambada/lambada_test.jsonl",),
                 (("acc", "acc"), ("perplexity", "perplexity")),
                 description="LAMBADA (OpenAI) test (lm-eval lambada_openai): last-word acc, perplexity"),
    ZeroShotTask("wikitext_lmeval", "wikitext", "wikitext_local", "wikitext",
                 ("EleutherAI/wikitext_document_level", "wikitext-2-raw-v1"), ("wikitext-2/wiki.test.raw",),
                 (("word_perplexity", "word_ppl"), ("byte_perplexity", "byte_ppl"), ("bits_per_byte", "bits_per_byte")),
                 kind="perplexity",
                 description="WikiText-2 test, lm-eval protocol: document-level rolling loglikelihood, word perplexity "
                             "of the detokenized pages (not comparable to the SparseGPT-protocol wikitext2)"),
    # lm-eval's own tasks on data sets that only the hub has (Deja Vu Table 4)
    ZeroShotTask("cb", "cb", None, None, ("aps/super_glue", "cb"), (), (("acc", "acc"), ("f1", "f1")),
                 description="CommitmentBank, SuperGLUE validation (lm-eval cb, from the Hugging Face hub): acc, f1"),
    ZeroShotTask("c4_lmeval", "c4", None, None, ("allenai/c4", "en"), (),
                 (("word_perplexity", "word_ppl"), ("byte_perplexity", "byte_ppl"), ("bits_per_byte", "bits_per_byte")),
                 kind="perplexity",
                 description="C4 en validation shard 0, lm-eval protocol (from the Hugging Face hub): document-level "
                             "rolling loglikelihood, word perplexity (not comparable to the SparseGPT-protocol c4)"),
)}


# -- the adapter ----------------------------------------------------------------------------------------
def require_lm_eval(tasks=()) -> None:
    """Refuse lm-eval tasks (named in the message) when lm-eval is not installed, before any work."""
    import importlib.util

    if importlib.util.find_spec("lm_eval") is None:
        named = f" ({', '.join(tasks)})" if tasks else ""
        raise HarnessError(f"tasks{named} run through lm-eval, which is not installed: "
                           "pip install 'sparsity-harness[zero-shot]'")


def _hflm_class():
    from lm_eval.models.huggingface import HFLM

    return HFLM


#: builds (model, tokenizer, engine) from model_args for a model named by a string; set by harness.lmeval_plugin
#: (the application layer, which this module does not import)
NAMED_MODEL_BUILDER = None


def _build_adapter_class():
    require_lm_eval()
    import lm_eval.models.huggingface as hf_module
    from lm_eval.api.registry import register_model

    HFLM = _hflm_class()

    class MaskedHFLM(HFLM):
        """HFLM on an already-loaded (and possibly hooked) model; marks lm-eval's padding in the attention mask."""

        def __init__(self, pretrained, tokenizer=None, batch_size: int | str = DEFAULT_BATCH_SIZE, max_length=None,
                     **kwargs):
            self.harness_cache_scope = None  # set for a model built from a name: lm-eval's caches are keyed by it
            self._harness = None
            if isinstance(pretrained, (str, Path)):  # lm-eval's CLI / simple_evaluate(model="harness-masked", …)
                if NAMED_MODEL_BUILDER is None:
                    raise HarnessError("a masked model named by a string is built by the lm-eval plugin: import "
                                       "harness.lmeval_plugin (or run harness-lm-eval), or pass a loaded model")
                built = NAMED_MODEL_BUILDER(str(pretrained), tokenizer=tokenizer, **kwargs)
                pretrained, tokenizer, kwargs = built.model, built.tokenizer, built.hflm_kwargs
                self._harness, self.harness_cache_scope = built, built.scope
            super().__init__(pretrained=pretrained, tokenizer=tokenizer, backend="causal", batch_size=batch_size,
                             max_length=max_length, **kwargs)
            if self._harness is not None:
                self._harness.apply()  # the method's masks stay on for this model's whole evaluation
            self._lengths: list[int] | None = None  # unpadded length of each row of the batch being built
            self._contexts: list[int] | None = None  # context tokens of each row (the rest is continuation)
            self._chunk = None  # the requests of that batch, as lm-eval's Collator yielded them

        @contextmanager
        def _recording_lengths(self):
            """While lm-eval builds a loglikelihood batch, remember the unpadded length of every row and how
            many of its tokens are context.

            lm-eval batches the requests that its Collator yields (chunks of (key, context, continuation)) and
            pads the rows with `pad_and_concat`; both are wrapped for the call. A row's input is
            (context + continuation)[-(max_length + 1):][:-1], so its last len(continuation) - 1 tokens are
            continuation and the rest context. Requests grouped by lm-eval (the same input, one-token
            continuations) share one row: the one with the longest continuation, whose context is a prefix of
            every member's, so its last context token is a context token for all of them.
            """
            original_pad, original_collator = hf_module.pad_and_concat, hf_module.Collator
            adapter = self

            class RecordingCollator(original_collator):
                def get_batched(self, *args, **kwargs):
                    for chunk in super().get_batched(*args, **kwargs):
                        adapter._chunk = chunk
                        yield chunk

            def recording(max_length, tensors, padding_side="right"):
                lengths = [int(t.shape[0]) for t in tensors]
                chunk = adapter._chunk
                if chunk is not None and len(chunk) == len(lengths):
                    adapter._contexts = [n - len(request[2]) + 1 for n, request in zip(lengths, chunk)]
                adapter._lengths = lengths
                return original_pad(max_length, tensors, padding_side=padding_side)

            hf_module.pad_and_concat, hf_module.Collator = recording, RecordingCollator
            try:
                yield
            finally:
                hf_module.pad_and_concat, hf_module.Collator = original_pad, original_collator
                self._lengths = self._contexts = self._chunk = None

        @property
        def tokenizer_name(self) -> str:
            """lm-eval keys its request cache (`cache_requests`) by task, shots and this name, never by the model's
            arguments: with a built configuration the name carries its digest, so two configurations never share."""
            name = super().tokenizer_name
            return f"{name}-harness-{self.harness_cache_scope}" if self.harness_cache_scope else name

        def get_model_info(self) -> dict:
            info = super().get_model_info()
            if self._harness is not None:
                info["harness"] = self._harness.info()
            return info

        def _loglikelihood_tokens(self, requests, disable_tqdm: bool = False, override_bs=None):
            with self._recording_lengths():
                return super()._loglikelihood_tokens(requests, disable_tqdm=disable_tqdm, override_bs=override_bs)

        def _model_call(self, inps, attn_mask=None, labels=None):
            lengths, contexts = self._lengths, self._contexts
            self._lengths = self._contexts = None
            if attn_mask is None and labels is None and lengths is not None and len(lengths) == inps.shape[0]:
                if contexts is None:
                    raise HarnessError("lm-eval adapter: a loglikelihood batch came without its requests' context "
                                       "lengths (lm-eval's batching changed?); request-scope masks need them")
                positions = torch.arange(inps.shape[1], device=inps.device)
                mask = (positions[None, :] < torch.tensor(lengths, device=inps.device)[:, None]).long()
                with torch.no_grad(), request_contexts(self.model, contexts):
                    return self.model(input_ids=inps, attention_mask=mask).logits
            return super()._model_call(inps, attn_mask=attn_mask, labels=labels)

        def _model_generate(self, context, max_length, stop, **generation_kwargs):
            """Generation: the whole prompt (the row's real tokens) is the request's context."""
            mask = generation_kwargs.get("attention_mask")
            counts = mask.sum(dim=1).tolist() if mask is not None else [context.shape[1]] * context.shape[0]
            with request_contexts(self.model, counts):
                return super()._model_generate(context, max_length, stop, **generation_kwargs)

    from lm_eval.api.registry import model_registry

    if ADAPTER_NAME not in model_registry:  # else a placeholder (the entry point, harness/lmeval_plugin.py) names it
        try:
            register_model(ADAPTER_NAME)(MaskedHFLM)
        except (AssertionError, ValueError):  # already registered (module reloaded)
            pass
    return MaskedHFLM


_ADAPTER_CLASS = None


def adapter_class():
    global _ADAPTER_CLASS
    if _ADAPTER_CLASS is None:
        _ADAPTER_CLASS = _build_adapter_class()
    return _ADAPTER_CLASS


def make_adapter(model, tokenizer, batch_size: int | str = DEFAULT_BATCH_SIZE, max_length=None):
    with _quiet():
        return adapter_class()(pretrained=model, tokenizer=tokenizer, batch_size=batch_size, max_length=max_length)


# -- tasks ----------------------------------------------------------------------------------------------
_BUNDLE = object()  # choose_source's default: a bundle is there (the caller did not say)


def choose_source(task: ZeroShotTask, setting: str = "auto", data_dir=_BUNDLE) -> str:
    """`hf` (lm-eval's own task and data set) or `local` (the offline copy in the bundle). `auto`: hf when the data
    set is in the Hugging Face cache, the task has no offline copy, or there is no bundle (`data_dir` None: the data
    comes from the hub); else local."""
    if setting not in SOURCES:
        raise HarnessError(f"unknown lm-eval data source {setting!r}; valid: {', '.join(SOURCES)}")
    if task.local_task is None:
        if setting == "local":
            raise HarnessError(f"task {task.name} has no offline copy (the data directory has none): it runs lm-eval's "
                               f"own task on {task.hf_dataset[0]} from the Hugging Face hub")
        return "hf"
    if data_dir is None:  # no bundle
        if setting == "local":
            raise HarnessError(f"lmeval_source local: task {task.name}'s offline copy reads an offline bundle, and none "
                               "was given; pass --data-dir DIR (or HARNESS_DATA_DIR), or use lmeval_source auto/hf")
        return "hf"
    if setting == "auto":
        return "hf" if hf_dataset_cached(task.hf_dataset[0]) else "local"
    return setting


_MANAGERS: dict = {}


def task_manager(data_dir, local_only: bool = False) -> "object":
    """lm-eval's TaskManager with the offline task files, their loaders pointed at `data_dir` (cached).
    local_only: the offline task files alone (they include nothing of lm-eval's), without indexing lm-eval's own
    ~14000 task files, which takes 16 s on the 2-core CPU machine; for loading offline tasks only."""
    key = (str(data_dir), local_only)
    if key not in _MANAGERS:
        from lm_eval.tasks import TaskManager

        with _quiet():
            _MANAGERS[key] = TaskManager(include_path=str(LOCAL_TASKS_DIR), include_defaults=not local_only,
                                         metadata={"data_dir": str(data_dir)})
    return _MANAGERS[key]


@contextmanager
def compiled_templates():
    """lm-eval renders every prompt field with `utils.apply_template`, which compiles its Jinja template anew for
    each call (`env.from_string`): 80% of building ShadowLLM's 3000 few-shot examples (27 of 34 s). While this is
    active, each template string is compiled once, by lm-eval's own Environment (same filters, same undefined), so
    every rendered string is the same. Restored on exit; nesting is harmless."""
    import functools

    from lm_eval import utils

    original = utils.apply_template
    if getattr(original, "_harness_cached", False):
        yield
        return
    compile_once = functools.lru_cache(maxsize=1024)(utils.env.from_string)

    def apply_template(template: str, doc: dict) -> str:
        return compile_once(template).render(**doc)

    apply_template._harness_cached = True
    utils.apply_template = apply_template
    try:
        yield
    finally:
        utils.apply_template = original


@contextmanager
def _quiet():
    """lm-eval and datasets log a lot at INFO/WARNING; keep errors only while they run."""
    loggers = [logging.getLogger(name) for name in ("lm_eval", "lm-eval", "datasets")]
    levels = [logger.level for logger in loggers]
    for logger in loggers:
        logger.setLevel(logging.ERROR)
    try:
        import datasets

        bars = datasets.utils.logging.is_progress_bar_enabled()
        datasets.utils.logging.disable_progress_bar()
    except ImportError:  # pragma: no cover
        datasets, bars = None, False
    previous = os.environ.get("DISABLE_MULTIPROC")
    os.environ["DISABLE_MULTIPROC"] = "1"  # bootstrap stderr in-process: no fork of a process holding a model
    try:
        yield
    finally:
        for logger, level in zip(loggers, levels):
            logger.setLevel(level)
        if bars:
            datasets.utils.logging.enable_progress_bar()
        if previous is None:
            os.environ.pop("DISABLE_MULTIPROC", None)
        else:
            os.environ["DISABLE_MULTIPROC"] = previous


def run_lm_eval(lm, task_names: list[str], manager, *, limit=None, num_fewshot: int = 0, log_samples: bool = False,
                bootstrap_iters: int = DEFAULT_BOOTSTRAP_ITERS, seed: int | None = None) -> dict:
    """lm-eval's `simple_evaluate` on an adapter, with every response/request cache off."""
    from lm_eval import simple_evaluate

    kwargs = {}
    if seed is not None:  # lm-eval's defaults are 0 / 1234; the harness seed only moves the few-shot sampler
        kwargs["fewshot_random_seed"] = seed
    with _quiet(), compiled_templates():
        return simple_evaluate(model=lm, tasks=task_names, task_manager=manager, limit=limit, num_fewshot=num_fewshot,
                               use_cache=None, cache_requests=False, log_samples=log_samples,
                               bootstrap_iters=bootstrap_iters, **kwargs)


def jsonable(results: dict) -> dict:
    from lm_eval.utils import handle_non_serializable

    return json.loads(json.dumps(results, default=handle_non_serializable))


def _value(entry: dict, metric: str, suffix: str = ""):
    value = entry.get(f"{metric}{suffix},none")
    if value is None or value == "N/A":
        return None
    return float(value)


def records_from_results(task: ZeroShotTask, lm_task: str, results: dict, source: str, num_fewshot: int,
                         holdout: str | None = None) -> list[dict]:
    """Records of one lm-eval task. holdout: what the offline task leaves out of its split (lmeval_data.holdout_note);
    an exact copy evaluated on part of its documents has fidelity `subset`."""
    from harness.lmeval_data import FIDELITY
    import lm_eval

    entry = results["results"][lm_task]
    n = results.get("n-samples", {}).get(lm_task, {}).get("effective")
    if source == "hf":
        fidelity, note = "exact", "lm-eval's own task and data set (Hugging Face cache)"
    else:
        fidelity, note = FIDELITY[task.converter]
        if holdout:
            fidelity = "subset" if fidelity == "exact" else fidelity
            note += f"; {holdout}"
        if num_fewshot:
            fidelity = "approximate" if fidelity in ("exact", "subset") else fidelity
            note += "; offline few-shot examples come from the evaluation split (lm-eval samples the training split)"
    version = getattr(lm_eval, "__version__", "?")
    out = []
    for lm_metric, name in task.metrics:
        value = _value(entry, lm_metric)
        if value is None:
            continue
        protocol = (f"lm-eval {version} {task.lm_eval_task}, {num_fewshot}-shot, {lm_metric}"
                    + (", document-level rolling loglikelihood" if task.kind == "perplexity" else ""))
        out.append({"metric": name, "value": value, "stderr": _value(entry, lm_metric, "_stderr"), "n": n,
                    "protocol": protocol, "lm_eval_task": lm_task, "data_source": source, "fidelity": fidelity,
                    "fidelity_note": note, "num_fewshot": num_fewshot})
    return out


def _run_dir(session):
    run_dir = getattr(session, "run_dir", None)
    return Path(run_dir) if run_dir else None


def save_results(session, job, results: dict) -> Path | None:
    """lm-eval's results in lm-eval's own schema and file names, written by lm-eval's EvaluationTracker (what
    `lm-eval run --output_path … [--log_samples]` writes): `<run_dir>/lm_eval/<job key>/results_<date>.json`, and
    with logged samples `samples_<task>_<date>.jsonl` beside it. The job's folder is emptied first (a job that was
    killed halfway left its partial files there). None without a run folder."""
    import shutil

    from lm_eval.loggers import EvaluationTracker

    run_dir = _run_dir(session)
    if run_dir is None:
        return None
    folder = run_dir / "lm_eval" / job.key
    if folder.exists():
        shutil.rmtree(folder)
    folder.mkdir(parents=True)
    results = dict(results)
    samples = results.pop("samples", None)
    tracker = EvaluationTracker(output_path=str(folder / "results.json"))  # a .json path: no model-name folder
    model_args = {"model": session.model_spec.label, "weights": session.config.weights, "method": job.method,
                  "sparsity": job.sparsity, "task": job.task, "seed": job.seed, "job": job.key}
    tracker.general_config_tracker.log_experiment_args(model_source=ADAPTER_NAME, model_args=model_args,
                                                       system_instruction=None, chat_template=None,
                                                       fewshot_as_multiturn=False)
    with _quiet():
        tracker.save_results_aggregated(results=results, samples=samples)
        for name in (samples or {}):
            tracker.save_results_samples(task_name=name, samples=samples[name])
    written = sorted(folder.glob("results_*.json"))
    if not written:  # the tracker logs its errors as warnings and goes on: say it here
        raise RuntimeError(f"lm-eval's EvaluationTracker wrote no results file into {folder}")
    return written[-1]


def _setting(config, name, default):
    value = getattr(config, name, None)
    if value is None:
        value = (getattr(config, "method_settings", None) or {}).get("lm_eval", {}).get(name)
    return default if value is None else value


def batch_size_for(setting, device: str):
    """The lm-eval batch size: the setting when given (an integer, or "auto"), else lm-eval's "auto" on a GPU (the
    largest batch that fits, found once per adapter) and DEFAULT_BATCH_SIZE on the CPU."""
    if setting is None:
        return "auto" if str(device).startswith("cuda") else DEFAULT_BATCH_SIZE
    if str(setting).startswith("auto"):
        return str(setting)
    try:
        return int(setting)
    except ValueError:
        raise HarnessError(f"batch_size {setting!r}: write an integer or auto") from None


def evaluate_task(session, job, config, progress) -> list[dict]:
    """The `evaluate` of every zero-shot task: one lm-eval task on the session's (hooked) model."""
    task = ZERO_SHOT[job.task]
    num_fewshot = int(_setting(config, "num_fewshot", 0))
    batch_size = batch_size_for(_setting(config, "batch_size", None), session.device)
    source = choose_source(task, _setting(config, "lmeval_source", "auto"), session.data.root)
    lm = session.memo(f"lm_eval:adapter:{batch_size}",
                             lambda: make_adapter(session.model, session.tokenizer, batch_size=batch_size))
    lm_task = task.lm_eval_task if source == "hf" else task.local_task
    if progress is not None:
        progress.total(1)
    manager = task_manager(session.data.root, local_only=source == "local")
    results = run_lm_eval(lm, [lm_task], manager, limit=config.limit, num_fewshot=num_fewshot,
                          log_samples=bool(_setting(config, "log_samples", False)),
                          bootstrap_iters=int(_setting(config, "bootstrap_iters", DEFAULT_BOOTSTRAP_ITERS)))
    from harness.lmeval_data import holdout_note

    holdout = holdout_note(task.converter, session.data.root) if source == "local" else None
    records = records_from_results(task, lm_task, results, source, num_fewshot, holdout)
    path = save_results(session, job, results)
    if path is not None:
        for record in records:
            record["lm_eval_results"] = str(path.relative_to(path.parent.parent.parent))
    if progress is not None:
        progress.advance(1)
    if not records:
        raise HarnessError(f"lm-eval returned no metrics for {lm_task}: {sorted(results['results'].get(lm_task, {}))}")
    return records


def register_tasks(tasks: dict, task_def_cls) -> None:
    """Add the zero-shot tasks to the harness TASKS registry."""
    for task in ZERO_SHOT.values():
        hub = (task.hf_dataset[0],) if task.local_task is None else ()
        tasks[task.name] = task_def_cls(task.name, task.kind, task.description, task.files, evaluate_task, hub=hub,
                                        hub_instead=(task.hf_dataset[0],) if task.local_task else ())
