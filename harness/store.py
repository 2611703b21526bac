"""The run folder: run.json (the run's identity), jobs/<key>.json (one file per finished job, written
atomically), records.jsonl (every job's records, appended atomically as each job finishes), tables and plots.

A folder belongs to one run identity: starting a different run in it is refused instead of mixing.

Several processes may work on one folder (harness/locking.py): binding the folder, claiming a job and writing a
result happen under the folder's lock, and a process runs only the jobs it claimed, so no job has two runners or two
writers. records.jsonl is an append-only log; `read_records` and `records` deduplicate it by job key (a job's last
records win), and a run that starts appends the records of finished jobs the log lacks (a kill between the job
file and its records).
"""
from __future__ import annotations

import json
import os
import tempfile
from pathlib import Path

from harness.errors import HarnessError
from harness.locking import CLAIMS_DIR, LOCK_FILE, Claims, FolderLock

RECORDS = "records.jsonl"
#: what a folder holds before it is bound to a run (a process waiting for the lock creates them)
_BOOKKEEPING = {LOCK_FILE, CLAIMS_DIR}


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
    def __init__(self, root: str | Path, sinks=None):
        self.root = Path(root)
        self.jobs_dir = self.root / "jobs"
        self.lock = FolderLock(self.root)
        self.claims = Claims(self.root)
        self.sinks = list(sinks or [])  # called with every result written (e.g. Weights & Biases, harness/tracking.py)

    # -- identity ------------------------------------------------------------------------------------
    def claim(self, identity: dict, config: dict) -> None:
        """Bind the folder to `identity`, or refuse when it already belongs to another run (under the lock, so
        two processes starting on one folder agree)."""
        run_file = self.root / "run.json"
        with self.lock:
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
                self.sync_records()
            else:
                if self.root.exists() and any(p.name not in _BOOKKEEPING for p in self.root.iterdir()):
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

    def begin(self, key: str) -> str:
        """Before running a job: "claimed" (this process runs it), "done" (finished meanwhile) or "busy" (another
        live process holds its claim)."""
        with self.lock:
            if self.is_done(key):
                return "done"
            return "claimed" if self.claims.take(key) else "busy"

    def end(self, key: str) -> None:
        """Give the job's claim back (its result is written, or this process gave up on it)."""
        with self.lock:
            self.claims.release(key)

    def release_all(self) -> None:
        with self.lock:
            self.claims.release_all()

    def running_elsewhere(self, keys) -> list[dict]:
        """The live claims of other processes among `keys`."""
        return [info for key in keys if (info := self.claims.busy(key)) is not None]

    def write_job(self, result: dict) -> bool:
        """Write a job's result (job file, then its records appended), under the folder's lock. A result for a job
        that another live process has claimed is not written (never two writers of one job): returns False."""
        key = result["key"]
        with self.lock:
            if self.claims.busy(key) is not None:
                return False
            if result.get("predictor_quality"):
                spec = result["spec"]
                name = f"{spec['method']}@{spec['sparsity']}-seed{spec['seed']}-{key}.json".replace(":", "_").replace("/", "_")
                report = {"spec": spec, "quality": result["predictor_quality"]}
                write_atomic(self.root / "predictors" / name, json.dumps(report, indent=1, sort_keys=True, default=str))
            write_atomic(self.job_path(key), json.dumps(result, indent=1, sort_keys=True, default=str))
            if result.get("status") == "ok":
                add_records(self.root / RECORDS, key, result.get("records", []))
        for sink in self.sinks:
            sink(result, self.root)
        return True

    def jobs(self) -> list[dict]:
        if not self.jobs_dir.exists():
            return []
        found = [self.job(p.stem) for p in sorted(self.jobs_dir.glob("*.json"))]
        return sorted((j for j in found if j), key=lambda j: (j.get("finished_at", ""), j["key"]))

    def records(self) -> list[dict]:
        return dedupe_records([record for job in self.jobs() if job.get("status") == "ok"
                               for record in job.get("records", [])])

    def failures(self) -> list[dict]:
        return [job for job in self.jobs() if job.get("status") != "ok"]

    def sync_records(self) -> None:
        """Append the records of finished jobs that records.jsonl lacks (a kill between a job file and its records)."""
        with self.lock:
            path = self.root / RECORDS
            logged = {record.get("job") for record in _read_lines(path)} if path.exists() else set()
            for job in self.jobs():
                if job.get("status") == "ok" and job["key"] not in logged and job.get("records"):
                    add_records(path, job["key"], job["records"])

    def write_records(self) -> None:
        """Rewrite records.jsonl from the job files (deduplicated), atomically."""
        with self.lock:
            lines = [json.dumps(record, sort_keys=True, default=str) for record in self.records()]
            write_atomic(self.root / RECORDS, "".join(line + "\n" for line in lines))


def add_records(path: Path, key: str, records: list[dict]) -> None:
    """Add one job's records to the log: appended in one write (O_APPEND). Where the log already holds records of
    this job (it ran again) or ends in a torn line (a writer killed mid-write), it is rewritten atomically instead,
    without them. The caller holds the folder's lock."""
    if not records:
        return
    data = "".join(json.dumps(record, sort_keys=True, default=str) + "\n" for record in records)
    if path.exists():
        text = path.read_text()
        torn = bool(text) and not text.endswith("\n")
        if torn or f'"job": "{key}"' in text:
            kept = [line for line in text.splitlines(keepends=True) if line.endswith("\n") and _job_of(line) != key]
            write_atomic(path, "".join(kept) + data)
            return
    path.parent.mkdir(parents=True, exist_ok=True)
    fd = os.open(path, os.O_WRONLY | os.O_APPEND | os.O_CREAT, 0o644)
    try:
        view = memoryview(data.encode())
        while view:
            view = view[os.write(fd, view):]
        os.fsync(fd)
    finally:
        os.close(fd)


def _job_of(line: str):
    try:
        return json.loads(line).get("job")
    except (json.JSONDecodeError, AttributeError):
        return None


def _signature(records: list[dict]) -> tuple:
    return tuple((r.get("metric"), r.get("task"), r.get("lm_eval_task"), r.get("engine")) for r in records)


def dedupe_records(records: list[dict]) -> list[dict]:
    """One set of records per job key. A job's records are written together (one run of lines); where the same job
    key has another run of lines later with the same metrics, the earlier one is a duplicate (the job was written
    twice) and goes: the last one wins. Records without a job key are kept as they are."""
    blocks: list[tuple] = []  # (job key, [indices])
    for index, record in enumerate(records):
        key = record.get("job")
        if blocks and blocks[-1][0] == key and key is not None:
            blocks[-1][1].append(index)
        else:
            blocks.append((key, [index]))
    keep, seen = set(), set()
    for key, indices in reversed(blocks):
        if key is None:
            keep.update(indices)
            continue
        signature = (key, _signature([records[i] for i in indices]))
        if signature not in seen:
            seen.add(signature)
            keep.update(indices)
    return [record for index, record in enumerate(records) if index in keep]


def _read_lines(path: Path) -> list[dict]:
    out = []
    for line in path.read_text().splitlines():
        try:
            out.append(json.loads(line))
        except json.JSONDecodeError:
            continue  # a torn last line
    return out


def read_records(run_dir: str | Path) -> list[dict]:
    """Records of a run folder (records.jsonl, deduplicated by job key), for tables and comparisons. A torn last
    line (a writer killed mid-append) is skipped; a bad line elsewhere is an error."""
    path = Path(run_dir) / RECORDS
    if not path.exists():
        raise HarnessError(f"{path} does not exist: is {run_dir} a run folder?")
    records = []
    lines = path.read_text().splitlines()
    for number, line in enumerate(lines, 1):
        if line.strip():
            try:
                records.append(json.loads(line))
            except json.JSONDecodeError as exc:
                if number == len(lines):
                    continue
                raise HarnessError(f"{path}:{number} is not JSON ({exc})") from exc
    return dedupe_records(records)
