"""wina (Chen et al., "WINA: Weight Informed Neuron Activation for Accelerating Large Language Model Inference",
2025): per token, keep the inputs of each linear layer with the largest |x_i| · ‖W[:, i]‖₂.

The score of input entry i of a linear layer (q, k, v, o, gate, up, down; OPT: q, k, v, out_proj, fc1, fc2) is its
magnitude times the L2 norm of weight column i, the column it multiplies; the lowest-scored fraction (the target,
`i0.5` or a plain 0.5) of every site's inputs is skipped at every token, the same count in every layer and site
(WINA's uniform allocation; its orthogonalising transform of the weights is not applied). Nothing is calibrated.
Records hold the achieved fraction (`achieved_inputs`, per site and per token), exact by construction.
"""
from __future__ import annotations

import torch

from harness.engine import MaskPolicy, lowest_k_mask
from harness.families import family_of
from methods import Method, register


class WinaPolicy(MaskPolicy):
    def __init__(self, model, fraction: float):
        family = family_of(model)
        self.layers = family.layers(model)
        self.family = family
        self.input_sites = tuple(family.linear_sites)
        self.fraction = fraction
        self._norms: dict = {}

    def column_norms(self, layer: int, site: str) -> torch.Tensor:
        key = (layer, site)
        if key not in self._norms:
            weight = self.family.linear(self.layers[layer], site).weight
            self._norms[key] = torch.linalg.vector_norm(weight.float(), dim=0)  # (in,)
        return self._norms[key]

    def input_keep(self, layer, site, state, x):
        norms = self.column_norms(layer, site).to(x.device)
        skip = int(round(self.fraction * x.shape[-1]))
        if skip <= 0:
            return None
        return lowest_k_mask(x.float().abs() * norms, skip)


@register
class Wina(Method):
    name = "wina"
    units = frozenset({"inputs"})
    masked_only = True
    training_free = True
    description = "WINA: per token, skip the linear-layer inputs with the smallest |x_i|·‖W[:, i]‖ (top-k per site)"

    def policy(self, ctx, allocation, artefact):
        return WinaPolicy(ctx.model, allocation.inputs)
