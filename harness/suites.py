"""Suites: declarative YAML files in suites/ (package data, harness/resources.py) naming tasks and the defaults of a run."""
from __future__ import annotations

from pathlib import Path

import yaml

from harness.errors import HarnessError
from harness.resources import suites_dir

SUITES_DIR = suites_dir()


def yaml_files(folder: Path) -> dict[str, Path]:
    return {path.stem: path for path in sorted(folder.glob("*.yaml"))}


def load_yaml_mapping(kind: str, name: str | Path, folder: Path | None = None) -> tuple[Path, dict]:
    """A YAML mapping by name (FOLDER/NAME.yaml) or by path; bad names and bad files are HarnessErrors."""
    path = Path(name)
    if not (path.suffix in (".yaml", ".yml") and path.exists()):
        known = yaml_files(folder) if folder is not None else {}
        if str(name) not in known:
            valid = ", ".join(known) or "(none)"
            raise HarnessError(f"unknown {kind} {str(name)!r}; valid {kind}s: {valid} (or a path to a YAML file)"
                               if folder is not None else f"{kind} file {path} does not exist")
        path = known[str(name)]
    try:
        mapping = yaml.safe_load(path.read_text()) or {}
    except yaml.YAMLError as exc:
        raise HarnessError(f"{kind} file {path} is not valid YAML: {exc}") from exc
    if not isinstance(mapping, dict):
        raise HarnessError(f"{kind} file {path} must be a mapping")
    return path, mapping


def available() -> dict[str, Path]:
    return yaml_files(SUITES_DIR)


def load_suite(name: str) -> dict:
    """A suite by name (suites/NAME.yaml) or by path; returns its mapping with `name` and `defaults`."""
    path, suite = load_yaml_mapping("suite", name, SUITES_DIR)
    if not isinstance(suite.get("defaults", {}), dict):
        raise HarnessError(f"suite file {path} must be a mapping with a `defaults` mapping")
    suite.setdefault("name", path.stem)
    suite.setdefault("description", "")
    suite.setdefault("defaults", {})
    return suite


def build_config(suite_name: str, overrides: dict):
    """The RunConfig of a suite: its defaults, then the overrides that are not None (command-line options, a sweep
    entry); a model named by a repository path (a fixture) resolves against the source checkout, and outside one
    is refused (exit 2) with what to pass instead."""
    from harness.resources import source_checkout
    from harness.spec import RunConfig

    suite = load_suite(suite_name)
    values = {**suite["defaults"], **{k: v for k, v in overrides.items() if v is not None}}
    values["suite"] = suite["name"]
    model = values.get("model")
    if model and str(model).startswith("tests/fixtures/") and not Path(model).exists():  # suites name fixtures by repo path
        checkout = source_checkout()
        if checkout is None or not (checkout / model).is_dir():
            raise HarnessError(f"suite {suite['name']} runs the project's reference model {model}, which ships with the "
                               "source checkout only (git clone the repository and run from it); or pass --model, e.g. "
                               "--model facebook/opt-1.3b --weights pretrained")
        values["model"] = str(checkout / model)
    config = RunConfig.from_mapping(values, f"suite {suite['name']}")
    config.validate()
    return config
