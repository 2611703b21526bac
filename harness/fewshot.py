"""ShadowLLM's calibration examples: few-shot prompts of the downstream tasks with their target output.

ShadowLLM (Akhauri et al. 2024, §5.2, §6) collects its pruning criteria "on ≈ 3000 input-output examples across the
7 downstream tasks in a 5-shot setting", with the loss on the target output and the importance read at the last
sequence index. `build_examples` makes these examples; `methods.criteria.score_targets` scores them.

An example is one query document of a task in lm-eval's own prompt format: `shots` demonstrations (each its
question and gold answer, lm-eval's `fewshot_context`) followed by the query's question is the context, and the
query's gold continuation (lm-eval's `construct_requests` for the gold choice) is the target. Demonstrations and
queries come from the same calibration documents (a query is never its own demonstration), which are never
documents that the zero-shot evaluation reads:
  * `hf` (the task's Hugging Face data set is in the cache, or is reachable when online; the evaluation then runs
    lm-eval's own task on its validation/test split): the task's training split;
  * `local` (the offline copies in the data directory, evaluated by the offline tasks): OpenBookQA's dev split;
    PIQA, WinoGrande, ARC-Easy and HellaSwag lend a fixed, content-chosen set of documents of their only local split,
    which the offline evaluation leaves out (harness/lmeval_data.py HOLDOUT); COPA and RTE have no calibration
    documents offline (their only split is evaluated and too small to split), so they are left out and the set says
    so (`FewShotSet.left_out`).
The source of each task follows the evaluation's (harness.lmeval.choose_source), so that calibration and
evaluation documents can never meet. Token ids are lm-eval's: context and continuation encoded as its
`_encode_pair` does for a causal model (trailing spaces of the context move to the continuation; the pair is encoded
whole and split after the context's tokens), left-truncated to `max_length` like its loglikelihood inputs.
"""
from __future__ import annotations

import hashlib
import random
from dataclasses import dataclass, field

from harness.errors import HarnessError

TASKS = ("piqa", "copa", "openbookqa", "winogrande", "rte", "hellaswag", "arc_easy")
DEFAULT_EXAMPLES = 3000
DEFAULT_SHOTS = 5


@dataclass(frozen=True)
class CalibrationExample:
    """One few-shot example: `ids` = context + target token ids, `target` = (start, end) the target's span."""

    task: str
    doc: int  # index of the query among the task's calibration documents
    ids: tuple[int, ...]
    target: tuple[int, int]


@dataclass
class FewShotSet:
    """The examples (task by task, in a seeded order), where each task's documents come from, and the tasks
    without calibration documents with the reason."""

    examples: list[CalibrationExample]
    tasks: dict  # task -> {"examples": n, "documents": m, "source": where the documents come from}
    left_out: dict = field(default_factory=dict)  # task -> why it has no calibration examples
    settings: dict = field(default_factory=dict)

    @property
    def fingerprint(self) -> str:
        """A content hash of every example (for the cache keys of what is fitted on them)."""
        digest = hashlib.sha256()
        for e in self.examples:
            digest.update(f"{e.task}:{e.doc}:{e.target}:{','.join(map(str, e.ids))};".encode())
        return digest.hexdigest()[:16]

    def describe(self) -> str:
        parts = [f"{task} {info['examples']} ({info['source']})" for task, info in self.tasks.items()]
        text = f"{len(self.examples)} {self.settings.get('shots')}-shot calibration examples: " + ", ".join(parts)
        if self.left_out:
            text += "; left out: " + "; ".join(f"{task} ({why})" for task, why in self.left_out.items())
        return text


def encode_pair(tokenizer, context: str, continuation: str) -> tuple[list[int], list[int]]:
    """lm-eval's `_encode_pair` for a causal model with its default `tok_encode` (the tokenizer's own special
    tokens): the context's trailing whitespace moves to the continuation, the pair is encoded whole and split."""
    spaces = len(context) - len(context.rstrip())
    if spaces:
        continuation, context = context[-spaces:] + continuation, context[:-spaces]
    whole = tokenizer.encode(context + continuation)
    context_ids = tokenizer.encode(context)
    return context_ids, whole[len(context_ids):]


class _Demonstrations:
    """An lm-eval sampler over the calibration documents that never draws the query being built."""

    def __init__(self, docs: list, rnd: random.Random):
        self.docs, self.rnd, self.query = docs, rnd, None

    def sample(self, n: int, eval_doc=None, **_):
        picks = self.rnd.sample(range(len(self.docs) - 1), n)  # indices of the documents other than the query
        return [self.docs[i + (self.query is not None and i >= self.query)] for i in picks]

    def set_rnd(self, _seed):  # lm-eval reseeds its own samplers; ours keeps the calibration seed
        return self


def _lm_eval_task(name: str, data_dir, local: bool = False):
    """lm-eval's task object (prompt functions and, for lm-eval's own tasks, its data set); local: an offline task
    file of the harness (its manager does not index lm-eval's own tasks)."""
    from harness.lmeval import _quiet, task_manager

    with _quiet():
        return task_manager(data_dir, local_only=local).load([name])["tasks"][name]


_DOCUMENTS: dict = {}


def task_documents(name: str, data_dir, source: str = "auto"):
    """(lm-eval task object, calibration documents in its processed schema, where they come from, source), or
    (None, [], why not, source) when the task has none there. Loaded once per process and source."""
    from harness.lmeval import ZERO_SHOT, choose_source

    chosen = choose_source(ZERO_SHOT[name], source, data_dir)  # no bundle (None): lm-eval's own data
    key = (name, str(data_dir), chosen)
    if key not in _DOCUMENTS:
        _DOCUMENTS[key] = _load_documents(name, data_dir, chosen)
    return _DOCUMENTS[key]


def _load_documents(name: str, data_dir, chosen: str):
    from harness.lmeval import ZERO_SHOT
    from harness.lmeval_data import calibration_rows

    spec = ZERO_SHOT[name]
    if chosen == "hf":
        task = _lm_eval_task(spec.lm_eval_task, data_dir)
        if not task.has_training_docs():
            return None, [], "lm-eval's task has no training split", chosen
        return task, list(task.training_docs()), f"{spec.hf_dataset[0]} {task.config.training_split} split", chosen
    found = calibration_rows(spec.converter, data_dir)
    if found is None:
        return None, [], "no calibration documents offline: its only local split is evaluated and too small to split", chosen
    rows, where = found
    task = _lm_eval_task(spec.local_task, data_dir, local=True)
    docs = rows
    if task.config.process_docs is not None:
        import datasets

        docs = list(task.config.process_docs(datasets.Dataset.from_list(rows)))
    return task, docs, where, chosen


def _gold(task, doc) -> int:
    """The index of the correct request, as lm-eval's multiple-choice scoring reads it."""
    if task.multiple_input:
        return int(task.doc_to_text(doc))
    gold = task.doc_to_target(doc)
    if isinstance(gold, str):
        choices = task.doc_to_choice(doc)
        if gold not in choices:
            raise HarnessError(f"{task.config.task}: gold answer {gold!r} is none of the choices {choices}")
        return choices.index(gold)
    return int(gold)


def task_examples(name: str, task, docs: list, tokenizer, count: int, shots: int, seed: int,
                  max_length: int) -> list[CalibrationExample]:
    """`count` examples of one task: distinct query documents drawn with `seed`, each with `shots`
    demonstrations drawn from the other documents."""
    if task.OUTPUT_TYPE != "multiple_choice":
        raise HarnessError(f"{name}: few-shot calibration examples need a multiple-choice task")
    if len(docs) < shots + 1:
        raise HarnessError(f"{name}: {len(docs)} calibration documents, fewer than {shots} demonstrations + a query")
    rnd = random.Random(f"{seed}:{name}")
    queries = rnd.sample(range(len(docs)), min(count, len(docs)))
    sampler = _Demonstrations(docs, rnd)
    task.sampler = sampler
    out = []
    for index in queries:
        doc = docs[index]
        sampler.query = index
        context = task.fewshot_context(doc=doc, num_fewshot=shots)
        requests = task.construct_requests(doc, context, metadata=(name, index, 1))
        ctx_text, continuation = requests[_gold(task, doc)].arguments[:2]
        ctx_ids, cont_ids = encode_pair(tokenizer, ctx_text, continuation)
        if not cont_ids:
            raise HarnessError(f"{name} document {index}: the gold continuation {continuation!r} has no tokens")
        ids = (ctx_ids + cont_ids)[-max_length:]
        start = len(ids) - len(cont_ids)
        if start < 1:
            raise HarnessError(f"{name} document {index}: its target alone fills max_length {max_length}")
        out.append(CalibrationExample(name, index, tuple(ids), (start, len(ids))))
    return out


def quotas(available: dict[str, int], total: int) -> dict[str, int]:
    """Split `total` examples over the tasks as evenly as their document counts allow (what a task cannot give is
    spread over the others), in the order of `available`."""
    quota = {task: 0 for task in available}
    left, open_ = total, [t for t in available if available[t] > 0]
    while left > 0 and open_:
        share, extra = divmod(left, len(open_))
        given = 0
        for i, task in enumerate(open_):
            want = share + (1 if i < extra else 0)
            take = min(want, available[task] - quota[task])
            quota[task] += take
            given += take
        left -= given
        open_ = [t for t in open_ if quota[t] < available[t]]
        if given == 0:
            break
    return quota


def build_examples(tokenizer, data_dir, *, tasks=TASKS, examples: int = DEFAULT_EXAMPLES, shots: int = DEFAULT_SHOTS,
                   seed: int = 0, source: str = "auto", max_length: int = 2048, log=None) -> FewShotSet:
    """ShadowLLM's calibration set: about `examples` `shots`-shot examples split evenly over `tasks` (the 7
    downstream tasks by default), each with token ids and the span of its target output (see the module doc for
    where the documents come from). Deterministic for a given seed, data and tokenizer. `source`: auto, local or
    hf, as for the zero-shot tasks (harness.lmeval.SOURCES). A task without calibration documents is left out and
    named in `left_out`; none at all is an error."""
    from harness.lmeval import ZERO_SHOT

    unknown = [t for t in tasks if t not in TASKS]
    if unknown:
        raise HarnessError(f"unknown calibration tasks {unknown}; valid: {', '.join(TASKS)}")
    if examples < 1 or shots < 0:
        raise HarnessError("few-shot calibration needs examples >= 1 and shots >= 0")
    found, left_out = {}, {}
    for name in tasks:
        task, docs, where, chosen = task_documents(name, data_dir, source)
        if task is None:
            left_out[name] = where
        else:
            found[name] = (task, docs, f"{chosen}: {where}")
    if not found:
        raise HarnessError(f"no calibration documents for any of {', '.join(tasks)}: " +
                           "; ".join(f"{t}: {why}" for t, why in left_out.items()))
    from harness.lmeval import compiled_templates

    quota = quotas({name: len(docs) for name, (_, docs, _) in found.items()}, examples)
    out, info = [], {}
    for name, (task, docs, where) in found.items():
        with compiled_templates():  # the same prompts, each template compiled once (lm-eval recompiles per call)
            made = task_examples(name, task, docs, tokenizer, quota[name], shots, seed, max_length)
        out.extend(made)
        info[name] = {"examples": len(made), "documents": len(docs), "source": where}
        if log is not None:
            log(f"calibration: {name}: {len(made)} {shots}-shot examples from {len(docs)} documents ({where})")
    if log is not None and left_out:
        log("calibration: left out " + "; ".join(f"{t} ({why})" for t, why in left_out.items()))
    settings = {"tasks": list(tasks), "examples": examples, "shots": shots, "seed": seed, "source": source,
                "max_length": max_length, "lm_eval_tasks": {n: ZERO_SHOT[n].lm_eval_task for n in found}}
    return FewShotSet(out, info, left_out, settings)


# -- for the methods that fit on these examples (shadow, dejavu:shadowllm) -----------------------------------
#: The method settings of the few-shot calibration and their defaults (ShadowLLM §5.2, §6: about 3000 5-shot
#: examples across the 7 tasks). `calib_seed` chooses the examples; it is part of the calibration data, not of a
#: method's seed (every seed, criterion and method reads the same examples).
SETTINGS = {"examples": DEFAULT_EXAMPLES, "shots": DEFAULT_SHOTS, "tasks": TASKS, "calib_seed": 0, "max_length": 2048}


def keep_scores(settings: dict) -> bool:
    """Whether the criterion scores of the examples go to the artefact cache (method setting `keep_scores`, default
    false): they are an intermediate of the fit (4.7 GiB for the default 3000 examples at OPT-13B, beside a 3.15 GiB
    ShadowLLM predictor), kept in the session's memory and shared there by every fit of the process (each seed,
    sparsity and method); true writes them, so that a fit in another process (another seed, changed training
    settings) reads them instead of scoring the examples again."""
    value = settings.get("keep_scores", False)
    if not isinstance(value, bool):
        raise HarnessError(f"keep_scores must be true or false, not {value!r}")
    return value


def settings_of(settings: dict) -> dict:
    """The few-shot settings among a method's settings (defaults filled in), JSON-ready."""
    out = {k: settings.get(k, v) for k, v in SETTINGS.items()}
    out["tasks"] = list(out["tasks"])
    return out


def calibration_set(ctx, settings: dict) -> FewShotSet:
    """ShadowLLM's calibration examples for a fit (harness.runner.FitContext), built once per session. The tasks'
    documents follow the run's zero-shot source (`lmeval_source`), so they never meet the evaluated ones; examples
    are left-truncated to the model's positions."""
    chosen = settings_of(settings)
    max_length = min(int(chosen["max_length"]), int(ctx.model.config.max_position_embeddings))
    source = getattr(ctx.config, "lmeval_source", "auto")
    key = ("fewshot", int(chosen["examples"]), int(chosen["shots"]), tuple(chosen["tasks"]), int(chosen["calib_seed"]),
           source, max_length)
    return ctx.session.memo(key, lambda: build_examples(
        ctx.tokenizer, ctx.data.root, tasks=tuple(chosen["tasks"]), examples=int(chosen["examples"]),
        shots=int(chosen["shots"]), seed=int(chosen["calib_seed"]), source=source, max_length=max_length,
        log=ctx.log))


def record_fields(fewshot: FewShotSet) -> dict:
    """What the records of a job fitted on these examples say about its calibration (harness.runner)."""
    return {"calib_protocol": "fewshot", "calib_data": "fewshot:" + ",".join(fewshot.tasks),
            "calib_examples": len(fewshot.examples), "calib_samples": len(fewshot.examples), "calib_seqlen": None,
            "calib_shots": fewshot.settings.get("shots"), "calib_tasks": {t: i["examples"] for t, i in fewshot.tasks.items()},
            "calib_left_out": sorted(fewshot.left_out), "calib_fingerprint": fewshot.fingerprint}
