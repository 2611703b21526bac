"""Perplexity protocols: PTB both ways, and the tasks whose data only the Hugging Face hub has (BookCorpus, C4,
CB): offline they stop a run before anything is written, naming what is missing; online they read the hub
through `datasets` (monkeypatched here)."""
import random

import pytest
import torch
from typer.testing import CliRunner

import harness.data as data_module
from harness.cli import app
from harness.errors import HarnessError
from harness.tasks import TASKS, c4_windows, get_task


def test_ptb_has_two_named_protocols(data):
    valid = (data.root / "ptb/ptb.valid.txt").read_text().splitlines()
    sentences = [line.strip() for line in valid if line.strip()]
    assert data.ptb_valid_sparsegpt() == "\n\n".join(sentences)  # GPTQ/SparseGPT `ptb`: validation, \n\n
    assert data.ptb_test().startswith("no it was n't black monday")  # `ptb_new`: test, joined with a space
    assert "\n" not in data.ptb_test()
    assert TASKS["ptb_sparsegpt"].files == ("ptb/ptb.valid.txt",) and TASKS["ptb_new"].files == ("ptb/ptb.test.txt",)
    with pytest.raises(HarnessError, match="ptb_new .*ptb_sparsegpt"):
        get_task("ptb")


@pytest.mark.parametrize("task", ["bookcorpus", "c4", "cb", "c4_lmeval"])
def test_hub_tasks_offline_exit_2_naming_the_data_set(task, tmp_path, monkeypatch):
    monkeypatch.setenv("HF_DATASETS_OFFLINE", "1")
    monkeypatch.setenv("HF_HOME", str(tmp_path / "empty-cache"))  # nothing cached
    out = tmp_path / "run"
    result = CliRunner().invoke(app, ["run", "--suite", "smoke", "--tasks", task, "--out", str(out)])
    assert result.exit_code == 2, result.output
    expected = {"bookcorpus": "bookcorpus/bookcorpus", "c4": "allenai/c4", "cb": "aps/super_glue",
                "c4_lmeval": "allenai/c4"}[task]
    assert f"reads the Hugging Face data set {expected}" in result.output and "switched off" in result.output
    assert not out.exists()


def test_a_cached_hub_data_set_passes_the_offline_check(tmp_path, monkeypatch, data):
    monkeypatch.setenv("HF_DATASETS_OFFLINE", "1")
    monkeypatch.setenv("HF_HOME", str(tmp_path))
    (tmp_path / "hub" / "datasets--allenai--c4").mkdir(parents=True)
    TASKS["c4"].check(data)  # cached: fine offline
    with pytest.raises(HarnessError, match="streamed"):
        TASKS["bookcorpus"].check(data)  # streamed: needs the hub whatever the cache holds
    monkeypatch.delenv("HF_DATASETS_OFFLINE")
    monkeypatch.delenv("HF_HUB_OFFLINE", raising=False)
    TASKS["bookcorpus"].check(data)  # online


class FakeTokenizer:
    def __call__(self, text, return_tensors=None):
        class Out:
            input_ids = torch.tensor([[int(w) for w in text.split()]])
        return Out()


def test_hub_loaders_call_datasets_as_the_protocols_say(monkeypatch):
    import datasets

    calls = []

    def load_dataset(path, **kwargs):
        calls.append((path, kwargs))
        if path == "bookcorpus/bookcorpus":
            return iter([{"text": f"sentence {i} .\n"} for i in range(50000)])
        return datasets.Dataset.from_list([{"text": "1 2 3"}, {"text": " ".join(map(str, range(40)))}])

    monkeypatch.delenv("HF_DATASETS_OFFLINE", raising=False)
    monkeypatch.delenv("HF_HUB_OFFLINE", raising=False)
    monkeypatch.setattr(datasets, "load_dataset", load_dataset)
    text = data_module.bookcorpus_text()
    assert text.startswith("sentence 0 . sentence 1 .") and text.endswith("sentence 39999 .")
    assert calls[-1] == ("bookcorpus/bookcorpus", {"streaming": True, "revision": "refs/convert/parquet",
                                                   "split": "train"})
    texts = data_module.c4_validation_texts()
    assert calls[-1] == ("allenai/c4", {"streaming": False, "split": "validation",
                                        "data_files": {"validation": "en/c4-validation.00000-of-00008.json.gz"}})
    ids = c4_windows(FakeTokenizer(), texts, seqlen=8, samples=5)
    assert ids.shape == (40,)
    # GPTQ/SparseGPT's draws: random.seed(0), a document of >= seqlen tokens, then an offset in it
    rnd, expected = random.Random(0), []
    for _ in range(5):
        while True:
            doc = [int(w) for w in texts[rnd.randint(0, len(texts) - 1)].split()]
            if len(doc) >= 8:
                break
        start = rnd.randint(0, len(doc) - 8 - 1)
        expected += doc[start:start + 8]
    assert ids.tolist() == expected

    def broken(path, **kwargs):
        raise ConnectionError("no route to host")

    monkeypatch.setattr(datasets, "load_dataset", broken)
    with pytest.raises(HarnessError, match="allenai/c4 .*ConnectionError: no route to host"):
        data_module.c4_validation_texts()
