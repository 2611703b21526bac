"""Which tensor and which token each predictor reads and trains on (issue 14 items 4-6), on tiny models:

* Deja Vu's head predictor of layer l reads layer l−1's MLP input (the lookahead of the paper's Figure 2), and
  `dejavu:attn-input` layer l−1's attention input, in the masked engine and in training; neurons read layer l's
  attention input;
* shadow's default fit is ShadowLLM's protocol: few-shot examples, the loss on the target, layer 0's attention
  output and the criterion read at each example's last context token; `shadow:lmtext` keeps language-model text;
  the artefact keys change with the examples (their fingerprint) and with CRITERIA_VERSION;
* `dejavu:shadowllm`: per-layer 2048-hidden MSE predictors of min-max normalised L2Norm from layer 0's attention
  output, local and global;
* timewise's predictors have two hidden layers.
"""
import pytest
import torch

pytest.importorskip("lm_eval")

from harness.artefacts import ArtefactCache  # noqa: E402
from harness.engine import Allocation, MaskedEngine  # noqa: E402
from harness.errors import HarnessError  # noqa: E402
from harness.runner import Session, calibration_sampling  # noqa: E402
from harness.spec import RunConfig  # noqa: E402
from methods import MethodSpec, get_method  # noqa: E402
from tests.conftest import tiny_model  # noqa: E402

LAYERS = 3
FEWSHOT = {"examples": 10, "epochs": 3, "hidden": 32}


@pytest.fixture(scope="module")
def model_dir(tmp_path_factory):
    path = tmp_path_factory.mktemp("tiny3")
    tiny_model(num_hidden_layers=LAYERS).save_pretrained(path)
    return path


def make_session(model_dir, data, cache, **settings):
    method_settings = {"shadow": dict(FEWSHOT), "dejavu": dict(FEWSHOT), "timewise": {"epochs": 2}}
    for name, extra in settings.items():
        method_settings[name] = {**method_settings.get(name, {}), **extra}
    config = RunConfig(model=str(model_dir), weights="pretrained", calib_samples=2, calib_seqlen=16,
                       method_settings=method_settings)
    return Session(config, data, ArtefactCache(cache, log=lambda m: None))


@pytest.fixture(scope="module")
def session(model_dir, data, tmp_path_factory):
    return make_session(model_dir, data, tmp_path_factory.mktemp("cache"))


def built(cache_root, kind) -> int:
    folder = cache_root / kind
    return len([p for p in folder.iterdir() if p.is_dir()]) if folder.exists() else 0


# -- Deja Vu: which tensor ------------------------------------------------------------------------------------
SEEN: dict = {}


class Recorder(torch.nn.Module):
    """A predictor that records what it reads (into the module-level SEEN: policies copy their predictors)."""

    def __init__(self, key, dim, out):
        super().__init__()
        self.key, self.proj = key, torch.nn.Linear(dim, out)

    def forward(self, x):
        SEEN[self.key] = x.detach().clone()
        return self.proj(x)


def recording_streams(model, streams):
    """Hooks of this test's own: the residual stream entering each decoder layer and each MLP block."""
    handles = []
    for index, layer in enumerate(model.model.decoder.layers):
        handles.append(layer.register_forward_pre_hook(
            lambda m, args, kwargs, i=index: streams.__setitem__(("layer", i), kwargs.get("hidden_states", args[0] if args else None).detach().clone()),
            with_kwargs=True))
        handles.append(layer.final_layer_norm.register_forward_pre_hook(
            lambda m, args, i=index: streams.__setitem__(("mlp", i), args[0].detach().clone())))
    return handles


def as_batch(x, like):
    return x.reshape(like.shape)  # OPT's MLP block sees (B·T, d)


@pytest.mark.parametrize("variant, head_stream", [(None, "mlp"), ("attn-input", "layer")])
def test_dejavu_head_predictor_reads_the_previous_layers_mlp_input_by_default(variant, head_stream):
    from methods.dejavu import HEAD_INPUTS, DejaVuPolicy

    model = tiny_model(num_hidden_layers=LAYERS)
    d, heads, ffn = model.config.hidden_size, model.config.num_attention_heads, model.config.ffn_dim
    attn = {l: Recorder(("heads", l), d, heads) for l in range(LAYERS)}
    mlp = {l: Recorder(("neurons", l), d, ffn) for l in range(LAYERS)}
    x = torch.randint(3, 50000, (1, 7), generator=torch.Generator().manual_seed(0))
    engine = MaskedEngine(model, DejaVuPolicy(attn, mlp, HEAD_INPUTS[variant]), Allocation(heads=0.5, neurons=0.5))
    streams, handles = {}, []
    SEEN.clear()
    try:
        handles = recording_streams(model, streams)  # the sparse model's streams (the policy's masks applied)
        with engine.applied(), torch.no_grad():
            model(input_ids=x)
    finally:
        for handle in handles:
            handle.remove()
    assert torch.equal(SEEN[("heads", 0)], streams[("layer", 0)])  # layer 0: its own attention input
    other = "layer" if head_stream == "mlp" else "mlp"
    for layer in range(1, LAYERS):
        seen = SEEN[("heads", layer)]
        assert torch.equal(seen, as_batch(streams[(head_stream, layer - 1)], seen)), layer
        assert not torch.allclose(seen, as_batch(streams[(other, layer - 1)], seen))  # the two really differ
    for layer in range(LAYERS):
        assert torch.equal(SEEN[("neurons", layer)], streams[("layer", layer)])


@pytest.mark.parametrize("variant, stored", [(None, "mlp_input"), ("attn-input", "layer_input")])
def test_dejavu_head_predictors_train_on_the_tensor_they_read(session, monkeypatch, variant, stored):
    import methods.dejavu as dejavu_module
    from harness.traces import collect_traces

    captured = {}
    original = dejavu_module.train_classifiers

    def spy(predictors, x, y, val_x, val_y, **kwargs):
        captured.setdefault("x", x)
        return original(predictors, x, y, val_x, val_y, **kwargs)

    monkeypatch.setattr(dejavu_module, "train_classifiers", spy)
    ctx = session.fit_context("dejavu")
    method = get_method(MethodSpec("dejavu", variant), ctx.settings)
    method.fit(ctx, Allocation(heads=0.5))
    traces = collect_traces(ctx)
    train, _ = traces.split(method.hp()["val_fraction"], ctx.seed)
    x = captured["x"]  # (layers, train tokens, d): layers 0, 1, 2
    assert torch.equal(x[0], traces.layer_input()[train, 0])
    for layer in range(1, LAYERS):
        assert torch.equal(x[layer], traces.t[stored][train, layer - 1]), layer
    assert not torch.equal(traces.t["mlp_input"][:, 0], traces.t["layer_input"][:, 0])


# -- shadow: ShadowLLM's protocol -----------------------------------------------------------------------------
def layer0_attention(model, example, index):
    """Layer 0's attention output at token `index` of the example (read up to its target's end), from a hook of
    this test's own."""
    got = {}
    handle = model.model.decoder.layers[0].self_attn.register_forward_hook(
        lambda m, args, output: got.__setitem__("y", output[0].detach()))
    try:
        with torch.no_grad():
            model(input_ids=torch.tensor([example.ids[:example.target[1]]]))
    finally:
        handle.remove()
    return got["y"][0, index]


def test_shadow_trains_on_few_shot_examples_read_at_the_last_context_token(session, monkeypatch):
    import methods.shadow as shadow_module
    from harness.fewshot import calibration_set
    from methods.criteria import score_targets
    from methods.predictors import example_split, minmax

    captured = {}
    original = shadow_module.train_regressor

    def spy(predictor, x, y, **kwargs):
        captured["x"], captured["y"] = x.clone(), y
        return original(predictor, x, y, **kwargs)

    monkeypatch.setattr(shadow_module, "train_regressor", spy)
    ctx = session.fit_context("shadow")
    method = get_method(MethodSpec("shadow"), ctx.settings)
    assert method.protocol == "fewshot" and method.hp()["epochs"] == 3
    allocation = method.adjust(Allocation(heads=0.5, neurons=0.5))
    artefact = method.fit(ctx, allocation)
    fewshot = calibration_set(ctx, ctx.settings)
    examples = fewshot.examples
    assert len(examples) == 10 and all(e.target[0] >= 1 for e in examples)
    train, val = example_split(len(examples), method.hp()["val_fraction"], ctx.seed)
    assert len(val) == 1 and len(train) == 9
    model = session.model
    rows = [examples[i] for i in train.tolist()]
    expected_x = torch.stack([layer0_attention(model, e, e.target[0] - 1) for e in rows])
    assert torch.allclose(captured["x"], expected_x, atol=1e-5)  # the last context token
    answer = torch.stack([layer0_attention(model, e, e.target[0]) for e in rows])
    assert not torch.allclose(captured["x"], answer, atol=1e-3)  # not the target's first token
    # the targets are the per-example criterion (plainact, loss on the target only) normalised per layer
    scores = score_targets(model, [examples[i] for i in train.tolist()], ("plainact",), batch_size=3).scores["plainact"]
    batch = torch.arange(len(train))
    target = captured["y"](batch)
    width = LAYERS * model.config.num_attention_heads
    assert torch.allclose(target[:, :width], minmax(scores["heads"]).flatten(1), atol=1e-5)
    neurons = minmax(scores["neurons"].to(torch.bfloat16).float()).flatten(1)
    assert torch.allclose(target[:, width:], neurons, atol=1e-5)
    fields = calibration_sampling(artefact.meta)
    assert fields["calib_protocol"] == "fewshot" and fields["calib_examples"] == 10 and fields["calib_shots"] == 5
    assert fields["calib_fingerprint"] == fewshot.fingerprint and sum(fields["calib_tasks"].values()) == 10
    assert fields["calib_data"].startswith("fewshot:")
    report = method.quality(ctx, allocation, artefact)
    assert set(report) >= {"heads", "neurons"}


def test_shadow_lmtext_calibrates_on_language_model_text(session, monkeypatch):
    import methods.shadow as shadow_module
    from harness.traces import collect_traces

    captured = {}
    original = shadow_module.train_regressor

    def spy(predictor, x, y, **kwargs):
        captured["x"] = x.clone()
        return original(predictor, x, y, **kwargs)

    monkeypatch.setattr(shadow_module, "train_regressor", spy)
    ctx = session.fit_context("shadow")
    method = get_method(MethodSpec("shadow", "lmtext"), ctx.settings)
    assert method.protocol == "lmtext" and method.criterion == "plainact_weight" and method.hp()["epochs"] == 3
    artefact = method.fit(ctx, method.adjust(Allocation(heads=0.5)))
    traces = collect_traces(ctx)
    train, _ = traces.split(method.hp()["val_fraction"], ctx.seed)
    assert torch.equal(captured["x"], traces.attn_output0()[train])  # every traced token of the calibration text
    fields = calibration_sampling(artefact.meta)
    assert fields["calib_protocol"] == "lmtext" and fields["calib_tokens"] == 2 * 16
    assert not calibration_sampling(artefact.meta).get("calib_examples")
    other = get_method(MethodSpec("shadow", "l2norm"), {**ctx.settings, "calibration": "lmtext"})
    assert other.protocol == "lmtext" and other.criterion == "l2norm"
    with pytest.raises(HarnessError, match="unknown calibration"):
        get_method(MethodSpec("shadow"), {"calibration": "wikitext"}).hp()


def test_a_changed_protocol_never_reuses_a_stale_fit(model_dir, data, tmp_path, monkeypatch):
    import methods.criteria as criteria

    root = tmp_path / "cache"
    allocation = Allocation(heads=0.5, neurons=0.5, dense_layers=(0,))

    def fit(label="shadow", **settings):
        session = make_session(model_dir, data, root, shadow={"keep_scores": True, **settings})
        spec = MethodSpec.parse(label)
        ctx = session.fit_context(spec.name)
        return get_method(spec, ctx.settings).fit(ctx, allocation)

    first = fit()
    assert (built(root, "target_scores"), built(root, "shadow")) == (1, 1)
    assert fit().path == first.path  # the same protocol: reused
    fit(examples=11)  # other examples: a new fingerprint, new scores and a new predictor
    assert (built(root, "target_scores"), built(root, "shadow")) == (2, 2)
    fit(shots=3)
    assert (built(root, "target_scores"), built(root, "shadow")) == (3, 3)
    monkeypatch.setattr(criteria, "CRITERIA_VERSION", criteria.CRITERIA_VERSION + 1)  # a criterion's definition changed
    fit()
    assert (built(root, "target_scores"), built(root, "shadow")) == (4, 4)
    monkeypatch.undo()
    lmtext = fit("shadow:lmtext")  # the language-model-text protocol: its own artefact, never a few-shot one
    assert built(root, "shadow") == 5 and lmtext.path != first.path and built(root, "target_scores") == 4


def test_fewshot_scores_stay_in_memory_unless_kept_and_give_the_same_predictor(model_dir, data, tmp_path, monkeypatch):
    """By default the few-shot scores are never written to the cache (keep_scores: false): one scoring per session,
    shared by every fit of it, and the same predictor weights as with the scores written and read back; the fit
    estimate then counts no disk for them. A non-boolean keep_scores is refused."""
    import methods.criteria as criteria

    scored = []
    original = criteria.score_targets
    monkeypatch.setattr(criteria, "score_targets", lambda *a, **k: scored.append(1) or original(*a, **k))
    allocation = Allocation(heads=0.5, neurons=0.5, dense_layers=(0,))

    def fit(root, seed=0, **settings):
        session = make_session(model_dir, data, root, shadow=settings)
        ctx = session.fit_context("shadow", seed)
        method = get_method(MethodSpec("shadow"), ctx.settings)
        return session, method, method.fit(ctx, allocation)

    session, method, memory = fit(tmp_path / "memory")
    passes = len(scored)
    assert passes > 0 and built(tmp_path / "memory", "target_scores") == 0 and built(tmp_path / "memory", "shadow") == 1
    ctx = session.fit_context("shadow", 1)  # another seed in the same session: scored once, from memory
    get_method(MethodSpec("shadow"), ctx.settings).fit(ctx, allocation)
    assert len(scored) == passes and built(tmp_path / "memory", "shadow") == 2
    _, kept_method, kept = fit(tmp_path / "kept", keep_scores=True)
    assert built(tmp_path / "kept", "target_scores") == 1 and len(scored) == 2 * passes
    assert memory.tensors.keys() == kept.tensors.keys()
    assert all(torch.equal(memory.tensors[k], kept.tensors[k]) for k in memory.tensors)
    config = session.model.config
    def need(m):
        return next(n for key, n in m.footprint(config, session.config, allocation, 0).items() if key[0] == "target_scores")

    assert need(method).disk == 0 and need(kept_method).disk > 0 and need(method).host == need(kept_method).host
    with pytest.raises(HarnessError, match="keep_scores"):
        fit(tmp_path / "bad", keep_scores="yes")


# -- dejavu:shadowllm ---------------------------------------------------------------------------------------------
def test_dejavu_shadowllm_per_layer_mse_predictors_on_l2norm_local_and_global(model_dir, data, tmp_path, monkeypatch):
    import methods.dejavu as dejavu_module
    from harness.fewshot import calibration_set
    from methods.criteria import fit_target_scores
    from methods.dejavu import LayerwiseShadowPolicy
    from methods.predictors import example_split, minmax

    session = make_session(model_dir, data, tmp_path / "cache", dejavu={"hidden": 2048, "epochs": 2})
    captured = {}
    original = dejavu_module.train_regressors

    def spy(predictors, x, y, **kwargs):
        captured[len(captured)] = (predictors, x.clone(), y)
        return original(predictors, x, y, **kwargs)

    monkeypatch.setattr(dejavu_module, "train_regressors", spy)
    ctx = session.fit_context("dejavu")
    method = get_method(MethodSpec("dejavu", "shadowllm"), ctx.settings)
    assert method.allocations == {"local", "global"} and "global" not in get_method(MethodSpec("dejavu")).allocations
    allocation = method.adjust(Allocation(heads=0.5, neurons=0.5))
    assert allocation.dense_layers == (0,)
    artefact = method.fit(ctx, allocation)
    fewshot = calibration_set(ctx, ctx.settings)
    scores = fit_target_scores(ctx, fewshot, "l2norm")
    train, _ = example_split(len(fewshot.examples), 0.1, ctx.seed)
    config = session.model.config
    for (predictors, x, y), unit, size in zip(captured.values(), ("heads", "neurons"),
                                              (config.num_attention_heads, config.ffn_dim)):
        assert len(predictors) == LAYERS - 1  # one per sparse layer
        net = predictors[0].net
        assert [type(m).__name__ for m in net] == ["Linear", "ReLU", "Linear"]
        assert net[0].out_features == 2048 and net[2].out_features == size
        assert torch.equal(x, scores["attn_output0"][train])  # layer 0's attention output, last context token
        expected = minmax(scores[unit][train][:, 1:].float()).transpose(0, 1)  # per-layer min-max of L2Norm
        assert torch.allclose(y(torch.arange(len(train))), expected)
    assert calibration_sampling(artefact.meta)["calib_protocol"] == "fewshot"
    x = torch.randint(3, 50000, (1, 9), generator=torch.Generator().manual_seed(2))
    for mode in ("local", "global"):
        alloc = method.adjust(Allocation(heads=0.5, neurons=0.5, mode=mode))
        policy = method.policy(ctx, alloc, artefact)
        assert isinstance(policy, LayerwiseShadowPolicy)
        engine = MaskedEngine(session.model, policy, alloc)
        with engine.applied(), torch.no_grad():
            session.model(input_ids=x)
        achieved = engine.achieved()
        assert achieved["achieved_heads"] == pytest.approx(0.5 * (LAYERS - 1) / LAYERS)
        assert achieved["achieved_heads_per_layer"][0] == 0.0


# -- timewise -----------------------------------------------------------------------------------------------------
def test_timewise_predictors_have_two_hidden_layers_of_256(session):
    ctx = session.fit_context("timewise")
    method = get_method(MethodSpec("timewise", "current"), ctx.settings)
    artefact = method.fit(ctx, Allocation(heads=0.5))
    d, heads = session.model.config.hidden_size, session.model.config.num_attention_heads
    shapes = {name.split(".", 2)[2]: tuple(t.shape) for name, t in artefact.tensors.items() if name.startswith("heads.1.")}
    assert shapes == {"mean": (d,), "std": (d,), "net.0.weight": (256, d), "net.0.bias": (256,),
                      "net.2.weight": (256, 256), "net.2.bias": (256,), "net.4.weight": (heads, 256),
                      "net.4.bias": (heads,)}
    predictor = method.policy(ctx, Allocation(heads=0.5), artefact).predictors[1]
    assert [type(m).__name__ for m in predictor.net] == ["Linear", "ReLU", "Linear", "ReLU", "Linear"]


def test_few_shot_scores_are_rows_in_the_examples_order(model_dir, data, tmp_path):
    """fit_target_scores packs the examples shortest first; its rows still follow the examples' order and equal
    score_targets of each example alone."""
    from harness.fewshot import calibration_set
    from methods.criteria import fit_target_scores, score_targets

    session = make_session(model_dir, data, tmp_path / "cache")
    ctx = session.fit_context("shadow")
    fewshot = calibration_set(ctx, ctx.settings)
    lengths = [int(e.target[1]) for e in fewshot.examples]
    assert lengths != sorted(lengths)  # packing reorders them
    got = fit_target_scores(ctx, fewshot, "plainact", max_tokens=512)
    alone = score_targets(ctx.model, fewshot.examples, ("plainact",), batch_size=1)
    torch.testing.assert_close(got["heads"], alone.scores["plainact"]["heads"].float(), rtol=1e-4, atol=1e-8)
    torch.testing.assert_close(got["neurons"].float(), alone.scores["plainact"]["neurons"].float(), rtol=1e-2, atol=1e-8)
    torch.testing.assert_close(got["attn_output0"], alone.features["attn_output0"].float(), rtol=1e-4, atol=1e-6)
