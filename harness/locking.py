"""Safe concurrent runs: several processes (on one machine, or on machines that share the folder) on one run folder.

* `FolderLock`: an exclusive `fcntl.flock` on `RUN/.lock`, held only for short critical sections (binding the
  folder to its run, claiming a job, writing a job's result). A second process waits for it.
* `Claims`: before a process runs a job it claims it: `RUN/claims/<job key>.json`, created with O_CREAT|O_EXCL
  under the folder lock, naming the host, pid and a per-process token. A process takes only the jobs that are
  neither done nor claimed, so one job never has two runners (nor two writers), and a second `harness run` on the
  same folder works through the rest. The claim is removed when the job's result is written.
* A claim is stale, and may be taken over, when its process is gone: on the same host, its pid is not alive (or is
  another process now: the start time differs); on another host, its heartbeat is old. A daemon thread touches
  every claim a process holds every HEARTBEAT_S seconds; a claim not touched for STALE_S seconds
  (HARNESS_CLAIM_STALE_S, default 600) counts as abandoned. So a killed run resumes: its claims are taken over.
"""
from __future__ import annotations

import fcntl
import json
import os
import socket
import threading
import time
import uuid
from pathlib import Path

STALE_S = float(os.environ.get("HARNESS_CLAIM_STALE_S", 600))
HEARTBEAT_S = max(1.0, min(60.0, STALE_S / 10))
LOCK_FILE = ".lock"
CLAIMS_DIR = "claims"
HOST = socket.gethostname()


def _start_time(pid: int) -> str | None:
    """The process's start time (clock ticks since boot, /proc/PID/stat field 22), or None where /proc has none."""
    try:
        stat = Path(f"/proc/{pid}/stat").read_text()
    except OSError:
        return None
    return stat.rsplit(")", 1)[1].split()[19]


def pid_alive(pid: int, started: str | None = None) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        pass
    if started is not None:
        now = _start_time(pid)
        if now is not None and now != started:  # the pid was reused by another process
            return False
    return True


class FolderLock:
    """Exclusive lock on a folder (`with lock:`), reentrant within a process; blocks until it is free."""

    def __init__(self, root: str | Path):
        self.path = Path(root) / LOCK_FILE
        self._local = threading.RLock()
        self._depth = 0
        self._fd: int | None = None

    def __enter__(self):
        self._local.acquire()
        try:
            if self._depth == 0:
                self.path.parent.mkdir(parents=True, exist_ok=True)
                fd = os.open(self.path, os.O_RDWR | os.O_CREAT, 0o644)
                try:
                    fcntl.flock(fd, fcntl.LOCK_EX)
                except BaseException:
                    os.close(fd)
                    raise
                self._fd = fd
            self._depth += 1
        except BaseException:
            self._local.release()
            raise
        return self

    def __exit__(self, *exc):
        try:
            self._depth -= 1
            if self._depth == 0 and self._fd is not None:
                fcntl.flock(self._fd, fcntl.LOCK_UN)
                os.close(self._fd)
                self._fd = None
        finally:
            self._local.release()


_HELD: dict[str, str] = {}  # claim path -> token, for every claim a live Claims of this process holds
_HELD_LOCK = threading.Lock()


class Claims:
    """The job claims of one run folder, for this process. Call `take`/`release` while holding the folder's lock."""

    def __init__(self, root: str | Path):
        self.dir = Path(root) / CLAIMS_DIR
        self.token = uuid.uuid4().hex
        self.held: set[str] = set()
        self._beat: threading.Thread | None = None
        self._stop = threading.Event()

    def path(self, key: str) -> Path:
        return self.dir / f"{key}.json"

    def owner(self, key: str) -> dict | None:
        """Who holds the claim of `key` ({} for a claim being written), or None when there is none."""
        try:
            text = self.path(key).read_text()
        except FileNotFoundError:
            return None
        try:
            return json.loads(text)
        except json.JSONDecodeError:
            return {}  # created, not yet written: held

    def mine(self, key: str) -> bool:
        return key in self.held

    def stale(self, key: str, info: dict | None = None) -> bool:
        info = self.owner(key) if info is None else info
        if info is None:
            return True
        path = self.path(key)
        if info.get("host") == HOST and "pid" in info:
            pid = int(info["pid"])
            if pid == os.getpid():  # this process: stale unless a live Claims of it holds the claim
                with _HELD_LOCK:
                    return _HELD.get(str(path)) != info.get("token")
            return not pid_alive(pid, info.get("started"))
        try:
            age = time.time() - path.stat().st_mtime
        except FileNotFoundError:
            return True
        return age > STALE_S

    def busy(self, key: str) -> dict | None:
        """The live claim of another process on `key`, or None (free, stale or ours)."""
        if self.mine(key):
            return None
        info = self.owner(key)
        if info is None or self.stale(key, info):
            return None
        return info

    def take(self, key: str) -> bool:
        """Claim `key` (taking over a stale claim); False when another live process holds it."""
        if self.mine(key):
            return True
        path = self.path(key)
        info = self.owner(key)
        if info is not None:
            if not self.stale(key, info):
                return False
            path.unlink(missing_ok=True)  # abandoned by a process that is gone
        self.dir.mkdir(parents=True, exist_ok=True)
        try:
            fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o644)
        except FileExistsError:  # another machine won the race (a folder lock that does not span machines)
            return False
        body = {"host": HOST, "pid": os.getpid(), "started": _start_time(os.getpid()), "token": self.token,
                "claimed_at": time.time()}
        with os.fdopen(fd, "w") as out:
            out.write(json.dumps(body))
            out.flush()
            os.fsync(out.fileno())
        self.held.add(key)
        with _HELD_LOCK:
            _HELD[str(path)] = self.token
        self._heartbeat()
        return True

    def release(self, key: str) -> None:
        if key not in self.held:
            return
        self.held.discard(key)
        path = self.path(key)
        with _HELD_LOCK:
            _HELD.pop(str(path), None)
        info = self.owner(key)
        if info is not None and info.get("token") == self.token:
            path.unlink(missing_ok=True)

    def release_all(self) -> None:
        for key in list(self.held):
            self.release(key)
        self._stop.set()

    def _heartbeat(self) -> None:
        if self._beat is not None and self._beat.is_alive():
            return
        self._stop.clear()

        def beat():
            while not self._stop.wait(HEARTBEAT_S):
                for key in list(self.held):
                    try:
                        os.utime(self.path(key))
                    except FileNotFoundError:
                        pass

        self._beat = threading.Thread(target=beat, name="harness-claims-heartbeat", daemon=True)
        self._beat.start()
