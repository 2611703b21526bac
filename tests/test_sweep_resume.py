"""A sweep on the Ray executor whose driver is killed (SIGKILL) resumes: the same command again runs only
the missing jobs and leaves what was written untouched."""
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
import yaml

pytest.importorskip("ray")

ROOT = Path(__file__).parent.parent


def test_killed_sweep_resumes_with_only_the_missing_jobs(tiny_model_dir, tmp_path):
    sweep = {"name": "resume", "models": [str(tiny_model_dir)], "weights": "pretrained", "suites": ["smoke"],
             "tasks": ["wikitext2"], "methods": ["dense", "random"], "sparsity": [0.2, 0.4, 0.6, 0.8, 0.9],
             "settings": {"seqlen": 256, "limit": 12}, "num_cpus": 2}
    file = tmp_path / "sweep.yaml"
    file.write_text(yaml.safe_dump(sweep))
    out = tmp_path / "sweep"
    command = [sys.executable, "-m", "harness", "sweep", str(file), "--executor", "ray", "--out", str(out)]
    env = {**os.environ, "PYTHONUNBUFFERED": "1", "RAY_USAGE_STATS_ENABLED": "0", "RAY_AUTH_MODE": "disabled"}
    # its own process group: the local Ray cluster the driver starts goes down with it
    process = subprocess.Popen(command, env=env, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL, cwd=ROOT,
                               start_new_session=True)
    deadline = time.time() + 180
    jobs = lambda: list(out.glob("*/jobs/*.json"))  # noqa: E731
    while time.time() < deadline and len(jobs()) < 2:
        time.sleep(0.05)
    os.killpg(process.pid, signal.SIGKILL)
    process.wait()
    finished = {p.name: p.read_text() for p in jobs()}
    assert 2 <= len(finished) < 6, "the sweep must be killed halfway"
    result = subprocess.run(command, env=env, capture_output=True, text=True, cwd=ROOT, start_new_session=True)
    assert result.returncode == 0, result.stderr
    assert f"{6 - len(finished)} ran, {len(finished)} already done, 0 failed" in result.stderr
    for path in jobs():
        if path.name in finished:  # what was written before the kill is untouched
            assert path.read_text() == finished[path.name]
    (run_dir,) = out.glob("smoke-*")
    assert len((run_dir / "records.jsonl").read_text().splitlines()) == 6
