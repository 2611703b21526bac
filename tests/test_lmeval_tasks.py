"""The offline lm-eval task files (suites/lm_eval_tasks) build exactly the requests of lm-eval's own task
definitions: lm-eval's installed YAML (templates, doc_to_text/doc_to_target/doc_to_choice, process_docs) is
applied to the local rows converted to the original data set's schema, and compared with what our offline
tasks produce — contexts, continuations and targets, byte for byte."""
import os

import pytest

os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("HF_DATASETS_OFFLINE", "1")

pytest.importorskip("lm_eval")

from harness.data import DataDir  # noqa: E402
from harness.lmeval import ZERO_SHOT, task_manager  # noqa: E402
from harness.lmeval_data import (CONVERTERS, HOLDOUT, calibration_rows, evaluation_rows, held_out, rows,  # noqa: E402
                                 split_hellaswag_ctx)

# docs compared per task (None = all); the big ones use a prefix to keep the test fast
LIMITS = {"piqa": None, "copa": None, "openbookqa": None, "winogrande": None, "rte": None,
          "arc_easy": 600, "hellaswag": 400, "lambada_openai": 1000, "wikitext_lmeval": None}


@pytest.fixture(scope="module")
def data_root():
    return DataDir.resolve().root


@pytest.fixture(scope="module")
def manager(data_root):
    return task_manager(data_root)


def original_task(manager, name: str, converted: list[dict]):
    """lm-eval's own task (its installed YAML and functions), its data set replaced by `converted`."""
    import datasets
    from lm_eval.api.task import ConfigurableTask
    from lm_eval.tasks._yaml_loader import load_yaml

    entry = manager.task_index[name]
    assert "lm_eval/tasks" in str(entry.yaml_path), entry.yaml_path  # the installed definition, not ours
    cfg = load_yaml(entry.yaml_path, resolve_func=True)
    for key in ("tag", "group", "task_list"):
        cfg.pop(key, None)
    splits = {cfg.get(k) for k in ("training_split", "validation_split", "test_split", "fewshot_split")} - {None}

    def custom_dataset(**_):
        dataset = datasets.Dataset.from_list(converted)
        return datasets.DatasetDict({split: dataset for split in splits})

    cfg["custom_dataset"] = custom_dataset
    return ConfigurableTask(config=cfg)


def requests_of(task, limit):
    task.build_all_requests(limit=limit, rank=0, world_size=1)
    out = [(inst.doc_id, inst.idx, inst.request_type, inst.arguments) for inst in task.instances]
    docs = list(task.eval_docs)[: limit or None]
    targets = [task.doc_to_target(doc) for doc in docs]
    return out, targets


@pytest.mark.parametrize("name", sorted(n for n, t in ZERO_SHOT.items() if t.local_task))
def test_offline_task_builds_lm_evals_requests(name, manager, data_root):
    """Our offline task, loaded by the local-only manager (the harness's, which does not index lm-eval's own
    tasks), against lm-eval's own task from the full index."""
    spec = ZERO_SHOT[name]
    converted = evaluation_rows(spec.converter, data_root)
    local = task_manager(data_root, local_only=True)
    assert spec.local_task in local.task_index and spec.lm_eval_task not in local.task_index
    ours = local.load([spec.local_task])["tasks"][spec.local_task]
    theirs = original_task(manager, spec.lm_eval_task, converted)
    assert ours.OUTPUT_TYPE == theirs.OUTPUT_TYPE
    limit = LIMITS[name]
    our_requests, our_targets = requests_of(ours, limit)
    their_requests, their_targets = requests_of(theirs, limit)
    assert len(our_requests) == len(their_requests) > 0
    for mine, other in zip(our_requests, their_requests):
        assert mine == other
    assert our_targets == their_targets
    assert len(list(ours.eval_docs)) == len(converted)


def test_calibration_documents_are_never_evaluated(data_root):
    """Offline, the documents lent to calibration are left out of the evaluated split, deterministically."""
    for name in CONVERTERS:
        everything = rows(name, data_root)
        evaluated = evaluation_rows(name, data_root)
        lent = calibration_rows(name, data_root)
        if name in HOLDOUT:
            assert len(lent[0]) == HOLDOUT[name] and len(evaluated) == len(everything) - HOLDOUT[name]
            keys = {repr(sorted(r.items())) for r in evaluated}
            assert not any(repr(sorted(r.items())) in keys for r in lent[0])
            assert held_out(name, list(reversed(everything))) == sorted(len(everything) - 1 - i
                                                                        for i in held_out(name, everything))
        else:
            assert evaluated == everything
    docs, where = calibration_rows("openbookqa", data_root)
    assert len(docs) == 500 and "dev" in where  # a split of its own
    test_ids = {r["id"] for r in rows("openbookqa", data_root)}
    assert not test_ids & {r["id"] for r in docs}
    assert calibration_rows("copa", data_root) is None and calibration_rows("rte", data_root) is None


def test_every_converter_has_a_task():
    assert {t.converter for t in ZERO_SHOT.values() if t.local_task} == set(CONVERTERS)
    hub_only = {n for n, t in ZERO_SHOT.items() if t.local_task is None}
    assert hub_only == {"cb", "c4_lmeval"}  # lm-eval's own tasks on data the data directory has no copy of


def test_local_copies_have_the_published_sizes(data_root):
    sizes = {"piqa": 1838, "copa": 100, "winogrande": 1267, "rte": 277, "lambada_openai": 5153,
             "openbookqa": 500, "arc_easy": 2376, "hellaswag": 10042, "wikitext": 62}
    assert {name: len(rows(name, data_root)) for name in sizes} == sizes


def test_hellaswag_ctx_split_matches_the_dataset_card_example():
    # Rowan/hellaswag val item 24: ctx_a "A man is sitting on a roof.", ctx_b "he"
    assert split_hellaswag_ctx("A man is sitting on a roof. he") == ("A man is sitting on a roof.", "he")
    assert split_hellaswag_ctx("How to clean windows. Use a cloth.") == ("How to clean windows. Use a cloth.", "")
