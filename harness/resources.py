"""Where the package's data lives: suite files, the offline lm-eval task files and the papers' reference numbers.

The repository keeps them in the top-level `suites/` folder. A wheel ships that folder as package data of
`harness` (`harness/_suites/`, mapped in pyproject.toml), found here through `importlib.resources`; a source
checkout (editable install, or `PYTHONPATH` pointing at the checkout) has no `harness/_suites/` and reads
`suites/` beside the package. Nothing is ever written here: runs write under `./results` or `--out`.
"""
from __future__ import annotations

from importlib import resources
from pathlib import Path

from harness.errors import HarnessError

#: the folder that holds `harness/` (a source checkout's root, or site-packages in a wheel install)
PACKAGE_PARENT = Path(__file__).resolve().parent.parent


def source_checkout() -> Path | None:
    """The repository root when the package runs from a source checkout (pyproject.toml beside it), else None."""
    root = PACKAGE_PARENT
    return root if (root / "pyproject.toml").is_file() and (root / "suites").is_dir() else None


def suites_dir() -> Path:
    """The suite files' folder: the installed package data, else the checkout's `suites/`."""
    packaged = resources.files("harness") / "_suites"
    if packaged.is_dir():
        return Path(str(packaged))  # a wheel installs into a folder, so this is a real path
    checkout = source_checkout()
    if checkout is not None:
        return checkout / "suites"
    raise HarnessError(f"the suite files are missing: neither {packaged} (an installed package) nor a source "
                       f"checkout's suites/ beside {PACKAGE_PARENT / 'harness'}; reinstall sparsity-harness")


def lm_eval_tasks_dir() -> Path:
    """The offline lm-eval task files (YAML + their loader)."""
    return suites_dir() / "lm_eval_tasks"


def references_dir() -> Path:
    """The papers' published tables, transcribed (`harness compare`)."""
    return suites_dir() / "references"


def results_dir() -> Path:
    """Where runs write when no --out is given: ./results in the current directory (never the package's folder)."""
    return Path.cwd() / "results"
