"""The sparse decode engine gives the masked engine's numbers (CPU, float32, a tiny OPT).

For the same per-token masks (changing every token and layer, so kv="recompute" must recompute the keys/values
of heads that were skipped earlier), the logits of every decode step equal those of harness.engine.MaskedEngine
on the Hugging Face model, for both KV modes and both backends (torch references; Triton interpreter).
"""
import pytest
import torch

from kernels.decode import DenseMasks, SparseDecoder, StaticMasks
from kernels.equivalence import (ScheduleSource, masked_engine_logits, random_schedule, relative_errors,
                                 sparse_engine_logits)
from tests.conftest import tiny_model

pytestmark = pytest.mark.filterwarnings("ignore::DeprecationWarning")

H, F_DIM, KEEP_H, KEEP_F = 4, 128, 2, 40
PROMPT, STEPS = 5, 6


def _model():
    model = tiny_model(seed=3, vocab_size=512, hidden_size=64, word_embed_proj_dim=64, ffn_dim=F_DIM,
                       num_attention_heads=H, num_hidden_layers=2)
    with torch.no_grad():  # biases and norms non-trivial too (HF initialises biases to zero)
        for param in model.parameters():
            if param.dim() == 1:
                param.add_(torch.randn_like(param) * 0.1)
    return model


schedule = random_schedule(H, F_DIM, KEEP_H, KEEP_F)


def _relerr(a, b):
    return ((a.double() - b.double()).norm() / b.double().norm()).item()


@pytest.fixture(scope="module")
def reference():
    model = _model()
    g = torch.Generator().manual_seed(7)
    prompt = torch.randint(0, 512, (1, PROMPT), generator=g)
    tokens = torch.randint(0, 512, (STEPS,), generator=g)
    return model, prompt, tokens, masked_engine_logits(model, schedule, prompt, tokens, KEEP_H, KEEP_F)


@pytest.mark.parametrize("backend", ["torch", "triton"])
@pytest.mark.parametrize("kv", ["all", "recompute"])
def test_sparse_engine_matches_masked_engine(reference, backend, kv):
    if backend == "triton":
        pytest.importorskip("triton")
    model, prompt, tokens, expected = reference
    engine = SparseDecoder(model, ScheduleSource(schedule), max_len=16, kv=kv, backend=backend,
                           heads_kept=KEEP_H, neurons_kept=KEEP_F)
    errors, agree = relative_errors(sparse_engine_logits(engine, prompt, tokens), expected)
    assert max(errors) < 1e-5 and all(agree), errors
    if kv == "recompute":  # every entry a kept head attended to now exists, and equals the kv="all" cache
        dense = SparseDecoder(model, ScheduleSource(schedule), max_len=16, kv="all", backend="torch",
                              heads_kept=KEEP_H, neurons_kept=KEEP_F)
        dense.prefill(prompt)
        for t in tokens:
            dense.step(t)
        for layer in range(2):
            have = engine.have[layer].bool()
            assert have[:, :PROMPT].all() and not have.all()
            mine = engine.cache[layer].transpose(1, 2)[:, have.T]
            full = dense.cache[layer].transpose(1, 2)[:, have.T]
            assert torch.allclose(mine, full, rtol=1e-5, atol=1e-5)


def test_static_masks_skip_the_recompute_and_match_the_masked_engine():
    """Static masks with kv="recompute": a kept head's K/V exist at every position, so the engine skips the
    recompute bookkeeping; the logits are still the masked engine's."""
    pytest.importorskip("triton")
    model = _model()
    keep = [torch.tensor([0, 3]), torch.tensor([1, 2])]
    neurons = [torch.arange(0, F_DIM, 3)[:KEEP_F], torch.arange(1, F_DIM, 3)[:KEEP_F]]
    fixed = lambda step, layer: (keep[layer], neurons[layer])  # noqa: E731
    g = torch.Generator().manual_seed(5)
    prompt, tokens = torch.randint(0, 512, (1, PROMPT), generator=g), torch.randint(0, 512, (STEPS,), generator=g)
    expected = masked_engine_logits(model, fixed, prompt, tokens, KEEP_H, KEEP_F)
    engine = SparseDecoder(model, StaticMasks(keep, neurons), max_len=16, kv="recompute", backend="triton")
    errors, agree = relative_errors(sparse_engine_logits(engine, prompt, tokens), expected)
    assert max(errors) < 1e-5 and all(agree), errors


def _dense_engine(backend, max_len, seed):
    """The tiny model, a (2, 4) prompt and a dense engine of batch 2 on `backend`."""
    if backend == "triton":
        pytest.importorskip("triton")
    model = _model()
    prompt = torch.randint(0, 512, (2, 4), generator=torch.Generator().manual_seed(seed))
    return model, prompt, SparseDecoder(model, DenseMasks(2), max_len=max_len, batch=2, backend=backend)


@pytest.mark.parametrize("backend", ["torch", "triton"])
def test_next_token_is_the_greedy_token_of_the_latest_logits(backend):
    model, prompt, engine = _dense_engine(backend, max_len=10, seed=4)
    twin = SparseDecoder(model, DenseMasks(2), max_len=10, batch=2, backend=backend, layers=engine.layers)
    logits, twin_logits = engine.prefill(prompt), twin.prefill(prompt)
    for _ in range(4):
        assert torch.equal(engine.next_token, logits.argmax(-1))
        token = engine.next_token.clone()
        logits = engine.step(engine.next_token).clone()  # fed back in place: no copy
        twin_logits = twin.step(token).clone()  # the same token given from outside
        assert torch.equal(logits, twin_logits)


@pytest.mark.parametrize("backend", ["torch", "triton"])
def test_dense_source_equals_the_model(backend):
    model, prompt, engine = _dense_engine(backend, max_len=8, seed=1)
    tokens = engine.generate(prompt, 3)
    with torch.no_grad():
        hf = model.generate(prompt, max_new_tokens=3, do_sample=False, min_new_tokens=3)
    assert torch.equal(tokens, hf[:, 4:])
    with torch.no_grad():
        full = model(torch.cat([prompt, tokens[:, :2]], 1)).logits[:, -1]
    engine.prefill(prompt)
    engine.step(tokens[:, 0])
    assert _relerr(engine.step(tokens[:, 1]), full) < 1e-5


def test_static_masks_and_fixed_counts():
    model = _model()
    source = StaticMasks([[0, 3], [1, 2]], [list(range(0, 128, 4)), None])
    engine = SparseDecoder(model, source, max_len=8, backend="torch", kv="recompute")
    assert engine.heads_kept == [2, 2] and engine.neurons_kept == [32, 128]
    engine.prefill(torch.tensor([[5, 6, 7]]))
    assert engine.step(torch.tensor([8])).shape == (1, 512)
    assert engine.weight_bytes() < SparseDecoder(model, DenseMasks(2), max_len=8, backend="torch").weight_bytes()
    bad = SparseDecoder(model, lambda layer, hidden: (torch.arange(3), torch.arange(40)), max_len=8,
                        backend="torch", heads_kept=2, neurons_kept=40)
    bad.prefill(torch.tensor([[5, 6]]))
    with pytest.raises(ValueError, match="fixed per layer"):
        bad.step(torch.tensor([1]))
