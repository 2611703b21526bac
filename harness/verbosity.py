"""The libraries' own output: transformers', huggingface_hub's, datasets' and lm-eval's progress bars and
warnings stay quiet unless `--verbose`, so what a run prints is the harness's progress (its rich bars, one
line per finished job). Set once per command by the CLI; `--verbose` gives the libraries their defaults back.
"""
from __future__ import annotations

import importlib

# lm-eval's modules that draw tqdm bars (request building, tokenizing, loglikelihood and generation requests);
# some pass `disable=False` explicitly, so the bar function itself is replaced while quiet
LM_EVAL_BAR_MODULES = ("lm_eval.api.task", "lm_eval.api.model", "lm_eval.models.huggingface")


def _hidden_tqdm(*args, **kwargs):
    from tqdm import tqdm

    kwargs["disable"] = True
    return tqdm(*args, **kwargs)


def configure(verbose: bool, lm_eval: bool = False) -> None:
    """Quiet (or, verbose, restore) the libraries' bars and logs; `lm_eval`: lm-eval's too (it is imported)."""
    from huggingface_hub import utils as hub_utils
    from transformers.utils import logging as transformers_logging

    if verbose:
        transformers_logging.set_verbosity_warning()
        transformers_logging.enable_progress_bar()
        hub_utils.enable_progress_bars()
    else:
        transformers_logging.set_verbosity_error()
        transformers_logging.disable_progress_bar()
        hub_utils.disable_progress_bars()
    try:
        import datasets
    except ImportError:  # datasets comes with lm-eval; a run without it has nothing to quiet
        datasets = None
    if datasets is not None:
        if verbose:
            datasets.utils.logging.set_verbosity_warning()
            datasets.utils.logging.enable_progress_bar()
        else:
            datasets.utils.logging.set_verbosity_error()
            datasets.utils.logging.disable_progress_bar()
    if lm_eval:
        from tqdm import tqdm

        for name in LM_EVAL_BAR_MODULES:
            importlib.import_module(name).tqdm = tqdm if verbose else _hidden_tqdm
