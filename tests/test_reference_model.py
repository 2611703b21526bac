"""The committed reference model (tests/fixtures/reference-opt) has learned something."""
import json
import math
import os

os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("HF_DATASETS_OFFLINE", "1")

import pytest  # noqa: E402

from harness.data import DataDir  # noqa: E402
from harness.models import ModelSpec, load_model, load_tokenizer  # noqa: E402
from harness.perplexity import perplexity, tokenize_text  # noqa: E402
from harness.reference_model import FIXTURE_DIR, render_report  # noqa: E402


@pytest.fixture(scope="module")
def wikitext_ids():
    data = DataDir.resolve()
    tokenizer = load_tokenizer(ModelSpec("opt-125m"), None, data)
    return tokenize_text(tokenizer, data.wikitext2_test())


def test_fixture_is_small_opt_with_opt_vocabulary():
    spec = ModelSpec(str(FIXTURE_DIR), "pretrained")
    assert spec.kind == "local"
    config = spec.config()
    assert config.model_type == "opt" and config.vocab_size == 50272 and config.max_position_embeddings == 2048
    assert config.do_layer_norm_before and config.activation_function == "relu"
    assert (FIXTURE_DIR / "model.safetensors").stat().st_size <= 16 * 2**20


def test_reference_model_beats_random_weights_on_wikitext2(wikitext_ids):
    trained = perplexity(load_model(ModelSpec(str(FIXTURE_DIR), "pretrained")), wikitext_ids, seqlen=2048, limit=2)
    random = perplexity(load_model(ModelSpec(str(FIXTURE_DIR), "random")), wikitext_ids, seqlen=2048, limit=2)
    assert trained["value"] < 1000
    assert random["value"] > 10_000  # about the vocabulary size
    assert trained["value"] * 20 < random["value"]
    # the same number as the GPU run reported (fp16 weights, float32 compute; CPU vs GPU kernels)
    record = json.loads((FIXTURE_DIR / "training.json").read_text())
    reported = record["evaluation"]["held_out"]["wikitext2"]["value_2_windows"]
    assert math.isclose(trained["value"], reported, rel_tol=0.01)


def test_training_used_no_evaluation_text():
    record = json.loads((FIXTURE_DIR / "training.json").read_text())
    used = set(record["data"]["train_files"])
    assert used.isdisjoint({"wikitext-2/wiki.test.raw", "wikitext-2/wiki.test.tokens", "ptb/ptb.test.txt"})
    assert "WikiText-2" in render_report(record)


def test_reference_holdout_calibration_text_was_never_trained_on():
    """`reference-holdout` (the calibration text of the reference-model reports) is the tail of WikiText-2 valid and
    PTB valid that the model's training run held out: its token windows never occur in the trained-on stream, while
    those of `wikitext2-valid` (the default calibration text, the model's training text) do."""
    import torch

    from harness.reference_model import HOLDOUT_CALIBRATION_SOURCES, holdout_ids, split_holdout, training_tokens

    data = DataDir.resolve()
    tokenizer = load_tokenizer(ModelSpec("opt-125m"), None, data)
    record = json.loads((FIXTURE_DIR / "training.json").read_text())
    hp = record["hyperparameters"]
    sources = training_tokens(tokenizer, data, unk_fill=hp["unk_fill"], seed=hp["seed"], only=HOLDOUT_CALIBRATION_SOURCES)
    assert {k: len(v) for k, v in sources.items()} == {k: record["training"]["tokens"][k] for k in sources}
    trained, _ = split_holdout(sources, hp["holdout_fraction"])
    held = holdout_ids(data, record)
    assert sum(len(v) for v in held.values()) + len(trained) == sum(len(v) for v in sources.values())
    as_text = lambda ids: "," + ",".join(map(str, ids.tolist())) + ","  # noqa: E731
    trained_text = as_text(trained)
    full_text = as_text(torch.cat(list(sources.values())))

    def seen(ids: torch.Tensor, stream: str, width: int = 12, count: int = 40) -> int:
        starts = torch.linspace(0, len(ids) - width - 1, count).long().tolist()
        return sum(as_text(ids[s:s + width]) in stream for s in starts)

    calibration = tokenize_text(tokenizer, data.calibration_text("reference-holdout"))[1:]  # after the BOS
    assert seen(calibration, trained_text) == 0
    assert seen(calibration, full_text) >= 36  # the same tokens as the held-out tail (decoded and re-encoded)
    default = tokenize_text(tokenizer, data.calibration_text("wikitext2-valid"))[1000:20000]
    assert seen(default, trained_text) >= 20  # the default calibration text is training text (`<unk>` aside)
