"""The masked engine on GPUs (skipped without CUDA; run on the device machine, see results/reports/)."""
import copy

import pytest
import torch

from harness.engine import Allocation, MaskedEngine, MaskPolicy
from harness.models import ModelSpec, load_model
from methods.norm_mask import NormPolicy
from methods.random import RandomPolicy

cuda = pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU")
two_gpus = pytest.mark.skipif(torch.cuda.device_count() < 2, reason="needs two CUDA GPUs")


def policies(config):
    sizes = {"heads": config.num_attention_heads, "neurons": config.ffn_dim}
    return {"random": RandomPolicy(0, sizes, config.num_hidden_layers), "norm-mask": NormPolicy()}


def masked_logits(model, policy, allocation, ids):
    engine = MaskedEngine(model, policy, allocation)
    with engine.applied(), torch.no_grad():
        logits = model(input_ids=ids.to(model.device) if not hasattr(model, "hf_device_map") else ids.to("cuda:0")).logits
    return logits.double().cpu(), engine


class Replay(MaskPolicy):
    """Keeps exactly the heads another run kept (scores 1 for kept, 0 for skipped)."""

    def __init__(self, engine):
        self.keep = {layer: keep.cpu() for (unit, layer), keep in engine.state.keep.items() if unit == "heads"}

    def head_scores(self, layer, state, head_out):
        return self.keep[layer].to(head_out.device).float()


@cuda
@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16])
@pytest.mark.parametrize("attn", ["sdpa", "eager"])
def test_gpu_half_precision_matches_a_float64_reference(dtype, attn):
    spec = ModelSpec("opt-125m", "random")
    model = load_model(spec, device="cuda", dtype=dtype, seed=0, attn_implementation=attn)
    reference = copy.deepcopy(model).to("cpu", torch.float64)  # the same (rounded) weights, computed in float64
    ids = torch.randint(3, 50000, (2, 256), generator=torch.Generator().manual_seed(0))
    random = RandomPolicy(0, {"heads": 12, "neurons": 3072}, 12)
    allocation = Allocation(heads=0.5, neurons=0.5)
    expected, _ = masked_logits(reference, random, allocation, ids)
    got, engine = masked_logits(model, random, allocation, ids)
    assert float((got - expected).norm() / expected.norm()) < 2e-2
    assert engine.achieved()["achieved_heads"] == pytest.approx(0.5)
    # norm-mask chooses by half-precision norms, so near-ties may flip: replay the GPU's choice in float64
    # for the logits, and require the two runs' own choices to agree almost everywhere
    heads = Allocation(heads=0.5)
    got, engine = masked_logits(model, NormPolicy(), heads, ids)
    replayed, _ = masked_logits(reference, Replay(engine), heads, ids)
    assert float((got - replayed).norm() / replayed.norm()) < 2e-2
    _, own = masked_logits(reference, NormPolicy(), heads, ids)
    agree = [(engine.state.keep[("heads", l)].cpu() == own.state.keep[("heads", l)]).float().mean() for l in range(12)]
    assert float(sum(agree) / len(agree)) > 0.95


@two_gpus
def test_device_map_over_two_gpus_gives_the_single_gpu_logits():
    spec = ModelSpec("opt-1.3b", "random")
    single = load_model(spec, device="cuda:0", dtype=torch.float32, seed=0)
    layers = single.config.num_hidden_layers
    device_map = {"model.decoder.embed_tokens": 0, "model.decoder.embed_positions": 0, "model.decoder.final_layer_norm": 1,
                  "lm_head": 0, **{f"model.decoder.layers.{i}": 0 if i < layers // 2 else 1 for i in range(layers)}}
    sharded = load_model(spec, dtype=torch.float32, seed=0, device_map=device_map)
    assert {p.device.index for p in sharded.parameters()} == {0, 1}
    ids = torch.randint(3, 50000, (1, 512), generator=torch.Generator().manual_seed(1))
    for name, policy in policies(single.config).items():
        allocation = Allocation(heads=0.5, neurons=0.5 if name == "random" else 0.0)
        a, engine_a = masked_logits(single, policy, allocation, ids)
        b, engine_b = masked_logits(sharded, policy, allocation, ids)
        assert float((a - b).norm() / a.norm()) < 1e-4, name
        for layer in range(layers):
            assert torch.equal(engine_a.state.keep[("heads", layer)].cpu(), engine_b.state.keep[("heads", layer)].cpu())
