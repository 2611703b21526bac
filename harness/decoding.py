"""The sparse decode engine's mask source for a method: the dispatcher from a method's masked-engine policy to the
per-token mask source its own file defines (`Method.decode_source`, methods/__init__.py).

`source_for(method, policy, allocation, model)` checks what no fixed-count decode step can run (a non-causal
scope; an allocation mode the method's source does not handle: `Method.decode_allocations`), returns the dense
source for a None policy or zero sparsity, and otherwise asks the method, found through the registry when given
by label. There is no per-method code here: adding a method with a `decode_source` adds it to the latency suite.
"""
from __future__ import annotations

from harness.errors import HarnessError


def source_for(method, policy, allocation, model):
    """The sparse engine's mask source for `policy` (what `method.policy()` returned; None: dense) under
    `allocation` on `model`. `method` is a methods.Method instance or a label ("dejavu:shadowllm")."""
    from kernels.decode import DenseMasks
    from methods import Method, MethodSpec, get_method

    if not isinstance(method, Method):
        method = get_method(MethodSpec.parse(method))
    if allocation.scope != "token":
        raise HarnessError(f"the sparse decode engine runs causal (token-scope) masks only, not scope "
                           f"{allocation.scope!r} (one mask per request chosen from its last token)")
    if policy is None or (allocation.heads == 0 and allocation.neurons == 0):
        return DenseMasks(model.config.num_hidden_layers)
    if not method.masked_only and allocation.mode not in method.decode_allocations:
        raise HarnessError(f"{type(policy).__name__}: the sparse decode engine needs a fixed number of kept units "
                           f"per layer, i.e. local allocation (a per-token global ranking changes the counts)")
    return method.decode_source(policy, allocation, model)
