"""teal (Liu et al., "Training-Free Activation Sparsity in Large Language Models", ICLR 2025): magnitude thresholds
on the inputs of every linear layer (q, k, v, o, gate, up, down; OPT: q, k, v, out_proj, fc1, fc2).

An input entry x_i of a linear layer is skipped (set to 0, so column i of the weight is not read) where
|x_i| ≤ t, with one threshold t per layer and site. `fit` runs the dense model over the calibration data and keeps
a histogram of |x| per layer and site (log-spaced bins, `BINS` over 10^LOG_MIN … 10^LOG_MAX, plus an underflow bin
that holds the exact zeros; `magnitude_histograms`); t is the histogram's quantile at the site's sparsity s (the
fraction of calibration entries with |x| ≤ t is s, up to the bin width, 0.23% of t).

  teal:uniform  every site of every layer at the target (`i0.5`, or a plain 0.5);
  teal:greedy   TEAL's block-wise greedy allocation: per layer, starting from 0, raise the sparsity of the site
                whose step changes the layer's output least (L2 over the hidden dim, mean over the last quarter of
                the tokens, on the dense inputs of `greedy_samples` calibration examples) until the layer's
                parameter-weighted sparsity reaches the target; a site's step is `greedy_step` / its weight
                (weights: parameters relative to q, e.g. k and v at 1/4 for Llama-3-8B's GQA, gate/up/down 3.5).
Sparsity is applied at every token (prefill included; TEAL's evaluation sparsifies half of the prefill). Thresholds
fluctuate in what they skip: records hold the achieved fraction (`achieved_inputs`: skipped weight columns over all
decoder-layer linear parameters; per site; per token: mean, std, min, max).
"""
from __future__ import annotations

import math

import torch

from harness.engine import MaskPolicy
from harness.errors import HarnessError
from harness.families import family_of, install
from harness.progress import stage
from methods import Method, register

LOG_MIN, LOG_MAX, BINS = -10.0, 5.0, 15000  # log10 |x| bins (0.001 decades each); bin 0: |x| < 10^LOG_MIN
HIST_VERSION = 1
GREEDY_DEFAULTS = {"greedy_step": 0.05, "greedy_samples": 4, "greedy_last_fraction": 0.25}
BATCH_TOKENS = 2048  # tokens per calibration forward (bounds the bin-index buffers of a wide site)


def bin_index(magnitude: torch.Tensor) -> torch.Tensor:
    """The histogram bin of each |x| (0: below 10^LOG_MIN, exact zeros included; BINS + 1: above 10^LOG_MAX)."""
    scaled = (torch.log10(magnitude.float().clamp(min=1e-30)) - LOG_MIN) * (BINS / (LOG_MAX - LOG_MIN))
    index = scaled.floor().clamp(-1, BINS).long() + 1
    return torch.where(magnitude < 10.0 ** LOG_MIN, torch.zeros_like(index), index)


def threshold(counts: torch.Tensor, sparsity: float) -> float:
    """|x| threshold whose fraction of entries at or below it is `sparsity`, from one histogram (BINS + 2 counts):
    interpolated (log-linearly) inside the bin where the cumulative count reaches it. -1 for sparsity 0 (nothing
    skipped), +inf for 1 (everything)."""
    if sparsity <= 0:
        return -1.0
    if sparsity >= 1:
        return math.inf
    counts = counts.double()
    total = float(counts.sum())
    if total == 0:
        raise HarnessError("a threshold from an empty histogram: the calibration pass saw no tokens")
    cumulative = counts.cumsum(0)
    want = sparsity * total
    b = int(torch.searchsorted(cumulative, torch.tensor([want], dtype=torch.float64)).item())
    if b == 0:
        return 0.0  # inside the underflow bin (zeros): skip the exact zeros and what is below 10^LOG_MIN
    b = min(b, BINS + 1)
    before = float(cumulative[b - 1])
    within = (want - before) / max(float(counts[b]), 1.0)
    width = (LOG_MAX - LOG_MIN) / BINS
    return 10.0 ** (LOG_MIN + (b - 1 + within) * width)


def calibration_batches(ids: torch.Tensor):
    per = max(1, BATCH_TOKENS // ids.shape[1])
    return [ids[start:start + per] for start in range(0, ids.shape[0], per)]


@torch.no_grad()
def magnitude_histograms(model, ids: torch.Tensor, points: list[str], progress=None) -> torch.Tensor:
    """(L, len(points), BINS + 2) int64 histograms of |x| at hookpoints `points` of every layer (linear sites, or
    `neuron_gate`), over the dense model's forward on the calibration examples `ids` (examples, seqlen)."""
    family = family_of(model)
    decoder, layers = family.decoder(model), family.layers(model)
    device = next(model.parameters()).device
    counts = torch.zeros(len(layers), len(points), BINS + 2, dtype=torch.long, device=device)
    handles = []

    def hook(l, p):
        def fn(x):
            index = bin_index(x.abs()).reshape(-1).to(device)
            counts[l, p] += torch.bincount(index, minlength=BINS + 2)
        return fn

    try:
        for l, layer in enumerate(layers):
            for p, point in enumerate(points):
                handles.append(install(family, layer, point, hook(l, p)))
        for batch in calibration_batches(ids):
            decoder(input_ids=batch.to(device), use_cache=False)
            if progress is not None:
                progress(batch.shape[0])
    finally:
        for handle in handles:
            handle.remove()
    return counts.cpu()


def fit_histograms(ctx, points: list[str], kind: str):
    """The cached histograms of the calibration data at `points` (one artefact per model, data and point set)."""
    inputs = {**ctx.base_key(), "points": list(points), "bins": [LOG_MIN, LOG_MAX, BINS], "version": HIST_VERSION}

    def build():
        ids = ctx.calibration_ids()
        with stage(f"{kind}: |x| histograms ({len(points)} sites per layer)", ids.shape[0], ctx.log,
                   unit="examples") as bar:
            counts = magnitude_histograms(ctx.model, ids, points, bar.advance)
        return {"counts": counts}, {"points": list(points), "tokens": int(ids.numel())}

    return ctx.cache.get_or_build(f"{kind}-histograms", inputs, build)


def site_weights(family, layer) -> dict[str, float]:
    """Each linear site's parameters relative to q (TEAL's weights of the greedy objective)."""
    params = {site: family.linear(layer, site).weight.numel() for site in family.linear_sites}
    return {site: n / params["q"] for site, n in params.items()}


def effective(sparsity: dict, weights: dict) -> float:
    return sum(sparsity[s] * weights[s] for s in sparsity) / sum(weights.values())


class ThresholdHooks:
    """Temporary input-threshold hooks on one layer (the greedy search runs the layer alone with them)."""

    def __init__(self, family, layer, thresholds: dict):
        self.handles = [install(family, layer, site, self._fn(t)) for site, t in thresholds.items() if t >= 0]

    @staticmethod
    def _fn(t):
        return lambda x: x * (x.abs() > t).to(x.dtype)

    def remove(self):
        for handle in self.handles:
            handle.remove()


@torch.no_grad()
def greedy_allocation(model, ids: torch.Tensor, counts: torch.Tensor, target: float, step: float,
                      last_fraction: float, dense_layers=(), progress=None) -> torch.Tensor:
    """TEAL's block-wise greedy: (L, sites) sparsities whose parameter-weighted mean is `target` in every layer."""
    family = family_of(model)
    decoder, layers = family.decoder(model), family.layers(model)
    sites = list(family.linear_sites)
    device = next(model.parameters()).device
    calls: dict = {}

    def grab(index):
        def hook(module, args, kwargs):
            calls[index] = (args, dict(kwargs))
        return hook

    handles = [layer.register_forward_pre_hook(grab(i), with_kwargs=True) for i, layer in enumerate(layers)]
    try:
        decoder(input_ids=ids.to(device), use_cache=False)  # the dense inputs of every layer
    finally:
        for handle in handles:
            handle.remove()
    out = torch.zeros(len(layers), len(sites), dtype=torch.float64)

    def run(l, sparsity):
        layer = layers[l]
        hooks = ThresholdHooks(family, layer, {s: threshold(counts[l, sites.index(s)], v) for s, v in sparsity.items()})
        try:
            args, kwargs = calls[l]
            result = layer(*args, **kwargs)
        finally:
            hooks.remove()
        return result[0] if isinstance(result, tuple) else result

    for l, layer in enumerate(layers):
        if l in dense_layers:
            if progress is not None:
                progress()
            continue
        weights = site_weights(family, layer)
        reference = run(l, {s: 0.0 for s in sites})
        start = int(reference.shape[1] * (1 - last_fraction))

        def error(sparsity):
            new = run(l, sparsity)
            return float(torch.linalg.vector_norm((new - reference)[:, start:].float(), dim=-1).mean())

        current = {s: 0.0 for s in sites}
        while effective(current, weights) < target - 1e-12:
            best, best_error = None, math.inf
            for s in sites:
                if current[s] >= 1:
                    continue
                trial = {**current, s: min(1.0, current[s] + step / weights[s])}
                value = error(trial)
                if value < best_error:
                    best, best_error = trial, value
            if best is None:
                break
            current = best
        out[l] = torch.tensor([current[s] for s in sites], dtype=torch.float64)
        if progress is not None:
            progress()
    return out


class InputThresholdPolicy(MaskPolicy):
    """Keep x_i where |x_i| > t[layer, site] (t < 0: the site stays dense)."""

    def __init__(self, thresholds: torch.Tensor, sites: list[str]):
        self.thresholds = thresholds.double()
        self.input_sites = tuple(sites)
        self.index = {site: i for i, site in enumerate(sites)}

    def input_keep(self, layer, site, state, x):
        t = float(self.thresholds[layer, self.index[site]])
        if t < 0:
            return None
        return x.abs() > t


@register
class Teal(Method):
    name = "teal"
    variants = ("uniform", "greedy")
    default_variant = "uniform"
    units = frozenset({"inputs"})
    training_free = True
    decode_families = frozenset({"llama"})  # input-sparse GEMVs exist in the Llama engine only
    description = ("TEAL: magnitude thresholds (calibration histograms) on the inputs of every linear layer; "
                   "uniform, or TEAL's greedy per-layer allocation")

    def hp(self) -> dict:
        return {**GREEDY_DEFAULTS, **{k: v for k, v in self.settings.items() if k in GREEDY_DEFAULTS}}

    def footprint(self, model_config, run_config, allocation, seed):
        """The histograms (int64 counts per layer and site) and, for greedy, every layer's dense inputs of
        `greedy_samples` calibration examples kept on the device while the allocation is searched."""
        from harness.footprint import Need
        from harness.families import sizes_of

        shape = sizes_of(model_config)
        sites = len(family_of(model_config).linear_sites)
        needs = {("teal-histograms",): Need("teal |x| histograms", disk=shape.layers * sites * (BINS + 2) * 8)}
        if self.variant == "greedy" and allocation.inputs > 0:
            tokens = int(self.hp()["greedy_samples"]) * run_config.calib_seqlen
            needs[("teal-greedy", allocation.inputs)] = Need(
                "teal greedy allocation (dense layer inputs)", gpu=tokens * shape.hidden * shape.layers * 4,
                settings="greedy_samples,calib_seqlen")
        return needs

    def fit(self, ctx, allocation):
        family = family_of(ctx.model)
        sites = list(family.linear_sites)
        histograms = fit_histograms(ctx, sites, "teal")
        counts = histograms.tensors["counts"]
        if self.variant == "uniform" or allocation.inputs == 0:
            sparsity = torch.full(counts.shape[:2], float(allocation.inputs), dtype=torch.float64)
            return self._artefact(histograms, sparsity, counts)
        hp = self.hp()
        inputs = {**ctx.base_key(), "histograms": histograms.meta.get("key"), "target": allocation.inputs, "hp": hp,
                  "dense_layers": list(allocation.dense_layers), "version": 1}

        def build():
            ids = ctx.calibration_ids()[: int(hp["greedy_samples"])]
            layers = family.layers(ctx.model)
            with stage(f"teal greedy allocation at {allocation.inputs} ({len(layers)} layers)", len(layers), ctx.log,
                       unit="layers") as bar:
                sparsity = greedy_allocation(ctx.model, ids, counts, allocation.inputs, float(hp["greedy_step"]),
                                             float(hp["greedy_last_fraction"]), allocation.dense_layers, bar.advance)
            return {"sparsity": sparsity}, {"hp": hp, "sites": sites}

        greedy = ctx.cache.get_or_build("teal-greedy", inputs, build)
        return self._artefact(greedy, greedy.tensors["sparsity"], counts)

    @staticmethod
    def _artefact(base, sparsity: torch.Tensor, counts: torch.Tensor):
        from harness.artefacts import Artefact

        thresholds = torch.tensor([[threshold(counts[l, s], float(sparsity[l, s])) for s in range(counts.shape[1])]
                                   for l in range(counts.shape[0])], dtype=torch.float64)
        return Artefact({"counts": counts, "sparsity": sparsity, "thresholds": thresholds}, dict(base.meta), base.path)

    def policy(self, ctx, allocation, artefact):
        if artefact is None:
            raise HarnessError("teal needs its calibration histograms (run fit first)")
        return InputThresholdPolicy(artefact.tensors["thresholds"], list(family_of(ctx.model).linear_sites))

    def decode_source(self, policy, allocation, model):
        return decode_source(policy, allocation, model)


def decode_source(policy, allocation, model):
    """The sparse decode engine's mask source for teal (kernels.decode_llama.InputThresholdMasks): the policy's
    thresholds per layer and site, in harness.families.LINEAR_SITES order (q, k, v, o, gate, up, down); sites the
    policy does not mask, and the allocation's dense layers, get −1 (dense). None (a dense engine) when nothing is
    sparsified. Llama-family models only: the OPT engine (kernels.decode) has no input-sparse path."""
    from harness.families import LINEAR_SITES

    if allocation.inputs == 0 or policy is None:
        return None
    family = family_of(model)
    if family.name != "llama":
        raise HarnessError(f"teal's decode source needs the Llama-family decode engine (kernels.decode_llama); the "
                           f"{family.name} engine has no input-sparse path")
    from kernels.decode_llama import InputThresholdMasks

    layers = policy.thresholds.shape[0]
    thresholds = torch.full((layers, len(LINEAR_SITES)), -1.0, dtype=torch.float64)
    for site, column in policy.index.items():
        thresholds[:, LINEAR_SITES.index(site)] = policy.thresholds[:, column]
    for layer in allocation.dense_layers:
        thresholds[layer] = -1.0
    return InputThresholdMasks(thresholds)
