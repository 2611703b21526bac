"""random: a seeded random mask per token (and layer), at exactly the target sparsity.

The score of unit u of layer l at a token is a counter-based hash of (seed, layer, unit, position,
token id): reproducible on any device, different across tokens and requests, and causal (it depends
on the token and its position alone).
"""
import torch

from harness.engine import MaskPolicy
from harness.families import sizes_of
from methods import Method, register

_M32 = 0xFFFFFFFF


def hashed_uniform(seed: int, layers, positions: torch.Tensor, tokens: torch.Tensor | None, n: int,
                   units: torch.Tensor | None = None) -> torch.Tensor:
    """Uniform scores in [0, 1): (B, T, n) for one layer (an int), (B, T, L, n) for a list of layers.

    A 32-bit integer hash (lowbias32); int64 products wrap, and only their low 32 bits are kept. `layers` may be a
    device tensor of layer ids and `units` the unit ids (torch.arange(n) on the device): nothing then crosses from
    the host, as the decode step's CUDA graph needs.
    """
    device = positions.device
    base = positions.long() * 0x9E3779B1 + (seed + 1) * 0x165667B1
    if tokens is not None:
        base = base + tokens.long() * 0x85EBCA77
    layer_ids = (layers if isinstance(layers, torch.Tensor) else torch.as_tensor(layers, device=device)).long().reshape(-1)
    units = units if units is not None else torch.arange(n, device=device)
    x = base[..., None, None] + layer_ids[:, None] * 0xC2B2AE3D + units * 0x27D4EB2F
    x = x & _M32
    for mult in (0x7FEB352D, 0x846CA68B):
        x = x ^ (x >> 16)
        x = (x * mult) & _M32
    x = x ^ (x >> 16)
    scores = x.double().div_(2.0**32).float()
    return scores if isinstance(layers, (list, tuple, range)) else scores[:, :, 0]


class RandomSource:
    """The decode engine's mask source: at every step and layer, the same hash of (seed, layer, unit, position,
    token id) as the masked engine's RandomPolicy, computed on the device from the engine's position and input
    token, then its top-k (kernels.topk.select): the masked engine's sets. Local allocation (fixed counts)."""

    reads_stream = True  # the hash reads the position and the token, not the stream

    def __init__(self, seed: int, counts, sizes: dict[str, int]):
        self.seed, self.counts, self.sizes = seed, list(counts), sizes

    def bind(self, engine) -> None:
        device = engine.device
        self.engine = engine
        self.layer_ids = [torch.full((1,), l, dtype=torch.long, device=device) for l in range(engine.num_layers)]
        self.units = {u: torch.arange(n, device=device) for u, n in self.sizes.items()}
        self.all = {u: torch.arange(n, dtype=torch.int32, device=device) for u, n in self.sizes.items()}
        self.out = {(u, l): torch.zeros(1, k, dtype=torch.int32, device=device)
                    for l, (kh, kf) in enumerate(self.counts) for u, k in (("heads", kh), ("neurons", kf))}

    def _choose(self, unit, layer):
        from kernels.topk import select

        k = self.counts[layer][0 if unit == "heads" else 1]
        if k >= self.sizes[unit]:
            return self.all[unit]
        e = self.engine
        salt = 0 if unit == "heads" else 7919
        scores = hashed_uniform(self.seed + salt, self.layer_ids[layer], e.pos.view(1, 1).expand(e.batch, 1),
                                e.token.view(-1, 1), self.sizes[unit], self.units[unit])[:, 0]
        return select(scores, k, out=self.out[(unit, layer)])

    def __call__(self, layer, hidden):
        return self._choose("heads", layer), None

    def neuron_masks(self, layer, hidden):
        return self._choose("neurons", layer)


class RandomPolicy(MaskPolicy):
    def __init__(self, seed: int, sizes: dict[str, int], num_layers: int):
        self.seed, self.sizes, self.num_layers = seed, sizes, num_layers

    def _scores(self, unit, layer, state):
        salt = 0 if unit == "heads" else 7919
        return hashed_uniform(self.seed + salt, layer, state.positions, state.input_ids, self.sizes[unit])

    def head_scores(self, layer, state, head_out):
        return self._scores("heads", layer, state)

    def neuron_scores(self, layer, state, act):
        return self._scores("neurons", layer, state)

    def global_scores(self, unit, state):
        return self._scores(unit, list(range(self.num_layers)), state)


@register
class Random(Method):
    name = "random"
    seeded = True
    allocations = frozenset({"local", "global"})
    description = "seeded random heads/neurons skipped per token"

    def policy(self, ctx, allocation, artefact):
        shape = sizes_of(ctx.model)
        return RandomPolicy(ctx.seed, shape.units(), shape.layers)

    def decode_source(self, policy, allocation, model):
        from kernels.sources import keep_counts

        config = model.config
        counts = keep_counts(allocation, config.num_hidden_layers, config.num_attention_heads, config.ffn_dim)
        return RandomSource(policy.seed, counts, {"heads": config.num_attention_heads, "neurons": config.ffn_dim})
