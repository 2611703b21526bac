"""The masked engine: equivalences, planted cases, exact counts and causality."""
import pytest
import torch

from harness.engine import Allocation, MaskedEngine, MaskPolicy, request_contexts
from harness.errors import HarnessError
from methods.norm_mask import NormPolicy
from methods.random import RandomPolicy
from tests.conftest import tiny_model

H, L, F = 4, 2, 64


class FixedHeads(MaskPolicy):
    """Scores that skip exactly the given heads in every layer and token."""

    def __init__(self, skipped):
        self.skipped = skipped

    def head_scores(self, layer, state, head_out):
        scores = torch.ones(*state.shape, head_out.shape[2])
        scores[..., self.skipped] = 0
        return scores


def ids(batch=1, seq=10, seed=0):
    return torch.randint(3, 50000, (batch, seq), generator=torch.Generator().manual_seed(seed))


def test_masking_a_head_equals_zeroing_its_out_proj_columns():
    model = tiny_model().double()
    x = ids()
    engine = MaskedEngine(model, FixedHeads([1]), Allocation(heads=0.25))
    with engine.applied():
        masked = model(input_ids=x).logits
    dim = model.config.hidden_size // H
    with torch.no_grad():
        for layer in model.model.decoder.layers:
            layer.self_attn.out_proj.weight[:, 1 * dim:2 * dim] = 0
    assert torch.allclose(masked, model(input_ids=x).logits, atol=1e-12)


def test_hooks_are_removed_even_after_an_error():
    model = tiny_model()
    engine = MaskedEngine(model, FixedHeads([0]), Allocation(heads=0.25))
    with pytest.raises(RuntimeError):
        with engine.applied():
            assert sum(len(m._forward_pre_hooks) for m in model.modules()) > 0
            raise RuntimeError("boom")
    assert sum(len(m._forward_pre_hooks) + len(m._forward_hooks) for m in model.modules()) == 0


def test_planted_useless_head_is_the_first_norm_mask_skips_at_every_token():
    model = tiny_model()
    dim = model.config.hidden_size // H
    with torch.no_grad():
        model.model.decoder.layers[1].self_attn.v_proj.weight[2 * dim:3 * dim] = 0
        model.model.decoder.layers[1].self_attn.v_proj.bias[2 * dim:3 * dim] = 0
    engine = MaskedEngine(model, NormPolicy(), Allocation(heads=0.25))  # one head of four
    with engine.applied():
        model(input_ids=ids(batch=2, seq=16))
        keep = engine.state.keep[("heads", 1)]
    assert (~keep[..., 2]).all() and keep[..., [0, 1, 3]].all()


@pytest.mark.parametrize("sparsity", [0.25, 0.5, 0.75])
def test_random_local_skips_exactly_k_heads_and_neurons_per_token_and_layer(sparsity):
    model = tiny_model()
    engine = MaskedEngine(model, RandomPolicy(0, {"heads": H, "neurons": F}, L), Allocation(heads=sparsity, neurons=sparsity))
    with engine.applied():
        model(input_ids=ids(batch=2, seq=12))
        for layer in range(L):
            assert ((~engine.state.keep[("heads", layer)]).sum(-1) == round(sparsity * H)).all()
            assert ((~engine.state.keep[("neurons", layer)]).sum(-1) == round(sparsity * F)).all()
    assert engine.achieved()["achieved_heads"] == pytest.approx(round(sparsity * H) / H)
    # different tokens get different masks
    masks = engine.state.keep[("neurons", 0)].reshape(-1, F)
    assert len({tuple(m.tolist()) for m in masks}) > 1


def test_random_global_skips_exactly_the_budget_overall_per_token():
    model = tiny_model(num_hidden_layers=4)
    alloc = Allocation(heads=0.5, neurons=0.5, mode="global", dense_layers=(0,))
    engine = MaskedEngine(model, RandomPolicy(3, {"heads": H, "neurons": F}, 4), alloc)
    with engine.applied():
        model(input_ids=ids(seq=20))
        heads = torch.stack([engine.state.keep[("heads", l)] for l in (1, 2, 3)], dim=2)
        neurons = torch.stack([engine.state.keep[("neurons", l)] for l in (1, 2, 3)], dim=2)
    assert ("heads", 0) not in engine.state.keep
    assert ((~heads).sum(dim=(-1, -2)) == round(0.5 * H * 3)).all()
    assert ((~neurons).sum(dim=(-1, -2)) == round(0.5 * F * 3)).all()
    per_layer = (~heads).sum(-1)
    assert (per_layer != per_layer[..., :1]).any()  # the budget moves between layers


def test_global_min_keep_protects_each_layer():
    model = tiny_model(num_hidden_layers=3)
    alloc = Allocation(heads=0.5, mode="global", min_keep=0.5)
    engine = MaskedEngine(model, RandomPolicy(1, {"heads": H, "neurons": F}, 3), alloc)
    with engine.applied():
        model(input_ids=ids(seq=30))
        for layer in range(3):
            assert (engine.state.keep[("heads", layer)].sum(-1) >= 2).all()


def test_norm_mask_cannot_allocate_globally():
    model = tiny_model()
    engine = MaskedEngine(model, NormPolicy(), Allocation(heads=0.5, mode="global"))
    with pytest.raises(HarnessError, match="cannot allocate globally"):
        with engine.applied():
            model(input_ids=ids())


def test_replacement_value_is_written_for_skipped_heads():
    model = tiny_model().double()
    dim = model.config.hidden_size // H
    table = torch.arange(L * H * dim, dtype=torch.float64).view(L, H, dim)
    policy = FixedHeads([3])
    policy.head_replacement = table
    seen = {}
    model.model.decoder.layers[1].self_attn.out_proj.register_forward_hook(
        lambda m, args, out: seen.setdefault("x", args[0]))
    with MaskedEngine(model, policy, Allocation(heads=0.25)).applied():
        model(input_ids=ids(seq=5))
    x = seen["x"].view(1, 5, H, dim)
    assert torch.equal(x[:, :, 3], table[1, 3].expand(1, 5, dim))


def test_request_scope_uses_the_last_tokens_mask_for_every_token():
    model = tiny_model()
    alloc = Allocation(heads=0.5, neurons=0.5, scope="request")
    engine = MaskedEngine(model, RandomPolicy(0, {"heads": H, "neurons": F}, L), alloc)
    mask = torch.ones(2, 9, dtype=torch.long)
    mask[1, 6:] = 0  # padding on the right of row 1: its last real token is position 5
    with engine.applied():
        model(input_ids=ids(batch=2, seq=9), attention_mask=mask)
        keep = engine.state.keep[("heads", 0)]
    assert (keep[0] == keep[0, -1]).all() and (keep[1] == keep[1, 5]).all()
    assert engine.achieved()["achieved_heads"] == pytest.approx(0.5)  # padding is not counted


def test_request_scope_takes_the_mask_of_the_last_context_token():
    """Two continuations of one context, batched (right-padded) as lm-eval does: inputs are
    (context + continuation)[:-1]; both rows must get the mask of the context's last token."""
    model = tiny_model()
    engine = MaskedEngine(model, RandomPolicy(0, {"heads": H, "neurons": F}, L),
                          Allocation(heads=0.5, neurons=0.5, scope="request"))
    context = ids(seq=5, seed=1)[0]
    inputs = torch.ones(2, 8, dtype=torch.long)
    inputs[0, :8] = torch.cat([context, ids(seq=3, seed=2)[0]])  # continuation of 4 tokens, 3 in the input
    inputs[1, :6] = torch.cat([context, ids(seq=1, seed=3)[0]])  # continuation of 2 tokens, 1 in the input
    mask = torch.tensor([[1] * 8, [1] * 6 + [0] * 2])
    with engine.applied(), request_contexts(model, [5, 5]):
        model(input_ids=inputs, attention_mask=mask)
        keep = dict(engine.state.keep)
    with engine.applied():  # the mask of the context alone, at its last token
        model(input_ids=context[None])
        alone = dict(engine.state.keep)
    for key, mask_ in keep.items():
        assert (mask_[0] == alone[key][0, -1]).all() and (mask_[1, :6] == alone[key][0, -1]).all(), key
    assert getattr(model, "_harness_request_contexts") is None  # the context manager cleans up
    with engine.applied(), request_contexts(model, [5]), pytest.raises(HarnessError, match="1 context lengths"):
        model(input_ids=inputs, attention_mask=mask)
    with engine.applied(), request_contexts(model, [5, 7]), pytest.raises(HarnessError, match="outside"):
        model(input_ids=inputs, attention_mask=mask)


def test_request_scope_decode_steps_keep_the_requests_mask():
    """With the KV cache, the generated tokens use the mask chosen at the prompt's last token; a left-padded
    batch's prompt ends at its last column."""
    model = tiny_model()
    engine = MaskedEngine(model, RandomPolicy(0, {"heads": H, "neurons": F}, L),
                          Allocation(heads=0.5, neurons=0.5, scope="request"))
    prompt = ids(batch=2, seq=6, seed=4)
    mask = torch.tensor([[0, 0, 1, 1, 1, 1], [1] * 6])
    calls = []
    with engine.applied(), request_contexts(model, mask.sum(1).tolist()):
        handle = model.model.decoder.register_forward_hook(lambda m, a, o: calls.append(dict(engine.state.keep)))
        try:
            model.generate(prompt, attention_mask=mask, max_new_tokens=4, do_sample=False, pad_token_id=1)
        finally:
            handle.remove()
    assert len(calls) == 4  # the prefill and three decode steps
    for key, first in calls[0].items():
        for step in calls[1:]:
            assert step[key].shape[1] == 1 and (step[key][:, 0] == first[:, -1]).all(), key
    skipped, tokens = engine.meter.counts("neurons")
    assert tokens[0] == 4 + 6 + 2 * 3 and sum(skipped) == sum(tokens) * F // 2
    with engine.applied(), pytest.raises(HarnessError, match="first forward call"):  # no prefill in this engine
        out = model(input_ids=prompt[:, :1], use_cache=True)
        engine._request_keep = {("heads", 0): torch.ones(1, H, dtype=torch.bool)}
        model(input_ids=prompt[:, 1:2], past_key_values=out.past_key_values, use_cache=True)


def test_padding_tokens_are_not_counted():
    model = tiny_model()
    engine = MaskedEngine(model, RandomPolicy(0, {"heads": H, "neurons": F}, L), Allocation(heads=0.5))
    mask = torch.tensor([[1, 1, 1, 1], [0, 0, 1, 1]])
    with engine.applied():
        model(input_ids=ids(batch=2, seq=4), attention_mask=mask)
    skipped, tokens = engine.meter.counts("heads")
    assert tokens == [6, 6] and skipped == [12, 12]


@pytest.mark.parametrize("attn", ["eager", "sdpa"])
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16, torch.float16])
def test_attention_implementations_and_dtypes_agree(attn, dtype):
    reference = tiny_model().double()
    model = tiny_model(attn_implementation=attn).to(dtype)
    model.config._attn_implementation = attn
    policy = RandomPolicy(0, {"heads": H, "neurons": F}, L)
    alloc = Allocation(heads=0.5, neurons=0.5)
    x = ids(seq=12)
    with MaskedEngine(reference, policy, alloc).applied():
        expected = reference(input_ids=x).logits
    with MaskedEngine(model, policy, alloc).applied():
        got = model(input_ids=x).logits.double()
    tolerance = 1e-4 if dtype == torch.float32 else 5e-2
    assert (got - expected).norm() / expected.norm() < tolerance


def test_kv_cache_decode_gives_the_full_forward_logits():
    """Token-by-token decoding with the cache sees the same per-token masks as one full forward."""
    model = tiny_model().double()
    policy = RandomPolicy(0, {"heads": H, "neurons": F}, L)
    alloc = Allocation(heads=0.5, neurons=0.5)
    x = ids(seq=8)
    with MaskedEngine(model, policy, alloc).applied():
        full = model(input_ids=x).logits
        out = model(input_ids=x[:, :5], use_cache=True)
        steps = [out.logits]
        cache = out.past_key_values
        for t in range(5, 8):
            out = model(input_ids=x[:, t:t + 1], past_key_values=cache, use_cache=True)
            cache = out.past_key_values
            steps.append(out.logits)
    assert torch.allclose(torch.cat(steps, dim=1), full, atol=1e-10)


def test_allocation_rejects_out_of_range_targets():
    for bad in (1.0, -0.1, 1.5):
        with pytest.raises(HarnessError, match="outside"):
            Allocation(heads=bad)


def test_prepare_moves_predictors_once_before_the_first_forward():
    """The one-time copy of a policy's predictors to the model's device and dtype happens in `prepare` (outside
    evaluation clocks), not in the first window; the forward then reuses it."""
    from methods.dejavu import DejaVuPolicy
    from methods.predictors import low_rank

    model = tiny_model().to(torch.float64)
    config = model.config
    mlp = {l: low_rank(config.hidden_size, 8, config.ffn_dim) for l in range(config.num_hidden_layers)}
    policy = DejaVuPolicy({}, mlp)
    engine = MaskedEngine(model, policy, Allocation(neurons=0.5))
    assert not getattr(policy, "_moved", None)
    engine.prepare()
    moved = dict(policy._moved)
    assert len(moved) == 1 and all(next(p.parameters()).dtype == torch.float64 for p in next(iter(moved.values())).values())
    with engine.applied(), torch.no_grad():
        model(input_ids=ids())
    assert policy._moved == moved and engine.achieved()["achieved_neurons"] == 0.5
