"""Shared fixtures. Offline by design: nothing may reach a hub."""
import os

os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("HF_DATASETS_OFFLINE", "1")
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
os.environ.setdefault("RAY_USAGE_STATS_ENABLED", "0")
os.environ.setdefault("TRITON_INTERPRET", "1")

import pytest  # noqa: E402
import torch  # noqa: E402

torch.set_num_threads(2)


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
