"""The Llama-family sparse decode engine (kernels/decode_llama.py) gives the masked engine's numbers.

A tiny Llama with grouped-query attention (4 query heads, 2 K/V heads), float32 on a CPU, both backends (torch
references; the Triton kernels under TRITON_INTERPRET=1): for the same masks, every decode step's logits equal those
of harness.engine.MaskedEngine on the Hugging Face model — dense, a per-token random schedule, static masks (the
static method's source), the per-token predictors of dejavu and shadow (kernels/sources.py, family-agnostic), and
TEAL's input thresholds (methods/teal.py's decode_source, the engine's input-sparse path, whose achieved sparsity per
token is the masked engine's). Greedy generation equals Hugging Face's `generate`; a later token never changes an
earlier step's logits; Qwen2's q/k/v biases, Mistral and Llama-3's "llama3" rope scaling are covered too.
"""
import pytest
import torch

from harness.engine import Allocation
from kernels.decode import DenseMasks, StaticMasks
from kernels.decode_llama import InputThresholdMasks, LlamaSparseDecoder, sparse_decoder
from kernels.equivalence import (ScheduleSource, masked_engine_logits, random_schedule, relative_errors,
                                 sparse_engine_logits)
from tests.method_policies import PromptDense, make_policy, masked_logits

pytestmark = pytest.mark.filterwarnings("ignore::DeprecationWarning")

L, D, H, KV, F_DIM, VOCAB = 3, 64, 4, 2, 128, 512
PROMPT, STEPS = 5, 5


def _model(name="llama-tiny", seed=3, **overrides):
    """A built-in tiny config of harness.families.llama, resized, with random weights."""
    from transformers import AutoConfig, AutoModelForCausalLM

    from harness.families.llama import COMMON, LLAMA_SIZES, Llama

    values = dict(LLAMA_SIZES[name])
    model_type = values.pop("model_type")
    values.pop("hub")
    theta = values.pop("rope_theta")
    values.update(vocab_size=VOCAB, hidden_size=D, num_attention_heads=H, num_key_value_heads=KV,
                  intermediate_size=F_DIM, num_hidden_layers=L, head_dim=D // H,
                  rope_parameters={"rope_type": "default", "rope_theta": theta})
    values.update(overrides)
    config = Llama.normalise_config(AutoConfig.for_model(model_type, **{**COMMON, **values}))
    torch.manual_seed(seed)
    model = AutoModelForCausalLM.from_config(config, attn_implementation="eager").eval()
    with torch.no_grad():  # visible structure: larger weights than HF's 0.02, non-trivial norms and biases
        for param in model.parameters():
            if param.dim() == 2:
                param.normal_(0, 0.15)
            else:
                param.add_(torch.randn_like(param) * 0.1)
    model.requires_grad_(False)
    return model


@pytest.fixture(scope="module")
def setup():
    model = _model()
    assert model.config.num_key_value_heads < model.config.num_attention_heads  # GQA
    g = torch.Generator().manual_seed(7)
    return model, torch.randint(0, VOCAB, (1, PROMPT), generator=g), torch.randint(0, VOCAB, (STEPS,), generator=g)


def _triton(backend):
    if backend == "triton":
        pytest.importorskip("triton")


# ------------------------------------------------------------------------------------------------------------
# dense: Hugging Face's numbers
# ------------------------------------------------------------------------------------------------------------
@pytest.mark.parametrize("backend", ["torch", "triton"])
def test_dense_greedy_equals_hf_generate(setup, backend):
    _triton(backend)
    model, prompt, _ = setup
    engine = LlamaSparseDecoder(model, DenseMasks(L), max_len=12, backend=backend)
    tokens = engine.generate(prompt, 3)
    with torch.no_grad():
        hf = model.generate(prompt, max_new_tokens=3, do_sample=False, min_new_tokens=3)
        full = model(torch.cat([prompt, tokens[:, :2]], 1)).logits[:, -1]
    assert torch.equal(tokens, hf[:, PROMPT:])
    engine.prefill(prompt)
    engine.step(tokens[:, 0])
    got = engine.step(tokens[:, 1])
    assert ((got - full).norm() / full.norm()).item() < 1e-5
    assert engine.weight_bytes() > 0


@pytest.mark.parametrize("name, overrides", [
    ("qwen2-tiny", {}),  # q/k/v biases
    ("mistral-tiny", {}),  # sliding window 16: max_len stays inside it
    ("llama-tiny", {"rope_parameters": {"rope_type": "llama3", "rope_theta": 500000.0, "factor": 8.0,
                                        "low_freq_factor": 1.0, "high_freq_factor": 4.0,
                                        "original_max_position_embeddings": 8}}),
])
def test_family_variants_match_the_model(name, overrides):
    model = _model(name, seed=5, **overrides)
    if name == "qwen2-tiny":
        assert model.model.layers[0].self_attn.q_proj.bias is not None
    prompt = torch.randint(0, VOCAB, (2, 4), generator=torch.Generator().manual_seed(2))
    engine = LlamaSparseDecoder(model, DenseMasks(L), max_len=12, batch=2, backend="torch")
    tokens = engine.generate(prompt, 5)
    with torch.no_grad():
        full = model(torch.cat([prompt, tokens[:, :4]], 1)).logits[:, 4:]
    engine.prefill(prompt)
    steps = [engine.step(tokens[:, i]).clone() for i in range(4)]
    for i, got in enumerate(steps):
        want = full[:, i]
        assert ((got - want).norm() / want.norm()).item() < 1e-5, (name, i)
    with pytest.raises(ValueError, match="sliding window") if name == "mistral-tiny" else _nothing():
        LlamaSparseDecoder(model, DenseMasks(L), max_len=40, backend="torch")


class _nothing:
    def __enter__(self):
        return self

    def __exit__(self, *exc):
        return False


# ------------------------------------------------------------------------------------------------------------
# masked engine = sparse engine, same masks
# ------------------------------------------------------------------------------------------------------------
schedule = random_schedule(H, F_DIM, 2, 40)


@pytest.mark.parametrize("backend", ["torch", "triton"])
def test_per_token_schedule_matches_masked_engine(setup, backend):
    _triton(backend)
    model, prompt, tokens = setup
    expected = masked_engine_logits(model, schedule, prompt, tokens, 2, 40)
    engine = LlamaSparseDecoder(model, ScheduleSource(schedule), max_len=16, backend=backend, heads_kept=2,
                                neurons_kept=40)
    errors, agree = relative_errors(sparse_engine_logits(engine, prompt, tokens), expected)
    assert max(errors) < 1e-5 and all(agree), errors
    dense = LlamaSparseDecoder(model, DenseMasks(L), max_len=16, backend="torch", layers=engine.layers)
    assert engine.weight_bytes() < dense.weight_bytes()


@pytest.mark.parametrize("label, backend", [("static", "torch"), ("dejavu", "torch"), ("shadow", "torch"),
                                            ("dejavu:shadowllm", "torch"), ("timewise:current", "torch"),
                                            ("timewise:time", "torch"), ("random", "torch"), ("static", "triton"),
                                            ("dejavu", "triton"),
                                            ("shadow", "triton")])
def test_method_sources_match_masked_engine(setup, label, backend):
    """kernels.sources' sources (written for OPT) are family-agnostic: they read the engine's sizes only."""
    from harness.decoding import source_for

    _triton(backend)
    model, prompt, tokens = setup
    policy, allocation = make_policy(label, model)
    expected = masked_logits(model, PromptDense(policy), allocation, prompt, tokens)
    policy, allocation = make_policy(label, model)
    source = source_for(label, policy, allocation, model)
    engine = sparse_decoder(model, source, max_len=16, kv="recompute", backend=backend)
    assert isinstance(engine, LlamaSparseDecoder)
    errors, agree = relative_errors(sparse_engine_logits(engine, prompt, tokens), expected)
    assert max(errors) < 1e-5 and all(agree), (label, errors)
    if label == "static":
        assert isinstance(source, StaticMasks) and engine.heads_kept == [2] * L
    if label == "shadow":
        assert engine.heads_kept == [H, 2, 2] and engine.neurons_kept[0] == F_DIM


# ------------------------------------------------------------------------------------------------------------
# TEAL: input thresholds, the input-sparse path
# ------------------------------------------------------------------------------------------------------------
def teal_policy(model, sparsity=0.5, dense_sites=("v",)):
    """Uniform TEAL thresholds from |x| histograms of random calibration ids (one site left dense: t = −1)."""
    from harness.families import family_of
    from methods.teal import InputThresholdPolicy, magnitude_histograms, threshold

    sites = list(family_of(model).linear_sites)
    ids = torch.randint(0, VOCAB, (4, 16), generator=torch.Generator().manual_seed(9))
    counts = magnitude_histograms(model, ids, sites)
    t = torch.tensor([[threshold(counts[l, s], 0.0 if site in dense_sites else sparsity)
                       for s, site in enumerate(sites)] for l in range(L)], dtype=torch.float64)
    return InputThresholdPolicy(t, sites), Allocation(inputs=sparsity)


@pytest.fixture(scope="module")
def teal_reference(setup):
    model, prompt, tokens = setup
    policy, allocation = teal_policy(model)
    engines = []
    expected = masked_logits(model, policy, allocation, prompt, tokens, engines)  # the prompt thresholded too
    return policy, allocation, expected, engines[0].achieved()


@pytest.mark.parametrize("backend", ["torch", "triton"])
def test_teal_source_matches_masked_engine(setup, teal_reference, backend):
    from methods.teal import decode_source

    _triton(backend)
    model, prompt, tokens = setup
    policy, allocation, expected, achieved = teal_reference
    source = decode_source(policy, allocation, model)
    assert isinstance(source, InputThresholdMasks)
    engine = LlamaSparseDecoder(model, source, max_len=16, backend=backend)
    assert engine.input_sparse and engine.layers[0].wqkv_t is not None and engine.layers[0].wqkv is None
    errors, agree = relative_errors(sparse_engine_logits(engine, prompt, tokens), expected)
    assert max(errors) < 1e-5 and all(agree), errors
    # the achieved sparsity per token, counted in the kernels, is the masked engine's (prompt and decode tokens)
    mine = engine.input_sparsity(decode_only=False)
    theirs = achieved["achieved_per_token"]["inputs"]
    assert mine["tokens"] == theirs["tokens"] == PROMPT + STEPS
    assert mine["per_token"]["mean"] == pytest.approx(theirs["mean"], abs=2e-3)
    assert mine["achieved_inputs"] == pytest.approx(achieved["achieved_inputs"], abs=2e-3)
    assert mine["achieved_inputs_per_site"]["v"] == 0.0 and 0.2 < mine["achieved_inputs_per_site"]["q"] < 0.8
    decoded = engine.input_sparsity()
    assert decoded["tokens"] == STEPS and 0.2 < decoded["achieved_inputs"] < 0.7
    dense = LlamaSparseDecoder(model, DenseMasks(L), max_len=16, backend="torch")
    assert engine.weight_bytes() < dense.weight_bytes()


def test_teal_source_dense_cases(setup):
    from methods.teal import decode_source

    model = setup[0]
    policy, _ = teal_policy(model)
    assert decode_source(policy, Allocation(), model) is None  # nothing sparsified: the dense engine
    source = decode_source(policy, Allocation(inputs=0.5, dense_layers=(1,)), model)
    assert (source.host_thresholds[1] == -1).all() and (source.host_thresholds[0, :3] != -1).any()


# ------------------------------------------------------------------------------------------------------------
# causality
# ------------------------------------------------------------------------------------------------------------
@pytest.mark.parametrize("kind, backend", [("dejavu", "torch"), ("teal", "torch"), ("dejavu", "triton")])
def test_a_later_token_does_not_change_earlier_logits(setup, kind, backend):
    """Two continuations that share their first two tokens, decoded one after the other by the same engine (the
    second run finds the first run's later K/V still in the cache): the shared steps' logits are equal."""
    from harness.decoding import source_for
    from methods.teal import decode_source

    _triton(backend)
    model, prompt, tokens = setup
    if kind == "teal":
        policy, allocation = teal_policy(model)
        source = decode_source(policy, allocation, model)
    else:
        policy, allocation = make_policy(kind, model)
        source = source_for(kind, policy, allocation, model)
    engine = LlamaSparseDecoder(model, source, max_len=16, backend=backend)
    first = sparse_engine_logits(engine, prompt, tokens)
    other = tokens.clone()
    other[2:] = (other[2:] + 17) % VOCAB
    second = sparse_engine_logits(engine, prompt, other)
    for a, b in zip(first[:3], second[:3]):  # prompt, tokens 0 and 1: identical inputs so far
        assert torch.equal(a, b)
    assert not torch.equal(first[-1], second[-1])


# ------------------------------------------------------------------------------------------------------------
# the new kernels against their references
# ------------------------------------------------------------------------------------------------------------
def test_input_sparse_kernel_batch_and_counts():
    pytest.importorskip("triton")
    from kernels import gemv_llama, reference_llama

    g = torch.Generator().manual_seed(1)
    B, R, segments = 3, 40, (0, 24, 40, 72)
    x, wt = torch.randn(B, R, generator=g), torch.randn(R, 72, generator=g)
    t = torch.tensor([0.5, -1.0, 1.2])
    pos = torch.tensor([2])
    out = []
    for mod in (gemv_llama, reference_llama):
        acc, counts = torch.zeros(B, 72), torch.zeros(4, B, 3, dtype=torch.int32)
        mod.input_sparse_add(x, wt, t, acc, segments=segments, counts=counts, pos=pos, bias=torch.ones(72))
        out.append((acc, counts))
    assert torch.allclose(out[0][0], out[1][0], atol=1e-5) and torch.equal(out[0][1], out[1][1])
    assert out[0][1][2, :, 1].tolist() == [R] * B and out[0][1][[0, 1, 3]].sum() == 0
    gu = torch.randn(B, 2 * R, generator=g)  # SwiGLU of gate/up accumulators as the input (the down projection)
    res = []
    for mod in (gemv_llama, reference_llama):
        acc = torch.zeros(B, 24)
        mod.input_sparse_add(gu, wt[:, :24].contiguous(), t[:1], acc, segments=(0, 24), swiglu=(torch.ones(2 * R),))
        res.append(acc)
    assert torch.allclose(res[0], res[1], atol=1e-5)


def test_latency_suite_runs_llama_models_on_their_engine(tmp_path):
    """`harness run --suite latency` on a Llama-family model builds the Llama engine (kv=all: the only K/V policy
    for shared K/V heads), for dense, a static ranking, dejavu's predictors (with the head-set change rate) and
    teal's input thresholds, and records the engine's own floor."""
    import json

    import yaml
    from typer.testing import CliRunner

    from harness.cli import app
    from harness.suites import load_suite

    suite = load_suite("latency")
    suite["defaults"]["method_settings"]["latency"].update(prompt=5, new_tokens=3, warmup=0, repeats=1, copy_mb=8,
                                                             batch=[1], engines=["ours"])
    suite["defaults"].update(calib_samples=2, calib_seqlen=16)
    path = tmp_path / "latency.yaml"
    path.write_text(yaml.safe_dump(suite))
    out = tmp_path / "run"
    common = ["run", "--suite", str(path), "--model", "llama-tiny", "--weights", "random", "--dtype", "float32",
              "--device", "cpu", "--out", str(out), "--cache-dir", str(tmp_path / "cache")]
    runner = CliRunner()
    for methods, sparsity in (("dense,static,dejavu", "h0.5/n0.5"), ("teal", "0.5")):
        result = runner.invoke(app, common + ["--methods", methods, "--sparsity", sparsity], catch_exceptions=False)
        assert result.exit_code == 0, result.output
    records = [json.loads(line) for line in (out / "records.jsonl").read_text().splitlines()]
    token = {r["method"]: r for r in records if r["metric"] == "token_ms"}
    assert set(token) == {"dense", "static", "dejavu", "teal"}
    assert all(r["value"] > 0 for r in token.values())
    assert 0.0 <= token["dejavu"]["head_change_rate"] <= 1.0 and token["dejavu"]["kv"] == "all"
    assert token["static"]["kv"] == "all" and set(token["static"]["token_ms_by_kv"]) == {"all"}
    floors = {m: r["weight_bytes"] for m, r in token.items() if "weight_bytes" in r}
    assert floors["static"] < floors["dense"]
