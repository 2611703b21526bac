"""How a record was made: git commit, package versions, hardware."""
from __future__ import annotations

import platform
import subprocess
from functools import lru_cache
from importlib import metadata

from harness.resources import source_checkout


@lru_cache(maxsize=1)
def git_commit() -> str:
    """The checkout's commit; an installed package is identified by its version (`packages`), not by git."""
    REPO_ROOT = source_checkout()
    if REPO_ROOT is None:
        return "installed"
    try:
        commit = subprocess.run(["git", "rev-parse", "HEAD"], cwd=REPO_ROOT, capture_output=True, text=True,
                                check=True).stdout.strip()
        dirty = subprocess.run(["git", "status", "--porcelain", "--untracked-files=no"], cwd=REPO_ROOT,
                               capture_output=True, text=True).stdout.strip()
        return commit + ("-dirty" if dirty else "")
    except (OSError, subprocess.CalledProcessError):
        return "unknown"


def _version(name: str) -> str | None:
    try:
        return metadata.version(name)
    except metadata.PackageNotFoundError:
        return None


@lru_cache(maxsize=1)
def provenance() -> dict:
    import torch

    hardware = {"machine": platform.machine(), "processor": platform.processor() or platform.machine(),
                "cpu_count": __import__("os").cpu_count()}
    if torch.cuda.is_available():
        hardware["gpus"] = [torch.cuda.get_device_name(i) for i in range(torch.cuda.device_count())]
    return {
        "commit": git_commit(),
        "python": platform.python_version(),
        "packages": {name: _version(name) for name in ("sparsity-harness", "torch", "transformers", "lm_eval", "ray", "triton")
                     if _version(name)},
        "hardware": hardware,
    }
