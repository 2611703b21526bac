"""replace (Sedghi et al.): as norm-mask, but a skipped head outputs a stored mean instead of zero.

  replace:head    the head's mean output over all calibration tokens;
  replace:ranked  its mean over the calibration tokens where the norm ranking (at the target head
                  sparsity, local allocation) skipped it; a head the ranking never skipped falls back
                  to its overall mean (the artefact counts such heads).
Means are taken on the dense model's activations over the calibration data (WikiText-2 valid by
default), never on evaluation text.
"""
import torch

from harness.engine import lowest_k_mask
from harness.families import family_of, install
from methods import Method, register
from methods.norm_mask import NormPolicy


@torch.no_grad()
def head_output_means(model, batches: torch.Tensor, skip: int, dense_layers=()) -> dict:
    """Sum of head outputs over all tokens and over tokens where the lowest-norm ranking skipped the head."""
    family = family_of(model)
    layers = family.layers(model)
    shape = family.sizes(model.config)
    heads, dim = shape.heads, shape.head_dim
    total = torch.zeros(len(layers), heads, dim, dtype=torch.float64)
    skipped_sum = torch.zeros_like(total)
    skipped_count = torch.zeros(len(layers), heads, dtype=torch.float64)
    tokens = 0
    handles = []

    def hook_for(index):
        def hook(x):
            out = x.reshape(-1, heads, dim).double()
            total[index] += out.sum(0).cpu()
            if skip and index not in dense_layers:
                keep = lowest_k_mask(torch.linalg.vector_norm(out, dim=-1), skip)
                skipped = (~keep).double()
                skipped_sum[index] += torch.einsum("nh,nhd->hd", skipped, out).cpu()
                skipped_count[index] += skipped.sum(0).cpu()
        return hook

    try:
        for index, layer in enumerate(layers):
            handles.append(install(family, layer, "head_output", hook_for(index)))
        device = next(model.parameters()).device
        for row in batches:
            model(input_ids=row[None].to(device), use_cache=False)
            tokens += row.numel()
    finally:
        for handle in handles:
            handle.remove()
    return {"total": total, "tokens": tokens, "skipped_sum": skipped_sum, "skipped_count": skipped_count}


@register
class Replace(Method):
    name = "replace"
    variants = ("head", "ranked")
    default_variant = "head"
    units = frozenset({"heads"})
    description = "norm-mask, but skipped heads output their calibration mean (head) or skipped-token mean (ranked)"

    def fit(self, ctx, allocation):
        heads = family_of(ctx.model).sizes(ctx.model.config).heads
        skip = int(round(allocation.heads * heads)) if self.variant == "ranked" else 0
        inputs = {**ctx.base_key(), "variant": self.variant, "skip_per_layer": skip,
                  "dense_layers": list(allocation.dense_layers), "version": 1}

        def build():
            stats = head_output_means(ctx.model, ctx.calibration_ids(), skip, allocation.dense_layers)
            mean = stats["total"] / stats["tokens"]
            meta = {"tokens": stats["tokens"]}
            if self.variant == "ranked":
                counts = stats["skipped_count"][..., None]
                ranked = torch.where(counts > 0, stats["skipped_sum"] / counts.clamp(min=1), mean)
                meta["heads_never_skipped"] = int((stats["skipped_count"] == 0).sum())
                return {"replacement": ranked.float(), "skipped_count": stats["skipped_count"]}, meta
            return {"replacement": mean.float()}, meta

        return ctx.cache.get_or_build("replace", inputs, build)

    def policy(self, ctx, allocation, artefact):
        return NormPolicy(replacement=artefact.tensors["replacement"])
