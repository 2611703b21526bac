"""Optional Weights & Biases logging (`--wandb PROJECT`, off by default), through `wandb` directly.

One W&B run per finished job, named after it (method @ sparsity · task · seed) and grouped by its run folder; its
config is the job's spec and its record fields (model, weights, method, variant, scope, allocation, achieved
sparsity, provenance), its summary the job's metrics (`<task>/<metric>`, and `<task>/<metric>_stderr`). A failed
job is logged with its error. Logging never fails a job: a W&B error is printed and the run goes on.
"""
from __future__ import annotations

import importlib.util
import sys

from harness.errors import HarnessError

#: record fields that describe the job (the W&B run's config) rather than measure it
CONFIG_FIELDS = ("suite", "model", "model_id", "weights", "dtype", "device", "method", "variant", "method_label",
                 "scope", "allocation", "dense_layers", "sparsity", "sparsity_heads", "sparsity_neurons",
                 "achieved_heads", "achieved_neurons", "task", "seed", "weight_seed", "limit", "data_source",
                 "data_verified", "provenance")


class WandbSink:
    """Called by RunStore.write_job with every result written."""

    def __init__(self, project: str, log=None):
        if not project or not str(project).strip():
            raise HarnessError("--wandb needs a project name, e.g. --wandb sparsity-opt")
        if importlib.util.find_spec("wandb") is None:
            raise HarnessError("--wandb logs through Weights & Biases, which is not installed: pip install wandb "
                               "(or 'sparsity-harness[wandb]'), then `wandb login`; or leave --wandb out")
        self.project = str(project)
        self.log = log or (lambda text: print(text, file=sys.stderr))

    def __call__(self, result: dict, run_dir=None) -> None:
        import wandb

        spec = result.get("spec", {})
        records = result.get("records", [])
        first = records[0] if records else {}
        name = f"{spec.get('method')}@{spec.get('sparsity')} · {spec.get('task')} · seed {spec.get('seed')}"
        config = {"job": result.get("key"), "status": result.get("status"),
                  **{key: first[key] for key in CONFIG_FIELDS if key in first}}
        group = getattr(run_dir, "name", None) or first.get("suite")
        try:
            run = wandb.init(project=self.project, name=name, group=str(group) if group else None, config=config,
                             job_type="eval", reinit=True)
            summary = {}
            for record in records:
                prefix = f"{record.get('task')}/{record.get('metric')}"
                summary[prefix] = record.get("value")
                if record.get("stderr") is not None:
                    summary[f"{prefix}_stderr"] = record["stderr"]
            if result.get("status") != "ok":
                summary["error"] = result.get("error")
            run.log(summary)
            for key, value in summary.items():
                run.summary[key] = value
            run.finish()
        except Exception as exc:  # noqa: BLE001 - logging must never fail the job
            self.log(f"wandb: could not log job {result.get('key')} to project {self.project}: "
                     f"{type(exc).__name__}: {exc}")
