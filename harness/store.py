"""The run folder: run.json (the run's identity), jobs/<key>.json (one file per finished job, written
atomically), records.jsonl (all records, rewritten atomically from the job files), tables and plots.

A folder belongs to one run identity: starting a different run in it is refused instead of mixing.
"""
from __future__ import annotations

import json
import os
import tempfile
from pathlib import Path

from harness.errors import HarnessError


def write_atomic(path: Path, text: str) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    handle, tmp = tempfile.mkstemp(prefix=f".{path.name}.", dir=path.parent)
    try:
        with os.fdopen(handle, "w") as out:
            out.write(text)
            out.flush()
            os.fsync(out.fileno())
        os.replace(tmp, path)
    except BaseException:
        Path(tmp).unlink(missing_ok=True)
        raise


class RunStore:
    def __init__(self, root: str | Path):
        self.root = Path(root)
        self.jobs_dir = self.root / "jobs"

    # -- identity ------------------------------------------------------------------------------------
    def claim(self, identity: dict, config: dict) -> None:
        """Bind the folder to `identity`, or refuse when it already belongs to another run."""
        run_file = self.root / "run.json"
        if run_file.exists():
            try:
                existing = json.loads(run_file.read_text())["identity"]
            except (json.JSONDecodeError, KeyError) as exc:
                raise HarnessError(f"{run_file} is corrupt ({exc}); move the folder away or choose another --out") from exc
            normal = json.loads(json.dumps(identity, sort_keys=True, default=str))
            if existing != normal:
                changed = sorted(k for k in set(existing) | set(normal) if existing.get(k) != normal.get(k))
                raise HarnessError(
                    f"run folder {self.root} holds a run with another spec (differs in: {', '.join(changed)}); "
                    "refusing to mix results: choose another --out"
                )
        else:
            if self.root.exists() and any(self.root.iterdir()):
                raise HarnessError(f"{self.root} is not empty and is not a run folder (no run.json); choose another --out")
            write_atomic(run_file, json.dumps({"identity": identity, "config": config}, indent=1, sort_keys=True, default=str))

    def run_info(self) -> dict:
        path = self.root / "run.json"
        return json.loads(path.read_text()) if path.exists() else {}

    # -- jobs ----------------------------------------------------------------------------------------
    def job_path(self, key: str) -> Path:
        return self.jobs_dir / f"{key}.json"

    def job(self, key: str) -> dict | None:
        path = self.job_path(key)
        if not path.exists():
            return None
        try:
            return json.loads(path.read_text())
        except json.JSONDecodeError:
            return None  # a torn file cannot happen with write_atomic, but never trust it: re-run the job

    def is_done(self, key: str) -> bool:
        job = self.job(key)
        return job is not None and job.get("status") == "ok"

    def write_job(self, result: dict) -> None:
        if result.get("predictor_quality"):
            spec = result["spec"]
            name = f"{spec['method']}@{spec['sparsity']}-seed{spec['seed']}-{result['key']}.json".replace(":", "_").replace("/", "_")
            report = {"spec": spec, "quality": result["predictor_quality"]}
            write_atomic(self.root / "predictors" / name, json.dumps(report, indent=1, sort_keys=True, default=str))
        write_atomic(self.job_path(result["key"]), json.dumps(result, indent=1, sort_keys=True, default=str))
        self.write_records()

    def jobs(self) -> list[dict]:
        if not self.jobs_dir.exists():
            return []
        found = [self.job(p.stem) for p in sorted(self.jobs_dir.glob("*.json"))]
        return sorted((j for j in found if j), key=lambda j: (j.get("finished_at", ""), j["key"]))

    def records(self) -> list[dict]:
        return [record for job in self.jobs() if job.get("status") == "ok" for record in job.get("records", [])]

    def failures(self) -> list[dict]:
        return [job for job in self.jobs() if job.get("status") != "ok"]

    def write_records(self) -> None:
        lines = [json.dumps(record, sort_keys=True, default=str) for record in self.records()]
        write_atomic(self.root / "records.jsonl", "".join(line + "\n" for line in lines))


def read_records(run_dir: str | Path) -> list[dict]:
    """Records of a run folder (records.jsonl), for tables and comparisons."""
    path = Path(run_dir) / "records.jsonl"
    if not path.exists():
        raise HarnessError(f"{path} does not exist: is {run_dir} a run folder?")
    records = []
    for number, line in enumerate(path.read_text().splitlines(), 1):
        if line.strip():
            try:
                records.append(json.loads(line))
            except json.JSONDecodeError as exc:
                raise HarnessError(f"{path}:{number} is not JSON ({exc})") from exc
    return records
