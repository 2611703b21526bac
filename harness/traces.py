"""Traces: one dense pass over calibration text recording what predictors learn from.

Per calibration token: every layer's attention input (`layer_input`, the residual stream entering the
layer) and MLP input (`mlp_input`), layer 0's attention output (`attn_output0`), per-head output L2 norms
(`head_norm`), fc1 activity after ReLU (`neuron_active`, bit-packed), and the token's position in its
example. Per-token criterion scores (plainact, …) are a second artefact (`trace_scores`), made only for
methods that need them. Both are cached by content hash (model, calibration data and budget) and shared
by every method and sparsity; the size is estimated and printed first and checked against a cap.
"""
from __future__ import annotations

import torch

from harness.engine import heads_view, mlp_input_module, opt_layers
from harness.errors import HarnessError

VERSION = 1
DEFAULT_CAP_GB = 8.0


def estimate_bytes(config, tokens: int) -> int:
    layers, d = config.num_hidden_layers, config.hidden_size
    per_token = 2 * layers * d * 2 + d * 2 + layers * config.num_attention_heads * 4 + layers * config.ffn_dim // 8 + 4
    return tokens * per_token


def pack_bits(active: torch.Tensor) -> torch.Tensor:
    """(..., F) bool -> (..., ceil(F/8)) uint8."""
    pad = (-active.shape[-1]) % 8
    if pad:
        active = torch.nn.functional.pad(active, (0, pad))
    bits = active.reshape(*active.shape[:-1], -1, 8).to(torch.uint8)
    return (bits << torch.arange(8, dtype=torch.uint8)).sum(-1, dtype=torch.uint8)


def unpack_bits(packed: torch.Tensor, size: int) -> torch.Tensor:
    bits = (packed.unsqueeze(-1) >> torch.arange(8, dtype=torch.uint8)) & 1
    return bits.reshape(*packed.shape[:-1], -1)[..., :size].bool()


class Traces:
    """Read access to a traces artefact; arrays are indexed by calibration token (N tokens in all)."""

    def __init__(self, artefact, config):
        self.artefact = artefact
        self.t = artefact.tensors
        self.ffn_dim = config.ffn_dim
        self.num_layers = config.num_hidden_layers

    @property
    def tokens(self) -> int:
        return self.t["position"].shape[0]

    def layer_input(self, layer: int) -> torch.Tensor:
        return self.t["layer_input"][:, layer].float()

    def mlp_input(self, layer: int) -> torch.Tensor:
        return self.t["mlp_input"][:, layer].float()

    def attn_output0(self) -> torch.Tensor:
        return self.t["attn_output0"].float()

    def head_norm(self, layer: int | None = None) -> torch.Tensor:
        return self.t["head_norm"] if layer is None else self.t["head_norm"][:, layer]

    def neuron_active(self, layer: int) -> torch.Tensor:
        return unpack_bits(self.t["neuron_active"][:, layer], self.ffn_dim)

    def previous(self) -> torch.Tensor:
        """Index of each token's previous token in the same example (itself for an example's first token)."""
        index = torch.arange(self.tokens)
        return torch.where(self.t["position"] > 0, index - 1, index)

    def split(self, val_fraction: float, seed: int) -> tuple[torch.Tensor, torch.Tensor]:
        """Train/validation token indices, split by example (never inside one)."""
        example = self.t["example"]
        count = int(example.max()) + 1
        order = torch.randperm(count, generator=torch.Generator().manual_seed(seed))
        val_count = max(1, int(round(val_fraction * count))) if count > 1 else 0
        is_val = torch.zeros(count, dtype=torch.bool)
        is_val[order[:val_count]] = True
        mask = is_val[example]
        index = torch.arange(self.tokens)
        return index[~mask], index[mask] if val_count else index[~mask]


@torch.no_grad()
def _collect(model, ids: torch.Tensor) -> dict:
    decoder, layers = opt_layers(model)
    config = model.config
    pre_ln = config.do_layer_norm_before
    out: dict[str, list] = {k: [] for k in ("layer_input", "mlp_input", "attn_output0", "head_norm", "neuron_active")}
    current: dict = {}
    handles = []

    def keep(name, index):
        def hook(module, args, kwargs=None):
            x = (kwargs or {}).get("hidden_states", args[0] if args else None)
            current[(name, index)] = x.reshape(-1, x.shape[-1])
        return hook

    try:
        for index, layer in enumerate(layers):
            handles.append(layer.register_forward_pre_hook(keep("layer_input", index), with_kwargs=True))
            handles.append(mlp_input_module(layer, pre_ln).register_forward_pre_hook(keep("mlp_input", index)))
            handles.append(layer.self_attn.out_proj.register_forward_pre_hook(keep("heads", index)))
            handles.append(layer.fc2.register_forward_pre_hook(keep("act", index)))
        handles.append(layers[0].self_attn.register_forward_hook(
            lambda m, args, output: current.__setitem__("attn_output0", output[0].reshape(-1, output[0].shape[-1]))))
        device = next(model.parameters()).device
        for row in ids:
            current.clear()
            model(input_ids=row[None].to(device), use_cache=False)
            seq = row.numel()
            stack = lambda name: torch.stack([current[(name, i)] for i in range(len(layers))], dim=1)  # noqa: E731
            out["layer_input"].append(stack("layer_input").half().cpu())
            out["mlp_input"].append(stack("mlp_input").half().cpu())
            out["attn_output0"].append(current["attn_output0"].half().cpu())
            heads = [torch.linalg.vector_norm(heads_view(current[("heads", i)], 1, seq, config.num_attention_heads)[0].float(), dim=-1)
                     for i in range(len(layers))]
            out["head_norm"].append(torch.stack(heads, dim=1).cpu())
            out["neuron_active"].append(pack_bits((stack("act") > 0).cpu()))
    finally:
        for handle in handles:
            handle.remove()
    tensors = {name: torch.cat(parts) for name, parts in out.items()}
    seq = ids.shape[1]
    tensors["position"] = torch.arange(seq, dtype=torch.int32).repeat(ids.shape[0])
    tensors["example"] = torch.arange(ids.shape[0], dtype=torch.int32).repeat_interleave(seq)
    return tensors


def collect_traces(ctx) -> Traces:
    """The traces of the model on its calibration data (cached; built once for every method and sparsity)."""
    config = ctx.model.config
    ids = ctx.calibration_ids()
    cap_gb = float(ctx.settings.get("trace_cap_gb", DEFAULT_CAP_GB))
    inputs = {**ctx.base_key(), "version": VERSION}
    size = estimate_bytes(config, ids.numel())

    def build():
        ctx.log(f"traces: {ids.shape[0]} examples × {ids.shape[1]} tokens, about {size / 2**30:.2f} GiB")
        if size > cap_gb * 2**30:
            raise HarnessError(f"traces would take {size / 2**30:.1f} GiB, over the cap of {cap_gb} GiB; lower "
                               "calib_samples/calib_seqlen or raise the method setting trace_cap_gb")
        return _collect(ctx.model, ids), {"tokens": int(ids.numel()), "examples": int(ids.shape[0]), "bytes": size}

    return Traces(ctx.cache.get_or_build("traces", inputs, build), config)


def collect_scores(ctx, criterion: str) -> dict:
    """Per-token criterion scores over the calibration data: {"heads": (N, L, H), "neurons": (N, L, F)} (cached)."""
    from methods.criteria import score_example

    ids = ctx.calibration_ids()
    inputs = {**ctx.base_key(), "criterion": criterion, "version": VERSION}

    def build():
        ctx.log(f"trace scores: {criterion} over {ids.shape[0]} examples (one forward-backward each)")
        heads, neurons = [], []
        for row in ids:
            scores = score_example(ctx.model, row, (criterion,))[criterion]
            heads.append(scores["heads"].float().cpu())
            neurons.append(scores["neurons"].half().cpu())
        return {"heads": torch.cat(heads), "neurons": torch.cat(neurons)}, {"criterion": criterion}

    return ctx.cache.get_or_build("trace_scores", inputs, build).tensors
