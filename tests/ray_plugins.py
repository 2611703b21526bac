"""A test-only method plugin for the Ray executor's fault tests. Ray workers import it by module name (the
executor passes the modules of methods registered outside the `methods` package), so tests/ must be on
the workers' PYTHONPATH.

`flaky:always` raises on every attempt; `flaky:once` raises on its first attempt and then runs as dense;
`flaky:crash` kills its worker process on the first attempt (a lost worker), then runs as dense; `flaky:fit`
fails in its fit, so the jobs that wait for that fit fail too; `flaky:input` refuses its input (a HarnessError,
the same on every attempt: never retried). Attempts are counted with marker files in the
`state_dir` setting.
"""
from __future__ import annotations

import os
from pathlib import Path

from harness.errors import HarnessError
from methods import Method, register


@register
class Flaky(Method):
    name = "flaky"
    variants = ("always", "once", "crash", "fit", "input")
    default_variant = "always"
    units = frozenset({"heads"})
    description = "test only: fails (always, once, in its fit) or kills its worker (crash)"

    def fit(self, ctx, allocation):
        if self.variant == "fit":
            raise RuntimeError("flaky: fit failed")
        return None

    def policy(self, ctx, allocation, artefact):
        if self.variant == "always":
            raise RuntimeError("flaky: made to fail")
        if self.variant == "input":
            marker = Path(self.settings["state_dir"]) / "input-attempts"
            marker.parent.mkdir(parents=True, exist_ok=True)
            with open(marker, "a") as handle:
                handle.write("attempt\n")
            raise HarnessError("flaky: this input is refused")
        marker = Path(self.settings["state_dir"]) / f"{self.variant}-{allocation.heads}"
        if not marker.exists():
            marker.parent.mkdir(parents=True, exist_ok=True)
            marker.write_text("attempted")
            if self.variant == "crash":
                os._exit(1)
            raise RuntimeError("flaky: failed on its first attempt")
        return None
