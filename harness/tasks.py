"""The task registry: what each task measures, which data files it reads, and how it is evaluated.

`TaskDef` and the registry `TASKS` live in harness.taskdefs (a leaf module); this module adds the perplexity tasks
and imports the modules that register the others (harness.zero_shot: lm-eval; harness.latency: decode), which
import harness.taskdefs, not this module (no import circle)."""
from __future__ import annotations

import random

import torch

from harness.data import BOOKCORPUS, C4, bookcorpus_text, c4_validation_texts
from harness.errors import HarnessError
from harness.perplexity import perplexity, windows
from harness.taskdefs import TASKS, TaskDef
from harness.tokens import token_ids


def _tokenized(text_of):
    """The `prepare` of a text task: its token ids, cached (so evaluation time never includes tokenization)."""
    def prepare(session, job, config):
        return token_ids(session, job.task, lambda: text_of(session.data))
    return prepare


def _perplexity_task(protocol: str, text_of=None, ids_of=None):
    """A perplexity task over one token stream: the text `text_of(data)` tokenized once, or `ids_of(session,
    seqlen)` (already cut into windows of seqlen); `protocol` says which text, for the records."""
    def evaluate(session, job, config, progress):
        seqlen = config.seqlen or session.model.config.max_position_embeddings
        if ids_of is not None:
            ids = session.memo((job.task, seqlen), lambda: ids_of(session, seqlen))
        else:
            ids = token_ids(session, job.task, lambda: text_of(session.data))
        stride = config.stride or seqlen
        if progress is not None:
            count = len(windows(len(ids), seqlen, stride))
            progress.total(min(count, config.limit) if config.limit else count)
        result = perplexity(session.model, ids, seqlen=seqlen, stride=stride, limit=config.limit,
                            progress=progress.advance if progress is not None else None)
        windowing = (f"{'non-overlapping' if stride >= seqlen else f'stride {stride}'} windows of {seqlen} tokens, "
                     "mean token NLL, exp")
        return [{"metric": "ppl", "value": result["value"], "stderr": result["stderr"], "n": result["n"],
                 "protocol": f"{protocol}; {windowing}", "tokens": result["tokens"], "seqlen": seqlen,
                 "stride": stride, "window_nll": result["window_nll"]}]
    return evaluate


def c4_windows(tokenizer, texts: list[str], seqlen: int, samples: int = 256, seed: int = 0) -> torch.Tensor:
    """GPTQ/SparseGPT's C4 evaluation data: `samples` windows of `seqlen` tokens, each from a document drawn with
    Python's `random` seeded `seed` (a document of at least seqlen tokens, then a random offset in it),
    concatenated (so that non-overlapping windows of seqlen are exactly these)."""
    rnd = random.Random(seed)  # the state of `random.seed(seed)`, which their loader uses
    parts = []
    for _ in range(samples):
        for _attempt in range(100000):
            ids = tokenizer(texts[rnd.randint(0, len(texts) - 1)], return_tensors="pt").input_ids[0]
            if ids.shape[0] >= seqlen:
                break
        else:
            raise HarnessError(f"c4: no document of {seqlen} tokens found in 100000 draws")
        # their randint(0, len - seqlen - 1) fails for a document of exactly seqlen tokens: take it whole
        start = rnd.randint(0, ids.shape[0] - seqlen - 1) if ids.shape[0] > seqlen else 0
        parts.append(ids[start:start + seqlen])
    return torch.cat(parts)


TASKS.update({
    "wikitext2": TaskDef("wikitext2", "perplexity", "WikiText-2 raw test, rows joined with \\n\\n (SparseGPT protocol)",
                         ("wikitext-2/wiki.test.raw",),
                         _perplexity_task("wikitext2: WikiText-2 raw test rows joined with \\n\\n",
                                          lambda data: data.wikitext2_test()),
                         prepare=_tokenized(lambda data: data.wikitext2_test())),
    "ptb_new": TaskDef("ptb_new", "perplexity", "Penn Treebank test, sentences joined with a space (GPTQ/SparseGPT "
                       "`ptb_new`; the PTB of the suites)", ("ptb/ptb.test.txt",),
                       _perplexity_task("ptb_new: PTB test sentences joined with ' ' (GPTQ/SparseGPT ptb_new)",
                                        lambda data: data.ptb_test()),
                       prepare=_tokenized(lambda data: data.ptb_test())),
    "ptb_sparsegpt": TaskDef("ptb_sparsegpt", "perplexity", "Penn Treebank validation, sentences joined with \\n\\n "
                             "(GPTQ/SparseGPT `ptb`, the PTB numbers of their papers; validation is also the "
                             "`ptb-valid` calibration text)", ("ptb/ptb.valid.txt",),
                             _perplexity_task("ptb_sparsegpt: PTB validation sentences joined with \\n\\n "
                                              "(GPTQ/SparseGPT ptb)", lambda data: data.ptb_valid_sparsegpt()),
                             prepare=_tokenized(lambda data: data.ptb_valid_sparsegpt())),
    "c4": TaskDef("c4", "perplexity", "C4 en validation shard 0, 256 random windows (seed 0) of the model's context "
                  "(GPTQ/SparseGPT `c4`; from the Hugging Face hub)", (),
                  _perplexity_task("c4: 256 windows drawn with seed 0 from allenai/c4 en validation shard 0 "
                                   "(GPTQ/SparseGPT c4)",
                                   ids_of=lambda session, seqlen: c4_windows(session.tokenizer, c4_validation_texts(),
                                                                             seqlen)),
                  hub=(C4["path"],)),
    "bookcorpus": TaskDef("bookcorpus", "perplexity", f"BookCorpus train, its first {BOOKCORPUS['sentences']} sentences "
                          "joined with a space (streamed from the Hugging Face hub)", (),
                          _perplexity_task(f"bookcorpus: the first {BOOKCORPUS['sentences']} sentences of "
                                           f"{BOOKCORPUS['path']} train joined with ' '", lambda data: bookcorpus_text()),
                          hub=(BOOKCORPUS["path"],), streamed=True),
})
#: Names that mean more than one protocol: the error says which names to use instead.
AMBIGUOUS = {"ptb": "PTB has two protocols: ptb_new (test split joined with ' ', the suites' PTB) and ptb_sparsegpt "
                    "(GPTQ/SparseGPT `ptb`: validation split joined with \\n\\n)"}


def get_task(name: str) -> TaskDef:
    if name not in TASKS:
        hint = f" ({AMBIGUOUS[name]})" if name in AMBIGUOUS else ""
        raise HarnessError(f"unknown task {name!r}{hint}; valid tasks: {', '.join(sorted(TASKS))}")
    return TASKS[name]
import harness.zero_shot  # noqa: E402,F401 - registers the lm-eval tasks (harness/lmeval.py)
import harness.latency  # noqa: E402,F401 - registers the latency task `decode` (harness/latency.py)
