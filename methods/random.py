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


def hashed_uniform(seed: int, layers, positions: torch.Tensor, tokens: torch.Tensor | None, n: int) -> torch.Tensor:
    """Uniform scores in [0, 1): (B, T, n) for one layer (an int), (B, T, L, n) for a list of layers.

    A 32-bit integer hash (lowbias32); int64 products wrap, and only their low 32 bits are kept.
    """
    device = positions.device
    base = positions.long() * 0x9E3779B1 + (seed + 1) * 0x165667B1
    if tokens is not None:
        base = base + tokens.long() * 0x85EBCA77
    layer_ids = torch.as_tensor(layers, device=device).long().reshape(-1)
    x = base[..., None, None] + layer_ids[:, None] * 0xC2B2AE3D + torch.arange(n, device=device) * 0x27D4EB2F
    x = x & _M32
    for mult in (0x7FEB352D, 0x846CA68B):
        x = x ^ (x >> 16)
        x = (x * mult) & _M32
    x = x ^ (x >> 16)
    scores = x.double().div_(2.0**32).float()
    return scores if isinstance(layers, (list, tuple, range)) else scores[:, :, 0]


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
