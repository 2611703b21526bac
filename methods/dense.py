"""dense: the unmodified model (no sparsity)."""
from methods import Method, register


@register
class Dense(Method):
    name = "dense"
    units = frozenset()
    description = "no sparsity: the model as it is"

    def policy(self, ctx, allocation, artefact):
        return None

    def decode_source(self, policy, allocation, model):
        from kernels.decode import DenseMasks

        return DenseMasks(model.config.num_hidden_layers)
