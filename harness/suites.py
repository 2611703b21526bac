"""Suites: declarative YAML files in suites/ naming tasks and the defaults of a run."""
from __future__ import annotations

from pathlib import Path

import yaml

from harness.data import REPO_ROOT
from harness.errors import HarnessError

SUITES_DIR = REPO_ROOT / "suites"


def available() -> dict[str, Path]:
    return {path.stem: path for path in sorted(SUITES_DIR.glob("*.yaml"))}


def load_suite(name: str) -> dict:
    """A suite by name (suites/NAME.yaml) or by path; returns its mapping with `name` and `defaults`."""
    path = Path(name)
    if not (path.suffix in (".yaml", ".yml") and path.exists()):
        suites = available()
        if name not in suites:
            raise HarnessError(f"unknown suite {name!r}; valid suites: {', '.join(suites)} (or a path to a YAML file)")
        path = suites[name]
    try:
        suite = yaml.safe_load(path.read_text()) or {}
    except yaml.YAMLError as exc:
        raise HarnessError(f"suite file {path} is not valid YAML: {exc}") from exc
    if not isinstance(suite, dict) or not isinstance(suite.get("defaults", {}), dict):
        raise HarnessError(f"suite file {path} must be a mapping with a `defaults` mapping")
    suite.setdefault("name", path.stem)
    suite.setdefault("description", "")
    suite.setdefault("defaults", {})
    return suite
