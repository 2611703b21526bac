"""The task registry: what each task measures, which data files it reads, and how it is evaluated."""
from __future__ import annotations

from dataclasses import dataclass, field
from typing import Callable

from harness.errors import HarnessError
from harness.perplexity import perplexity, windows
from harness.tokens import token_ids


@dataclass(frozen=True)
class TaskDef:
    """A task. `evaluate(session, job, config, progress)` returns metric dicts. Quality tasks run inside the
    masked engine (`masked=True`); others (latency) get the job's method, allocation and fitted artefact
    from `session.job` and build their own engine."""

    name: str
    kind: str
    description: str
    files: tuple[str, ...]
    evaluate: Callable = field(repr=False)
    masked: bool = True
    #: work done before the evaluation clock starts (tokenizing the test set), `prepare(session, job, config)`
    prepare: Callable | None = field(default=None, repr=False)


def _perplexity_ids(text_of):
    def prepare(session, job, config):
        return token_ids(session, job.task, lambda: text_of(session.data))
    return prepare


def _perplexity_task(text_of):
    def evaluate(session, job, config, progress):
        ids = _perplexity_ids(text_of)(session, job, config)
        seqlen = config.seqlen or session.model.config.max_position_embeddings
        stride = config.stride or seqlen
        if progress is not None:
            count = len(windows(len(ids), seqlen, stride))
            progress.total(min(count, config.limit) if config.limit else count)
        result = perplexity(session.model, ids, seqlen=seqlen, stride=stride, limit=config.limit,
                            progress=progress.advance if progress is not None else None)
        protocol = (f"sparsegpt: {'non-overlapping' if stride >= seqlen else f'stride {stride}'} windows of "
                    f"{seqlen} tokens, mean token NLL, exp")
        return [{"metric": "ppl", "value": result["value"], "stderr": result["stderr"], "n": result["n"],
                 "protocol": protocol, "tokens": result["tokens"], "seqlen": seqlen, "stride": stride,
                 "window_nll": result["window_nll"]}]
    return evaluate


TASKS: dict[str, TaskDef] = {
    "wikitext2": TaskDef("wikitext2", "perplexity", "WikiText-2 raw test, rows joined with \\n\\n (SparseGPT protocol)",
                         ("wikitext-2/wiki.test.raw",), _perplexity_task(lambda data: data.wikitext2_test()),
                         prepare=_perplexity_ids(lambda data: data.wikitext2_test())),
    "ptb": TaskDef("ptb", "perplexity", "Penn Treebank test, sentences joined with a space (SparseGPT ptb_new)",
                   ("ptb/ptb.test.txt",), _perplexity_task(lambda data: data.ptb_test()),
                   prepare=_perplexity_ids(lambda data: data.ptb_test())),
}


def get_task(name: str) -> TaskDef:
    if name not in TASKS:
        raise HarnessError(f"unknown task {name!r}; valid tasks: {', '.join(sorted(TASKS))}")
    return TASKS[name]
import harness.zero_shot  # noqa: E402,F401 - registers the lm-eval tasks (harness/lmeval.py)
import harness.latency  # noqa: E402,F401 - registers the latency task `decode` (harness/latency.py)
