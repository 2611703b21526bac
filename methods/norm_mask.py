"""norm-mask: the oracle of Sedghi et al. — per token, skip the heads whose output has the smallest L2 norm.

It reads the current token's own head outputs, so it is an upper bound a predictor tries to reach, not
something a decoder could run ahead of computing the heads. With an explicit neuron target (n0.5) it
skips the neurons with the smallest activation magnitude at the down projection's input (Deja Vu's oracle; OPT's
post-ReLU activation, Llama's SwiGLU act(gate) · up).
"""
import torch

from harness.engine import MaskPolicy
from methods import Method, register


class NormPolicy(MaskPolicy):
    def __init__(self, replacement: torch.Tensor | None = None):
        self.head_replacement = replacement

    def head_scores(self, layer, state, head_out):
        return torch.linalg.vector_norm(head_out.float(), dim=-1)

    def neuron_scores(self, layer, state, act):
        return act.float().abs()


@register
class NormMask(Method):
    name = "norm-mask"
    units = frozenset({"heads"})
    supports = frozenset({"heads", "neurons"})
    description = "oracle: per token, skip the heads with the smallest output L2 norm"

    def policy(self, ctx, allocation, artefact):
        return NormPolicy()
