"""static: one fixed mask for every token, from importance aggregated over calibration data.

`fit` runs one forward-backward pass per calibration example (`ctx.calibration_ids()`: WikiText-2 valid by
default, `calib_samples` examples of `calib_seqlen` tokens), scores every head and FFN neuron with the
criteria of methods.criteria and averages the per-token scores over all calibration tokens. The (L, H)
head and (L, F) neuron scores are cached as one `importance` artefact per group of criteria that share a pass
(the first-order ones; grasp; jacov: methods.criteria.IMPORTANCE_GROUPS); the variant picks its criterion. The policy returns these scores at
every token, so the engine skips the same lowest-scored units everywhere (per layer with `local`
allocation, ranked across layers with `global`).
"""
from __future__ import annotations

import torch

from harness.engine import Allocation, ForwardState, MaskedEngine, MaskPolicy, lowest_k_mask
from harness.errors import HarnessError
from harness.families import sizes_of
from kernels.decode import StaticMasks
from methods import Method, register
from methods.criteria import ALL_CRITERIA, fit_importance

class StaticPolicy(MaskPolicy):
    """Fixed scores: (L, H) for heads and (L, F) for neurons, the same at every token."""

    token_independent = True

    def __init__(self, heads: torch.Tensor, neurons: torch.Tensor):
        self.tables = {"heads": heads.float(), "neurons": neurons.float()}
        self._on_device: dict = {}

    def table(self, unit: str, device) -> torch.Tensor:
        key = (unit, str(device))
        if key not in self._on_device:
            self._on_device[key] = self.tables[unit].to(device)
        return self._on_device[key]

    def head_scores(self, layer, state, head_out):
        batch, seq = head_out.shape[:2]
        row = self.table("heads", head_out.device)[layer]
        return row.expand(batch, seq, row.shape[-1])

    def neuron_scores(self, layer, state, act):
        batch, seq = act.shape[:2]
        row = self.table("neurons", act.device)[layer]
        return row.expand(batch, seq, row.shape[-1])

    def global_scores(self, unit, state):
        batch, seq = state.shape
        table = self.table(unit, state.positions.device)
        return table.expand(batch, seq, *table.shape)


# The sparse decode engine's mask source: the kept sets are fixed, the policy's score tables ranked once under the
# allocation (local or global, dense layers, min_keep) exactly as the masked engine ranks them; no per-token work.
def static_source(policy, allocation: Allocation, model) -> StaticMasks:
    """The fixed kept sets of a StaticPolicy, ranked by the masked engine's own code (local or global)."""
    engine = MaskedEngine(model, policy, allocation)
    engine.state = ForwardState(input_ids=None, positions=torch.zeros(1, 1, dtype=torch.long),
                                valid=torch.ones(1, 1, dtype=torch.bool))
    sets = {}
    for unit in ("heads", "neurons"):
        n = engine.sizes[unit]
        table = policy.tables[unit]
        if not engine.active(unit):
            sets[unit] = [None] * engine.num_layers
            continue
        if allocation.mode == "global":
            keep = engine._plan_global(unit)[0, 0]  # (L, n)
        else:
            keep = torch.stack([lowest_k_mask(table[l], engine.skip_count(unit)) for l in range(engine.num_layers)])
        sets[unit] = [None if l in allocation.dense_layers else keep[l].nonzero().flatten().tolist()
                      for l in range(engine.num_layers)]
        for l in range(engine.num_layers):
            if sets[unit][l] is not None and len(sets[unit][l]) == n:
                sets[unit][l] = None
    return StaticMasks(sets["heads"], sets["neurons"])


@register
class Static(Method):
    name = "static"
    variants = ALL_CRITERIA
    default_variant = "plainact"
    allocations = frozenset({"local", "global"})
    decode_allocations = frozenset({"local", "global"})  # a fixed ranking: the counts do not change per token
    description = "the same units skipped at every token: importance (variant = criterion) averaged over calibration data"

    def fit(self, ctx, allocation):
        return fit_importance(ctx, self.variant)  # its group's criteria from one pass, shared by those variants

    def footprint(self, model_config, run_config, allocation, seed):
        from harness.footprint import Need
        from harness.traces import backward_bytes
        from methods.criteria import GROUP_BACKWARDS, JACOV_BATCH, importance_group

        group = importance_group(self.variant)
        gpu = GROUP_BACKWARDS[group] * backward_bytes(model_config, run_config.calib_seqlen)
        settings = "calib_seqlen"
        if group == "jacov":  # its batch's (F, B, E) Jacobians, and their Gram product, in float32
            batch = int(self.settings.get("importance_batch", JACOV_BATCH))
            gpu = gpu / JACOV_BATCH * batch + 2 * 4 * model_config.ffn_dim * batch * model_config.hidden_size
            settings = "calib_seqlen,importance_batch"
        return {("importance", group): Need(f"importance ({group}: one forward-backward per pass)", gpu=int(gpu),
                                            settings=settings)}

    def policy(self, ctx, allocation, artefact):
        if artefact is None:
            raise HarnessError("static needs its fitted importance scores (run fit first)")
        shape = sizes_of(ctx.model)
        heads, neurons = artefact.tensors[f"{self.variant}.heads"], artefact.tensors[f"{self.variant}.neurons"]
        expected = {"heads": (shape.layers, shape.heads), "neurons": (shape.layers, shape.ffn)}
        for unit, tensor in (("heads", heads), ("neurons", neurons)):
            if tuple(tensor.shape) != expected[unit]:
                raise HarnessError(f"static artefact {artefact.path}: {unit} scores have shape {tuple(tensor.shape)}, "
                                   f"the model needs {expected[unit]}")
        return StaticPolicy(heads, neurons)

    def decode_source(self, policy, allocation, model):
        return static_source(policy, allocation, model)
