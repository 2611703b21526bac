"""8-bit predictor weights (`predictor_weights: model|int8|fp8` of dejavu, shadow and timewise): per-row quantization
error bounds, exact int8 round trips, masks that change only through the dequantized weights, and bad values refused
(exit 2)."""
from types import SimpleNamespace

import pytest
import torch
import yaml
from typer.testing import CliRunner

from harness.cli import app
from harness.engine import Allocation, MaskedEngine
from harness.errors import HarnessError
from methods import MethodSpec, get_method
from methods.predictors import (FP8_DTYPE, FP8_MAX, PREDICTOR_WEIGHTS, dequantize, low_rank, mlp, predictor_weights,
                                quantize_predictor, quantize_rows, quantized_weights, save)
from tests.conftest import tiny_model


def rows_of_every_size(seed=0):
    """Rows whose magnitudes span 1e-4 … 1e2, a row of zeros, and a row with one large outlier."""
    generator = torch.Generator().manual_seed(seed)
    w = torch.randn(8, 96, generator=generator) * torch.logspace(-4, 2, 8)[:, None]
    w[3] = 0
    w[5, 7] = 50 * w[5].abs().max()
    return w


@pytest.mark.parametrize("dtype", [torch.float32, torch.float16, torch.bfloat16])
def test_int8_error_is_at_most_half_a_step_of_its_row(dtype):
    w = rows_of_every_size().to(dtype)
    q, scale = quantize_rows(w, "int8")
    assert q.dtype == torch.int8 and q.shape == w.shape and scale.dtype == torch.float32 and scale.shape == (8,)
    assert int(q.abs().max()) <= 127
    exact = w.float()
    assert torch.equal(scale, exact.abs().amax(1) / 127)
    error = (dequantize(q, scale) - exact).abs()
    bound = scale[:, None] / 2 * (1 + 1e-5) + 1e-30
    assert bool((error <= bound).all()), (error / bound).max()
    nonzero = scale > 0
    assert bool((q[nonzero].abs().amax(1) == 127).all())  # each row's absmax maps onto the full range
    assert torch.equal(q[3], torch.zeros_like(q[3])) and float(scale[3]) == 0.0  # zeros stay zeros
    assert torch.equal(dequantize(q, scale)[3], torch.zeros(96))


@pytest.mark.parametrize("dtype", [torch.float32, torch.float16])
def test_fp8_error_is_e4m3s_rounding_of_each_row(dtype):
    w = rows_of_every_size(1).to(dtype)
    q, scale = quantize_rows(w, "fp8")
    assert q.dtype == FP8_DTYPE and scale.dtype == torch.float32
    exact = w.float()
    assert torch.equal(scale, exact.abs().amax(1) / FP8_MAX)
    assert bool((q.float().abs() <= FP8_MAX).all())
    error = (dequantize(q, scale) - exact).abs()
    # 3 mantissa bits: half a unit in the last place is 2^-4 relative; subnormals (below 2^-6) step by 2^-9
    bound = scale[:, None] * torch.maximum(exact.abs() / scale.clamp(min=1e-30)[:, None] * 2 ** -4,
                                           torch.full_like(exact, 2 ** -10)) * (1 + 1e-5) + 1e-30
    assert bool((error <= bound).all()), (error / bound).max()
    relative = (dequantize(q, scale) - exact).norm(dim=1) / exact.norm(dim=1).clamp(min=1e-30)
    assert float(relative[scale > 0].max()) < 0.05
    assert torch.equal(dequantize(q, scale)[3], torch.zeros(96))


def test_int8_round_trip_is_exact_on_planted_values():
    """Rows that are integers −127 … 127 times a power-of-two step (one entry at ±127) come back bit for bit."""
    generator = torch.Generator().manual_seed(2)
    k = torch.randint(-127, 128, (6, 40), generator=generator)
    k[:, 0] = torch.tensor([127, -127, 127, -127, 127, -127])
    steps = 2.0 ** torch.arange(-10, 2, 2).float()  # 2^-10 … 2^0
    w = k.float() * steps[:, None]
    q, scale = quantize_rows(w, "int8")
    assert torch.equal(scale, steps)
    assert torch.equal(q.long(), k)
    assert torch.equal(dequantize(q, scale), w)
    assert torch.equal(dequantize(q, scale, torch.float16), w.half())  # representable in fp16 too


def test_fp8_round_trip_is_exact_on_representable_values():
    values = torch.tensor([448.0, -448.0, 0.0, 1.0, -0.5, 3.5, 240.0, 2 ** -9, -(2 ** -6)])
    w = values[None].repeat(3, 1) * torch.tensor([1.0, 2 ** -12, 2 ** 8])[:, None]
    q, scale = quantize_rows(w, "fp8")
    assert torch.equal(dequantize(q, scale), w)


def test_quantize_predictor_replaces_only_linear_weights_and_keeps_the_8bit_tensors():
    torch.manual_seed(0)
    for predictor in (low_rank(16, 12, 5), mlp(16, 12, 5, hidden_layers=2)):
        predictor.mean.normal_(), predictor.std.uniform_(0.5, 2)
        before = {name: t.clone() for name, t in predictor.state_dict().items()}
        assert quantize_predictor(predictor, "model") is predictor and quantized_weights(predictor) is None
        assert all(torch.equal(before[n], t) for n, t in predictor.state_dict().items())
        for kind in ("int8", "fp8"):
            copy = mlp(16, 12, 5, hidden_layers=2) if len(predictor.net) == 5 else low_rank(16, 12, 5)
            copy.load_state_dict(before)
            quantize_predictor(copy, kind)
            found = quantized_weights(copy)
            linear = [n for n in before if n.endswith("weight") and before[n].dim() == 2]
            assert found["kind"] == kind and sorted(found["weights"]) == sorted(linear)
            for name, tensor in copy.state_dict().items():
                if name in found["weights"]:
                    q, scale = found["weights"][name]
                    assert q.dtype == (torch.int8 if kind == "int8" else FP8_DTYPE)
                    assert torch.equal(q, quantize_rows(before[name], kind)[0])
                    assert torch.equal(tensor, dequantize(q, scale))
                    assert not torch.equal(tensor, before[name])
                else:  # biases, mean, std: as fitted
                    assert torch.equal(tensor, before[name])
            moved = copy.to(torch.float16)  # moving the predictor (the engine's copy) leaves the 8-bit tensors 8-bit
            assert quantized_weights(moved)["weights"][linear[0]][0].dtype == q.dtype


def test_setting_values_and_unknown_value():
    assert PREDICTOR_WEIGHTS == ("model", "int8", "fp8")
    assert predictor_weights({}) == "model" and predictor_weights(None) == "model"
    assert predictor_weights({"predictor_weights": "fp8"}) == "fp8"
    with pytest.raises(HarnessError, match="predictor_weights 'int4'.*valid: model.*int8.*fp8"):
        predictor_weights({"predictor_weights": "int4"})


# -- the methods: masks change only through the dequantized weights -------------------------------------------------
def tiny():
    return tiny_model(num_hidden_layers=3, hidden_size=32, num_attention_heads=4, ffn_dim=64)


def fitted(label, config, seed=0):
    """An artefact as the method's fit stores it (random predictor weights), without fitting."""
    torch.manual_seed(seed)
    d, heads, ffn, layers = config.hidden_size, config.num_attention_heads, config.ffn_dim, config.num_hidden_layers

    def noisy(predictor):
        with torch.no_grad():
            for p in predictor.parameters():
                p.normal_(0, 0.3)
            predictor.mean.normal_(0, 0.1)
        return predictor

    tensors = {}
    if label == "dejavu":
        for l in range(layers):
            tensors.update(save(f"attn.{l}", noisy(low_rank(d, 24, heads))))
            tensors.update(save(f"mlp.{l}", noisy(low_rank(d, 24, ffn))))
        return tensors, {"dejavu": {"hidden": 24}}
    if label == "dejavu:shadowllm":
        for l in range(1, layers):
            tensors.update(save(f"attn.{l}", noisy(mlp(d, 24, heads))))
            tensors.update(save(f"mlp.{l}", noisy(mlp(d, 24, ffn))))
        return tensors, {"dejavu": {"hidden": 24}}
    if label == "timewise:current":
        hp = {"hidden": 16, "hidden_layers": 2}
        for l in range(layers):
            tensors.update(save(f"heads.{l}", noisy(mlp(d, 16, heads, hidden_layers=2))))
        return tensors, {"timewise": hp}
    from methods.shadow import shadow_predictor

    tensors.update(save("shadow", noisy(shadow_predictor(config, 24))))
    return tensors, {"shadow": {"hidden": 24, "calibration": "lmtext"}}


def dequantized_tensors(tensors, kind):
    """The artefact with every Linear weight (2-D `weight`) replaced by its dequantized 8-bit form, by hand."""
    out = {}
    for name, t in tensors.items():
        out[name] = dequantize(*quantize_rows(t, kind)) if name.endswith(".weight") and t.dim() == 2 else t
    return out


def masks(model, label, settings, tensors, allocation, ids):
    spec = MethodSpec.parse(label)
    method = get_method(spec, settings)
    allocation = method.adjust(allocation)
    ctx = SimpleNamespace(model=model)
    policy = method.policy(ctx, allocation, SimpleNamespace(tensors=tensors, meta={}, path=None))
    engine = MaskedEngine(model, policy, allocation)
    with engine.applied(), torch.no_grad():
        logits = model(input_ids=ids).logits
    return {k: v.clone() for k, v in engine.state.keep.items()}, logits


@pytest.mark.parametrize("label, allocation", [
    ("dejavu", Allocation(heads=0.5, neurons=0.5)),
    ("dejavu:shadowllm", Allocation(heads=0.5, neurons=0.5)),
    ("timewise:current", Allocation(heads=0.5)),
    ("shadow", Allocation(heads=0.5, neurons=0.5)),
])
def test_the_setting_changes_masks_only_through_the_dequantized_weights(label, allocation):
    model = tiny()
    tensors, settings = fitted(label, model.config)
    name = MethodSpec.parse(label).name
    ids = torch.randint(3, 1000, (2, 12), generator=torch.Generator().manual_seed(0))
    plain, plain_logits = masks(model, label, settings[name], tensors, allocation, ids)
    same, same_logits = masks(model, label, {**settings[name], "predictor_weights": "model"}, tensors, allocation, ids)
    assert plain.keys() == same.keys() and all(torch.equal(plain[k], same[k]) for k in plain)
    assert torch.equal(plain_logits, same_logits)
    for kind in ("int8", "fp8"):
        quantized, q_logits = masks(model, label, {**settings[name], "predictor_weights": kind}, tensors, allocation,
                                    ids)
        by_hand, h_logits = masks(model, label, settings[name], dequantized_tensors(tensors, kind), allocation, ids)
        assert quantized.keys() == by_hand.keys() == plain.keys()
        assert all(torch.equal(quantized[k], by_hand[k]) for k in quantized), kind
        assert torch.equal(q_logits, h_logits)


def test_policy_refuses_an_unknown_value():
    model = tiny()
    tensors, settings = fitted("dejavu", model.config)
    with pytest.raises(HarnessError, match="predictor_weights 'bf16'"):
        masks(model, "dejavu", {**settings["dejavu"], "predictor_weights": "bf16"}, tensors,
              Allocation(heads=0.5, neurons=0.5), torch.ones(1, 4, dtype=torch.long))


def test_cli_refuses_unknown_values_and_non_predictor_methods_with_exit_2(tmp_path):
    cli = CliRunner()
    work = tmp_path / "work"
    work.mkdir()
    for methods, settings, message in (
            (["dense", "dejavu"], {"dejavu": {"predictor_weights": "int4"}}, "predictor_weights 'int4'"),
            (["dense", "static"], {"static": {"predictor_weights": "int8"}}, "static has no predictors"),
    ):
        suite = tmp_path / "suite.yaml"
        suite.write_text(yaml.safe_dump({"name": "q", "description": "test", "defaults": {
            "model": "opt-125m", "weights": "random", "methods": methods, "sparsity": [0.5], "tasks": ["wikitext2"],
            "limit": 1, "method_settings": settings}}))
        result = cli.invoke(app, ["run", "--suite", str(suite), "--out", str(work / "run"), "--cache-dir",
                                  str(work / "cache")], catch_exceptions=False)
        assert result.exit_code == 2, result.output
        assert message in " ".join(result.output.split())
        assert sorted(p.name for p in work.iterdir()) == []
