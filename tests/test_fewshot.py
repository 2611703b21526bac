"""ShadowLLM's few-shot calibration examples (harness/fewshot.py): lm-eval's prompts, the gold target's span,
documents that are never evaluated, determinism, and the Hugging Face training-split path."""
import pytest

pytest.importorskip("lm_eval")

from harness.errors import HarnessError  # noqa: E402
from harness.fewshot import TASKS, build_examples, encode_pair, quotas, task_documents  # noqa: E402
from harness.lmeval import ZERO_SHOT  # noqa: E402
from harness.lmeval_data import calibration_rows, evaluation_rows  # noqa: E402


@pytest.fixture(scope="module")
def fewshot(tokenizer, data):
    return build_examples(tokenizer, data.root, examples=35, seed=3)


def test_examples_are_split_over_the_tasks_that_have_calibration_documents(fewshot):
    assert set(fewshot.left_out) == {"copa", "rte"}  # offline their only split is evaluated and too small
    assert {t: info["examples"] for t, info in fewshot.tasks.items()} == {
        "piqa": 7, "openbookqa": 7, "winogrande": 7, "hellaswag": 7, "arc_easy": 7}
    assert len(fewshot.examples) == 35 and {e.task for e in fewshot.examples} == set(fewshot.tasks)
    assert "dev split" in fewshot.tasks["openbookqa"]["source"] and "left out" in fewshot.describe()
    assert quotas({"a": 2, "b": 100, "c": 100}, 30) == {"a": 2, "b": 14, "c": 14}


def test_each_example_is_five_demonstrations_a_query_and_its_gold_answer(fewshot, tokenizer, data):
    for name in fewshot.tasks:
        task, docs, _, source = task_documents(name, data.root)
        assert source == "local"
        for example in (e for e in fewshot.examples if e.task == name):
            start, end = example.target
            assert 1 <= start < end == len(example.ids)
            context = tokenizer.decode(example.ids[:start], skip_special_tokens=True)
            answer = tokenizer.decode(example.ids[start:])
            doc = docs[example.doc]
            if task.multiple_input:  # winogrande: the gold option fills the blank in the context
                query, gold = task.doc_to_choice(doc)[task.doc_to_text(doc)], task.doc_to_target(doc)
            else:
                choices, gold = task.doc_to_choice(doc), task.doc_to_target(doc)
                query, gold = task.doc_to_text(doc), choices[gold] if isinstance(gold, int) else gold
            assert answer.strip() == str(gold).strip(), name
            assert context.rstrip().endswith(query.rstrip()), name
            demonstrations = context.rstrip()[: -len(query.rstrip())].rstrip("\n").split("\n\n")
            assert len(demonstrations) == 5, (name, demonstrations)
            assert not any(query.strip() in d for d in demonstrations), name  # never its own demonstration


def test_calibration_documents_are_not_evaluation_documents(fewshot, data):
    for name in fewshot.tasks:
        converter = ZERO_SHOT[name].converter
        calibration = calibration_rows(converter, data.root)[0]
        evaluated = {repr(sorted(r.items())) for r in evaluation_rows(converter, data.root)}
        assert not any(repr(sorted(r.items())) in evaluated for r in calibration), name


def test_the_pair_is_encoded_as_lm_eval_encodes_it(tokenizer):
    from harness.lmeval import make_adapter
    from tests.conftest import tiny_model

    lm = make_adapter(tiny_model(), tokenizer)
    for context, continuation in (("Question: a b\nAnswer:", " yes"), ("Trailing space ", "word"), ("x", "\n\ny")):
        assert encode_pair(tokenizer, context, continuation) == tuple(map(list, lm._encode_pair(context, continuation)))


def test_deterministic_and_seeded(fewshot, tokenizer, data):
    again = build_examples(tokenizer, data.root, examples=35, seed=3)
    other = build_examples(tokenizer, data.root, examples=35, seed=4)
    assert again.fingerprint == fewshot.fingerprint and again.examples == fewshot.examples
    assert other.fingerprint != fewshot.fingerprint
    short = build_examples(tokenizer, data.root, tasks=("arc_easy",), examples=2, max_length=64)
    assert all(len(e.ids) <= 64 and e.target[0] >= 1 for e in short.examples)  # left-truncated like lm-eval
    with pytest.raises(HarnessError, match="valid"):
        build_examples(tokenizer, data.root, tasks=("lambada_openai",))
    with pytest.raises(HarnessError, match="no calibration documents"):
        build_examples(tokenizer, data.root, tasks=("copa", "rte"))


def test_the_hub_path_reads_the_training_split(monkeypatch, tokenizer, data):
    """When the evaluation runs lm-eval's own task (source hf), calibration comes from its training split."""
    import datasets
    from lm_eval.api.task import ConfigurableTask
    from lm_eval.tasks._yaml_loader import load_yaml

    import harness.fewshot as fewshot_module
    from harness.lmeval import task_manager

    train = [{"goal": f"train goal {i}", "sol1": f"first {i}", "sol2": f"second {i}", "label": i % 2} for i in range(9)]
    valid = [{"goal": "validation goal", "sol1": "a", "sol2": "b", "label": 0}]

    def lm_eval_task(name, data_dir):
        assert name == "piqa"  # lm-eval's own task, not the offline copy
        cfg = load_yaml(task_manager(data.root).task_index[name].yaml_path, resolve_func=True)
        cfg["custom_dataset"] = lambda **_: datasets.DatasetDict(
            {"train": datasets.Dataset.from_list(train), "validation": datasets.Dataset.from_list(valid)})
        return ConfigurableTask(config=cfg)

    monkeypatch.setattr(fewshot_module, "_lm_eval_task", lm_eval_task)
    monkeypatch.setattr(fewshot_module, "_DOCUMENTS", {})
    made = build_examples(tokenizer, data.root, tasks=("piqa",), examples=4, source="hf")
    assert made.tasks["piqa"]["source"].startswith("hf: baber/piqa train split")
    for e in made.examples:
        text = tokenizer.decode(e.ids, skip_special_tokens=True)
        assert "train goal" in text and "validation goal" not in text
    assert set(TASKS) == {"piqa", "copa", "openbookqa", "winogrande", "rte", "hellaswag", "arc_easy"}


def test_compiled_templates_render_as_lm_eval_does_and_restore_it():
    """harness.lmeval.compiled_templates compiles each prompt template once, with lm-eval's own Environment: the
    same strings (its regex_replace filter, StrictUndefined), and lm-eval's function is back afterwards."""
    import jinja2
    from lm_eval import utils

    from harness.lmeval import compiled_templates

    original = utils.apply_template
    doc = {"q": "Is it  wet? ", "choices": ["yes", "no way"], "n": 3}
    templates = ["Question: {{q}}\nAnswer:", "{{choices[1] | regex_replace('way', 'thanks')}}", "{{n + 1}} {{q|trim}}"]
    expected = [original(t, doc) for t in templates]
    with compiled_templates():
        assert utils.apply_template is not original
        with compiled_templates():  # nested: still the cached one
            got = [utils.apply_template(t, doc) for t in templates * 3]
        with pytest.raises(jinja2.exceptions.UndefinedError):
            utils.apply_template("{{missing}}", doc)
    assert got == expected * 3 and expected[1] == "no thanks"
    assert utils.apply_template is original
