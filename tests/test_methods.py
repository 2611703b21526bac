"""Method plugins through their public interface: fit → policy → masked engine."""
import pytest
import torch

from harness.artefacts import ArtefactCache
from harness.engine import Allocation, MaskedEngine
from harness.runner import Session
from harness.spec import RunConfig
from methods import MethodSpec, discover, get_method


@pytest.fixture()
def session(tiny_model_dir, data, tmp_path):
    fewshot = {"examples": 10, "epochs": 2}  # ShadowLLM's few-shot calibration (shadow, dejavu:shadowllm), small
    config = RunConfig(model=str(tiny_model_dir), weights="pretrained", calib_samples=2, calib_seqlen=32,
                       method_settings={"shadow": fewshot, "dejavu": fewshot})
    return Session(config, data, ArtefactCache(tmp_path / "cache", log=lambda m: None))


def all_method_specs():
    """Every variant of every method (an unnamed default too); shadow's criterion variants differ only in the
    criterion its one predictor is trained on (the same network, inputs and masks), so its default variant, one
    other criterion and its language-model-text calibration stand for all."""
    specs = []
    for name, cls in sorted(discover().items()):
        variants = cls.variants if name != "shadow" else (cls.default_variant, "l2norm", "lmtext")
        if cls.default_variant is None and variants:
            variants = (None, *variants)
        specs += [MethodSpec(name, v) for v in variants] or [MethodSpec(name)]
    return specs


def build(session, spec, allocation):
    ctx = session.fit_context(spec.name)
    method = get_method(spec, ctx.settings)
    allocation = method.adjust(allocation)  # as the runner does (shadow keeps layer 0 dense)
    artefact = method.fit(ctx, allocation)
    return method, MaskedEngine(session.model, method.policy(ctx, allocation, artefact), allocation)


def target(method, value=0.5, **extra):
    units = method.units or set()
    return Allocation(heads=value if "heads" in units else 0.0, neurons=value if "neurons" in units else 0.0, **extra)


@pytest.mark.parametrize("spec", all_method_specs(), ids=lambda s: s.label)
def test_every_method_is_causal_with_token_scope(session, spec):
    """Changing token t+1 leaves the logits of tokens <= t unchanged."""
    method = get_method(spec)
    _, engine = build(session, spec, target(method))
    x = torch.randint(3, 50000, (1, 12), generator=torch.Generator().manual_seed(0))
    y = x.clone()
    t = 6
    y[0, t + 1:] = torch.randint(3, 50000, (12 - t - 1,), generator=torch.Generator().manual_seed(1))
    with engine.applied():
        a = session.model(input_ids=x).logits
        b = session.model(input_ids=y).logits
    assert torch.allclose(a[:, :t + 1], b[:, :t + 1], atol=1e-6, rtol=0)
    if method.units:
        assert not torch.allclose(a[:, t + 1:], b[:, t + 1:])


def test_request_scope_is_not_causal_and_that_is_visible(session):
    method = get_method(MethodSpec("random"))
    _, engine = build(session, MethodSpec("random"), target(method, scope="request"))
    x = torch.randint(3, 50000, (1, 12), generator=torch.Generator().manual_seed(0))
    y = x.clone()
    y[0, -1] += 1
    with engine.applied():
        a, b = session.model(input_ids=x).logits, session.model(input_ids=y).logits
    assert not torch.allclose(a[:, :5], b[:, :5])


def test_replace_head_outputs_calibration_means_and_ranked_differs(session):
    allocation = Allocation(heads=0.5)
    ctx = session.fit_context("replace")
    head = get_method(MethodSpec("replace", "head")).fit(ctx, allocation)
    ranked = get_method(MethodSpec("replace", "ranked")).fit(ctx, allocation)
    calib = ctx.calibration_ids()
    # the head mean recomputed independently from the out_proj inputs
    model, sums, count = session.model, torch.zeros_like(head.tensors["replacement"], dtype=torch.float64), 0
    grabbed = []
    handle = model.model.decoder.layers[1].self_attn.out_proj.register_forward_pre_hook(
        lambda m, args: grabbed.append(args[0].detach().double()))
    with torch.no_grad():
        for row in calib:
            model(input_ids=row[None])
    handle.remove()
    outs = torch.cat([g.reshape(-1, 4, 8) for g in grabbed])
    assert torch.allclose(head.tensors["replacement"][1].double(), outs.mean(0), atol=1e-5)
    # ranked: the mean over tokens where the head was among the 2 lowest-norm heads
    norms = outs.norm(dim=-1)
    skipped = torch.zeros_like(norms, dtype=torch.bool).scatter_(1, norms.topk(2, largest=False).indices, True)
    for h in range(4):
        if skipped[:, h].any():
            assert torch.allclose(ranked.tensors["replacement"][1, h].double(), outs[skipped[:, h], h].mean(0), atol=1e-5)
    assert not torch.allclose(head.tensors["replacement"], ranked.tensors["replacement"])


def test_fitted_artefacts_are_reused_and_a_corrupt_one_is_rebuilt(session):
    allocation = Allocation(heads=0.5)
    method = get_method(MethodSpec("replace", "ranked"))
    ctx = session.fit_context("replace")
    first = method.fit(ctx, allocation)
    assert session.cache.builds == 1
    again = method.fit(ctx, allocation)
    assert session.cache.builds == 1 and session.cache.hits == 1
    assert torch.equal(first.tensors["replacement"], again.tensors["replacement"])
    method.fit(ctx, Allocation(heads=0.25))  # ranked depends on the target: a new artefact
    assert session.cache.builds == 2
    tensors = first.path / "tensors.safetensors"
    tensors.write_bytes(tensors.read_bytes()[:-20] + b"x" * 20)
    messages = []
    session.cache.log = messages.append
    rebuilt = method.fit(ctx, allocation)
    assert session.cache.builds == 3 and "corrupt artefact" in messages[0]
    assert torch.equal(rebuilt.tensors["replacement"], first.tensors["replacement"])
