"""Executors run a run's jobs and hand each result to the store as soon as it finishes.

`local`: in-process and sequential, reusing the loaded model across jobs. A job that raises (including
running out of memory) is recorded as failed with its traceback and the others go on.
"""
from __future__ import annotations

from dataclasses import dataclass

import torch

from harness.runner import Session, execute_job, failed_result, now
from harness.spec import JobSpec
from harness.store import RunStore


@dataclass
class Summary:
    ran: int = 0
    skipped: int = 0
    failed: int = 0


class LocalExecutor:
    name = "local"

    def run(self, jobs: list[JobSpec], session: Session, store: RunStore, ui) -> Summary:
        summary = Summary()
        pending = []
        for job in jobs:
            if store.is_done(job.key):
                summary.skipped += 1
            else:
                pending.append(job)
        ui.start(len(jobs), summary.skipped)
        for job in pending:
            started = now()
            progress = ui.job_started(job)
            try:
                result = execute_job(session, job, progress)
            except Exception as exc:  # noqa: BLE001 - a failing job must not stop the run
                result = failed_result(job, exc, started)
                if torch.cuda.is_available():
                    torch.cuda.empty_cache()
            store.write_job(result)
            ok = result["status"] == "ok"
            summary.ran += ok
            summary.failed += not ok
            ui.job_finished(job, result)
        return summary


EXECUTORS = {"local": LocalExecutor}
