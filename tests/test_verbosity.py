"""The libraries' own progress bars and warnings (transformers, huggingface_hub, datasets, lm-eval) stay quiet
unless --verbose; the harness's own progress is unaffected."""
import pytest
from typer.testing import CliRunner

from harness.cli import app
from harness.verbosity import configure


def run(model_dir, out, *extra):
    return CliRunner().invoke(app, ["run", "--model", str(model_dir), "--weights", "pretrained", "--methods", "dense",
                                    "--seqlen", "64", "--limit", "1", "--out", str(out), *extra],
                              catch_exceptions=False)


def test_library_bars_are_quiet_unless_verbose(tiny_model_dir, tmp_path):
    from huggingface_hub.utils import are_progress_bars_disabled
    from transformers.utils import logging as transformers_logging

    try:
        loud = run(tiny_model_dir, tmp_path / "loud", "--verbose")
        assert loud.exit_code == 0, loud.output
        assert transformers_logging.is_progress_bar_enabled() and not are_progress_bars_disabled()
        quiet = run(tiny_model_dir, tmp_path / "quiet")
        assert quiet.exit_code == 0, quiet.output
        assert not transformers_logging.is_progress_bar_enabled() and are_progress_bars_disabled()
        assert transformers_logging.get_verbosity() == transformers_logging.ERROR
        assert "1 ran, 0 already done, 0 failed" in quiet.output  # the harness still reports its progress
    finally:
        configure(False)


def test_lm_eval_bars_are_hidden_even_where_lm_eval_asks_for_them():
    pytest.importorskip("lm_eval")
    import lm_eval.api.model
    import lm_eval.api.task
    import lm_eval.models.huggingface

    modules = (lm_eval.api.task, lm_eval.api.model, lm_eval.models.huggingface)
    try:
        configure(False, lm_eval=True)
        for module in modules:  # lm-eval passes disable=False explicitly for its request bars
            bar = module.tqdm(range(2), disable=False)
            assert bar.disable
            bar.close()
        configure(True, lm_eval=True)
        for module in modules:
            bar = module.tqdm(range(2), disable=False)
            assert not bar.disable
            bar.close()
    finally:
        configure(False, lm_eval=True)
