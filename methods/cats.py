"""cats (Lee et al., "CATS: Contextually-Aware Thresholding for Sparsity in Large Language Models", 2024): a
threshold on the gate activation of each MLP neuron.

Neuron j of a layer is skipped at a token (its activation at the down projection's input set to 0: its rows of
gate/up and its column of down are not needed) where |act(gate_proj x)_j| ≤ t, one threshold t per layer: the
quantile at the target neuron sparsity of |act(gate)| over the calibration data (a histogram per layer, as TEAL's:
`methods.teal.magnitude_histograms` at the `neuron_gate` hookpoint). On OPT the gate activation is fc1's output
after ReLU, the neuron activation itself: ReLU's zeros make OPT's FFN naturally sparse, so at a target below that
sparsity the threshold is 0 and CATS skips exactly the zero neurons, more than the target. The count skipped
varies per token: records hold the achieved fraction (`achieved_neurons`, and per token: mean, std, min, max).
"""
from __future__ import annotations

import torch

from harness.engine import MaskPolicy
from harness.errors import HarnessError
from methods import Method, register
from methods.teal import fit_histograms, threshold


class GateThresholdPolicy(MaskPolicy):
    """Keep neuron j where |gate activation_j| > t[layer]."""

    needs = frozenset({"neuron_gate"})
    returns_masks = True

    def __init__(self, thresholds: torch.Tensor):
        self.thresholds = thresholds.double()

    def neuron_scores(self, layer, state, act):
        gate = state.captures.pop(("neuron_gate", layer))  # (B, T, F), dropped once used
        return gate.abs() > float(self.thresholds[layer])


@register
class Cats(Method):
    name = "cats"
    units = frozenset({"neurons"})
    masked_only = True
    training_free = True
    description = "CATS: per-layer calibration threshold on |gate activation| (OPT: the ReLU output) skips FFN neurons"

    def fit(self, ctx, allocation):
        histograms = fit_histograms(ctx, ["neuron_gate"], "cats")
        counts = histograms.tensors["counts"][:, 0]
        thresholds = torch.tensor([threshold(counts[l], allocation.neurons) for l in range(counts.shape[0])],
                                  dtype=torch.float64)
        from harness.artefacts import Artefact

        return Artefact({"counts": counts, "thresholds": thresholds}, dict(histograms.meta), histograms.path)

    def policy(self, ctx, allocation, artefact):
        if artefact is None:
            raise HarnessError("cats needs its calibration histograms (run fit first)")
        return GateThresholdPolicy(artefact.tensors["thresholds"])
