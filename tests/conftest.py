"""Shared fixtures. Offline by design: nothing may reach a hub. Tests write under pytest's temporary folders
only: the artefact cache goes to one (HARNESS_CACHE_DIR), and the session ends with a check that the
repository (tracked files, untracked files, results/) is as it was before the tests."""
import os
import subprocess
import tempfile
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
_CACHE = tempfile.TemporaryDirectory(prefix="harness-test-cache-")
os.environ["HARNESS_CACHE_DIR"] = _CACHE.name  # never the repository's results/cache
os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("HF_DATASETS_OFFLINE", "1")
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
os.environ.setdefault("RAY_USAGE_STATS_ENABLED", "0")
os.environ.setdefault("TRITON_INTERPRET", "1")

import pytest  # noqa: E402
import torch  # noqa: E402

torch.set_num_threads(2)


def repository_state() -> str | None:
    """`git status` of the checkout, ignored files under results/ included; None outside a git checkout."""
    try:
        tracked = subprocess.run(["git", "status", "--porcelain", "--untracked-files=all"], cwd=ROOT,
                                 capture_output=True, text=True, check=True).stdout
        results = subprocess.run(["git", "status", "--porcelain", "--untracked-files=all", "--ignored", "--",
                                  "results"], cwd=ROOT, capture_output=True, text=True, check=True).stdout
    except (OSError, subprocess.CalledProcessError):
        return None
    return tracked + results


@pytest.fixture(scope="session", autouse=True)
def repository_stays_clean():
    """Fails the session (an error in its last test's teardown) when a test wrote into the repository."""
    before = repository_state()
    yield
    after = repository_state()
    if before is not None:
        assert after == before, f"the tests changed the repository:\nbefore:\n{before}\nafter:\n{after}"


def tiny_config(**overrides):
    from transformers import OPTConfig

    values = dict(vocab_size=50272, hidden_size=32, num_hidden_layers=2, num_attention_heads=4, ffn_dim=64,
                  max_position_embeddings=2048, word_embed_proj_dim=32, dropout=0.0, attention_dropout=0.0,
                  do_layer_norm_before=True, enable_bias=True, pad_token_id=1, bos_token_id=2, eos_token_id=2)
    values.update(overrides)
    return OPTConfig(**values)


def tiny_model(seed=0, **overrides):
    from transformers import OPTForCausalLM

    torch.manual_seed(seed)
    model = OPTForCausalLM(tiny_config(**overrides)).eval()
    with torch.no_grad():  # random init with visible structure: larger weights than HF's default 0.02
        for param in model.parameters():
            if param.dim() == 2:
                param.normal_(0, 0.2)
    return model


@pytest.fixture(scope="session")
def tiny_model_dir(tmp_path_factory):
    """A tiny OPT checkpoint saved with save_pretrained (the 'pretrained' path, loaded by directory)."""
    path = tmp_path_factory.mktemp("tiny-opt")
    tiny_model().save_pretrained(path)
    return path


@pytest.fixture(scope="session")
def data():
    from harness.data import DataDir

    return DataDir.resolve()


@pytest.fixture(scope="session")
def tokenizer(data):
    from harness.models import ModelSpec, load_tokenizer

    return load_tokenizer(ModelSpec("opt-125m"), None, data)
