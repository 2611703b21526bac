"""The training-free methods (teal, cats, wina) on both families: exact achieved counts on planted inputs,
thresholds from histograms, TEAL's greedy allocation, and what their records say."""
import pytest
import torch

from harness.artefacts import ArtefactCache
from harness.engine import Allocation, MaskedEngine
from harness.families import family_of
from harness.runner import Session
from harness.spec import RunConfig
from methods import MethodSpec, get_method
from methods.teal import BINS, bin_index, greedy_allocation, magnitude_histograms, site_weights, threshold
from tests.test_families import FAMILIES, ids, layers_of, tiny

PLANTED = torch.cat([-torch.arange(16, 0, -1.0), torch.arange(1, 17.0)])  # magnitudes 1..16, each twice, mean 0


def planted(family, **overrides):
    """A tiny model whose layer-0 attention input is known: every token embeds as a permutation of PLANTED (OPT:
    position embeddings zeroed), so after the (unit-weight) norm each token's q/k/v inputs hold the magnitudes
    1..16 (twice each) over the same scale."""
    model = tiny(family, **overrides)
    generator = torch.Generator().manual_seed(0)
    with torch.no_grad():
        embed = model.get_input_embeddings().weight
        for row in range(embed.shape[0]):
            embed[row] = PLANTED[torch.randperm(32, generator=generator)]
        if family == "opt":
            model.model.decoder.embed_positions.weight.zero_()
    return model


def session_for(model, tmp_path, data, **settings):
    path = tmp_path / "model"
    model.save_pretrained(path)
    config = RunConfig(model=str(path), weights="pretrained", calib_samples=2, calib_seqlen=32, **settings)
    return Session(config, data, ArtefactCache(tmp_path / "cache", log=lambda m: None))


def run(session, label, allocation, x):
    method = get_method(MethodSpec.parse(label), session.config.method_settings.get(label.split(":")[0], {}))
    ctx = session.fit_context(method.name)
    artefact = method.fit(ctx, allocation)
    engine = MaskedEngine(session.model, method.policy(ctx, allocation, artefact), allocation)
    with engine.applied():
        session.model(input_ids=x)
    return engine, artefact


# -- histograms and thresholds -----------------------------------------------------------------------------------
def test_thresholds_split_a_planted_histogram_exactly():
    values = torch.arange(1, 101, dtype=torch.float64) / 100  # 0.01 … 1.00, 3% or more apart
    counts = torch.bincount(bin_index(values), minlength=BINS + 2)
    for k in (1, 30, 50, 99):
        t = threshold(counts, k / 100)
        assert int((values <= t).sum()) == k
    assert threshold(counts, 0.0) == -1.0 and threshold(counts, 1.0) == float("inf")
    zeros = torch.bincount(bin_index(torch.tensor([0.0] * 40 + [1.0] * 60)), minlength=BINS + 2)
    assert threshold(zeros, 0.25) == 0.0  # inside the zeros: skip exactly the zeros


@pytest.mark.parametrize("family", FAMILIES)
def test_histograms_count_every_entry_of_every_site(family):
    model = tiny(family)
    fam = family_of(model)
    sites = list(fam.linear_sites)
    x = ids(batch=3, seq=8)
    counts = magnitude_histograms(model, x, sites)
    for l, layer in enumerate(layers_of(model)):
        for s, site in enumerate(sites):
            assert int(counts[l, s].sum()) == 24 * fam.linear(layer, site).weight.shape[1]


# -- teal ----------------------------------------------------------------------------------------------------------
@pytest.mark.parametrize("family", FAMILIES)
def test_teal_skips_exactly_the_planted_fraction_at_layer_zero(family, tmp_path, data):
    """teal:uniform at i0.25 through fit (histograms of the calibration text) → policy → engine: each token's layer-0
    q/k/v inputs are the planted magnitudes, so exactly 8 of 32 (magnitudes 1..4) are skipped at every token."""
    session = session_for(planted(family), tmp_path, data)
    x = ids(batch=2, seq=10)
    engine, artefact = run(session, "teal:uniform", Allocation(inputs=0.25), x)
    for site in ("q", "k", "v"):
        keep = engine.state.keep[(site, 0)]
        assert ((~keep).sum(-1) == 8).all(), site
        assert int(engine.input_meter.skipped[(0, site)]) == 8 * 20
    achieved = engine.achieved()
    per_token = achieved["achieved_per_token"]["inputs"]
    assert per_token["tokens"] == 20 and per_token["min"] <= achieved["achieved_inputs"] <= per_token["max"]
    assert achieved["achieved_inputs"] == pytest.approx(0.25, abs=0.06)  # later sites: the calibration's quantile
    assert (artefact.tensors["sparsity"] == 0.25).all()


@pytest.mark.parametrize("family", FAMILIES)
def test_teal_greedy_reaches_the_weighted_target_in_every_layer(family):
    model = tiny(family)
    fam = family_of(model)
    x = ids(batch=2, seq=16)
    sites = list(fam.linear_sites)
    counts = magnitude_histograms(model, x, sites)
    sparsity = greedy_allocation(model, x, counts, 0.5, 0.5, 0.25)
    for l, layer in enumerate(layers_of(model)):
        weights = site_weights(fam, layer)
        reached = sum(float(sparsity[l, i]) * weights[s] for i, s in enumerate(sites)) / sum(weights.values())
        assert 0.5 <= reached < 0.5 + 0.5 / sum(weights.values()) + 1e-9
        assert (sparsity[l] >= 0).all() and (sparsity[l] <= 1).all()
        assert len({round(float(v), 6) for v in sparsity[l]}) > 1  # not uniform: the sites differ in cost
    if family == "llama":  # GQA: k and v have half q's parameters, so their steps are twice as large
        assert site_weights(fam, layers_of(model)[0])["k"] == 0.5


# -- cats ----------------------------------------------------------------------------------------------------------
def planted_gates(family):
    """Layer 0's gate activation is the same at every token: a zero gate weight and a planted bias (OPT: fc1's bias,
    16 of 64 negative, so ReLU zeroes 16 neurons; Llama, built with MLP biases: 64 distinct positive values)."""
    model = tiny(family, **({} if family == "opt" else {"mlp_bias": True}))
    layer = layers_of(model)[0]
    gate = layer.fc1 if family == "opt" else layer.mlp.gate_proj
    bias = torch.linspace(0.1, 3.0, 64)[torch.randperm(64, generator=torch.Generator().manual_seed(1))]
    if family == "opt":
        bias[:16] = -bias[:16]
    with torch.no_grad():
        gate.weight.zero_()
        gate.bias.copy_(bias)
    return model, bias


@pytest.mark.parametrize("family", FAMILIES)
def test_cats_skips_exactly_the_smallest_gate_activations(family, tmp_path, data):
    model, bias = planted_gates(family)
    session = session_for(model, tmp_path, data)
    x = ids(batch=2, seq=9)
    engine, _ = run(session, "cats", Allocation(neurons=0.25 if family == "llama" else 0.5), x)
    keep = engine.state.keep[("neurons", 0)]
    magnitude = bias.clamp(min=0) if family == "opt" else torch.nn.functional.silu(bias)
    expected = magnitude > magnitude.sort().values[(16 if family == "llama" else 32) - 1]
    assert (keep == expected).all()
    skipped, tokens = engine.meter.counts("neurons")
    assert skipped[0] == (16 if family == "llama" else 32) * 18 and tokens[0] == 18
    per_token = engine.achieved()["achieved_per_token"]["neurons"]
    assert per_token["tokens"] == 18 and per_token["min"] <= per_token["mean"] <= per_token["max"]


def test_cats_on_opt_below_the_relu_sparsity_skips_exactly_the_zeros(tmp_path, data):
    """At a target under ReLU's own sparsity (16 of 64 zero) the threshold is 0: CATS skips the 16 zeros, more than
    the 10% asked for, and says so in the achieved fraction."""
    model, bias = planted_gates("opt")
    session = session_for(model, tmp_path, data)
    engine, artefact = run(session, "cats", Allocation(neurons=0.1), ids(batch=1, seq=6))
    assert float(artefact.tensors["thresholds"][0]) == 0.0
    keep = engine.state.keep[("neurons", 0)]
    assert (keep == (bias > 0)).all()
    assert engine.meter.per_layer("neurons")[0] == pytest.approx(0.25)


# -- wina ----------------------------------------------------------------------------------------------------------
@pytest.mark.parametrize("family", FAMILIES)
def test_wina_skips_the_exact_count_everywhere_and_the_planted_dead_columns(family, tmp_path, data):
    model = tiny(family)
    with torch.no_grad():
        family_of(model).linear(layers_of(model)[0], "q").weight[:, :8] = 0  # columns 0..7: norm 0, score 0
    session = session_for(model, tmp_path, data)
    x = ids(batch=2, seq=7)
    engine, artefact = run(session, "wina", Allocation(inputs=0.25), x)
    assert artefact is None  # nothing calibrated
    fam = family_of(model)
    for l in range(2):
        for site in fam.linear_sites:
            keep = engine.state.keep[(site, l)]
            assert ((~keep).sum(-1) == keep.shape[-1] // 4).all(), (l, site)
    assert (~engine.state.keep[("q", 0)][..., :8]).all() and engine.state.keep[("q", 0)][..., 8:].all()
    achieved = engine.achieved()
    assert achieved["achieved_inputs"] == pytest.approx(0.25, abs=1e-12)
    assert achieved["achieved_per_token"]["inputs"]["std"] == pytest.approx(0.0, abs=1e-12)


def test_wina_scores_are_magnitude_times_column_norm():
    from methods.wina import WinaPolicy

    model = tiny("llama")
    policy = WinaPolicy(model, 0.5)
    weight = family_of(model).linear(layers_of(model)[1], "down").weight
    x = torch.randn(1, 3, 64, generator=torch.Generator().manual_seed(0))
    keep = policy.input_keep(1, "down", None, x)
    score = x.abs() * weight.norm(dim=0)
    assert (keep == (score > score.median(dim=-1, keepdim=True).values)).all()


# -- records -----------------------------------------------------------------------------------------------------
def test_a_teal_job_records_its_family_and_the_achieved_input_sparsity_per_token(tmp_path, data):
    from harness.runner import execute_job
    from harness.spec import expand_jobs
    from harness.tables import markdown

    model = tiny("llama")
    path = tmp_path / "model"
    model.save_pretrained(path)
    config = RunConfig(model=str(path), weights="pretrained", calib_samples=2, calib_seqlen=32, methods=["teal"],
                       sparsity=["0.4"], tasks=["wikitext2"], seqlen=32, limit=1)
    session = Session(config, data, ArtefactCache(tmp_path / "cache", log=lambda m: None))
    (job,) = expand_jobs(config, {"test": 1})
    assert job.inputs == 0.4 and job.heads == job.neurons == 0.0
    result = execute_job(session, job)
    record = result["records"][0]
    assert record["model_family"] == "llama" and record["model_heads"] == 4 and record["model_kv_heads"] == 2
    assert record["sparsity_inputs"] == 0.4 and record["achieved_inputs"] == pytest.approx(0.4, abs=0.1)
    assert set(record["achieved_inputs_per_site"]) == {"q", "k", "v", "o", "gate", "up", "down"}
    per_token = record["achieved_per_token"]["inputs"]
    assert per_token["tokens"] == 32 and per_token["std"] > 0  # thresholds: the fraction varies per token
    assert "i 0.400→" in markdown(result["records"])
