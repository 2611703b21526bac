"""Stage progress for long fits (trace collection, criterion scores, predictor training): a bar with the
elapsed time and an estimate of the time left on a terminal, and otherwise one line at the start, one with
an estimate once a tenth of the work is done, and one at the end (so logs of batch jobs say how long each
stage took and would take)."""
from __future__ import annotations

import sys
import time
from contextlib import contextmanager


def _format(seconds: float) -> str:
    seconds = max(0.0, seconds)
    return f"{seconds:.1f} s" if seconds < 120 else f"{seconds / 60:.1f} min"


class Stage:
    """One stage of `total` steps; `advance(n)` after each step."""

    def __init__(self, description: str, total: int, log, unit: str = "steps"):
        self.description, self.total, self.log, self.unit = description, max(int(total), 1), log, unit
        self.done = 0
        self.started = time.perf_counter()
        self._estimated = False
        self._bar = None
        if sys.stderr.isatty():
            from rich.progress import (BarColumn, MofNCompleteColumn, Progress, TextColumn, TimeElapsedColumn,
                                       TimeRemainingColumn)

            self._bar = Progress(TextColumn("{task.description}"), BarColumn(), MofNCompleteColumn(),
                                 TimeElapsedColumn(), TextColumn("left"), TimeRemainingColumn(), transient=True)
            self._bar.start()
            self._task = self._bar.add_task(description, total=self.total)
        else:
            log(f"{description}: {self.total} {unit}")

    def elapsed(self) -> float:
        return time.perf_counter() - self.started

    def estimate_left(self) -> float | None:
        if not self.done:
            return None
        return self.elapsed() / self.done * (self.total - self.done)

    def advance(self, n: int = 1) -> None:
        self.done = min(self.total, self.done + n)
        if self._bar is not None:
            self._bar.update(self._task, completed=self.done)
        elif not self._estimated and self.done < self.total and self.done * 10 >= self.total:
            self._estimated = True
            self.log(f"{self.description}: {self.done}/{self.total} {self.unit} in {_format(self.elapsed())}, "
                     f"about {_format(self.estimate_left())} left")

    def close(self) -> None:
        if self._bar is not None:
            self._bar.stop()
        self.log(f"{self.description}: done, {self.done} {self.unit} in {_format(self.elapsed())}")


@contextmanager
def stage(description: str, total: int, log=print, unit: str = "steps"):
    bar = Stage(description, total, log, unit)
    try:
        yield bar
    finally:
        bar.close()
