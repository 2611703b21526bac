"""Model families through the architecture adapter: OPT and the Llama family (GQA) in the masked engine, traces,
criteria, model building, placement and validation. Tiny models, random weights, no download."""
import pytest
import torch

from harness.engine import Allocation, MaskedEngine, MaskPolicy
from harness.errors import HarnessError
from harness.families import family_of, install, sizes_of
from harness.families.llama import llama_config
from harness.models import ModelSpec, load_model
from methods.norm_mask import NormPolicy
from tests.conftest import tiny_model

FAMILIES = ("opt", "llama")


def tiny_llama(seed=0, **overrides):
    """llama-tiny (4 query heads, 2 K/V heads, FFN 64) with N(0, 0.2) matrices, as conftest's tiny OPT."""
    from transformers import LlamaForCausalLM

    config = llama_config("llama-tiny")
    for key, value in overrides.items():
        setattr(config, key, value)
    family_of(config).normalise_config(config)
    torch.manual_seed(seed)
    model = LlamaForCausalLM(config).eval()
    with torch.no_grad():
        for param in model.parameters():
            if param.dim() == 2:
                param.normal_(0, 0.2)
    return model


def tiny(family, seed=0, **overrides):
    return tiny_model(seed, **overrides) if family == "opt" else tiny_llama(seed, **overrides)


def ids(batch=1, seq=10, seed=0):
    return torch.randint(3, 50000, (batch, seq), generator=torch.Generator().manual_seed(seed))


def layers_of(model):
    return family_of(model).layers(model)


# -- the adapter ------------------------------------------------------------------------------------------------
def test_family_of_every_supported_type_and_a_clear_refusal():
    from transformers import GPT2Config

    assert family_of(tiny_model()).name == "opt"
    for name in ("llama-tiny", "mistral-tiny", "qwen2-tiny"):
        assert family_of(ModelSpec(name).config()).name == "llama"
    with pytest.raises(HarnessError, match=r"supports OPT and Llama-family .* \(model types: llama, mistral, opt, qwen2\)"):
        family_of(GPT2Config())


@pytest.mark.parametrize("name, layers, hidden, heads, kv, ffn, params", [
    ("llama-2-7b", 32, 4096, 32, 32, 11008, 6_738_415_616),
    ("llama-2-13b", 40, 5120, 40, 40, 13824, 13_015_864_320),
    ("llama-3-8b", 32, 4096, 32, 8, 14336, 8_030_261_248),
    ("mistral-7b", 32, 4096, 32, 8, 14336, 7_241_732_096),
    ("qwen2-7b", 28, 3584, 28, 4, 18944, 7_615_616_512),
    ("llama-tiny", 2, 32, 4, 2, 64, None),
])
def test_builtin_llama_family_configs_are_exact(name, layers, hidden, heads, kv, ffn, params):
    from harness.placement import parameter_count

    config = ModelSpec(name).config()
    shape = sizes_of(config)
    assert (shape.layers, shape.hidden, shape.heads, shape.kv_heads, shape.ffn) == (layers, hidden, heads, kv, ffn)
    assert config.ffn_dim == ffn  # the alias the predictor methods read
    if params is not None:  # the published sizes (6.74B, 13.0B, 8.03B, 7.24B, 7.62B)
        assert parameter_count(config) == params


@pytest.mark.parametrize("name", ["opt-tiny", "llama-tiny", "mistral-tiny", "qwen2-tiny"])
def test_random_weights_build_the_exact_model_rotary_frequencies_included(name):
    """Seeded random weights on the meta device then materialised: the same logits as a model Hugging Face builds
    normally with the same parameters (its non-persistent buffers, e.g. RoPE's frequencies, computed in __init__)."""
    from transformers import AutoModelForCausalLM

    model = load_model(ModelSpec(name, "random"))
    reference = AutoModelForCausalLM.from_config(model.config).eval()
    reference.load_state_dict(model.state_dict())
    x = ids(batch=2, seq=9)
    assert torch.equal(model(input_ids=x).logits, reference(input_ids=x).logits)
    assert sum(p.numel() for p in model.parameters()) == family_of(model).parameter_count(model.config)
    again = load_model(ModelSpec(name, "random"))
    assert all(torch.equal(a, b) for a, b in zip(model.parameters(), again.parameters()))


def test_test_configs_have_no_checkpoint():
    with pytest.raises(HarnessError, match="test config"):
        ModelSpec("llama-tiny", "pretrained").source  # noqa: B018


def test_layer_device_map_of_a_llama_model():
    from harness.placement import layer_device_map

    config = ModelSpec("llama-3-8b").config()
    device_map, per_device = layer_device_map(config, ["cuda:0", "cuda:1"])
    assert per_device == [16, 16]
    assert device_map["model.layers.0"] == "cuda:0" and device_map["model.layers.31"] == "cuda:1"
    assert device_map["model.embed_tokens"] == "cuda:0" and device_map["model.rotary_emb"] == "cuda:0"
    assert device_map["model.norm"] == "cuda:1" and device_map["lm_head"] == "cuda:1"  # untied head beside the norm


@pytest.mark.parametrize("family", FAMILIES)
def test_every_hookpoint_and_linear_site_is_reached_with_the_documented_shape(family):
    from harness.families import HOOKPOINTS

    model = tiny(family)
    fam = family_of(model)
    shape = sizes_of(model)
    seen = {}
    handles = [install(fam, layers_of(model)[1], name, lambda x, name=name: seen.__setitem__(name, x.shape))
               for name in HOOKPOINTS + fam.linear_sites]
    try:
        model(input_ids=ids(batch=2, seq=5))
    finally:
        for handle in handles:
            handle.remove()
    assert set(seen) == set(HOOKPOINTS + fam.linear_sites)
    width = lambda name: seen[name][-1]  # noqa: E731
    assert width("head_output") == shape.heads * shape.head_dim
    assert width("neuron_act") == width("neuron_gate") == shape.ffn
    assert width("layer_input") == width("mlp_input") == shape.hidden
    assert sum(len(m._forward_pre_hooks) + len(m._forward_hooks) for m in model.modules()) == 0


# -- masked engine equivalences ----------------------------------------------------------------------------------
class Fixed(MaskPolicy):
    """Skips fixed units: heads, neurons, or the input columns of one linear site, at every token and layer."""

    def __init__(self, heads=(), neurons=(), site=None, columns=()):
        self.heads, self.neurons, self.columns = list(heads), list(neurons), list(columns)
        self.input_sites = (site,) if site else ()

    def _scores(self, n, skipped, like):
        scores = torch.ones(*like.shape[:2], n)
        scores[..., skipped] = 0
        return scores

    def head_scores(self, layer, state, head_out):
        return self._scores(head_out.shape[2], self.heads, head_out)

    def neuron_scores(self, layer, state, act):
        return self._scores(act.shape[-1], self.neurons, act)

    def input_keep(self, layer, site, state, x):
        keep = torch.ones_like(x, dtype=torch.bool)
        keep[..., self.columns] = False
        return keep


@pytest.mark.parametrize("family", FAMILIES)
def test_masking_a_query_head_equals_zeroing_its_output_projection_columns(family):
    model = tiny(family).double()
    x = ids()
    with MaskedEngine(model, Fixed(heads=[1]), Allocation(heads=0.25)).applied():
        masked = model(input_ids=x).logits
    dim = sizes_of(model).head_dim
    with torch.no_grad():
        for layer in layers_of(model):
            family_of(model).linear(layer, "o").weight[:, dim:2 * dim] = 0
    assert torch.allclose(masked, model(input_ids=x).logits, atol=1e-12)


@pytest.mark.parametrize("family", FAMILIES)
def test_masking_neurons_equals_zeroing_the_down_projection_columns(family):
    model = tiny(family).double()
    x = ids()
    skipped = [3, 17, 40, 63]
    with MaskedEngine(model, Fixed(neurons=skipped), Allocation(neurons=4 / 64)).applied():
        masked = model(input_ids=x).logits
    with torch.no_grad():
        for layer in layers_of(model):
            family_of(model).linear(layer, "down").weight[:, skipped] = 0
    assert torch.allclose(masked, model(input_ids=x).logits, atol=1e-12)


@pytest.mark.parametrize("family", FAMILIES)
def test_an_input_mask_equals_zeroing_the_weight_columns_of_that_site(family):
    model = tiny(family).double()
    fam = family_of(model)
    x = ids(batch=2, seq=7)
    for site in fam.linear_sites:
        columns = [0, 5, 9]
        engine = MaskedEngine(model, Fixed(site=site, columns=columns), Allocation(inputs=0.1))
        with engine.applied():
            masked = model(input_ids=x).logits
        weights = [fam.linear(layer, site).weight for layer in layers_of(model)]
        saved = [w.clone() for w in weights]
        with torch.no_grad():
            for w in weights:
                w[:, columns] = 0
        zeroed = model(input_ids=x).logits
        with torch.no_grad():
            for w, s in zip(weights, saved):
                w.copy_(s)
        assert torch.allclose(masked, zeroed, atol=1e-12), site
        assert not torch.allclose(masked, model(input_ids=x).logits), site
        width = weights[0].shape[1]
        assert engine.achieved()["achieved_inputs_per_site"][site] == pytest.approx(3 / width)


def test_llama_keys_and_values_of_every_head_are_kept():
    """Head masks act at o_proj's input: the KV cache of a masked prefill is the dense model's (GQA included)."""
    model = tiny_llama().double()
    x = ids(batch=2, seq=8)
    dense = model(input_ids=x, use_cache=True).past_key_values
    with MaskedEngine(model, NormPolicy(), Allocation(heads=0.5, neurons=0.5)).applied():
        masked = model(input_ids=x, use_cache=True).past_key_values
    for layer in masked.layers:  # every K/V head (2, shared by 2 query heads each) at every token
        assert layer.keys.shape == layer.values.shape == (2, 2, 8, 8)
    # a layer's own masks change nothing of its K/V (they act after attention): layer 0 reads the embeddings only
    first_dense, first_masked = dense.layers[0], masked.layers[0]
    assert torch.equal(first_dense.keys, first_masked.keys) and torch.equal(first_dense.values, first_masked.values)


@pytest.mark.parametrize("family", FAMILIES)
def test_planted_dead_heads_are_the_ones_norm_mask_skips(family):
    """OPT: zero one head's values. Llama (GQA): zero one K/V head's values, so both query heads of its group
    output zero; norm-mask skips exactly those at every token."""
    model = tiny(family)
    fam, shape = family_of(model), sizes_of(model)
    v = fam.linear(layers_of(model)[1], "v")
    dim = shape.head_dim
    with torch.no_grad():
        v.weight[dim:2 * dim] = 0
        if v.bias is not None:
            v.bias[dim:2 * dim] = 0
    dead = [1] if family == "opt" else [2, 3]  # K/V head 1 serves query heads 2 and 3
    engine = MaskedEngine(model, NormPolicy(), Allocation(heads=len(dead) / shape.heads))
    with engine.applied():
        model(input_ids=ids(batch=2, seq=16))
        keep = engine.state.keep[("heads", 1)]
    assert (~keep[..., dead]).all() and keep[..., [h for h in range(shape.heads) if h not in dead]].all()


def test_planted_dead_swiglu_neurons_are_the_ones_norm_mask_skips():
    model = tiny_llama()
    mlp = layers_of(model)[0].mlp
    dead = [5, 33]
    with torch.no_grad():
        mlp.up_proj.weight[dead] = 0  # act = silu(gate) · up = 0
    engine = MaskedEngine(model, NormPolicy(), Allocation(neurons=2 / 64))
    with engine.applied():
        model(input_ids=ids(batch=2, seq=12))
        keep = engine.state.keep[("neurons", 0)]
    assert (~keep[..., dead]).all() and int((~keep).sum(-1).max()) == 2


# -- traces and criteria on the Llama family ---------------------------------------------------------------------
def test_llama_traces_label_the_top_half_of_neurons_by_magnitude():
    from harness.traces import _collect, unpack_bits

    model = tiny_llama()
    x = ids(batch=2, seq=8)
    keep = torch.ones_like(x, dtype=torch.bool)
    traces = _collect(model, x, keep)
    assert traces["layer_input"].shape == (16, 2, 32) and traces["head_norm"].shape == (16, 2, 4)
    active = unpack_bits(traces["neuron_active"], 64)
    assert (active.sum(-1) == 32).all()
    grabbed = []
    handle = install(family_of(model), layers_of(model)[1], "neuron_act", lambda a: grabbed.append(a.detach()))
    with torch.no_grad():
        model(input_ids=x)
    handle.remove()
    act = grabbed[0].reshape(16, 64).abs()
    smallest_active = torch.where(active[:, 1], act, torch.inf).min(-1).values
    largest_inactive = torch.where(active[:, 1], -torch.inf, act).max(-1).values
    assert (smallest_active > largest_inactive).all()


def test_swiglu_criteria_match_autograd_gradients_at_gate_and_up():
    """plainact, gradnorm, fisher and snip of a SwiGLU neuron from the gradients at gate_proj's and up_proj's
    outputs (autograd, retained), against the scores methods.criteria computes from act and ∂L/∂act."""
    from methods.criteria import example_loss, score_example

    model = tiny_llama().double()
    x = ids(seq=9)[0]
    scores = score_example(model, x, ("plainact", "gradnorm", "fisher", "snip", "l2norm"))
    layer = layers_of(model)[1]
    mlp, store = layer.mlp, {}

    def keep(name):
        def hook(module, args, output):
            output.retain_grad()
            store[name] = output
            store[name + ".in"] = args[0]
        return hook

    handles = [mlp.gate_proj.register_forward_hook(keep("gate")), mlp.up_proj.register_forward_hook(keep("up")),
               mlp.down_proj.register_forward_hook(lambda m, a, o: store.__setitem__("act", a[0]))]
    for p in model.parameters():
        p.requires_grad_(True)
    try:
        example_loss(model(input_ids=x[None]).logits, x[None]).backward()
    finally:
        for handle in handles:
            handle.remove()
        model.requires_grad_(False)
    xin = store["gate.in"][0].detach()
    g_gate, g_up = store["gate"].grad[0], store["up"].grad[0]
    wg, wu = mlp.gate_proj.weight, mlp.up_proj.weight
    rows = [xin.abs() @ wg.abs().t(), xin.abs() @ wu.abs().t()]
    plainact = g_gate.abs() * rows[0] + g_up.abs() * rows[1]
    gradnorm = (g_gate.square() + g_up.square()).sqrt() * xin.norm(dim=-1, keepdim=True)
    fisher = (g_gate.square() * (xin.square() @ wg.square().t()) + g_up.square() * (xin.square() @ wu.square().t())) / 64
    for name, expected in (("plainact", plainact), ("gradnorm", gradnorm), ("fisher", fisher), ("snip", plainact),
                           ("l2norm", store["act"][0].abs())):
        assert torch.allclose(scores[name]["neurons"][:, 1], expected.detach(), rtol=1e-9, atol=1e-14), name


def test_every_criterion_runs_on_a_llama_model():
    from methods.criteria import ALL_CRITERIA, aggregate

    model = tiny_llama()
    result = aggregate(model, ids(batch=4, seq=8), ALL_CRITERIA, batch_size=2)
    for criterion in ALL_CRITERIA:
        assert result[criterion]["heads"].shape == (2, 4) and result[criterion]["neurons"].shape == (2, 64)
        assert torch.isfinite(result[criterion]["neurons"]).all(), criterion


# -- validation --------------------------------------------------------------------------------------------------
def test_validation_refuses_what_the_sparse_engine_cannot_run_and_a_vocabulary_too_small(tmp_path):
    from harness.spec import RunConfig
    from harness.validate import prepare

    def refused(match, **values):
        config = RunConfig(**{"weights": "random", "calib_samples": 2, "calib_seqlen": 32, **values})
        with pytest.raises(HarnessError, match=match):
            prepare(config, cache_dir=tmp_path / "cache")

    refused("teal:uniform decodes on the sparse engine of the llama family only", model="opt-125m",
            tasks=["decode"], methods=["teal"], sparsity=["0.5"])
    refused("cats has no mask source for the sparse decode engine", model="llama-tiny", tasks=["decode"],
            methods=["cats"], sparsity=["0.5"])
    refused("embeds 32000 tokens", model="llama-2-7b", tasks=["wikitext2"], methods=["dense"])


def test_input_masks_refuse_request_scope():
    with pytest.raises(HarnessError, match="valid: token"):
        MaskedEngine(tiny_model(), Fixed(site="q", columns=[0]), Allocation(inputs=0.5, scope="request"))


def test_sparsity_targets_name_linear_inputs_and_old_job_keys_stay():
    from harness.spec import JobSpec, parse_sparsity

    assert parse_sparsity("i0.4", {"inputs"}) == {"heads": 0.0, "neurons": 0.0, "inputs": 0.4}
    assert parse_sparsity("0.5", {"inputs"})["inputs"] == 0.5
    assert parse_sparsity("h0.5/n0.25", {"heads"}) == {"heads": 0.5, "neurons": 0.25, "inputs": 0.0}
    job = JobSpec("random", "0.5", 0.5, 0.5, "wikitext2", 0, ())
    assert "inputs" not in job.describe()  # keys of jobs without input masks are what they were
    assert "inputs" in JobSpec("teal", "0.5", 0.0, 0.0, "wikitext2", 0, (), inputs=0.5).describe()


# -- every method × family through the masked engine -------------------------------------------------------------
@pytest.fixture(scope="module")
def checkpoints(tmp_path_factory):
    """Saved tiny checkpoints of both families (the `pretrained` path: loaded by directory; OPT's tokenizer from the
    data directory, as for a Llama-family model without one)."""
    out = {}
    for family in FAMILIES:
        path = tmp_path_factory.mktemp(f"tiny-{family}")
        tiny(family).save_pretrained(path)
        out[family] = path
    return out


FEWSHOT = {"examples": 8, "epochs": 2, "hidden": 16}


@pytest.fixture(scope="module")
def sessions(checkpoints, data, tmp_path_factory):
    from harness.artefacts import ArtefactCache
    from harness.runner import Session
    from harness.spec import RunConfig

    cache = ArtefactCache(tmp_path_factory.mktemp("cache"), log=lambda m: None)
    out = {}
    for family, path in checkpoints.items():
        config = RunConfig(model=str(path), weights="pretrained", calib_samples=2, calib_seqlen=32,
                           method_settings={"teal": {"greedy_step": 0.25, "greedy_samples": 2},
                                            # few-shot calibration (shadow, dejavu:shadowllm) at test size
                                            "shadow": dict(FEWSHOT), "dejavu": dict(FEWSHOT), "timewise": {"epochs": 2}})
        out[family] = Session(config, data, cache)
    return out


def method_specs():
    from methods import MethodSpec, discover

    specs = []
    for name, cls in sorted(discover().items()):
        variants = cls.variants if name not in ("shadow", "static") else (cls.default_variant,)
        specs += [MethodSpec(name, v) for v in variants] or [MethodSpec(name)]
    return specs


def half(method, **extra):
    units = method.units or set()
    return Allocation(**{unit: 0.5 for unit in ("heads", "neurons", "inputs") if unit in units}, **extra)


@pytest.mark.parametrize("family", FAMILIES)
@pytest.mark.parametrize("spec", method_specs(), ids=lambda s: s.label)
def test_every_method_on_every_family_is_causal_sparse_and_measured(sessions, family, spec):
    """Through fit → policy → masked engine: changing token t+1 leaves the logits of tokens ≤ t unchanged; a
    method that sparsifies changes the logits, and the engine measures what it skipped near the target."""
    from methods import get_method

    session = sessions[family]
    method = get_method(spec, session.config.method_settings.get(spec.name, {}))
    allocation = method.adjust(half(method))
    ctx = session.fit_context(spec.name)
    engine = MaskedEngine(session.model, method.policy(ctx, allocation, method.fit(ctx, allocation)), allocation)
    x = ids(seq=12)
    y = x.clone()
    y[0, 7:] = ids(seq=5, seed=1)
    with torch.no_grad():
        dense = session.model(input_ids=x).logits
    with engine.applied():
        a = session.model(input_ids=x).logits
        b = session.model(input_ids=y).logits
    assert torch.allclose(a[:, :7], b[:, :7], atol=1e-6, rtol=0)
    achieved = engine.achieved()
    if not method.units:
        assert torch.equal(a, dense)
        return
    assert not torch.allclose(a, dense)
    for unit in method.units:
        value = achieved[f"achieved_{unit}"]
        sparse_layers = 1 if 0 in allocation.dense_layers else 2
        assert value == pytest.approx(0.5 * sparse_layers / 2, abs=0.2), (unit, value)


def test_a_family_that_leaves_out_an_accessor_is_refused_at_registration():
    """Family is an abstract interface: register() names what a new family's file does not define, and registers
    nothing."""
    from harness.families import FAMILIES, Family, register
    from harness.families.opt import OPT

    class Partial(Family):
        name = "partial"
        model_types = ("partial-test",)
        sizes = staticmethod(OPT.sizes)  # one of the nine accessors given, the other eight left out

    with pytest.raises(TypeError, match=r"does not define .*decoder.*hookpoint") as error:
        register(Partial)
    assert "sizes" not in str(error.value) and "partial-test" not in FAMILIES
