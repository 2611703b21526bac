"""Traces and fits at scale: the token sample, batched collection, batched predictor training, the fit
footprint refused before anything is built, and the mask selection."""
import json

import pytest
import torch

from harness import traces as traces_module
from harness.artefacts import ArtefactCache
from harness.engine import Allocation, lowest_k_mask
from harness.errors import HarnessError
from harness.footprint import GiB, Need, check
from harness.models import opt_config
from harness.runner import Session
from harness.spec import RunConfig
from harness.traces import Traces, budget_tokens, collect_scores, collect_traces, sample_positions
from methods import MethodSpec, get_method
from methods.predictors import Stacked, low_rank, mlp, seeded, train_classifiers
from tests.conftest import tiny_model

FAST = {"epochs": 3, "patience": 2, "hidden": 16, "batch_size": 32}


def make_session(tmp_path, data, model_dir, **overrides):
    values = dict(model=str(model_dir), weights="pretrained", calib_samples=6, calib_seqlen=16,
                  method_settings={"dejavu": FAST, "timewise": FAST, "shadow": FAST})
    values.update(overrides)
    session = Session(RunConfig(**values), data, ArtefactCache(tmp_path / "cache", log=lambda m: None),
                      log=lambda m: None)
    return session


def test_sample_keeps_every_token_when_the_budget_allows_and_pairs_otherwise():
    assert sample_positions(3, 8, 24).all() and sample_positions(3, 8, 10**6).all()
    keep = sample_positions(4, 16, 20, seed=0)
    assert int(keep.sum()) == 20
    assert [int(r.sum()) for r in keep] == [6, 6, 4, 4]  # 10 pairs over 4 examples, the remainder first
    for row in keep:  # whole pairs (2i, 2i+1)
        assert torch.equal(row[0::2], row[1::2])
    assert torch.equal(keep, sample_positions(4, 16, 20, seed=0))  # fixed for a model and budget
    with pytest.raises(HarnessError, match="calib_budget_gb"):
        sample_positions(4, 16, 1)


def test_budget_tokens_at_opt_13b_defaults_fit_the_budget():
    config = opt_config("opt-13b")
    tokens = budget_tokens(config, 32 * 512, 3.0)
    per_token = traces_module.trace_bytes_per_token(config) + traces_module.score_bytes_per_token(config)
    assert 0 < tokens < 32 * 512 and tokens * per_token <= 3.0 * GiB < (tokens + 1) * per_token
    assert budget_tokens(opt_config("opt-125m"), 32 * 512, 3.0) == 32 * 512  # small models keep everything


def test_previous_token_index_of_sampled_pairs():
    meta = {"tokens": 5}
    t = {"example": torch.tensor([0, 0, 0, 0, 1], dtype=torch.int32),
         "position": torch.tensor([0, 1, 6, 7, 4], dtype=torch.int32)}
    traces = Traces(type("A", (), {"tensors": t, "meta": meta})(), opt_config("opt-125m"))
    assert traces.previous().tolist() == [0, 0, -1, 2, -1]


@pytest.fixture(scope="module")
def model_dir(tmp_path_factory):
    path = tmp_path_factory.mktemp("tiny")
    tiny_model(num_hidden_layers=3).save_pretrained(path)
    return path


def test_batched_collection_gives_the_same_traces_and_predictors(tmp_path, data, model_dir, monkeypatch):
    results = []
    for batch_tokens in (16, 8192):  # one example per forward, then all of them in one
        monkeypatch.setattr(traces_module, "BATCH_TOKENS", batch_tokens)
        session = make_session(tmp_path / str(batch_tokens), data, model_dir)
        ctx = session.fit_context("dejavu")
        traces = collect_traces(ctx)
        art = get_method(MethodSpec("dejavu"), FAST).fit(ctx, Allocation(heads=0.5, neurons=0.5))
        results.append((traces.t, art.tensors))
    (t1, a1), (t2, a2) = results
    assert t1.keys() == t2.keys() and a1.keys() == a2.keys()
    for name in t1:
        assert torch.allclose(t1[name].float(), t2[name].float(), atol=2e-3), name
    for name in a1:
        assert torch.allclose(a1[name], a2[name], atol=1e-4), name


def test_sampled_traces_are_the_full_traces_of_the_sampled_tokens_and_train_the_same_predictors(tmp_path, data,
                                                                                                 model_dir, monkeypatch):
    full_session = make_session(tmp_path / "full", data, model_dir)
    full = collect_traces(full_session.fit_context("dejavu"))
    per_token = traces_module.trace_bytes_per_token(full_session.model.config) + \
        traces_module.score_bytes_per_token(full_session.model.config)
    budget = 40 * per_token / GiB  # 40 of the 96 tokens
    sampled_session = make_session(tmp_path / "sampled", data, model_dir, calib_budget_gb=budget)
    sampled = collect_traces(sampled_session.fit_context("dejavu"))
    assert sampled.tokens == 40 and sampled.sampling["calib_tokens_total"] == 96
    assert "pairs" in sampled.sampling["calib_sampling"]
    keep = sample_positions(6, 16, 40)
    index = (sampled.t["example"].long() * 16 + sampled.t["position"].long())
    assert torch.equal(index, keep.reshape(-1).nonzero().squeeze(1))
    for name in ("layer_input", "mlp_input", "attn_output0", "head_norm", "neuron_active"):
        assert torch.allclose(sampled.t[name].float(), full.t[name][index].float(), atol=2e-3), name
    # the same rows give the same predictors: train on the full traces cut to the sample
    subset = Traces(type("A", (), {"tensors": {k: v[index] for k, v in full.t.items()}, "meta": {}})(),
                    full_session.model.config)
    sampled_session.memo("traces", lambda: sampled)
    dejavu = get_method(MethodSpec("dejavu"), FAST)
    layers = [0, 1, 2]
    got, _ = dejavu._train(sampled_session.fit_context("dejavu"), "attn", layers, 2)
    cut_session = make_session(tmp_path / "cut", data, model_dir, calib_budget_gb=budget)
    cut_session.memo("traces", lambda: subset)
    want, _ = dejavu._train(cut_session.fit_context("dejavu"), "attn", layers, 2)
    for name in got:
        assert torch.allclose(got[name], want[name], atol=1e-4), name


def test_records_say_what_calibration_tokens_were_kept(tmp_path, data, model_dir):
    from harness.runner import execute_job
    from harness.spec import expand_jobs

    session = make_session(tmp_path, data, model_dir, methods=["timewise"], sparsity=["0.5"], tasks=["wikitext2"],
                           limit=1, seqlen=64, calib_budget_gb=20 * 1e-6)
    job = expand_jobs(session.config, {})[0]
    record = execute_job(session, job)["records"][0]
    assert record["calib_tokens"] < record["calib_tokens_total"] == 96
    assert record["calib_budget_gb"] == 20 * 1e-6 and "pairs" in record["calib_sampling"]
    assert record["timings"]["prepare_s"] >= 0 and "eval_s" in record["timings"]


def test_criterion_scores_keep_every_nonzero_score(tmp_path, data, model_dir):
    session = make_session(tmp_path, data, model_dir)
    from methods.criteria import score_example

    ctx = session.fit_context("shadow")
    stored = collect_scores(ctx, "fisher")
    ids = ctx.calibration_ids()
    fresh = torch.cat([score_example(session.model, row, ("fisher",))["fisher"]["neurons"] for row in ids])
    scaled = fresh * 1e-12  # far below fp16's smallest subnormal (6e-8)
    assert (fresh > 0).any()
    assert torch.equal(stored["neurons"].float() > 0, fresh > 0)
    assert torch.equal(scaled.to(stored["neurons"].dtype).float() > 0, scaled > 0)
    assert torch.allclose(stored["neurons"].float(), fresh, rtol=1e-2, atol=0)


def test_layers_trained_together_equal_layers_trained_alone():
    torch.manual_seed(0)
    x = torch.randn(3, 64, 8)
    y = torch.randn(3, 64, 5) > 0
    make = lambda layer: seeded(lambda: mlp(8, 12, 5), layer)  # noqa: E731
    together = [make(l) for l in range(3)]
    metrics = train_classifiers(together, x[:, :48], y[:, :48], x[:, 48:], y[:, 48:], k=2, epochs=4, patience=2,
                                batch_size=16, seed=3)
    for layer in range(3):
        alone = [make(layer)]
        single = train_classifiers(alone, x[layer:layer + 1, :48], y[layer:layer + 1, :48], x[layer:layer + 1, 48:],
                                   y[layer:layer + 1, 48:], k=2, epochs=4, patience=2, batch_size=16, seed=3)
        assert single[0]["epochs"] == metrics[layer]["epochs"]
        for a, b in zip(alone[0].state_dict().values(), together[layer].state_dict().values()):
            assert torch.allclose(a, b, atol=1e-5)


def test_stacked_forward_equals_each_predictor():
    predictors = [seeded(lambda: low_rank(6, 4, 3), l) for l in range(2)]
    for p in predictors:
        p.mean.normal_(), p.std.uniform_(0.5, 2)
    x = torch.randn(2, 5, 6)
    out = Stacked(predictors)(x)
    for l, p in enumerate(predictors):
        assert torch.allclose(out[l], p(x[l]), atol=1e-5)


def test_footprint_over_the_machine_is_refused_naming_the_setting():
    config = opt_config("opt-13b")
    run = RunConfig(model="opt-13b")
    needs = {("traces",): Need("traces", host=2 * GiB, disk=2 * GiB, gpu=GiB)}
    kwargs = dict(model_config=config, run_config=run, device="cuda", dtype="float16", cache_root="/tmp")
    assert check(needs, free_host=64 * GiB, free_disk=64 * GiB, gpu_total=140 * GiB, **kwargs)["disk_gb"] == 2
    with pytest.raises(HarnessError, match="host memory.*calib_budget_gb"):
        check(needs, free_host=GiB, free_disk=64 * GiB, gpu_total=140 * GiB, **kwargs)
    with pytest.raises(HarnessError, match="artefact cache.*--cache-dir"):
        check(needs, free_host=64 * GiB, free_disk=GiB, gpu_total=140 * GiB, **kwargs)
    with pytest.raises(HarnessError, match="GPU memory.*calib_budget_gb"):  # 24 GiB of fp16 weights + 1
        check(needs, free_host=64 * GiB, free_disk=64 * GiB, gpu_total=20 * GiB, **kwargs)


def test_run_whose_fits_exceed_the_machine_exits_2_before_building_anything(tmp_path, monkeypatch):
    from typer.testing import CliRunner

    import harness.footprint as footprint
    import harness.runner as runner
    from harness.cli import app

    monkeypatch.setattr(footprint, "_free_host", lambda: 4 * GiB)
    monkeypatch.setattr(runner, "load_model", lambda *a, **k: pytest.fail("the model was built"))
    out, cache = tmp_path / "run", tmp_path / "cache"
    result = CliRunner().invoke(app, ["run", "--suite", "perplexity", "--model", "opt-13b", "--methods", "dejavu,shadow",
                                      "--sparsity", "0.5", "--device", "cpu", "--calib-budget-gb", "8", "--out", str(out),
                                      "--cache-dir", str(cache)])
    assert result.exit_code == 2, result.output
    assert "calib_budget_gb" in result.output and "host memory" in result.output
    assert not out.exists() and not cache.exists()


def test_lowest_k_mask_skips_exactly_k_and_keeps_the_lowest_tied_indices():
    torch.manual_seed(0)
    scores = torch.randn(2, 3, 50)
    for skip in (0, 1, 17, 49, 50):
        keep = lowest_k_mask(scores, skip)
        assert ((~keep).sum(-1) == skip).all()
        if 0 < skip < 50:
            reference = torch.ones_like(keep).scatter_(-1, scores.topk(skip, -1, largest=False).indices, False)
            assert torch.equal(keep, reference)
    tied = torch.tensor([[3.0, 0.0, 0.0, 0.0, 0.0, 5.0]])
    assert lowest_k_mask(tied, 2).tolist() == [[True, True, True, False, False, True]]
    assert lowest_k_mask(torch.zeros(1, 6, dtype=torch.float16), 4).tolist() == [[True, True, False, False, False, False]]
    assert json.dumps(lowest_k_mask(tied, 6).tolist()) == "[[false, false, false, false, false, false]]"


@pytest.mark.parametrize("dtype,search", [(torch.float16, "bisect"), (torch.bfloat16, "bisect"),
                                          (torch.float16, "histogram"), (torch.bfloat16, "radix4")])
def test_triton_selection_equals_lowest_k_mask_with_ties_and_signed_zeros(dtype, search):
    from functools import partial

    from harness.selection import lowest_k_keep

    lowest_k_keep = partial(lowest_k_keep, search=search)

    torch.manual_seed(1)
    for shape, skip in [((3, 37), 5), ((2, 100), 99), ((4, 64), 1), ((2, 3, 300), 150)]:
        scores = torch.randn(shape).to(dtype)
        scores[..., ::7] = 0.5  # ties at the threshold
        scores[..., 3], scores[..., 4] = -0.0, 0.0
        assert torch.equal(lowest_k_keep(scores, skip), lowest_k_mask(scores.float(), skip)), (shape, skip)
    tied = torch.full((2, 40), 1.5, dtype=dtype)  # one value: the skipped units are the highest indices
    assert torch.equal(lowest_k_keep(tied, 25), torch.arange(40).expand(2, 40) < 15)
    wide = torch.randn(3, 2, 90).to(dtype)  # rows that are a strided view (e.g. one layer's slice of a wider output)
    wide[0, 0, 20:30] = float("inf")
    wide[1, 1, 40:50] = float("-inf")
    view = wide[..., 17:77]
    assert view.reshape(-1, 60).stride(0) == 90
    for skip in (1, 30, 59):
        assert torch.equal(lowest_k_keep(view, skip), lowest_k_mask(view.float(), skip)), skip
