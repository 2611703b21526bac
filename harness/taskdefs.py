"""What a task is (`TaskDef`) and the registry of tasks (`TASKS`), filled by harness.tasks (perplexity),
harness.zero_shot (lm-eval) and harness.latency (decode). A leaf module: the modules that register tasks import it,
and `harness.tasks` imports them, without a circle."""
from __future__ import annotations

from dataclasses import dataclass, field
from typing import Callable

from harness.data import check_hub


@dataclass(frozen=True)
class TaskDef:
    """A task. `evaluate(session, job, config, progress)` returns metric dicts. Quality tasks run inside the
    masked engine (`masked=True`); others (latency) get the job's method, allocation and fitted artefact
    from `session.job` and build their own engine. `files` are read from the data directory, `hub` names the
    Hugging Face data sets read through `datasets` (the data directory has no copy); `check` tells before a run
    starts whether they can be had."""

    name: str
    kind: str
    description: str
    files: tuple[str, ...]
    evaluate: Callable = field(repr=False)
    masked: bool = True
    hub: tuple[str, ...] = ()
    streamed: bool = False  # the hub data set is streamed (never served from the local cache)
    #: with no bundle (data from the hub), the hub data sets read instead of `files` (zero-shot: lm-eval's own);
    #: empty: the hub splits that `files` are copies of (harness.data.HUB)
    hub_instead: tuple[str, ...] = ()
    #: work done before the evaluation clock starts (tokenizing the test set), `prepare(session, job, config)`
    prepare: Callable | None = field(default=None, repr=False)

    def check(self, data) -> None:
        """Exit-2 error (HarnessError) naming what is missing: a data file, or a hub data set while offline."""
        if getattr(data, "kind", "bundle") == "hub" and self.hub_instead:
            for path in self.hub_instead:
                check_hub(path, f"task {self.name}", bundled=True)
        else:
            data.check(self.files)
        for path in self.hub:
            check_hub(path, self.name, self.streamed)


TASKS: dict[str, TaskDef] = {}
