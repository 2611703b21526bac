"""Data sources: an offline bundle, else the Hugging Face hub through `datasets` (harness/data.py), and the bundle's
export and check (harness/bundle.py). The hub is never reached: `datasets.load_dataset` is replaced by rows built
from the real bundle in ../shared/data, in the Hugging Face schema (what the hub's builders yield), and the
"is it cached" probe says yes; so both sources must give the same texts, token streams and perplexities."""
import json
import shutil

import pytest
from typer.testing import CliRunner

from harness import lmeval_data
from harness.bundle import GROUPS, check, export
from harness.cli import app
from harness.data import HUB, DataDir, HubData, resolve_data
from harness.errors import HarnessError

datasets = pytest.importorskip("datasets")


def hub_rows(root) -> dict:
    """(path, name, split) -> rows, as the hub serves the splits that the bundle's files are copies of."""
    def lines(rel):
        with open(root / rel, encoding="utf-8") as handle:
            return list(handle)

    def wikitext(rel):  # the `wikitext` builder: every line with its newline, "" for a blank one
        return [{"text": line if line.strip() else ""} for line in lines(rel)]

    def ptb(rel):  # the `ptb_text_only` builder: every line stripped
        return [{"sentence": line.strip()} for line in lines(rel)]

    return {
        ("Salesforce/wikitext", "wikitext-2-raw-v1", "test"): wikitext("wikitext-2/wiki.test.raw"),
        ("Salesforce/wikitext", "wikitext-2-v1", "test"): wikitext("wikitext-2/wiki.test.tokens"),
        ("Salesforce/wikitext", "wikitext-2-v1", "validation"): wikitext("wikitext-2/wiki.valid.tokens"),
        ("ptb-text-only/ptb_text_only", "penn_treebank", "test"): ptb("ptb/ptb.test.txt"),
        ("ptb-text-only/ptb_text_only", "penn_treebank", "validation"): ptb("ptb/ptb.valid.txt"),
        ("EleutherAI/lambada_openai", "default", "test"): lmeval_data.rows_lambada_openai(root),
        ("baber/piqa", None, "validation"): lmeval_data.rows_piqa(root),
        ("aps/super_glue", "copa", "validation"): lmeval_data.rows_copa(root),
        ("allenai/openbookqa", "main", "test"): lmeval_data.rows_openbookqa(root),
        ("allenai/openbookqa", "main", "validation"): lmeval_data.rows_openbookqa(root, "dev"),
        ("allenai/winogrande", "winogrande_xl", "validation"): lmeval_data.rows_winogrande(root),
        ("nyu-mll/glue", "rte", "validation"): lmeval_data.rows_rte(root),
        ("Rowan/hellaswag", None, "validation"): lmeval_data.rows_hellaswag(root),
        ("allenai/ai2_arc", "ARC-Easy", "test"): lmeval_data.rows_arc_easy(root),
    }


@pytest.fixture
def fake_hub(monkeypatch, data):
    """`datasets.load_dataset` answering from the bundle, every hub data set "cached", OPT's tokenizer from the bundle;
    nothing reaches a network (HF_HUB_OFFLINE stays set)."""
    import harness.data as data_module
    import harness.models as models

    served = hub_rows(data.root)
    calls = []

    def load_dataset(path, name=None, *, split=None, revision=None, streaming=False, **kwargs):
        calls.append((path, name, split, revision))
        key = (path, name, split)
        if key not in served:
            raise FileNotFoundError(f"fake hub: no {key}")
        return datasets.Dataset.from_list(served[key])

    monkeypatch.setattr(datasets, "load_dataset", load_dataset)
    monkeypatch.setattr(data_module, "hf_dataset_cached", lambda path: True)
    monkeypatch.setattr(models, "hub_tokenizer", lambda repo_id, why: data.root / "tokenizer" / "opt")
    monkeypatch.setattr(data_module, "_HUB_ROWS", {})
    return calls


@pytest.fixture
def no_bundle(monkeypatch):
    """As on a machine with the package installed: no --data-dir, no HARNESS_DATA_DIR, no checkout's ../shared/data."""
    import harness.data as data_module

    monkeypatch.delenv("HARNESS_DATA_DIR", raising=False)
    monkeypatch.setattr(data_module, "source_checkout", lambda: None)


def test_without_a_bundle_the_source_is_the_hub(no_bundle, monkeypatch, tmp_path):
    assert isinstance(resolve_data(), HubData)
    assert isinstance(resolve_data(tmp_path), DataDir)  # an explicit bundle first
    monkeypatch.setenv("HARNESS_DATA_DIR", str(tmp_path))
    assert isinstance(resolve_data(), DataDir)


def test_hub_and_bundle_give_the_same_wikitext2_token_stream(fake_hub, data, tokenizer):
    from harness.perplexity import tokenize_text

    hub = HubData()
    assert hub.wikitext2_test() == data.wikitext2_test()
    assert tokenize_text(tokenizer, hub.wikitext2_test()).equal(tokenize_text(tokenizer, data.wikitext2_test()))
    for name in ("wikitext2-valid", "ptb-valid"):
        assert hub.calibration_text(name) == data.calibration_text(name)
    assert hub.ptb_test() == data.ptb_test() and hub.ptb_valid_sparsegpt() == data.ptb_valid_sparsegpt()
    assert ("Salesforce/wikitext", "wikitext-2-raw-v1", "test", None) in fake_hub
    assert hub.fingerprint.startswith("hub-") and hub.fingerprint != data.fingerprint


def tiny_run(model_dir, out, *extra):
    args = ["run", "--suite", "smoke", "--model", str(model_dir), "--weights", "pretrained", "--methods",
            "dense,random", "--sparsity", "0.5", "--tasks", "wikitext2", "--limit", "1", "--seqlen", "64",
            "--device", "cpu", "--out", str(out), *map(str, extra)]
    return CliRunner().invoke(app, args)


def test_a_run_from_the_hub_equals_the_run_from_the_bundle(fake_hub, no_bundle, data, tiny_model_dir, tmp_path):
    from_hub = tiny_run(tiny_model_dir, tmp_path / "hub")
    assert from_hub.exit_code == 0, from_hub.output
    assert "data: the Hugging Face hub" in from_hub.output
    from_bundle = tiny_run(tiny_model_dir, tmp_path / "bundle", "--data-dir", data.root)
    assert from_bundle.exit_code == 0, from_bundle.output

    def values(out):
        rows = [json.loads(line) for line in (out / "records.jsonl").read_text().splitlines()]
        return {r["method"]: (r["value"], r["tokens"], r["data_source"]) for r in rows}

    hub, bundle = values(tmp_path / "hub"), values(tmp_path / "bundle")
    assert {m: v[:2] for m, v in hub.items()} == {m: v[:2] for m, v in bundle.items()}
    assert {v[2] for v in hub.values()} == {"hub"} and {v[2] for v in bundle.values()} == {"bundle"}


def test_offline_without_a_bundle_names_both_ways_to_get_data(no_bundle, tiny_model_dir, tmp_path):
    result = tiny_run(tiny_model_dir, tmp_path / "run")
    assert result.exit_code == 2, result.output
    text = " ".join(result.output.split())
    for needed in ("Salesforce/wikitext", "--data-dir", "HARNESS_DATA_DIR", "harness data export",
                   "HF_HUB_OFFLINE", "huggingface-cli login"):
        assert needed in text, needed
    assert not (tmp_path / "run").exists()


def test_zero_shot_without_a_bundle_runs_lm_evals_own_task():
    from harness.lmeval import ZERO_SHOT, choose_source

    assert choose_source(ZERO_SHOT["piqa"], "auto", None) == "hf"
    with pytest.raises(HarnessError, match="--data-dir"):
        choose_source(ZERO_SHOT["piqa"], "local", None)


def test_export_from_the_hub_writes_a_bundle_equal_to_ours(fake_hub, data, tmp_path):
    """Every file written from the hub rows reads back as the bundle's own: the same rows for every offline
    lm-eval task, the same texts for perplexity and calibration; the manifest checks."""
    out = export(tmp_path / "bundle", HubData(), log=lambda *_: None)
    assert {rel for rel, *_ in out.files} == {rel for files in GROUPS.values() for rel in files}
    found = check(out.root)
    assert not found.problems and all(found.groups.values()) and not found.unlisted
    exported = DataDir(out.root, "test")
    for task in lmeval_data.CONVERTERS:
        assert lmeval_data.CONVERTERS[task][0](out.root) == lmeval_data.CONVERTERS[task][0](data.root), task
    assert lmeval_data.rows_openbookqa(out.root, "dev") == lmeval_data.rows_openbookqa(data.root, "dev")
    assert exported.wikitext2_test() == data.wikitext2_test() and exported.ptb_test() == data.ptb_test()
    for name in ("wikitext2-valid", "ptb-valid"):
        assert exported.calibration_text(name) == data.calibration_text(name)
    manifest = {line.split("\t")[0]: line.split("\t")[1] for line in (out.root / "MANIFEST.tsv").read_text().splitlines()}
    assert manifest["wikitext-2/wiki.test.raw"].startswith("hub:Salesforce/wikitext/wikitext-2-raw-v1:test")
    assert set(HUB) <= set(manifest)


def test_export_copies_a_bundle_and_check_finds_an_altered_file(data, tmp_path):
    result = CliRunner().invoke(app, ["data", "export", str(tmp_path / "copy"), "--data-dir", str(data.root), "--only",
                                      "ptb,tokenizer"])
    assert result.exit_code == 0, result.output
    assert sorted(p.name for p in (tmp_path / "copy" / "ptb").iterdir()) == ["ptb.test.txt", "ptb.valid.txt"]
    assert CliRunner().invoke(app, ["data", "check", str(tmp_path / "copy")]).exit_code == 0
    (tmp_path / "copy" / "ptb" / "ptb.test.txt").write_text("altered\n")
    bad = CliRunner().invoke(app, ["data", "check", str(tmp_path / "copy")])
    assert bad.exit_code == 2 and "ptb/ptb.test.txt" in bad.output and "the manifest says" in bad.output
    # a folder that is not empty is refused, nothing is written into it
    again = CliRunner().invoke(app, ["data", "export", str(tmp_path / "copy"), "--data-dir", str(data.root)])
    assert again.exit_code == 2 and "not empty" in again.output


@pytest.mark.parametrize("args, expected", [
    (["data", "export", "OUT", "--only", "ptb,nosuch"], "valid: wikitext-2, ptb"),
    (["data", "check", "NOWHERE"], "is not a folder"),
    (["data", "check", "EMPTY"], "has no MANIFEST.tsv"),
])
def test_bad_data_commands_exit_2_naming_what_is_valid(args, expected, tmp_path):
    (tmp_path / "EMPTY").mkdir()
    args = [str(tmp_path / a) if a in ("OUT", "NOWHERE", "EMPTY") else a for a in args]
    result = CliRunner().invoke(app, args)
    assert result.exit_code == 2 and expected in " ".join(result.output.split()), result.output
    assert not (tmp_path / "OUT").exists()


def test_offline_export_from_the_hub_is_refused_before_writing(no_bundle, tmp_path):
    result = CliRunner().invoke(app, ["data", "export", str(tmp_path / "out"), "--only", "copa"])
    assert result.exit_code == 2 and "aps/super_glue" in result.output and "--data-dir" in result.output
    assert not (tmp_path / "out").exists()


def test_a_random_weight_model_without_a_bundle_uses_opts_tokenizer_from_the_hub(no_bundle, monkeypatch, data):
    import harness.models as models
    from harness.models import ModelSpec, tokenizer_dir_for

    asked = []
    monkeypatch.setattr(models, "hub_tokenizer", lambda repo_id, why: asked.append(repo_id) or data.root / "tokenizer" / "opt")
    assert tokenizer_dir_for(ModelSpec("opt-125m", "random"), None, HubData()) == data.root / "tokenizer" / "opt"
    assert asked == ["facebook/opt-125m"]
    with_bundle = tokenizer_dir_for(ModelSpec("opt-125m", "random"), None, data)
    assert with_bundle == data.root / "tokenizer" / "opt" and asked == ["facebook/opt-125m"]


def test_a_copied_bundle_can_be_used_for_a_run(data, tmp_path, tiny_model_dir):
    copy = tmp_path / "copy"
    export(copy, data, only=["wikitext-2", "tokenizer"], log=lambda *_: None)
    shutil.rmtree(copy / "wikitext-2")  # ... and a missing file is named before anything runs
    result = tiny_run(tiny_model_dir, tmp_path / "run", "--data-dir", copy)
    assert result.exit_code == 2 and "wiki.test.raw" in result.output


def test_data_check_without_a_bundle_says_how_to_name_one(no_bundle, monkeypatch):
    import harness.resources as resources

    monkeypatch.setattr(resources, "source_checkout", lambda: None)
    result = CliRunner().invoke(app, ["data", "check"])
    assert result.exit_code == 2 and "harness data check DIR" in result.output
