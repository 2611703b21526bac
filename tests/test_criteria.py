"""Importance criteria (methods/criteria.py) against brute-force autograd references, and the `static` method."""
import os

os.environ.setdefault("HF_HUB_OFFLINE", "1")

import pytest
import torch
from transformers import OPTConfig, OPTForCausalLM

from harness.artefacts import ArtefactCache
from harness.data import DataDir
from harness.engine import Allocation, MaskedEngine, opt_layers
from harness.errors import HarnessError
from harness.runner import Session
from harness.spec import RunConfig
from methods import MethodSpec, get_method
from methods.criteria import ALL_CRITERIA, CRITERIA, aggregate, score_example

L, H, E, FF, T = 2, 4, 32, 64, 12
D = E // H


def tiny_opt(vocab=256, dtype=torch.float64, seed=0, randomise=True):
    config = OPTConfig(vocab_size=vocab, hidden_size=E, num_hidden_layers=L, num_attention_heads=H, ffn_dim=FF,
                       max_position_embeddings=64, word_embed_proj_dim=E, dropout=0.0, attention_dropout=0.0,
                       do_layer_norm_before=True, enable_bias=True, pad_token_id=1, bos_token_id=2, eos_token_id=2)
    torch.manual_seed(seed)
    model = OPTForCausalLM(config)
    if randomise:  # non-trivial biases and norms, so that every term of every formula matters
        with torch.no_grad():
            for name, p in model.named_parameters():
                if "layer_norm" in name and name.endswith("weight"):
                    p.copy_(1 + 0.2 * torch.randn_like(p))
                elif name.endswith("bias") or "layer_norm" in name:
                    p.copy_(0.1 * torch.randn_like(p))
                else:
                    p.copy_(0.3 * torch.randn_like(p))
    model = model.to(dtype).eval()
    model.requires_grad_(False)
    return model


@pytest.fixture(scope="module")
def model():
    return tiny_opt()


@pytest.fixture(scope="module")
def ids():
    torch.manual_seed(1)
    return torch.randint(3, 256, (2, T))


def reference_scores(model, ids_1d):
    """Independent brute force: explicit zero perturbations whose autograd gradients are the quantities the
    criteria are defined from. ∂L/∂δA = G, ∂L/∂δact = g, and for per-token weights W⊙(1+ε[t]) the gradient
    ∂L/∂ε[t,i,c] = W[i,c]·∂L/∂W[i,c] restricted to token t (the token's share of θ ⊙ ∂L/∂θ)."""
    _, layers = opt_layers(model)
    dt = model.dtype
    ids = ids_1d.view(1, -1)
    n = ids.shape[1]
    dA = [torch.zeros(n, E, dtype=dt, requires_grad=True) for _ in layers]
    dact = [torch.zeros(n, FF, dtype=dt, requires_grad=True) for _ in layers]
    eps_o = [torch.zeros(n, E, E, dtype=dt, requires_grad=True) for _ in layers]
    eps_1 = [torch.zeros(n, FF, E, dtype=dt, requires_grad=True) for _ in layers]
    eps_b = [torch.zeros(n, FF, dtype=dt, requires_grad=True) for _ in layers]
    seen = {}
    handles = []

    def pre_out(l):
        def hook(module, args):
            seen[("A", l)] = args[0].detach().reshape(n, E).clone()
            return (args[0] + dA[l].view_as(args[0]),)
        return hook

    def post_out(l):
        def hook(module, args, output):
            a = args[0].reshape(n, E)
            w = module.weight * (1 + eps_o[l])  # (T, E_out, E_in)
            return (torch.einsum("tc,tic->ti", a, w) + module.bias).view_as(output)
        return hook

    def post_fc1(l):
        def hook(module, args, output):
            x = args[0].reshape(n, E)
            w = module.weight * (1 + eps_1[l])  # (T, F, E)
            return (torch.einsum("tk,tjk->tj", x, w) + module.bias * (1 + eps_b[l])).view_as(output)
        return hook

    def pre_fc2(l):
        def hook(module, args):
            seen[("act", l)] = args[0].detach().reshape(n, FF).clone()
            return (args[0] + dact[l].view_as(args[0]),)
        return hook

    try:
        for l, layer in enumerate(layers):
            handles += [layer.self_attn.out_proj.register_forward_pre_hook(pre_out(l)),
                        layer.self_attn.out_proj.register_forward_hook(post_out(l)),
                        layer.fc1.register_forward_hook(post_fc1(l)),
                        layer.fc2.register_forward_pre_hook(pre_fc2(l))]
        with torch.enable_grad():
            logits = model(input_ids=ids).logits[0]  # the LM loss written out, in float64
            loss = -torch.log_softmax(logits[:-1], dim=-1)[torch.arange(n - 1), ids[0, 1:]].mean()
            hf_loss = model(input_ids=ids, labels=ids).loss  # Hugging Face's own (float32 inside)
            assert abs(hf_loss.item() - loss.item()) < 1e-5
            grads = torch.autograd.grad(loss, dA + dact + eps_o + eps_1 + eps_b)
    finally:
        for h in handles:
            h.remove()
    k = len(layers)
    gA, gact, geo, ge1, geb = (grads[i * k:(i + 1) * k] for i in range(5))
    out = {c: {"heads": [], "neurons": []} for c in ALL_CRITERIA}
    for l in range(k):
        a, ga = seen[("A", l)].view(n, H, D), gA[l].view(n, H, D)
        act, g = seen[("act", l)], gact[l]
        dot = torch.stack([sum(a[:, h, d] * ga[:, h, d] for d in range(D)) for h in range(H)], dim=1)
        heads = {
            "l2norm": a.pow(2).sum(-1).sqrt(), "gradnorm": ga.pow(2).sum(-1).sqrt(),
            "plainact": dot.abs(), "fisher": dot ** 2,
            "snip": geo[l].view(n, E, H, D).abs().sum(dim=(1, 3)), "plainact_weight": dot.abs(),
        }
        neurons = {
            "l2norm": act.abs(), "gradnorm": g.abs(), "plainact": (act * g).abs(), "fisher": (act * g) ** 2,
            "snip": ge1[l].abs().sum(-1) + geb[l].abs(), "plainact_weight": ge1[l].abs().sum(-1),
        }
        for c in ALL_CRITERIA:
            out[c]["heads"].append(heads[c])
            out[c]["neurons"].append(neurons[c])
    return {c: {u: torch.stack(v, dim=1) for u, v in units.items()} for c, units in out.items()}


def test_every_criterion_matches_brute_force_per_token(model, ids):
    got = score_example(model, ids[0], ALL_CRITERIA)
    ref = reference_scores(model, ids[0])
    for c in ALL_CRITERIA:
        assert got[c]["heads"].shape == (T, L, H) and got[c]["neurons"].shape == (T, L, FF)
        for unit in ("heads", "neurons"):
            torch.testing.assert_close(got[c][unit], ref[c][unit], rtol=1e-9, atol=1e-12, msg=f"{c} {unit}")
            assert got[c][unit][:-1].abs().sum() > 0, f"{c} {unit} is trivially zero"
    # the last token predicts nothing inside the example: gradient-based scores are 0 there
    assert got["gradnorm"]["heads"][-1].abs().max() == 0
    # the two FFN plainact flavours differ (|sum| vs sum of |terms|), and snip adds the bias term
    assert (got["plainact_weight"]["neurons"] >= got["plainact"]["neurons"] - 1e-12).all()
    assert not torch.allclose(got["plainact_weight"]["neurons"], got["plainact"]["neurons"])
    assert (got["snip"]["neurons"] >= got["plainact_weight"]["neurons"]).all()


def test_batch_scores_are_each_examples_own(model, ids):
    both = score_example(model, ids, CRITERIA)
    for b in range(ids.shape[0]):
        one = score_example(model, ids[b], CRITERIA)
        for c in CRITERIA:
            for unit in ("heads", "neurons"):
                torch.testing.assert_close(both[c][unit][b], one[c][unit], rtol=1e-9, atol=1e-12)


def test_aggregate_is_the_mean_over_tokens(model, ids):
    agg = aggregate(model, ids, ALL_CRITERIA)
    per = score_example(model, ids, ALL_CRITERIA)
    for c in ALL_CRITERIA:
        for unit in ("heads", "neurons"):
            expected = per[c][unit].mean(dim=(0, 1)).float()
            assert agg[c][unit].shape == expected.shape and agg[c][unit].dtype == torch.float32
            torch.testing.assert_close(agg[c][unit], expected, rtol=1e-5, atol=1e-8)
    with pytest.raises(HarnessError, match="valid"):
        aggregate(model, ids, ("bogus",))


def test_head_l2norm_is_the_out_proj_input_slice_norm(model, ids):
    _, layers = opt_layers(model)
    inputs = {}
    handles = [layer.self_attn.out_proj.register_forward_pre_hook(
        lambda m, args, l=l: inputs.__setitem__(l, args[0].detach().clone())) for l, layer in enumerate(layers)]
    try:
        with torch.no_grad():
            model(input_ids=ids[:1])
    finally:
        for h in handles:
            h.remove()
    got = score_example(model, ids[0], ("l2norm",))["l2norm"]["heads"]
    for l in range(L):
        x = inputs[l].view(T, E)
        for h in range(H):
            torch.testing.assert_close(got[:, l, h], torch.linalg.vector_norm(x[:, h * D:(h + 1) * D], dim=-1))


def test_planted_dead_head_scores_zero():
    model = tiny_opt(seed=3)
    layer, head = 1, 2
    v_proj = opt_layers(model)[1][layer].self_attn.v_proj
    with torch.no_grad():
        v_proj.weight[head * D:(head + 1) * D] = 0
        v_proj.bias[head * D:(head + 1) * D] = 0
    torch.manual_seed(5)
    scores = score_example(model, torch.randint(3, 256, (T,)), ALL_CRITERIA)
    for c in ("l2norm", "plainact", "fisher", "snip", "plainact_weight"):
        assert scores[c]["heads"][:, layer, head].abs().max() == 0, c
        others = scores[c]["heads"][:-1, layer, [h for h in range(H) if h != head]]
        assert (others > 0).all(), c
    assert scores["gradnorm"]["heads"][:-1, layer, head].abs().min() > 0  # its gradient is not zero


def _hooks(model):
    return sum(len(m._forward_hooks) + len(m._forward_pre_hooks) + len(m._backward_hooks) for m in model.modules())


def test_model_is_unchanged_after_scoring(model, ids):
    with torch.no_grad():
        before = model(input_ids=ids).logits.clone()
    hooks = _hooks(model)
    score_example(model, ids, ALL_CRITERIA)
    aggregate(model, ids, ("snip",))
    assert _hooks(model) == hooks == 0
    assert not model.training
    assert all(not p.requires_grad and p.grad is None for p in model.parameters())
    with torch.no_grad():
        assert torch.equal(model(input_ids=ids).logits, before)
    # a model in train mode with trainable parameters is restored as it was (and scored in eval mode)
    other = tiny_opt(seed=4)
    other.train()
    other.requires_grad_(True)
    eval_scores = score_example(tiny_opt(seed=4), ids[0], ("plainact",))
    train_scores = score_example(other, ids[0], ("plainact",))
    assert other.training and all(p.requires_grad and p.grad is None for p in other.parameters())
    torch.testing.assert_close(train_scores["plainact"]["heads"], eval_scores["plainact"]["heads"])


# -- the static method ------------------------------------------------------------------------------

@pytest.fixture(scope="module")
def model_dir(tmp_path_factory):
    folder = tmp_path_factory.mktemp("tiny-opt")
    tiny_opt(vocab=50272, dtype=torch.float32, seed=7).save_pretrained(folder)
    return folder


@pytest.fixture(scope="module")
def session(model_dir, tmp_path_factory):
    config = RunConfig(model=str(model_dir), weights="pretrained", calib_samples=2, calib_seqlen=32, device="cpu")
    return Session(config, DataDir.resolve(), ArtefactCache(tmp_path_factory.mktemp("cache")), log=lambda m: None)


def test_static_fit_is_cached_reused_and_rebuilt_when_corrupt(session, tmp_path):
    messages = []
    session.cache = ArtefactCache(tmp_path, log=messages.append)
    ctx = session.fit_context("static")
    method = get_method(MethodSpec.parse("static"), ctx.settings)
    assert method.variant == "plainact"
    allocation = Allocation(heads=0.5)
    first = method.fit(ctx, allocation)
    assert session.cache.builds == 1 and first.meta["tokens"] == 64
    ids = ctx.calibration_ids()
    assert ids.shape == (2, 32)
    expected = aggregate(ctx.model, ids, ("plainact",))["plainact"]
    torch.testing.assert_close(first.tensors["plainact.heads"], expected["heads"])
    torch.testing.assert_close(first.tensors["plainact.neurons"], expected["neurons"])
    assert first.tensors["plainact.heads"].shape == (L, H) and first.tensors["plainact.neurons"].shape == (L, FF)

    second = method.fit(ctx, allocation)
    assert session.cache.builds == 1 and session.cache.hits == 1 and second.path == first.path
    assert torch.equal(second.tensors["plainact.heads"], first.tensors["plainact.heads"])

    with open(first.path / "tensors.safetensors", "r+b") as handle:
        handle.seek(-16, os.SEEK_END)
        handle.write(b"\xff" * 16)
    third = method.fit(ctx, allocation)
    assert session.cache.builds == 2
    assert any("corrupt" in m and "rebuilding" in m for m in messages)
    assert torch.equal(third.tensors["plainact.neurons"], first.tensors["plainact.neurons"])

    other = get_method(MethodSpec.parse("static:l2norm")).fit(ctx, allocation)  # same pass, no new build
    assert session.cache.builds == 2 and other.path == first.path
    ctx.config.calib_samples = 1  # any input of the key changes: rebuilt
    try:
        assert method.fit(ctx, allocation).path != first.path and session.cache.builds == 3
    finally:
        ctx.config.calib_samples = 2


def _static_policy(session, variant="plainact"):
    ctx = session.fit_context("static")
    method = get_method(MethodSpec("static", variant))
    artefact = method.fit(ctx, Allocation())
    return ctx, artefact, method.policy(ctx, Allocation(), artefact)


def test_static_local_allocation_skips_the_same_units_everywhere(session):
    ctx, artefact, policy = _static_policy(session)
    ids = ctx.calibration_ids()
    engine = MaskedEngine(ctx.model, policy, Allocation(heads=0.5, neurons=0.25))
    with engine.applied(), torch.no_grad():
        ctx.model(input_ids=ids)
        keep = dict(engine.state.keep)
    achieved = engine.achieved()
    assert achieved["achieved_heads"] == 0.5 and achieved["achieved_neurons"] == 0.25
    for unit, n, skip in (("heads", H, 2), ("neurons", FF, 16)):
        for l in range(L):
            mask = keep[(unit, l)]
            assert mask.shape == (2, 32, n)
            assert ((~mask).sum(-1) == skip).all()
            assert (mask == mask[0, 0]).all()  # the same units at every token
            lowest = set(torch.argsort(artefact.tensors[f"plainact.{unit}"][l])[:skip].tolist())
            assert set((~mask[0, 0]).nonzero().flatten().tolist()) == lowest


def test_static_global_allocation_skips_the_budget_per_token(session):
    ctx, artefact, policy = _static_policy(session, "fisher")
    ids = ctx.calibration_ids()
    engine = MaskedEngine(ctx.model, policy, Allocation(heads=0.5, mode="global"))
    with engine.applied(), torch.no_grad():
        ctx.model(input_ids=ids)
        planned = engine.state.planned["heads"]
    assert planned.shape == (2, 32, L, H)
    assert ((~planned).sum(dim=(-1, -2)) == round(0.5 * L * H)).all()
    assert (planned == planned[0, 0]).all()
    assert engine.achieved()["achieved_heads"] == 0.5
    lowest = set(torch.argsort(artefact.tensors["fisher.heads"].flatten())[:round(0.5 * L * H)].tolist())
    assert set((~planned[0, 0]).flatten().nonzero().flatten().tolist()) == lowest


def test_static_variants_are_the_criteria():
    for variant in ALL_CRITERIA:
        assert get_method(MethodSpec.parse(f"static:{variant}")).variant == variant
    with pytest.raises(HarnessError, match="static:plainact"):
        get_method(MethodSpec.parse("static:bogus"))
