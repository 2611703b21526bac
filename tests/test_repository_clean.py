"""Tests write under pytest's temporary folders only: the artefact cache is a temporary one, and the session's
check (conftest.repository_stays_clean) sees a file a test would leave in the repository, results/ included."""
import os
from pathlib import Path

import pytest

from conftest import ROOT, repository_state


def test_the_artefact_cache_of_the_tests_is_outside_the_repository():
    from harness.artefacts import ArtefactCache

    root = ArtefactCache().root.resolve()
    assert root == Path(os.environ["HARNESS_CACHE_DIR"]).resolve() and not root.is_relative_to(ROOT)


def test_the_repository_check_sees_a_file_left_in_results():
    before = repository_state()
    if before is None:
        pytest.skip("not a git checkout")
    probe = ROOT / "results" / f".left-by-a-test-{os.getpid()}"
    probe.write_text("x\n")
    try:
        assert repository_state() != before
    finally:
        probe.unlink()
    assert repository_state() == before
