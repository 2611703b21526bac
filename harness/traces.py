"""Traces: one dense pass over calibration text recording what predictors learn from.

Per sampled calibration token: every layer's attention input (`layer_input`, the residual stream entering
the layer) and MLP input (`mlp_input`), layer 0's attention output (`attn_output0`), per-head output L2 norms
(`head_norm`), neuron activity (`neuron_active`, bit-packed: OPT's fc1 after ReLU > 0; for SwiGLU, which has no
exact zeros, the top half of the token's neurons by |activation|: the family's `neuron_active`), and the token's
example and position.
Per-token criterion scores (plainact, …) are a second artefact (`trace_scores`) of the same tokens, made
only for methods that need them.

Which tokens: at OPT-13B one token's traces take 0.9 MB and its neuron scores 1.6 MB, so the calibration set
(32 × 512 tokens by default) cannot be kept whole. A budget (`calib_budget_gb`, traces and scores together)
decides how many tokens are kept: all of them when they fit, else pairs of consecutive tokens (t-1, t) drawn
uniformly from every example (the same number per example, seeded, fixed for a model and budget), so that a
token's previous token is there for the predictors that read it (timewise:time). The sample depends only on
the model's shape, the calibration data and the budget: every method, criterion and sparsity trains on the
same tokens, and records say how many were kept out of how many.

Collection runs in batches of examples; only the sampled tokens leave the GPU. Both artefacts are cached by
content hash and shared by every method and sparsity.
"""
from __future__ import annotations

import torch

from harness.errors import HarnessError
from harness.families import family_of, install, sizes_of
from harness.progress import stage

VERSION = 2
DEFAULT_BUDGET_GB = 3.0
SAMPLE_SEED = 0  # the token sample is part of the calibration data, not of a method's seed
BATCH_TOKENS = 8192  # tokens per collection forward (examples are batched up to this)


def trace_bytes_per_token(config) -> int:
    size = sizes_of(config)
    layers, d = size.layers, size.hidden
    return (2 * layers * d * 2  # layer_input, mlp_input (fp16)
            + d * 2  # attn_output0 (fp16)
            + layers * size.heads * 4  # head_norm (fp32)
            + layers * ((size.ffn + 7) // 8)  # neuron_active (bits)
            + 2 * 4)  # example, position (int32)


def score_bytes_per_token(config) -> int:
    """Per-token criterion scores: heads in fp32, neurons in bf16 (fp32's range: no score underflows to 0)."""
    size = sizes_of(config)
    return size.layers * size.heads * 4 + size.layers * size.ffn * 2


def budget_tokens(config, total: int, budget_gb: float) -> int:
    """How many calibration tokens the budget keeps (traces and scores of each token together)."""
    per_token = trace_bytes_per_token(config) + score_bytes_per_token(config)
    return int(min(total, (budget_gb * 2**30) // per_token))


def calibration_tokens(run_config) -> int:
    """Tokens in the calibration examples (an upper bound: a short calibration text gives fewer examples)."""
    return run_config.calib_samples * run_config.calib_seqlen


def kept_tokens(model_config, run_config) -> int:
    """How many calibration tokens the run's budget keeps for this model (estimated from the config alone)."""
    return budget_tokens(model_config, calibration_tokens(run_config), run_config.calib_budget_gb)


def run_dtype(run_config) -> str:
    """The dtype name the run's model will have (auto: fp16 on a GPU, fp32 on the CPU)."""
    from harness.models import dtype_name, resolve_device, resolve_dtype

    return dtype_name(resolve_dtype(run_config.dtype, resolve_device(run_config.device)))


def store_bytes(dtype: str) -> int:
    """Bytes per stored predictor parameter: half-precision models keep their predictors in their dtype."""
    return 2 if dtype in ("float16", "bfloat16") else 4


def trace_need(model_config, run_config):
    from harness.footprint import Need

    tokens = kept_tokens(model_config, run_config)
    size = tokens * trace_bytes_per_token(model_config)
    d, f = model_config.hidden_size, sizes_of(model_config).ffn
    return Need(f"traces ({tokens} tokens)", host=size, disk=size, gpu=BATCH_TOKENS * (16 * d + 4 * f))


def score_need(model_config, run_config, criterion: str):
    """Per-token scores of the traced tokens; building them takes one forward-backward per example."""
    from harness.footprint import Need

    tokens = kept_tokens(model_config, run_config)
    size = tokens * score_bytes_per_token(model_config)
    return Need(f"{criterion} scores ({tokens} tokens)", host=size, disk=size,
                gpu=backward_bytes(model_config, run_config.calib_seqlen), settings="calib_budget_gb,calib_seqlen")


def backward_bytes(model_config, seqlen: int) -> int:
    """GPU memory of one calibration example's forward-backward (activations kept for the backward, logits)."""
    shape = sizes_of(model_config)
    d, f, layers = shape.hidden, shape.ffn, shape.layers
    return seqlen * layers * (20 * d + 4 * f) * 2 + seqlen * model_config.vocab_size * 8


def sample_positions(examples: int, seqlen: int, tokens: int, seed: int = SAMPLE_SEED) -> torch.Tensor:
    """(examples, seqlen) bool: the tokens kept. All when `tokens` covers them; else disjoint pairs
    (2i, 2i+1) drawn per example (the same count in each example, the remainder in the first ones)."""
    keep = torch.zeros(examples, seqlen, dtype=torch.bool)
    if tokens >= examples * seqlen:
        return keep.fill_(True)
    pairs_per_row = seqlen // 2
    total_pairs = tokens // 2
    if total_pairs < 1:
        raise HarnessError(f"calib_budget_gb keeps {tokens} calibration tokens, fewer than one pair; raise calib_budget_gb")
    generator = torch.Generator().manual_seed(seed)
    base, extra = divmod(total_pairs, examples)
    for row in range(examples):
        count = min(pairs_per_row, base + (row < extra))
        chosen = torch.randperm(pairs_per_row, generator=generator)[:count]
        keep[row, 2 * chosen] = True
        keep[row, 2 * chosen + 1] = True
    return keep


def pack_bits(active: torch.Tensor) -> torch.Tensor:
    """(..., F) bool -> (..., ceil(F/8)) uint8."""
    pad = (-active.shape[-1]) % 8
    if pad:
        active = torch.nn.functional.pad(active, (0, pad))
    bits = active.reshape(*active.shape[:-1], -1, 8).to(torch.uint8)
    return (bits << torch.arange(8, dtype=torch.uint8, device=bits.device)).sum(-1, dtype=torch.uint8)


def unpack_bits(packed: torch.Tensor, size: int) -> torch.Tensor:
    bits = (packed.unsqueeze(-1) >> torch.arange(8, dtype=torch.uint8, device=packed.device)) & 1
    return bits.reshape(*packed.shape[:-1], -1)[..., :size].bool()


class Traces:
    """Read access to a traces artefact; arrays are indexed by kept calibration token (N tokens in all)."""

    def __init__(self, artefact, config):
        self.artefact = artefact
        self.t = artefact.tensors
        self.ffn_dim = sizes_of(config).ffn
        self.num_layers = config.num_hidden_layers

    @property
    def tokens(self) -> int:
        return self.t["position"].shape[0]

    @property
    def sampling(self) -> dict:
        """What was kept, for records: tokens kept of tokens in the calibration examples."""
        meta = self.artefact.meta
        return {"calib_tokens": int(meta.get("tokens", self.tokens)), "calib_tokens_total": int(meta.get("tokens_total", self.tokens)),
                "calib_sampling": meta.get("sampling", "all tokens")}

    def layer_input(self, layer: int | None = None) -> torch.Tensor:
        """(N, d) of one layer, or (N, L, d) of all (stored precision)."""
        return self.t["layer_input"] if layer is None else self.t["layer_input"][:, layer].float()

    def mlp_input(self, layer: int | None = None) -> torch.Tensor:
        return self.t["mlp_input"] if layer is None else self.t["mlp_input"][:, layer].float()

    def attn_output0(self) -> torch.Tensor:
        return self.t["attn_output0"].float()

    def head_norm(self, layer: int | None = None) -> torch.Tensor:
        return self.t["head_norm"] if layer is None else self.t["head_norm"][:, layer]

    def neuron_active(self, layer: int) -> torch.Tensor:
        return unpack_bits(self.t["neuron_active"][:, layer], self.ffn_dim)

    def neuron_active_packed(self) -> torch.Tensor:
        """(N, L, ceil(F/8)) uint8."""
        return self.t["neuron_active"]

    def previous(self) -> torch.Tensor:
        """Index of each token's previous token in the same example: itself for an example's first token,
        -1 where the previous token was not kept (a sampled pair's first token)."""
        example, position = self.t["example"].long(), self.t["position"].long()
        index = torch.arange(self.tokens)
        shifted = torch.cat([index[:1], index[:-1]])
        same = torch.cat([torch.tensor([False]), (example[1:] == example[:-1]) & (position[1:] == position[:-1] + 1)])
        return torch.where(position == 0, index, torch.where(same, shifted, torch.full_like(index, -1)))

    def split(self, val_fraction: float, seed: int) -> tuple[torch.Tensor, torch.Tensor]:
        """Train/validation token indices, split by example (never inside one)."""
        example = self.t["example"].long()
        count = int(example.max()) + 1
        order = torch.randperm(count, generator=torch.Generator().manual_seed(seed))
        val_count = max(1, int(round(val_fraction * count))) if count > 1 else 0
        is_val = torch.zeros(count, dtype=torch.bool)
        is_val[order[:val_count]] = True
        mask = is_val[example]
        index = torch.arange(self.tokens)
        return index[~mask], index[mask] if val_count else index[~mask]


def _batches(rows: int, seqlen: int):
    per = max(1, BATCH_TOKENS // seqlen)
    return [(start, min(rows, start + per)) for start in range(0, rows, per)]


@torch.no_grad()
def _collect(model, ids: torch.Tensor, keep: torch.Tensor, progress=None) -> dict:
    """Traces of the kept tokens of `ids` (examples, seqlen), in batches of examples. The hooks keep only the
    kept tokens' rows, and the decoder runs without the LM head (no logits)."""
    family = family_of(model)
    decoder, layers = family.decoder(model), family.layers(model)
    num_heads = family.sizes(model.config).heads
    out: dict[str, list] = {k: [] for k in ("layer_input", "mlp_input", "attn_output0", "head_norm", "neuron_active")}
    current: dict = {}
    chosen: list = [None]
    handles = []

    def rows(x):
        return x.reshape(-1, x.shape[-1]).index_select(0, chosen[0])

    def keep_input(name, index):
        def hook(x):
            current[(name, index)] = rows(x)
        return hook

    def keep_heads(index):
        def hook(x):
            x = rows(x)
            current[("head_norm", index)] = torch.linalg.vector_norm(x.view(x.shape[0], num_heads, -1).float(), dim=-1)
        return hook

    def keep_active(index):
        def hook(x):
            current[("neuron_active", index)] = pack_bits(family.neuron_active(rows(x)))
        return hook

    try:
        for index, layer in enumerate(layers):
            handles.append(install(family, layer, "layer_input", keep_input("layer_input", index)))
            handles.append(install(family, layer, "mlp_input", keep_input("mlp_input", index)))
            handles.append(install(family, layer, "head_output", keep_heads(index)))
            handles.append(install(family, layer, "neuron_act", keep_active(index)))
        handles.append(install(family, layers[0], "attn_output", lambda y: current.__setitem__("attn_output0", rows(y))))
        device = next(model.parameters()).device
        for start, end in _batches(ids.shape[0], ids.shape[1]):
            current.clear()
            chosen[0] = keep[start:end].reshape(-1).nonzero().squeeze(1).to(device)
            decoder(input_ids=ids[start:end].to(device), use_cache=False)
            stack = lambda name: torch.stack([current[(name, i)] for i in range(len(layers))], dim=1)  # noqa: E731
            out["layer_input"].append(stack("layer_input").half().cpu())
            out["mlp_input"].append(stack("mlp_input").half().cpu())
            out["attn_output0"].append(current["attn_output0"].half().cpu())
            out["head_norm"].append(stack("head_norm").cpu())
            out["neuron_active"].append(stack("neuron_active").cpu())
            if progress is not None:
                progress(end - start)
    finally:
        for handle in handles:
            handle.remove()
    tensors = {name: torch.cat(parts) for name, parts in out.items()}
    example, position = keep.nonzero(as_tuple=True)
    tensors["example"], tensors["position"] = example.to(torch.int32), position.to(torch.int32)
    return tensors


def calibration_sample(ctx) -> tuple[torch.Tensor, torch.Tensor]:
    """The calibration examples (examples, seqlen) and the (examples, seqlen) bool mask of kept tokens."""
    ids = ctx.calibration_ids()
    budget = ctx.budget_gb
    tokens = budget_tokens(ctx.model.config, ids.numel(), budget)
    return ids, sample_positions(ids.shape[0], ids.shape[1], tokens)


def _sampling_meta(ids: torch.Tensor, keep: torch.Tensor, budget: float) -> dict:
    kept = int(keep.sum())
    how = "all tokens" if kept == ids.numel() else (
        f"pairs of consecutive tokens, uniform per example (seed {SAMPLE_SEED}), to fit calib_budget_gb={budget}")
    return {"tokens": kept, "tokens_total": int(ids.numel()), "examples": int(ids.shape[0]), "sampling": how}


def trace_key(ctx) -> dict:
    return {**ctx.base_key(), "budget_gb": ctx.budget_gb, "version": VERSION}


def collect_traces(ctx) -> Traces:
    """The traces of the model on its calibration data (cached; built once for every method and sparsity)."""
    config = ctx.model.config

    def build():
        ids, keep = calibration_sample(ctx)
        meta = _sampling_meta(ids, keep, ctx.budget_gb)
        size = meta["tokens"] * trace_bytes_per_token(config)
        ctx.log(f"traces: {meta['tokens']} of {meta['tokens_total']} calibration tokens ({meta['sampling']}), "
                f"{size / 2**30:.2f} GiB")
        with stage("traces", ids.shape[0], ctx.log, unit="examples") as bar:
            tensors = _collect(ctx.model, ids, keep, bar.advance)
        return tensors, {**meta, "bytes": size}

    return Traces(ctx.cache.get_or_build("traces", trace_key(ctx), build), config)


def collect_scores(ctx, criterion: str) -> dict:
    """Per-token criterion scores of the traced tokens: {"heads": (N, L, H) fp32, "neurons": (N, L, F) bf16}
    (cached). bf16 keeps fp32's exponent range, so no non-zero score is stored as 0."""
    from methods.criteria import CRITERIA_VERSION, score_example

    inputs = {**trace_key(ctx), "criterion": criterion, "criteria_version": CRITERIA_VERSION}

    def build():
        ids, keep = calibration_sample(ctx)
        meta = _sampling_meta(ids, keep, ctx.budget_gb)
        heads, neurons = [], []
        with stage(f"trace scores ({criterion}, one forward-backward per example)", ids.shape[0], ctx.log,
                   unit="examples") as bar:
            for row, kept in zip(ids, keep):
                if not kept.any():
                    bar.advance()
                    continue
                scores = score_example(ctx.model, row, (criterion,))[criterion]
                chosen = kept.nonzero().squeeze(1).to(scores["heads"].device)
                heads.append(scores["heads"].index_select(0, chosen).float().cpu())
                neurons.append(scores["neurons"].index_select(0, chosen).float().to(torch.bfloat16).cpu())
                bar.advance()
        return {"heads": torch.cat(heads), "neurons": torch.cat(neurons)}, {**meta, "criterion": criterion}

    return ctx.session.memo(("trace_scores", criterion),
                            lambda: ctx.cache.get_or_build("trace_scores", inputs, build).tensors)
