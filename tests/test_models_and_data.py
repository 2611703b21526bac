import shutil

import pytest
import torch

from harness.data import DataDir
from harness.errors import HarnessError
from harness.models import OPT_SIZES, ModelSpec, load_model, opt_config


def test_builtin_configs_are_the_published_architectures():
    config = opt_config("opt-13b")
    assert (config.num_hidden_layers, config.hidden_size, config.num_attention_heads, config.ffn_dim) == (40, 5120, 40, 20480)
    assert opt_config("opt-350m").do_layer_norm_before is False and opt_config("opt-350m").word_embed_proj_dim == 512
    assert opt_config("opt-66b").num_attention_heads == 72
    assert set(OPT_SIZES) == {"opt-125m", "opt-350m", "opt-1.3b", "opt-2.7b", "opt-6.7b", "opt-13b", "opt-30b", "opt-66b"}


def test_random_weights_are_exact_architecture_and_seeded():
    with torch.device("meta"):
        from transformers import AutoModelForCausalLM

        meta = AutoModelForCausalLM.from_config(opt_config("opt-125m"))
    assert sum(p.numel() for p in meta.parameters()) == 125_239_296  # facebook/opt-125m
    a = load_model(ModelSpec("opt-125m", "random"), seed=1)
    b = load_model(ModelSpec("opt-125m", "random"), seed=1)
    c = load_model(ModelSpec("opt-125m", "random"), seed=2)
    wa, wb, wc = (m.model.decoder.layers[3].fc1.weight for m in (a, b, c))
    assert torch.equal(wa, wb) and not torch.equal(wa, wc)


def test_pretrained_path_loads_a_saved_checkpoint(tiny_model_dir):
    from transformers import OPTForCausalLM

    spec = ModelSpec(str(tiny_model_dir), "pretrained")
    assert spec.kind == "local"
    loaded = load_model(spec)
    reference = OPTForCausalLM.from_pretrained(tiny_model_dir).eval()
    ids = torch.randint(3, 50000, (1, 12))
    assert torch.equal(loaded(input_ids=ids).logits, reference(input_ids=ids).logits)


def test_unknown_model_names_the_valid_ones():
    with pytest.raises(HarnessError, match="opt-125m"):
        ModelSpec("opt-7b").kind


def test_opt_tokenizer_ids(tokenizer):
    assert tokenizer("Hello, my dog is cute").input_ids == [2, 31414, 6, 127, 2335, 16, 11962]


def test_our_kernels_package_does_not_shadow_transformers_optional_kernels():
    from transformers.utils.import_utils import is_kernels_available

    assert not is_kernels_available()


def test_data_dir_resolution_order(tmp_path, monkeypatch):
    (tmp_path / "env").mkdir()
    (tmp_path / "flag").mkdir()
    monkeypatch.setenv("HARNESS_DATA_DIR", str(tmp_path / "env"))
    assert DataDir.resolve(tmp_path / "flag").root == (tmp_path / "flag").resolve()
    assert DataDir.resolve().root == (tmp_path / "env").resolve()
    monkeypatch.delenv("HARNESS_DATA_DIR")
    assert DataDir.resolve().root.name == "data"  # ../shared/data beside the repository


def test_missing_and_corrupt_data_files_are_clear_errors(tmp_path, data):
    copy = tmp_path / "data"
    (copy / "ptb").mkdir(parents=True)
    shutil.copy(data.root / "MANIFEST.tsv", copy / "MANIFEST.tsv")
    local = DataDir.resolve(copy)
    with pytest.raises(HarnessError, match=r"missing data file .*wiki.test.raw.*--data-dir"):
        local.wikitext2_test()
    (copy / "ptb" / "ptb.test.txt").write_text("not the treebank\n")
    with pytest.raises(HarnessError, match="does not match MANIFEST"):
        local.ptb_test()


def test_wikitext_is_the_hf_rows_joined(data):
    text = data.wikitext2_test()
    # rows "", " = Robert Boulter = \\n", "", " Robert Boulter is ..." joined with "\\n\\n"
    assert text.startswith("\n\n = Robert Boulter = \n\n\n\n\n Robert Boulter is an English film")
    assert "\n\n" in text and len(text) > 1_000_000
    assert data.ptb_test().startswith("no it was n't black monday but while")


def test_random_weights_do_not_depend_on_placement():
    """Sharded (device_map) and single-device builds get the same weights: per-parameter generators."""
    spec = ModelSpec("opt-125m", "random")
    single = load_model(spec, seed=3)
    layers = single.config.num_hidden_layers
    device_map = {"model.decoder.embed_tokens": "cpu", "model.decoder.embed_positions": "cpu",
                  "model.decoder.final_layer_norm": "cpu", "lm_head": "cpu",
                  **{f"model.decoder.layers.{i}": "cpu" for i in range(layers)}}
    mapped = load_model(spec, seed=3, device_map=device_map)
    for (name, a), (_, b) in zip(single.named_parameters(), mapped.named_parameters()):
        assert torch.equal(a, b), name
    assert single.lm_head.weight is single.model.decoder.embed_tokens.weight  # still tied
    embed = single.model.decoder.embed_tokens.weight
    assert float(embed.std()) == pytest.approx(0.02, rel=0.05) and embed[1].abs().sum() == 0
    ids = torch.randint(3, 50000, (1, 16))
    assert torch.equal(single(input_ids=ids).logits, mapped(input_ids=ids).logits)
