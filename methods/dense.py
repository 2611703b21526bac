"""dense: the unmodified model (no sparsity)."""
from methods import Method, register


@register
class Dense(Method):
    name = "dense"
    units = frozenset()
    description = "no sparsity: the model as it is"

    def policy(self, ctx, allocation, artefact):
        return None
