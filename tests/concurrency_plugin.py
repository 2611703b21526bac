"""A test-only method for the concurrency test (tests/test_concurrency.py): `slow-test` runs the model dense, but
its policy first appends one line (pid, heads) to the file `log`, so that every execution of a job is counted, and
pauses `sleep` seconds. The first job of each process also waits (up to a minute) until `parties` processes have
reached theirs (a barrier of marker files in the folder `barrier`), so the processes surely overlap."""
from __future__ import annotations

import os
import time
from pathlib import Path

from methods import Method, register

_REACHED = []


@register
class SlowTest(Method):
    name = "slow-test"
    units = frozenset({"heads"})
    description = "test only: dense, after a pause; logs every execution"

    def policy(self, ctx, allocation, artefact):
        with open(self.settings["log"], "a") as handle:
            handle.write(f"{os.getpid()} {allocation.heads}\n")
        barrier = self.settings.get("barrier")
        if barrier and not _REACHED:
            _REACHED.append(True)
            folder = Path(barrier)
            folder.mkdir(parents=True, exist_ok=True)
            (folder / str(os.getpid())).touch()
            deadline = time.time() + 60
            while len(list(folder.iterdir())) < int(self.settings.get("parties", 2)) and time.time() < deadline:
                time.sleep(0.05)
        time.sleep(float(self.settings.get("sleep", 0.3)))
        return None
