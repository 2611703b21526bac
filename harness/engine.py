"""The masked engine: hooks on a Hugging Face model that skip attention heads and FFN neurons per token.

Head masks act on the per-head attention outputs (the input of the output projection, viewed as batch × tokens ×
heads × head dim: OPT's `out_proj`, Llama's `o_proj`, whose heads are the query heads); neuron masks on the
activations at the input of the down projection (OPT: fc1 after ReLU; Llama: the SwiGLU act(gate) · up). Keys and
values of every head are kept. A skipped head outputs zero, or a replacement vector when the policy gives one.
Input masks (TEAL, WINA) zero entries of a linear layer's input (q, k, v, o, gate, up, down), i.e. skip columns
of its weight. Where these tensors are is the model family's business (`harness.families`): the engine only names
hookpoints.

A method supplies a `MaskPolicy` that scores heads and neurons (higher = more important); the engine
turns scores into masks under an `Allocation` (one place for top-k, local/global budgets, dense layers and
the mask scope), measures the achieved sparsity, and removes every hook when the context exits.
"""
from __future__ import annotations

from contextlib import contextmanager
from dataclasses import dataclass, field

import torch

from harness.errors import HarnessError
from harness.families import family_of, install

ALLOCATIONS = ("local", "global")
SCOPES = ("token", "request")


@dataclass(frozen=True)
class Allocation:
    """How a sparsity target becomes masks.

    heads / neurons: the fraction skipped per token (of the heads/neurons of the layers that may be sparse).
    inputs: the fraction of each linear layer's input entries skipped per token (input masks, TEAL/WINA).
    mode: `local` skips the same count in every layer; `global` ranks all layers' scores together.
    dense_layers: layers never sparsified (e.g. (0,) as in ShadowLLM).
    min_keep: with `global`, at least this fraction of each layer's units is kept.
    scope: `token` (a token's mask depends only on what the model has seen up to it) or `request`
    (one mask per request: the mask of its last context token is used for every token of the request, the
    tokens generated after it included; not causal). See `request_contexts` for where the context ends.
    """

    heads: float = 0.0
    neurons: float = 0.0
    mode: str = "local"
    dense_layers: tuple[int, ...] = ()
    min_keep: float = 0.0
    scope: str = "token"
    inputs: float = 0.0

    def __post_init__(self):
        for name in ("heads", "neurons", "inputs"):
            value = getattr(self, name)
            if not 0.0 <= value < 1.0:
                raise HarnessError(f"{name} sparsity {value} is outside [0, 1)")
        if self.mode not in ALLOCATIONS:
            raise HarnessError(f"unknown allocation {self.mode!r}; valid: {', '.join(ALLOCATIONS)}")
        if self.scope not in SCOPES:
            raise HarnessError(f"unknown mask scope {self.scope!r}; valid: {', '.join(SCOPES)}")
        if not 0.0 <= self.min_keep <= 1.0:
            raise HarnessError(f"min_keep {self.min_keep} is outside [0, 1]")

    def fraction(self, unit: str) -> float:
        return getattr(self, unit)


@dataclass
class ForwardState:
    """What the hooks know about the forward pass in progress (one call of the decoder)."""

    input_ids: torch.Tensor | None  # (B, T) tokens of this call
    positions: torch.Tensor  # (B, T) absolute positions (past tokens counted)
    valid: torch.Tensor  # (B, T) bool: real tokens, not padding
    captures: dict = field(default_factory=dict)  # (name, layer) -> tensor, see MaskPolicy.needs
    keep: dict = field(default_factory=dict)  # (unit, layer) -> (B, T, n) bool masks chosen in this call
    planned: dict = field(default_factory=dict)  # unit -> (B, T, L, n) bool, for global allocation
    past: int = 0  # tokens already in the KV cache (0: the call starts new requests)
    context_end: torch.Tensor | None = None  # (B,) column of each row's last context token (request scope)

    @property
    def shape(self) -> tuple[int, int]:
        return tuple(self.positions.shape)


class MaskPolicy:
    """What a method installs. Override the score functions; higher score = more important = kept.

    `needs` names the activations the engine must capture for the policy, each stored in
    `state.captures[(name, layer)]` as (B, T, ...) tensors:
      layer_input: the residual stream entering a decoder layer (the attention input, before its norm),
      mlp_input: the residual stream entering the MLP block (after attention),
      attn_output: a layer's attention output (after the output projection, before the residual add),
      neuron_gate: the gate activation of a layer's neurons (B, T, F): act(gate_proj x), or OPT's ReLU(fc1 x).
    Score functions see `state` (captures of this call up to the current layer) and, for heads, the
    per-head outputs of the current layer (B, T, H, D), for neurons the activations at the down projection's
    input (B, T, F). Return None to keep every unit of that layer.

    Thresholding policies (`returns_masks`) return bool keep masks from the score functions instead of scores: the
    engine applies them as they are (the count skipped varies per token) and measures what they skip.
    Input-masking policies name `input_sites` (of q, k, v, o, gate, up, down) and return from `input_keep` a bool
    keep mask over a linear layer's input entries (B, T, in), or None for that layer and site.
    """

    needs: frozenset = frozenset()
    #: (L, H, D) values written for skipped heads instead of zero, or None
    head_replacement: torch.Tensor | None = None
    #: the scores are the same at every token (static masks): the engine selects once and reuses the mask
    token_independent: bool = False
    #: head_scores / neuron_scores return bool keep masks (thresholds), not scores to rank
    returns_masks: bool = False
    #: linear sites whose inputs the policy masks (`input_keep`), under the `inputs` target
    input_sites: tuple = ()

    def begin(self, state: ForwardState) -> None:
        """Called at the start of every forward call (decode steps included)."""

    def prepare(self, like: torch.Tensor) -> None:
        """One-time work before the first forward (e.g. predictors moved to `like`'s device and dtype), called by
        `MaskedEngine.prepare` outside any timed evaluation."""

    def head_scores(self, layer: int, state: ForwardState, head_out: torch.Tensor) -> torch.Tensor | None:
        return None

    def neuron_scores(self, layer: int, state: ForwardState, act: torch.Tensor) -> torch.Tensor | None:
        return None

    def input_keep(self, layer: int, site: str, state: ForwardState, x: torch.Tensor) -> torch.Tensor | None:
        """(B, T, in) bool keep mask of the input `x` (B, T, in) of linear `site` at `layer`, or None (dense)."""
        return None

    def global_scores(self, unit: str, state: ForwardState) -> torch.Tensor:
        """(B, T, L, n) scores of every layer at once (for `global`), asked for at the first sparsifiable layer."""
        raise HarnessError(f"{type(self).__name__} cannot allocate globally: its scores are only known layer by layer")


class SparsityMeter:
    """Counts skipped units over valid tokens, per layer, on the tensors' device (no host sync until read)."""

    def __init__(self, num_layers: int, sizes: dict[str, int]):
        self.sizes = sizes
        self.num_layers = num_layers
        self.skipped = {unit: [0] * num_layers for unit in sizes}
        self.tokens = {unit: [0] * num_layers for unit in sizes}

    def add(self, unit: str, layer: int, keep: torch.Tensor | None, valid: torch.Tensor, exact: int | None = None) -> None:
        """Count one call. `exact`: every token skips exactly this many (a `lowest_k_mask` selection), so the
        mask need not be read again."""
        count = valid.sum()
        self.tokens[unit][layer] = self.tokens[unit][layer] + count
        if exact is not None:
            self.skipped[unit][layer] = self.skipped[unit][layer] + exact * count
        elif keep is not None:
            # skipped per token without materialising ~keep (keep may be a broadcast view of one static mask)
            skipped = self.sizes[unit] - keep.sum(-1)
            self.skipped[unit][layer] = self.skipped[unit][layer] + (skipped * valid).sum()

    def counts(self, unit: str) -> tuple[list[int], list[int]]:
        """(skipped units, valid tokens) per layer."""
        return [int(v) for v in self.skipped[unit]], [int(v) for v in self.tokens[unit]]

    def achieved(self, unit: str) -> float | None:
        skipped, tokens = self.counts(unit)
        total = sum(tokens) * self.sizes[unit]
        return sum(skipped) / total if total else None

    def per_layer(self, unit: str) -> list[float]:
        skipped, tokens = self.counts(unit)
        return [s / (t * self.sizes[unit]) if t else 0.0 for s, t in zip(skipped, tokens)]


class InputMeter:
    """Counts skipped input entries of linear layers (input masks) over valid tokens, per layer and site.

    Skipping one input entry of a linear layer skips one column of its weight (`out_features` parameters), so the
    model-wide fraction weighs every site by its weight: skipped parameters / all decoder-layer linear parameters
    (TEAL's "model-wide" sparsity). Sites the policy does not mask count as dense."""

    def __init__(self, family, layers, sites):
        self.sites = tuple(sites)
        self.shape = {(l, site): tuple(family.linear(layer, site).weight.shape)
                      for l, layer in enumerate(layers) for site in family.linear_sites}
        self.num_layers = len(layers)
        self.total_weight = sum(out * inp for out, inp in self.shape.values())  # parameters per token
        self.skipped: dict = {}
        self.tokens: dict = {}

    def weight(self, layer: int, site: str) -> int:
        return self.shape[(layer, site)][0]

    def add(self, layer: int, site: str, keep: torch.Tensor | None, valid: torch.Tensor):
        """Count one call; returns the (B, T) skipped entries per token (None when nothing was skipped)."""
        key = (layer, site)
        self.tokens[key] = self.tokens.get(key, 0) + valid.sum()
        if keep is None:
            return None
        skipped = (~keep).sum(-1) * valid
        self.skipped[key] = self.skipped.get(key, 0) + skipped.sum()
        return skipped

    def achieved(self) -> dict:
        tokens = max((int(v) for v in self.tokens.values()), default=0)
        skipped = {key: int(v) for key, v in self.skipped.items()}
        if not tokens:
            return {"achieved_inputs": None, "achieved_inputs_per_site": {}, "achieved_inputs_per_layer": []}
        params = sum(n * self.weight(*key) for key, n in skipped.items())
        per_site = {site: sum(skipped.get((l, site), 0) for l in range(self.num_layers))
                    / (tokens * sum(self.shape[(l, site)][1] for l in range(self.num_layers))) for site in self.sites}
        per_layer = []
        for l in range(self.num_layers):
            sites = [s for (layer, s) in self.shape if layer == l]
            total = sum(self.shape[(l, s)][0] * self.shape[(l, s)][1] for s in sites)
            per_layer.append(sum(skipped.get((l, s), 0) * self.weight(l, s) for s in sites) / (tokens * total))
        return {"achieved_inputs": params / (tokens * self.total_weight), "achieved_inputs_per_site": per_site,
                "achieved_inputs_per_layer": per_layer}


class TokenMeter:
    """The fraction each token skipped (masks whose count varies per token: thresholds, input masks): per forward
    call, the skipped units of every layer add up per token; at the call's end the valid tokens' fractions are
    folded into mean, std, min and max."""

    def __init__(self):
        self.current: dict = {}  # unit -> ((B, T) skipped, total per token)
        self.stats: dict = {}  # unit -> [count, sum, sum of squares, min, max]

    def add(self, unit: str, skipped: torch.Tensor, total: int) -> None:
        previous = self.current.get(unit)
        value = skipped.double() if previous is None else previous[0] + skipped.to(previous[0].device).double()
        self.current[unit] = (value, total)

    def close(self, valid: torch.Tensor) -> None:
        for unit, (skipped, total) in self.current.items():
            fraction = (skipped / total)[valid.to(skipped.device)]
            if fraction.numel() == 0:
                continue
            count, total_sum, squares, low, high = self.stats.get(unit, (0, 0.0, 0.0, float("inf"), float("-inf")))
            self.stats[unit] = (count + fraction.numel(), total_sum + float(fraction.sum()),
                                squares + float(fraction.square().sum()), min(low, float(fraction.min())),
                                max(high, float(fraction.max())))
        self.current = {}

    def summary(self) -> dict:
        """{unit: {tokens, mean, std, min, max}} of the per-token fractions skipped."""
        out = {}
        for unit, (count, total_sum, squares, low, high) in self.stats.items():
            mean = total_sum / count
            out[unit] = {"tokens": count, "mean": mean, "std": max(squares / count - mean * mean, 0.0) ** 0.5,
                         "min": low, "max": high}
        return out


def model_layers(model):
    """The decoder (the module that takes input_ids) and its layers, of any supported family."""
    family = family_of(model)
    return family.decoder(model), family.layers(model)


opt_layers = model_layers  # the name callers used when only OPT was supported


def heads_view(x: torch.Tensor, batch: int, seq: int, num_heads: int) -> torch.Tensor:
    """The output projection's input (B, T, H*D) or (B*T, H*D) as per-head outputs (B, T, H, D)."""
    return x.view(batch, seq, num_heads, -1)


def lowest_k_mask(scores: torch.Tensor, skip: int) -> torch.Tensor:
    """Bool keep-mask over the last dim with the `skip` lowest scores set False.

    Exactly `skip` units are skipped per row. Among units tied at the threshold score the highest indices are
    skipped (the kept ties are the lowest indices, as in the decode engine's top-k). One selection
    (kthvalue) and a few elementwise passes: at 20480 neurons a row this is several times faster than
    torch.topk, whose cost grows with k."""
    n = scores.shape[-1]
    if skip <= 0:
        return torch.ones_like(scores, dtype=torch.bool)
    if skip >= n:
        return torch.zeros_like(scores, dtype=torch.bool)
    from harness import selection

    if selection.enabled() and selection.available(scores):  # fp16/bf16 rows on CUDA: one Triton launch
        return selection.lowest_k_keep(scores, skip)
    from kernels.topk import lowest_k_keep_torch

    return lowest_k_keep_torch(scores, skip)


def plan_global(scores: torch.Tensor, allocation: Allocation, unit: str) -> torch.Tensor:
    """Global allocation: one ranking of (…, L, n) scores over every sparsifiable layer, per leading index (token):
    the keep mask (…, L, n) that skips the lowest-scored units overall, dense layers and each layer's top
    `min_keep` protected. The masked engine's plan, and the decode engine's (kernels.sources)."""
    *lead, layers, n = scores.shape
    flat = scores.float().reshape(-1, layers, n)
    dense = sorted(l for l in set(allocation.dense_layers) if 0 <= l < layers)
    eligible = layers - len(dense)
    protect = torch.zeros_like(flat, dtype=torch.bool)
    for l in dense:  # slices, not an index list: no host-to-device copy (the decode step runs this in a CUDA graph)
        protect[:, l] = True
    floor = min(int(round(allocation.min_keep * n)), n)
    if floor > 0:  # the top `floor` units of every layer are never skipped
        top = torch.topk(flat, floor, dim=-1).indices
        protect.scatter_(-1, top, True)
    flat = torch.where(protect, float("inf"), flat)
    skip = int(round(allocation.fraction(unit) * n * eligible))
    skip = min(skip, (layers - len(dense)) * (n - floor))  # the units left unprotected (no device read)
    return lowest_k_mask(flat.view(-1, layers * n), skip).view(*lead, layers, n)


class MaskedEngine:
    """Installs a policy on a model (any family of harness.families) for the duration of a `with engine.applied():`
    block."""

    def __init__(self, model, policy: MaskPolicy | None, allocation: Allocation):
        self.model = model
        self.policy = policy
        self.allocation = allocation
        self.family = family_of(model)
        self.decoder, self.layers = self.family.decoder(model), self.family.layers(model)
        shape = self.family.sizes(model.config)
        self.num_layers = len(self.layers)
        self.num_heads = shape.heads
        self.head_dim = shape.head_dim
        self.ffn_dim = shape.ffn
        self.sizes = {"heads": self.num_heads, "neurons": self.ffn_dim}
        self.meter = SparsityMeter(self.num_layers, self.sizes)
        self.input_meter = InputMeter(self.family, self.layers, self._input_sites())
        self.token_meter = TokenMeter()
        self.state: ForwardState | None = None
        self._request_keep: dict = {}  # (unit, layer) -> (B, n): the masks of the requests being decoded
        self._replacement_cache: dict = {}
        self._fixed: dict = {}  # token-independent masks, selected once
        self._prepared = False
        for layer in allocation.dense_layers:
            if not 0 <= layer < self.num_layers:
                raise HarnessError(f"dense layer {layer} does not exist (the model has {self.num_layers} layers)")
        if self.active("inputs") and allocation.scope != "token":
            raise HarnessError(f"input masks (TEAL, WINA) are chosen per token from the token's own inputs; scope "
                               f"{allocation.scope!r} is not available for them (valid: token)")

    # -- which layers/units are sparsified ---------------------------------------------------------
    def skip_count(self, unit: str) -> int:
        return int(round(self.allocation.fraction(unit) * self.sizes[unit]))

    def active(self, unit: str) -> bool:
        if unit == "inputs":
            return self.policy is not None and self.allocation.inputs > 0 and bool(self._input_sites())
        return self.policy is not None and self.skip_count(unit) > 0

    def _input_sites(self) -> tuple:
        """The linear sites of this family that the policy masks the inputs of."""
        wanted = getattr(self.policy, "input_sites", ()) if self.policy is not None else ()
        return tuple(site for site in self.family.linear_sites if site in wanted)

    def _per_token(self) -> bool:
        """Whether per-token achieved sparsity is tracked (masks whose count varies per token)."""
        return self.active("inputs") or (self.policy is not None and self.policy.returns_masks)

    @contextmanager
    def applied(self):
        handles = []
        try:
            if self.policy is not None and (self.active("heads") or self.active("neurons") or self.active("inputs")
                                            or self.policy.needs):
                handles.append(self.decoder.register_forward_pre_hook(self._begin, with_kwargs=True))
                if self._per_token():
                    handles.append(self.decoder.register_forward_hook(self._end))
                needs = self.policy.needs
                family = self.family
                for index, layer in enumerate(self.layers):
                    if "layer_input" in needs:
                        handles.append(install(family, layer, "layer_input", self._capture_layer_input(index)))
                    if "mlp_input" in needs:
                        handles.append(install(family, layer, "mlp_input", self._capture("mlp_input", index)))
                    if "attn_output" in needs:
                        handles.append(install(family, layer, "attn_output", self._capture_attn_output(index)))
                    if "neuron_gate" in needs:
                        handles.append(install(family, layer, "neuron_gate", self._capture("neuron_gate", index)))
                    if self.active("inputs"):  # before the head/neuron masks: a site's input is masked first
                        for site in self._input_sites():
                            handles.append(install(family, layer, site, self._mask_input(index, site)))
                    if self.active("heads") or self.policy.needs:
                        handles.append(install(family, layer, "head_output", self._mask_heads(index)))
                    if self.active("neurons"):
                        handles.append(install(family, layer, "neuron_act", self._mask_neurons(index)))
                self.prepare()
            yield self
        finally:
            for handle in handles:
                handle.remove()
            if self.state is not None:  # keep the last call's masks for inspection, drop activations
                self.state.captures = {}

    def prepare(self) -> None:
        """One-time work, done before evaluation clocks start (the runner calls it; `applied()` does it when not done
        yet): the policy's predictors moved to the model's device and dtype, and the GPU selection kernel compiled
        for this model's rows. On OPT-30B these took ~3 s of an 8-window evaluation when done in its first window."""
        if self._prepared or self.policy is None:
            return
        self._prepared = True
        self.policy.prepare(next(self.model.parameters()))
        self._warm_up()

    def _warm_up(self) -> None:
        """Compile the GPU selection kernel for this model's rows before the first forward is timed."""
        from harness import selection

        param = next(self.model.parameters())
        widths = [self.sizes[unit] for unit in self.sizes if self.active(unit)]
        if self.allocation.mode == "global":
            widths = [self.sizes[unit] * self.num_layers for unit in self.sizes if self.active(unit)]
        selection.warm_up(widths, param.dtype, param.device)

    # -- hooks ---------------------------------------------------------------------------------------
    def _begin(self, module, args, kwargs):
        input_ids = kwargs.get("input_ids", args[0] if args else None)
        embeds = kwargs.get("inputs_embeds")
        batch, seq = (input_ids.shape if input_ids is not None else embeds.shape[:2])
        device = (input_ids if input_ids is not None else embeds).device
        cache = kwargs.get("past_key_values")
        past = cache.get_seq_length() if cache is not None else 0
        mask = kwargs.get("attention_mask")
        if mask is not None and mask.dim() == 2:
            positions = (torch.cumsum(mask, dim=1) * mask - 1).long()[:, -seq:]
            valid = mask[:, -seq:].bool()
        else:
            positions = (torch.arange(seq, device=device) + past).expand(batch, seq)
            valid = torch.ones(batch, seq, dtype=torch.bool, device=device)
        self.state = ForwardState(input_ids=input_ids, positions=positions, valid=valid, past=past)
        if self.allocation.scope == "request" and past == 0:
            self.state.context_end = context_end(valid, positions, getattr(self.model, CONTEXT_ATTR, None))
            self._request_keep = {}
        self.policy.begin(self.state)

    def _end(self, module, args, output):
        """End of a forward call: fold its per-token sparsity into the token meter."""
        self.token_meter.close(self.state.valid)

    def _capture_layer_input(self, index):
        def hook(hidden):
            self.state.captures[("layer_input", index)] = hidden
        return hook

    def _capture(self, name, index):
        def hook(x):
            batch, seq = self.state.shape
            self.state.captures[(name, index)] = x.view(batch, seq, -1)
        return hook

    def _capture_attn_output(self, index):
        def hook(output):
            self.state.captures[("attn_output", index)] = output
        return hook

    def _mask_input(self, index, site):
        def hook(x):
            batch, seq = self.state.shape
            rows = x.view(batch, seq, -1)
            valid = self.state.valid
            if index in self.allocation.dense_layers:
                self.input_meter.add(index, site, None, valid)
                return None
            keep = self.policy.input_keep(index, site, self.state, rows)
            if keep is not None:
                keep = keep.to(rows.device)
                self.state.keep[(site, index)] = keep
            skipped = self.input_meter.add(index, site, keep, valid.to(rows.device))
            if skipped is not None:
                self.token_meter.add("inputs", skipped * self.input_meter.weight(index, site),
                                     self.input_meter.total_weight)
            if keep is None:
                return None
            return (rows * keep.to(rows.dtype)).view(x.shape)
        return hook

    def _mask_heads(self, index):
        def hook(x):
            batch, seq = self.state.shape
            heads = heads_view(x, batch, seq, self.num_heads)
            keep = self._keep("heads", index, lambda: self.policy.head_scores(index, self.state, heads))
            if keep is None:
                return None
            keep = keep.to(heads.device)  # sharded models: scores may come from another layer's device
            self.state.keep[("heads", index)] = keep
            out = heads * keep.unsqueeze(-1)  # one pass: a bool factor promotes to the activations' dtype
            replacement = self._replacement(index, heads)
            if replacement is not None:
                out = out + (~keep).unsqueeze(-1) * replacement
            return out.reshape(x.shape)
        return hook

    def _mask_neurons(self, index):
        def hook(x):
            batch, seq = self.state.shape
            act = x.view(batch, seq, self.ffn_dim)
            keep = self._keep("neurons", index, lambda: self.policy.neuron_scores(index, self.state, act))
            if keep is None:
                return None
            keep = keep.to(act.device)  # sharded models: scores may come from another layer's device
            self.state.keep[("neurons", index)] = keep
            return (act * keep).view(x.shape)  # one pass, no float copy of the mask
        return hook

    # -- scores to masks -----------------------------------------------------------------------------
    def _keep(self, unit: str, layer: int, scores_fn) -> torch.Tensor | None:
        """The keep mask of `unit` at `layer`, or None when the layer stays dense."""
        valid = self.state.valid
        if not self.active(unit) or layer in self.allocation.dense_layers:
            self.meter.add(unit, layer, None, valid)
            return None
        if self.allocation.scope == "request" and self.state.past > 0:
            keep = self._continued(unit, layer)  # a decode step: the request's mask, chosen at its context
            self.meter.add(unit, layer, keep, valid if keep is None else valid.to(keep.device))
            return keep
        exact = None
        if self.allocation.mode == "global":
            # planned once per forward, at the first sparsifiable layer: the policy may use what earlier
            # (dense) layers computed in this forward, e.g. ShadowLLM's layer-0 attention output
            if unit not in self.state.planned:
                self.state.planned[unit] = self._plan_global(unit)
            keep = self.state.planned[unit][:, :, layer]
        else:
            scores = scores_fn()
            if scores is None:
                self._request_keep[(unit, layer)] = None
                self.meter.add(unit, layer, None, valid)
                return None
            if self.policy.returns_masks:  # a thresholding policy: its scores are the keep mask (counted)
                keep = scores
            else:
                if self.policy.token_independent:  # one selection for every token, made once
                    key = (unit, layer, scores.device)
                    if key not in self._fixed:
                        self._fixed[key] = lowest_k_mask(scores[:1, :1], self.skip_count(unit))
                    keep = self._fixed[key].expand(scores.shape)
                else:
                    keep = lowest_k_mask(scores, self.skip_count(unit))
                exact = self.skip_count(unit)  # lowest_k_mask skips exactly this many a row (tested)
        valid = valid.to(keep.device)  # sharded models: the forward's state lives on the first device
        if self.allocation.scope == "request":
            chosen = request_mask(keep, self.state.context_end.to(keep.device))
            self._request_keep[(unit, layer)] = chosen
            keep = chosen.unsqueeze(1).expand_as(keep)
        self.meter.add(unit, layer, keep, valid, exact)
        if self.policy.returns_masks:
            self.token_meter.add(unit, (~keep).sum(-1), self.sizes[unit] * self.num_layers)
        return keep

    def _continued(self, unit: str, layer: int) -> torch.Tensor | None:
        """(B, T, n) keep mask of a call that continues requests from the KV cache (request scope); None where
        the requests' first call kept the whole layer."""
        batch, seq = self.state.shape
        if (unit, layer) in self._request_keep and self._request_keep[(unit, layer)] is None:
            return None
        chosen = self._request_keep.get((unit, layer))
        if chosen is None or chosen.shape[0] != batch:
            raise HarnessError("request scope: a decode step continues requests whose first forward call (with an "
                               "empty KV cache) ran outside this engine or with another batch; start the requests "
                               "inside `engine.applied()`")
        return chosen.unsqueeze(1).expand(batch, seq, chosen.shape[-1])

    def _plan_global(self, unit: str) -> torch.Tensor:
        """One ranking over all sparsifiable layers per token: skip the lowest-scored units overall."""
        scores = self.policy.global_scores(unit, self.state).float()  # (B, T, L, n)
        batch, seq, layers, n = scores.shape
        if self.policy.token_independent:  # the same plan for every token, made once
            key = ("global", unit, scores.device)
            if key not in self._fixed:
                self._fixed[key] = self._plan_from(unit, scores[:1, :1].clone())
            return self._fixed[key].expand(batch, seq, layers, n)
        return self._plan_from(unit, scores)

    def _plan_from(self, unit: str, scores: torch.Tensor) -> torch.Tensor:
        return plan_global(scores, self.allocation, unit)

    def _replacement(self, layer: int, like: torch.Tensor):
        table = self.policy.head_replacement
        if table is None:
            return None
        key = (layer, like.device, like.dtype)
        if key not in self._replacement_cache:
            self._replacement_cache[key] = table[layer].to(device=like.device, dtype=like.dtype)
        return self._replacement_cache[key]

    # -- what was achieved ---------------------------------------------------------------------------
    def achieved(self) -> dict:
        """Measured fractions skipped over valid tokens; 0 for a unit no hook could skip."""
        def of(unit):
            return self.meter.achieved(unit) if self.active(unit) else 0.0

        out = {
            "achieved_heads": of("heads"),
            "achieved_neurons": of("neurons"),
            "achieved_heads_per_layer": self.meter.per_layer("heads"),
            "achieved_neurons_per_layer": self.meter.per_layer("neurons"),
        }
        if self.active("inputs"):
            out.update(self.input_meter.achieved())
        if self._per_token():
            out["achieved_per_token"] = self.token_meter.summary()
        return out


# -- request scope: where a request's context ends -------------------------------------------------------
#: the model attribute that `request_contexts` sets for the duration of a call
CONTEXT_ATTR = "_harness_request_contexts"


@contextmanager
def request_contexts(model, lengths):
    """Tell the masked engine, for the forward calls inside the block, how many of each row's real tokens are
    the request's context (the rest is the continuation being scored, which a request mask must never see).

    lengths: one int per row of the batch, counted over the row's valid tokens (padding excluded, so it works
    for right- and left-padded batches alike). Under `request` scope the engine takes every row's mask from
    its last context token. Calls without this information take it from the last valid token of the call.
    The lm-eval adapter (harness/lmeval.py) sets it around every batch it runs.
    """
    previous = getattr(model, CONTEXT_ATTR, None)
    setattr(model, CONTEXT_ATTR, [int(n) for n in lengths])
    try:
        yield
    finally:
        setattr(model, CONTEXT_ATTR, previous)


def context_end(valid: torch.Tensor, positions: torch.Tensor, lengths) -> torch.Tensor:
    """(B,) column of each row's last context token in a call that starts its requests: the `lengths[b]`-th
    valid token of row b, or the row's last valid token when no lengths are given."""
    columns = torch.arange(valid.shape[1], device=valid.device)
    if lengths is None:
        return (valid.long() * columns).argmax(dim=1)
    if len(lengths) != valid.shape[0]:
        raise HarnessError(f"request scope: {len(lengths)} context lengths for a batch of {valid.shape[0]} rows")
    counts = valid.sum(dim=1)
    wanted = torch.as_tensor(lengths, device=valid.device)
    if bool(((wanted < 1) | (wanted > counts)).any()):
        raise HarnessError(f"request scope: context lengths {list(lengths)} outside 1..valid tokens per row "
                           f"{counts.tolist()}")
    hit = valid & (positions == (wanted - 1)[:, None])  # positions count valid tokens from 0 (no KV cache yet)
    return (hit.long() * columns).argmax(dim=1)


def request_mask(keep: torch.Tensor, end: torch.Tensor) -> torch.Tensor:
    """(B, n): each row's mask at its last context token `end[b]` (ShadowLLM's per-request masks)."""
    return keep[torch.arange(keep.shape[0], device=keep.device), end]
