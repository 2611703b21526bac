"""Importance criteria (methods/criteria.py) against brute-force autograd references, and the `static` method."""
import os
from pathlib import Path

os.environ.setdefault("HF_HUB_OFFLINE", "1")

import numpy as np
import pytest
import torch
import torch.nn.functional as F
from transformers import OPTConfig, OPTForCausalLM

from harness.artefacts import ArtefactCache
from harness.data import DataDir
from harness.engine import Allocation, MaskedEngine, opt_layers
from harness.errors import HarnessError
from harness.runner import Session
from harness.spec import RunConfig
from methods import MethodSpec, get_method
from methods.criteria import (ALL_CRITERIA, CRITERIA, FEATURES, UNITS, aggregate, aggregate_targets, score_example,
                              score_targets)

L, H, E, FF, T = 2, 4, 32, 64, 12
D = E // H


def tiny_opt(vocab=256, dtype=torch.float64, seed=0, randomise=True, layers=L, hidden=E, heads=H, ffn=FF):
    config = OPTConfig(vocab_size=vocab, hidden_size=hidden, num_hidden_layers=layers, num_attention_heads=heads,
                       ffn_dim=ffn, max_position_embeddings=64, word_embed_proj_dim=hidden, dropout=0.0,
                       attention_dropout=0.0, do_layer_norm_before=True, enable_bias=True, pad_token_id=1,
                       bos_token_id=2, eos_token_id=2)
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


# -- an independent reference: OPT written out on explicit tensors -------------------------------------------
class Explicit:
    """The OPT forward written out on the model's weights (pre-LN, learned positions with offset 2, tied head),
    with explicit zero perturbations whose autograd gradients are the quantities the criteria are defined from:
    dA[l] (T, E) added to the heads' outputs (∂L/∂dA = G), dact[l] (T, F) added to fc1's activations
    (∂L/∂dact = g), and per-token copies of the weights, dW1[l] (T, F, E), db1[l] (T, F), dWo[l] (T, E, E),
    whose gradients are each token's share of ∂L/∂W1, ∂L/∂b1 and ∂L/∂Wo."""

    def __init__(self, model):
        self.model = model
        self.cfg = model.config
        self.decoder, self.layers = opt_layers(model)

    def forward(self, ids, dA, dact, dW1=None, db1=None, dWo=None):
        cfg, n = self.cfg, ids.shape[0]
        heads, dim = cfg.num_attention_heads, cfg.hidden_size // cfg.num_attention_heads
        dec = self.decoder
        h = dec.embed_tokens.weight[ids] + dec.embed_positions.weight[torch.arange(n) + 2]
        causal = torch.full((n, n), float("-inf"), dtype=h.dtype).triu(1)
        seen = {"A": [], "act": [], "x": []}
        for l, layer in enumerate(self.layers):
            at = layer.self_attn
            y = F.layer_norm(h, (cfg.hidden_size,), layer.self_attn_layer_norm.weight, layer.self_attn_layer_norm.bias,
                             layer.self_attn_layer_norm.eps)
            q = (y @ at.q_proj.weight.T + at.q_proj.bias) * dim ** -0.5
            k, v = y @ at.k_proj.weight.T + at.k_proj.bias, y @ at.v_proj.weight.T + at.v_proj.bias
            q, k, v = (t.view(n, heads, dim).transpose(0, 1) for t in (q, k, v))
            a = (torch.softmax(q @ k.transpose(1, 2) + causal, dim=-1) @ v).transpose(0, 1).reshape(n, -1)
            seen["A"].append(a.detach())
            a = a + dA[l]
            wo = at.out_proj.weight + (dWo[l] if dWo is not None else 0)
            h = h + torch.einsum("tc,tic->ti", a, wo.expand(n, -1, -1)) + at.out_proj.bias
            x = F.layer_norm(h, (cfg.hidden_size,), layer.final_layer_norm.weight, layer.final_layer_norm.bias,
                             layer.final_layer_norm.eps)
            seen["x"].append(x.detach())
            w1 = layer.fc1.weight + (dW1[l] if dW1 is not None else 0)
            pre = torch.einsum("tk,tjk->tj", x, w1.expand(n, -1, -1)) + layer.fc1.bias + (db1[l] if db1 is not None else 0)
            act = torch.relu(pre)
            seen["act"].append(act.detach())
            h = h + (act + dact[l]) @ layer.fc2.weight.T + layer.fc2.bias
        h = F.layer_norm(h, (cfg.hidden_size,), dec.final_layer_norm.weight, dec.final_layer_norm.bias,
                         dec.final_layer_norm.eps)
        return h @ self.model.lm_head.weight.T, seen

    def loss(self, logits, ids, counted):
        """Mean cross-entropy of the tokens predicted at the `counted` positions (position t predicts t + 1)."""
        nll = -torch.log_softmax(logits[:-1], dim=-1)[torch.arange(ids.shape[0] - 1), ids[1:]]
        return nll[counted[:-1]].mean()

    def scores(self, ids, counted=None, hessian=True):
        """Per-token scores of every per-token criterion, from the formulas of ShadowLLM on explicit gradients."""
        cfg, n, dt = self.cfg, ids.shape[0], self.model.dtype
        nl, e, f = cfg.num_hidden_layers, cfg.hidden_size, cfg.ffn_dim
        heads = cfg.num_attention_heads
        dim = e // heads
        counted = torch.ones(n, dtype=torch.bool) if counted is None else counted
        zeros = lambda *shape: [torch.zeros(*shape, dtype=dt, requires_grad=True) for _ in range(nl)]  # noqa: E731
        dA, dact, dW1, db1, dWo = zeros(n, e), zeros(n, f), zeros(n, f, e), zeros(n, f), zeros(n, e, e)
        with torch.enable_grad():
            logits, seen = self.forward(ids, dA, dact, dW1, db1, dWo)
            with torch.no_grad():  # the explicit forward is OPT's
                torch.testing.assert_close(logits, self.model(input_ids=ids[None]).logits[0], rtol=1e-9, atol=1e-9)
            loss = self.loss(logits, ids, counted)
            grads = torch.autograd.grad(loss, dA + dact + dW1 + db1 + dWo)
        gA, gact, gW1, gb1, gWo = (grads[i * nl:(i + 1) * nl] for i in range(5))
        hg = (self.hessian_times_gradient(ids, counted, list(gA) + list(gact)) if hessian
              else [torch.full_like(t, float("nan")) for t in list(gA) + list(gact)])
        out = {c: {"heads": [], "neurons": []} for c in CRITERIA}
        for l, layer in enumerate(self.layers):
            a, ga, hga = seen["A"][l].view(n, heads, dim), gA[l].view(n, heads, dim), hg[l].view(n, heads, dim)
            act, g, hgact = seen["act"][l], gact[l], hg[nl + l]
            w1, b1, wo = layer.fc1.weight, layer.fc1.bias, layer.self_attn.out_proj.weight
            theta_grad = w1 * gW1[l]  # θ ⊙ ∂L/∂θ per token: (T, F, E)
            heads_ = {
                "l2norm": a.pow(2).sum(-1).sqrt(), "gradnorm": ga.pow(2).sum(-1).sqrt(),
                "plainact": (a * ga).abs().sum(-1), "fisher": ((a * ga) ** 2).mean(-1),
                "snip": (wo * gWo[l]).view(n, e, heads, dim).abs().sum(dim=(1, 3)),
                "grasp": (-hga * a).abs().sum(-1),
                "gradnorm_act": ga.pow(2).sum(-1).sqrt(), "plainact_act": (a * ga).sum(-1).abs(),
                "fisher_act": (a * ga).sum(-1) ** 2,
            }
            neurons = {
                "l2norm": act.abs(), "gradnorm": gW1[l].pow(2).sum(-1).sqrt(),
                "plainact": theta_grad.abs().sum(-1), "fisher": (theta_grad ** 2).mean(-1),
                "snip": theta_grad.abs().sum(-1) + (b1 * gb1[l]).abs(), "grasp": (-hgact * act).abs(),
                "gradnorm_act": g.abs(), "plainact_act": (act * g).abs(), "fisher_act": (act * g) ** 2,
            }
            for c in CRITERIA:
                out[c]["heads"].append(heads_[c])
                out[c]["neurons"].append(neurons[c])
        raw = {"G": [t.view(n, heads, dim) for t in gA], "dW1": list(gW1)}
        return {c: {u: torch.stack(v, dim=1) for u, v in units.items()} for c, units in out.items()}, raw

    def hessian_times_gradient(self, ids, counted, g, eps=1e-5):
        """H·g by central finite differences of the gradient along g (all heads' outputs and activations)."""
        cfg, n, nl = self.cfg, ids.shape[0], self.cfg.num_hidden_layers
        scale = eps / torch.sqrt(sum((t ** 2).sum() for t in g))

        def gradient(step):
            dA = [(step * g[l]).clone().requires_grad_(True) for l in range(nl)]
            dact = [(step * g[nl + l]).clone().requires_grad_(True) for l in range(nl)]
            with torch.enable_grad():
                logits, _ = self.forward(ids, dA, dact)
                return torch.autograd.grad(self.loss(logits, ids, counted), dA + dact)

        up, down = gradient(scale), gradient(-scale)
        return [(u - d) / (2 * scale) for u, d in zip(up, down)]


def jacov_reference(jacobians):
    """NASWOT's jacob_cov on (B, n) Jacobians: -Σ log(λ + k) + 1/(λ + k) over the eigenvalues of corrcoef (where
    a Jacobian is flat, its correlations, undefined, are 0)."""
    with np.errstate(invalid="ignore", divide="ignore"):
        corr = np.nan_to_num(np.corrcoef(jacobians.numpy()), nan=0.0)
    eig = np.linalg.eigvalsh(corr).clip(min=0)
    return float(-np.sum(np.log(eig + 1e-5) + 1.0 / (eig + 1e-5)))


def test_every_criterion_matches_the_explicit_reference_per_token(model, ids):
    got = score_example(model, ids[0], CRITERIA)
    ref, _ = Explicit(model).scores(ids[0])
    for c in CRITERIA:
        assert got[c]["heads"].shape == (T, L, H) and got[c]["neurons"].shape == (T, L, FF)
        for unit in ("heads", "neurons"):
            tol = dict(rtol=1e-5, atol=1e-9) if c == "grasp" else dict(rtol=1e-9, atol=1e-12)  # finite differences
            torch.testing.assert_close(got[c][unit], ref[c][unit], **tol, msg=f"{c} {unit}")
            assert got[c][unit][:-1].abs().sum() > 0, f"{c} {unit} is trivially zero"
    # the last token predicts nothing inside the example: gradient-based scores are 0 there
    assert got["gradnorm"]["heads"][-1].abs().max() == 0
    # plainact sums absolute terms whose sum's absolute value plainact_act takes; snip adds fc1's bias term
    assert (got["plainact"]["heads"] >= got["plainact_act"]["heads"] - 1e-12).all()
    assert not torch.allclose(got["plainact"]["heads"], got["plainact_act"]["heads"])
    assert (got["snip"]["neurons"] >= got["plainact"]["neurons"]).all()
    assert set(score_example(model, ids[0], ("plainact_weight",))) == {"plainact_weight"}  # the former name


def test_hand_computed_values_on_a_one_layer_model():
    """A 1-layer OPT (hidden 8, 2 heads): the criteria of one head and one neuron at one token, written out."""
    model = tiny_opt(vocab=32, layers=1, hidden=8, heads=2, ffn=16, seed=2)
    tokens = torch.tensor([3, 7, 11, 5, 9])
    got = score_example(model, tokens, CRITERIA)
    _, raw = Explicit(model).scores(tokens, hessian=False)
    t, h, j = 1, 1, 4
    layer = opt_layers(model)[1][0]
    g, share = raw["G"][0][t, h], raw["dW1"][0][t, j]  # ∂L/∂A of head h, token t's share of ∂L/∂θ_j
    captured = {}
    handles = [layer.self_attn.out_proj.register_forward_pre_hook(lambda m, a: captured.setdefault("A", a[0])),
               layer.fc2.register_forward_pre_hook(lambda m, a: captured.setdefault("act", a[0]))]
    with torch.no_grad():
        model(input_ids=tokens[None])
    for handle in handles:
        handle.remove()
    a, act = captured["A"].reshape(5, 2, 4)[t, h], captured["act"].reshape(5, 16)[t, j]
    theta = layer.fc1.weight[j]
    expected = {
        "l2norm": (sum(v * v for v in a) ** 0.5, abs(act)),
        "gradnorm": (sum(v * v for v in g) ** 0.5, sum(v * v for v in share) ** 0.5),
        "plainact": (sum(abs(a[d] * g[d]) for d in range(4)), sum(abs(theta[k] * share[k]) for k in range(8))),
        "fisher": (sum((a[d] * g[d]) ** 2 for d in range(4)) / 4, sum((theta[k] * share[k]) ** 2 for k in range(8)) / 8),
    }
    for c, (head_value, neuron_value) in expected.items():
        assert got[c]["heads"][t, 0, h].item() == pytest.approx(float(head_value), rel=1e-9), c
        assert got[c]["neurons"][t, 0, j].item() == pytest.approx(float(neuron_value), rel=1e-9), c


def test_jacov_is_the_jacobian_covariance_of_a_batch(model):
    torch.manual_seed(9)
    batch = torch.randint(3, 256, (3, T))
    got = aggregate(model, batch, ("jacov",))["jacov"]
    raws = [Explicit(model).scores(row, hessian=False)[1] for row in batch]
    for l in range(L):
        for h in range(H):
            jac = torch.stack([raw["G"][l][:, h].flatten() for raw in raws])
            assert got["heads"][l, h].item() == pytest.approx(jacov_reference(jac), rel=1e-4)
        for j in range(0, FF, 7):
            jac = torch.stack([raw["dW1"][l][:, j].sum(0) for raw in raws])  # ∂L_b/∂θ_j, summed over tokens
            assert got["neurons"][l, j].item() == pytest.approx(jacov_reference(jac), rel=1e-4)
    assert got["heads"].shape == (L, H) and got["neurons"].shape == (L, FF)
    # a batch of two plus a batch of one: the single example does not count for jacov
    two = aggregate(model, batch[:2], ("jacov",), batch_size=2)["jacov"]
    torch.testing.assert_close(aggregate(model, batch, ("jacov",), batch_size=2)["jacov"]["heads"], two["heads"])
    with pytest.raises(HarnessError, match="batch"):
        score_example(model, batch[0], ("jacov",))
    with pytest.raises(HarnessError, match="at least 2"):
        aggregate(model, batch[:1], ("jacov",))


def test_a_neuron_that_never_fires_scores_lowest():
    model = tiny_opt(seed=6)
    with torch.no_grad():
        opt_layers(model)[1][1].fc1.bias[5] = -1e3
    torch.manual_seed(3)
    batch = torch.randint(3, 256, (3, T))
    agg = aggregate(model, batch, ALL_CRITERIA, batch_size=3)
    for c in ALL_CRITERIA:
        if c == "jacov":  # a zero Jacobian correlates with nothing: every eigenvalue 0
            assert agg[c]["neurons"][1, 5].item() == pytest.approx(-3 * (np.log(1e-5) + 1e5))
            assert (agg[c]["neurons"][1, 5] < agg[c]["neurons"][1, [0, 1, 2, 3, 4, 6]]).all()
        elif c == "gradnorm_act":  # |∂L/∂act| does not look at whether the neuron fires
            assert agg[c]["neurons"][1, 5] > 0
        else:
            assert agg[c]["neurons"][1, 5] == 0, c
            assert agg[c]["neurons"][1].max() > 0, c


@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16])
def test_scores_are_float32_for_half_precision_models(ids, dtype):
    """Per-token fisher of neurons is far below fp16's smallest value: the scores come back in float32, close
    to the float64 model's."""
    exact = score_example(tiny_opt(), ids[0], ("fisher", "grasp"))
    scores = score_example(tiny_opt(dtype=dtype), ids[0], ("fisher", "grasp"))
    for c in ("fisher", "grasp"):
        for unit in ("heads", "neurons"):
            assert scores[c][unit].dtype == torch.float32
            truth = exact[c][unit][:-1]
            assert (scores[c][unit][:-1][truth > 0] > 0).float().mean() > 0.95, (c, unit)


def test_batch_scores_are_each_examples_own(model, ids):
    both = score_example(model, ids, CRITERIA)
    for b in range(ids.shape[0]):
        one = score_example(model, ids[b], CRITERIA)
        for c in CRITERIA:
            for unit in ("heads", "neurons"):
                torch.testing.assert_close(both[c][unit][b], one[c][unit], rtol=1e-9, atol=1e-12)


def test_aggregate_is_the_mean_over_tokens(model, ids):
    agg = aggregate(model, ids, CRITERIA)
    per = score_example(model, ids, CRITERIA)
    for c in CRITERIA:
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
    scores = score_example(model, torch.randint(3, 256, (T,)), CRITERIA)
    for c in ("l2norm", "plainact", "fisher", "snip", "grasp", "plainact_act", "fisher_act"):
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
    score_example(model, ids, CRITERIA)
    aggregate(model, ids, ("snip", "jacov"))
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
    assert session.cache.builds == 1 and first.meta["tokens"] == 64 and first.meta["batch"] == 1
    assert "grasp" not in first.meta["criteria"] and "jacov" not in first.meta["criteria"]
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
    jacov = get_method(MethodSpec.parse("static:jacov")).fit(ctx, allocation)  # its own pass, 8 examples a batch
    assert session.cache.builds == 3 and jacov.meta["criteria"] == ["jacov"] and jacov.meta["batch"] == 8
    ctx.config.calib_seqlen = 16  # any input of the key changes: rebuilt
    try:
        assert method.fit(ctx, allocation).path != first.path and session.cache.builds == 4
    finally:
        ctx.config.calib_seqlen = 32
    ctx.config.calib_samples = 1
    try:
        with pytest.raises(HarnessError, match="at least 2 calibration examples"):  # jacov is a batch's property
            get_method(MethodSpec.parse("static:jacov")).fit(ctx, allocation)
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


# -- ShadowLLM's protocol: loss on the target output, importance read at the last context token ------------------
class Example:
    def __init__(self, ids, target):
        self.ids, self.target = list(ids), target


@pytest.fixture(scope="module")
def targets():
    torch.manual_seed(11)
    return [Example(torch.randint(3, 256, (9,)).tolist(), (5, 8)),  # context 5, target 3, one token after it
            Example(torch.randint(3, 256, (6,)).tolist(), (3, 6)),
            Example(torch.randint(3, 256, (11,)).tolist(), (9, 11))]


def test_target_scores_are_read_at_the_last_context_token_with_the_loss_on_the_target(model, targets):
    got = score_targets(model, targets, CRITERIA, batch_size=2, features=FEATURES)
    assert got.index.tolist() == [4, 2, 8]
    for i, example in enumerate(targets):
        start, end = example.target
        ids = torch.tensor(example.ids[:end])
        counted = torch.zeros(end, dtype=torch.bool)
        counted[start - 1:end - 1] = True  # the positions that predict the target's tokens
        ref, _ = Explicit(model).scores(ids, counted)
        lm = score_example(model, ids, ("plainact",))["plainact"]  # the loss over every token instead
        for c in CRITERIA:
            for unit in UNITS:
                tol = dict(rtol=1e-5, atol=1e-9) if c == "grasp" else dict(rtol=1e-9, atol=1e-12)
                torch.testing.assert_close(got.scores[c][unit][i], ref[c][unit][start - 1], **tol, msg=f"{c} {unit}")
        assert not torch.allclose(got.scores["plainact"]["heads"][i], lm["heads"][start - 1])
        # the features are the model's activations at that token
        seen = {}
        keep = lambda key, value: seen.__setitem__(key, value)  # noqa: E731 - hooks that return None
        _, layers = opt_layers(model)
        hooks = [layers[0].self_attn.register_forward_hook(lambda m, a, o: keep("attn", o[0]))]
        hooks += [layer.register_forward_pre_hook(lambda m, a, kw, l=l: keep(("in", l), kw.get("hidden_states", a[0] if a else None)),
                                                  with_kwargs=True) for l, layer in enumerate(layers)]
        hooks += [layer.final_layer_norm.register_forward_pre_hook(lambda m, a, l=l: keep(("mlp", l), a[0]))
                  for l, layer in enumerate(layers)]
        with torch.no_grad():
            model(input_ids=ids[None])
        for h in hooks:
            h.remove()
        torch.testing.assert_close(got.features["attn_output0"][i], seen["attn"].reshape(end, E)[start - 1])
        for l in range(L):
            torch.testing.assert_close(got.features["layer_input"][i, l], seen[("in", l)].reshape(end, E)[start - 1])
            torch.testing.assert_close(got.features["mlp_input"][i, l], seen[("mlp", l)].reshape(end, E)[start - 1])


def test_target_scores_ignore_what_follows_the_target_and_how_examples_are_batched(model, targets):
    one = score_targets(model, targets, ("plainact", "fisher"), batch_size=1)
    padded = score_targets(model, targets, ("plainact", "fisher"), batch_size=3)
    longer = [Example(e.ids + [7, 8, 9], e.target) for e in targets]
    after = score_targets(model, longer, ("plainact", "fisher"), batch_size=3)
    for c in ("plainact", "fisher"):
        for unit in UNITS:
            torch.testing.assert_close(padded.scores[c][unit], one.scores[c][unit], rtol=1e-9, atol=1e-12)
            torch.testing.assert_close(after.scores[c][unit], one.scores[c][unit], rtol=1e-9, atol=1e-12)
    assert one.scores["plainact"]["neurons"].shape == (3, L, FF) and one.features["attn_output0"].shape == (3, E)
    with pytest.raises(HarnessError, match="target span"):
        score_targets(model, [Example([5, 6, 7], (0, 2))])
    with pytest.raises(HarnessError, match="batch of examples only"):
        score_targets(model, targets, ("jacov",))


def test_aggregate_targets_means_the_read_scores_and_computes_jacov_at_the_read_token(model, targets):
    agg = aggregate_targets(model, targets, ("plainact", "jacov"), batch_size=3)
    per = score_targets(model, targets, ("plainact",))
    for unit in UNITS:
        torch.testing.assert_close(agg["plainact"][unit], per.scores["plainact"][unit].mean(0).float())
    raws = []
    for example in targets:
        start, end = example.target
        counted = torch.zeros(end, dtype=torch.bool)
        counted[start - 1:end - 1] = True
        raws.append((start - 1, Explicit(model).scores(torch.tensor(example.ids[:end]), counted, hessian=False)[1]))
    for l in range(L):
        for h in range(H):
            jac = torch.stack([raw["G"][l][t, h] for t, raw in raws])
            assert agg["jacov"]["heads"][l, h].item() == pytest.approx(jacov_reference(jac), rel=1e-4)
        for j in range(0, FF, 9):
            jac = torch.stack([raw["dW1"][l][t, j] for t, raw in raws])
            assert agg["jacov"]["neurons"][l, j].item() == pytest.approx(jacov_reference(jac), rel=1e-4)


def test_static_footprint_is_per_criterion_group_and_jacov_refuses_at_30b():
    """OPT-30B on a 139 GiB GPU: plainact's one-example backward fits; jacov's 8-example pass does not (exit 2
    naming the settings), where one pass of every criterion used to run out of memory halfway."""
    from harness.footprint import GiB, check
    from harness.models import ModelSpec
    from harness.spec import RunConfig

    model_config = ModelSpec("opt-30b", "random").config()
    config = RunConfig(suite="x", model="opt-30b", weights="random", methods=["static"], sparsity=["0.5"])
    needs = {}
    for variant in ("plainact", "fisher", "grasp", "jacov"):
        needs[variant] = get_method(MethodSpec.parse(f"static:{variant}")).footprint(model_config, config,
                                                                                     Allocation(heads=0.5), 0)
    assert list(needs["plainact"]) == list(needs["fisher"]) == [("importance", "first_order")]
    gpu = {v: next(iter(n.values())).gpu for v, n in needs.items()}
    assert gpu["grasp"] == 2 * gpu["plainact"] and gpu["jacov"] > 8 * gpu["plainact"]
    kwargs = dict(model_config=model_config, run_config=config, device="cuda", dtype="float16",
                  cache_root=Path("/tmp"), free_host=100 * GiB, free_disk=100 * GiB, gpu_total=139 * GiB)
    assert check(needs["plainact"], **kwargs)["gpu_gb"] < 139
    with pytest.raises(HarnessError, match="importance_batch"):
        check(needs["jacov"], **kwargs)


@pytest.mark.parametrize("family", ["opt", "llama"])
def test_scores_at_one_position_per_example_equal_the_full_form_there(family):
    """_layer_scores(at=...) (what ShadowLLM's few-shot scoring uses) computes each per-token criterion at one
    token per example; it equals the full (B, T) form at those tokens, features included, for both families."""
    from methods.criteria import _layer_scores
    from tests.test_families import tiny_llama

    net = (tiny_opt() if family == "opt" else tiny_llama().double()).eval()
    net.requires_grad_(False)
    batch = torch.randint(3, 200, (3, 9), generator=torch.Generator().manual_seed(4))
    at = torch.tensor([4, 8, 2])
    counted = torch.zeros(3, 9, dtype=torch.bool)
    counted[0, 4:8], counted[1, 8:], counted[2, 2:6] = True, False, True
    counted[1, 5:8] = True
    full = list(_layer_scores(net, batch, CRITERIA, counted=counted, features=("attn_output0",)))
    one = list(_layer_scores(net, batch, CRITERIA, counted=counted, features=("attn_output0",), at=at))
    rows = torch.arange(3)
    for (l, whole, feats), (_, picked, feats_at) in zip(full, one):
        for c in CRITERIA:
            for unit in UNITS:
                assert picked[c][unit].shape[1] == 1
                torch.testing.assert_close(picked[c][unit][:, 0], whole[c][unit][rows, at], rtol=1e-9, atol=1e-12,
                                           msg=f"{family} layer {l} {c} {unit}")
        if l == 0:
            torch.testing.assert_close(feats_at["attn_output0"][:, 0], feats["attn_output0"][rows, at])
    with pytest.raises(HarnessError, match="per-position form"):
        list(_layer_scores(net, batch, ("jacov",), at=at))
