"""Safe concurrent runs (harness/locking.py, harness/store.py): two processes on one run folder do every job once
and write every record once; claims of processes that are gone are taken over; records are deduplicated by job."""
import json
import os
import re
import subprocess
import sys
import time
from pathlib import Path

import pytest
import yaml

from harness.locking import HOST, Claims, FolderLock
from harness.store import RunStore, add_records, dedupe_records, read_records

ROOT = Path(__file__).resolve().parent.parent
SPARSITIES = ["0.1", "0.2", "0.3", "0.4", "0.5", "0.6"]


def test_two_processes_on_one_folder_do_each_job_once(tiny_model_dir, tmp_path):
    log = tmp_path / "executions.log"
    suite = tmp_path / "slow.yaml"
    suite.write_text(yaml.safe_dump({"name": "slow", "description": "concurrency test", "defaults": {
        "tasks": ["wikitext2"], "limit": 1, "seqlen": 32, "device": "cpu",
        "method_settings": {"slow-test": {"sleep": 0.3, "log": str(log), "barrier": str(tmp_path / "barrier")}}}}))
    out = tmp_path / "run"
    code = "import tests.concurrency_plugin; from harness.cli import app; app()"
    command = [sys.executable, "-c", code, "run", "--suite", str(suite), "--model", str(tiny_model_dir), "--weights",
               "pretrained", "--methods", "slow-test", "--sparsity", ",".join(SPARSITIES), "--out", str(out)]
    env = {**os.environ, "PYTHONPATH": os.pathsep.join([str(ROOT), os.environ.get("PYTHONPATH", "")])}
    processes = [subprocess.Popen(command, cwd=ROOT, env=env, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
                 for _ in range(2)]
    outputs = [p.communicate(timeout=300) for p in processes]
    for process, (stdout, stderr) in zip(processes, outputs):
        assert process.returncode == 0, stderr
    executions = [line.split() for line in log.read_text().splitlines()]
    heads = sorted(float(h) for _, h in executions)
    assert heads == [float(s) for s in SPARSITIES], "every job ran exactly once"
    ran = [int(re.search(r"(\d+) ran, (\d+) already done, (\d+) failed", stderr).group(1)) for _, stderr in outputs]
    assert sum(ran) == len(SPARSITIES)
    assert len({pid for pid, _ in executions}) == 2 and min(ran) >= 1, f"both processes took jobs: {ran}"
    assert any("claimed by another process" in stderr for _, stderr in outputs)
    lines = (out / "records.jsonl").read_text().splitlines()
    assert len(lines) == len(SPARSITIES) and len({json.loads(line)["job"] for line in lines}) == len(SPARSITIES)
    assert len(list((out / "jobs").glob("*.json"))) == len(SPARSITIES)
    assert not list((out / "claims").glob("*.json")), "every claim is given back"


def _dead_pid() -> int:
    process = subprocess.Popen([sys.executable, "-c", "pass"])
    process.wait()
    return process.pid


def _plant(claims: Claims, key: str, **info) -> Path:
    path = claims.path(key)
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(json.dumps(info))
    return path


def test_a_claim_has_one_holder_until_it_is_given_back(tmp_path):
    first, second = Claims(tmp_path), Claims(tmp_path)
    assert first.take("job") and first.take("job")  # taking one's own claim again is fine
    assert not second.take("job") and second.busy("job")["pid"] == os.getpid()
    first.release("job")
    assert second.take("job") and not first.take("job")
    second.release_all()
    assert not list((tmp_path / "claims").iterdir())


def test_claims_of_processes_that_are_gone_are_taken_over(tmp_path, monkeypatch):
    claims = Claims(tmp_path)
    _plant(claims, "dead", host=HOST, pid=_dead_pid(), token="x")
    assert claims.take("dead")
    _plant(claims, "leftover", host=HOST, pid=os.getpid(), token="not-held")  # this process, no live holder
    assert claims.take("leftover")
    _plant(claims, "alive", host=HOST, pid=os.getppid(), token="y")  # another live process on this host
    assert not claims.take("alive")
    old = _plant(claims, "far", host="another-machine", pid=1, token="z")
    assert not claims.take("far")  # its heartbeat is fresh
    os.utime(old, (time.time() - 3600, time.time() - 3600))
    assert claims.take("far")  # an hour without a heartbeat: abandoned
    claims.release_all()


def test_a_result_is_not_written_for_a_job_another_process_holds(tmp_path):
    store = RunStore(tmp_path / "run")
    _plant(store.claims, "k1", host=HOST, pid=os.getppid(), token="other")
    result = {"key": "k1", "status": "ok", "spec": {}, "records": [{"job": "k1", "metric": "ppl", "value": 1.0}]}
    assert store.begin("k1") == "busy"
    assert store.write_job(result) is False
    assert not store.job_path("k1").exists() and not (tmp_path / "run" / "records.jsonl").exists()
    store.claims.path("k1").unlink()
    assert store.begin("k1") == "claimed" and store.write_job(result) is True
    store.end("k1")
    assert store.begin("k1") == "done"


def test_records_are_appended_once_per_job_and_deduplicated_by_job_key(tmp_path):
    path = tmp_path / "records.jsonl"
    add_records(path, "a", [{"job": "a", "metric": "ppl", "value": 1}, {"job": "a", "metric": "acc", "value": 2}])
    add_records(path, "b", [{"job": "b", "metric": "ppl", "value": 3}])
    add_records(path, "a", [{"job": "a", "metric": "ppl", "value": 4}])  # a ran again: its old records go
    assert [(r["job"], r["value"]) for r in read_records(tmp_path)] == [("b", 3), ("a", 4)]
    with open(path, "a") as handle:  # a writer killed mid-line
        handle.write('{"job": "c", "met')
    assert [r["job"] for r in read_records(tmp_path)] == ["b", "a"]
    add_records(path, "c", [{"job": "c", "metric": "ppl", "value": 5}])  # the torn line is cut off first
    assert [r["job"] for r in read_records(tmp_path)] == ["b", "a", "c"]
    # a log holding a job twice (e.g. two logs concatenated): its last run of lines with the same metrics wins;
    # other metrics of the same job key, and records without one, stay
    doubled = [{"job": "a", "metric": "ppl", "value": 1}, {"job": "b", "metric": "ppl", "value": 2},
               {"job": "a", "metric": "ppl", "value": 3}, {"metric": "note"}, {"job": "b", "metric": "acc", "value": 4}]
    assert dedupe_records(doubled) == doubled[1:]


def test_a_killed_run_leaves_records_the_next_run_completes(tmp_path):
    """A job file written but its records not yet appended (a kill in between): binding the folder again adds them."""
    store = RunStore(tmp_path / "run")
    store.claim({"id": 1}, {})
    result = {"key": "k", "status": "ok", "spec": {}, "records": [{"job": "k", "metric": "ppl", "value": 1.0}]}
    store.job_path("k").parent.mkdir(parents=True)
    store.job_path("k").write_text(json.dumps(result))
    RunStore(tmp_path / "run").claim({"id": 1}, {})
    assert [r["job"] for r in read_records(tmp_path / "run")] == ["k"]


def test_the_folder_lock_excludes_another_process(tmp_path):
    lock = FolderLock(tmp_path)
    code = ("import sys, time; from harness.locking import FolderLock; t = time.time(); "
            "lock = FolderLock(sys.argv[1]); lock.__enter__(); print(time.time() - t)")
    with lock:
        process = subprocess.Popen([sys.executable, "-c", code, str(tmp_path)], stdout=subprocess.PIPE, text=True,
                                   cwd=ROOT, env={**os.environ, "PYTHONPATH": str(ROOT)})
        time.sleep(1.5)
        assert process.poll() is None, "the other process waits for the lock"
    waited = float(process.communicate(timeout=60)[0])
    assert waited > 1.0


@pytest.mark.parametrize("entry", [".lock", "claims"])
def test_a_folder_holding_only_the_lock_or_claims_can_be_bound(tmp_path, entry):
    root = tmp_path / "run"
    (root / entry).mkdir(parents=True) if entry == "claims" else (root.mkdir(), (root / entry).touch())
    RunStore(root).claim({"id": 1}, {})
    assert (root / "run.json").exists()
