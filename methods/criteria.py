"""Importance criteria for attention heads and FFN neurons (a library module, not a registered method).

The criteria are ShadowLLM's (Akhauri et al. 2024, §3, §6 and appendix A.2). Every criterion comes from ONE
forward-backward pass per batch of examples, all criteria from the same pass, so every criterion sees exactly
the same samples. Each example has its own loss L (examples do not interact in a forward pass; a batch is
scored with the sum of its examples' losses, so every example's gradients are those of its own loss):
  * language-model text (`aggregate`, `score_example`): the mean cross-entropy of predicting tokens 1..T-1
    from their prefixes (what Hugging Face computes with `labels=input_ids`);
  * ShadowLLM's protocol (`score_targets`, `aggregate_targets`): the mean cross-entropy of the example's
    target output only, its context predicting nothing; the importance is read at the last context token.

Notation, for layer l and token t of an example:
  A[t, h, :]   the output of head h: the slice h of the input of the attention output projection (OPT's
               `out_proj`, Llama's `o_proj`; D = head_dim values; h runs over the query heads),
  G = ∂L/∂A    its gradient,   Hg = H·G   the Hessian of L times the gradient (below),
  W, gY        the output projection's weight (E × H·D, columns (h, d)) and the gradient at its output,
  x[t, :]      fc1's input (the normalised MLP input),  W1, b1  fc1's weight (F × E) and bias,
  θ_j          the up-projection parameters of neuron j: row j of W1 (E values; the bias is not part of θ),
  act[t, j]    fc1's activation after ReLU (the input of fc2),  g[t, j] = ∂L/∂act[t, j],
  gp[t, j]     the gradient at fc1's pre-activation output: g[t, j] · 1[act[t, j] > 0] (ReLU),
  ∂L/∂θ_j|t    the token's share of the weight gradient: gp[t, j] · x[t, :] (∂L/∂W1 = Σ_t of these).
Llama-family (SwiGLU) MLPs: act = f(gate_proj x) · up_proj x at down_proj's input, and θ_j is row j of both
gate_proj and up_proj (2E values), so every neuron formula below sums over the two parts p ∈ {gate, up}, each with
its weight W_p, bias b_p and output gradient gp_p (∂L/∂u = g · f(gate), ∂L/∂gate = g · u · f'(gate)):
gradnorm's |gp| becomes (Σ_p gp_p²)^½, plainact's and snip's terms are summed over p, fisher's mean runs over all
2E elements and jacov's Jacobian concatenates both parts. The model family says what the parts are
(`harness.families`: `up_parts`, `pre_activation_grads`); OPT has the one part fc1.

Per-token scores (higher = more important), heads | neurons. ShadowLLM's definitions (CRITERIA, first six):
  l2norm    ‖A[t,h]‖₂                         | |act[t,j]|
  gradnorm  ‖G[t,h]‖₂                         | ‖∂L/∂θ_j|t‖₂ = |gp[t,j]| · ‖x[t]‖₂
  plainact  ‖A[t,h] ⊙ G[t,h]‖₁ = Σ_d |A·G|    | ‖θ_j ⊙ ∂L/∂θ_j|t‖₁ = |gp[t,j]| · Σ_k |W1[j,k] x[t,k]|
  fisher    ⟨(A[t,h] ⊙ G[t,h])²⟩ (mean over d) | ⟨(θ_j ⊙ ∂L/∂θ_j|t)²⟩ = gp[t,j]² · mean_k (W1[j,k] x[t,k])²
  snip      Σ_{i,d} |W[i,(h,d)]·gY[t,i]·A[t,(h,d)]|   (|θ ⊙ ∂L/∂θ| over the head's out_proj columns)
            | |gp[t,j]| · (Σ_k |W1[j,k]·x[t,k]| + |b1[j]|)   (|θ ⊙ ∂L/∂θ| over fc1 row j and its bias)
  grasp     ‖−(Hg)[t,h] ⊙ A[t,h]‖₁            | |(Hg)[t,j] · act[t,j]|
            (GraSP, Wang et al. 2020, in the activation form the paper writes for it: H is the Hessian of L
            with respect to all heads' outputs and all neurons' activations of all layers and tokens jointly,
            Hg = ∂(G · stop_gradient(G))/∂A, one double backward; attention runs in its math kernel then)
The activation forms of the gradient criteria (the earlier definitions), under their own names:
  gradnorm_act  ‖G[t,h]‖₂                     | |g[t,j]|
  plainact_act  |A[t,h] · G[t,h]| (|dot|)     | |act[t,j] · g[t,j]|
  fisher_act    (A[t,h] · G[t,h])²            | (act[t,j] · g[t,j])²
Batch-level, static only (STATIC_ONLY): jacov (NASWOT's Jacobian covariance, Mellor et al. 2021). For a batch
of B ≥ 2 examples and one unit, J_b is example b's gradient of the unit (heads: G[t,h,:] over the tokens read,
flattened; neurons: ∂L_b/∂θ_j, the sum of the token shares over the tokens read), C = corrcoef(J_1..J_B)
(B × B; a unit whose gradient is zero correlates with nothing, C's row 0), λ = eigenvalues(C), and
jacov = −Σ_b [log(λ_b + k) + 1/(λ_b + k)], k = 1e-5. It depends on the whole batch, so it has no per-token or
per-example value (ShadowLLM: "jacov does not have a context-dependent equivalent"); `aggregate` averages it
over its batches.

The weight-based scores use the token's share of the weight gradient, so per-token values add up over an
example's tokens to the share of each token (ShadowLLM's code takes the absolute value after summing over an
example's tokens, which is at most the sum of our per-token values). Per-token values are what a predictor
trains on. Scores are float32 (float64 for a float64 model) whatever the model's dtype: per-token neuron scores
are far below fp16's range. The gradient-based scores of a sequence's last token are 0 for language-model text
(it predicts nothing inside the example).
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import Iterable, Sequence

import torch
import torch.nn.functional as F

from harness.errors import HarnessError
from harness.families import family_of, install

#: Every per-token criterion (ShadowLLM's, then the activation forms): the variants of `static` and `shadow`.
CRITERIA = ("l2norm", "gradnorm", "plainact", "fisher", "snip", "grasp", "gradnorm_act", "plainact_act", "fisher_act")
#: Criteria defined over a batch of examples only (no per-token value): `static` can rank by them.
STATIC_ONLY = ("jacov",)
ALL_CRITERIA = CRITERIA + STATIC_ONLY
#: Other names accepted for a criterion: `plainact_weight` was the weight-based FFN plainact, which `plainact` is.
ALIASES = {"plainact_weight": "plainact"}
UNITS = ("heads", "neurons")
#: Changes whenever a definition changes: cached artefacts built from criterion scores include it in their key.
CRITERIA_VERSION = 2
#: Examples per forward-backward pass in `aggregate` when jacov is asked for (its batch).
JACOV_BATCH = 8
JACOV_K = 1e-5
#: Activations that `score_targets` can return at the read index, besides the scores.
FEATURES = ("attn_output0", "layer_input", "mlp_input")


def _check(criteria, allowed=ALL_CRITERIA) -> tuple[str, ...]:
    criteria = tuple(criteria)
    unknown = [c for c in criteria if ALIASES.get(c, c) not in allowed]
    if unknown or not criteria:
        if any(c in STATIC_ONLY for c in unknown) and allowed is CRITERIA:
            raise HarnessError(f"{', '.join(c for c in unknown if c in STATIC_ONLY)}: defined over a batch of "
                               "examples only (no per-token or per-example value); use `aggregate`")
        raise HarnessError(f"unknown importance criteria {unknown or criteria}; valid: {', '.join(allowed)}")
    return criteria


def _token_losses(logits: torch.Tensor, input_ids: torch.Tensor, counted: torch.Tensor) -> torch.Tensor:
    """(B,) sum of the next-token cross-entropies at the positions `counted` (B, T) marks (float32 or wider);
    position t predicts token t + 1."""
    logits = logits[:, :-1].to(torch.promote_types(logits.dtype, torch.float32))
    targets = input_ids[:, 1:]
    nll = F.cross_entropy(logits.reshape(-1, logits.shape[-1]), targets.reshape(-1), reduction="none")
    return (nll.view(targets.shape) * counted[:, :-1]).sum(dim=1)


def _counted_loss(model, input_ids: torch.Tensor, attention_mask, counted: torch.Tensor) -> torch.Tensor:
    """Sum over the batch of the next-token cross-entropies at the positions `counted` marks, float32 or wider.
    The LM head runs on those positions only (a causal LM's `lm_head` over its base model's last hidden states, as
    OPTForCausalLM computes its logits): with a few-shot example's few target tokens this skips the (T × vocab)
    logits of the context, most of the pass's cost on a small model."""
    base, head = getattr(model, "model", None), getattr(model, "lm_head", None)
    if base is None or head is None:
        logits = model(input_ids=input_ids, attention_mask=attention_mask, use_cache=False).logits
        return _token_losses(logits, input_ids, counted).sum()
    hidden = base(input_ids=input_ids, attention_mask=attention_mask, use_cache=False)[0]
    rows = counted[:, :-1]
    logits = head(hidden[:, :-1][rows])
    logits = logits.to(torch.promote_types(logits.dtype, torch.float32))
    return F.cross_entropy(logits, input_ids[:, 1:][rows], reduction="sum")


def example_loss(logits: torch.Tensor, input_ids: torch.Tensor) -> torch.Tensor:
    """Sum over the batch of each example's mean next-token cross-entropy (float32 or wider)."""
    counted = torch.ones_like(input_ids, dtype=torch.bool)
    return (_token_losses(logits, input_ids, counted) / (input_ids.shape[1] - 1)).sum()


class _Capture:
    """Temporary hooks that capture, per layer, the output projection's input A and output Y, the MLP's input x
    as its up projection(s) see it, the neuron activation act at the down projection's input, the outputs of the
    up-projection parts beyond OPT's one (SwiGLU's gate and up, for their gradients), all as (B, T, ·), and
    optionally the residual streams entering the layer and its MLP block. A of a layer that would not be tracked
    by autograd (layer 0 with frozen parameters) is made a leaf that requires grad, so that every captured tensor
    is part of the graph."""

    def __init__(self, model, features=()):
        self.family = family_of(model)
        self.decoder, self.layers = self.family.decoder(model), self.family.layers(model)
        self.features = tuple(features)
        self.store: dict = {}
        self.handles: list = []
        self.shape = None

    def __enter__(self):
        family = self.family
        try:
            for index, layer in enumerate(self.layers):
                self.handles.append(install(family, layer, "head_output", self._pre_a(index)))
                self.handles.append(install(family, layer, "attn_proj_output", self._pre_plain("Y", index)))
                self.handles.append(install(family, layer, "neuron_input", self._pre_plain("x", index)))
                self.handles.append(install(family, layer, "neuron_act", self._pre_plain("act", index)))
                parts = family.up_parts(layer)
                if len(parts) > 1:
                    for name, _ in parts:
                        self.handles.append(install(family, layer, f"{name}_output", self._pre_plain(f"part.{name}", index)))
                if "layer_input" in self.features:
                    self.handles.append(install(family, layer, "layer_input", self._pre_plain("layer_input", index)))
                if "mlp_input" in self.features:
                    self.handles.append(install(family, layer, "mlp_input", self._pre_plain("mlp_input", index)))
        except BaseException:
            self.__exit__()
            raise
        return self

    def __exit__(self, *exc):
        for handle in self.handles:
            handle.remove()
        self.handles.clear()

    def _pre_a(self, index):
        def hook(x):
            if not x.requires_grad:
                x = x.detach().requires_grad_(True)
                self.store[("A", index)] = x
                return x
            self.store[("A", index)] = x
            return None
        return hook

    def _pre_plain(self, name, index):
        def hook(x):
            self.store[(name, index)] = x
        return hook


def _jacov(vectors: torch.Tensor, mean: torch.Tensor, sq_norm: torch.Tensor, size: int) -> torch.Tensor:
    """jacov of every unit from the Gram matrices of its per-example Jacobians.

    vectors: (U, B, B) Gram matrices <J_b, J_c>; mean: (U, B) the mean of each J_b's `size` elements;
    sq_norm: (U, B) the diagonal. Returns (U,) −Σ log(λ + k) + 1/(λ + k) over the eigenvalues of corrcoef(J)."""
    centred = vectors - size * mean.unsqueeze(-1) * mean.unsqueeze(-2)  # <J_b - m_b, J_c - m_c>
    var = (sq_norm - size * mean.square()).clamp(min=0)
    scale = var.sqrt()
    live = scale > 0
    denom = torch.where(live, scale, torch.ones_like(scale))
    corr = centred / (denom.unsqueeze(-1) * denom.unsqueeze(-2))
    corr = corr * (live.unsqueeze(-1) & live.unsqueeze(-2))  # a flat Jacobian correlates with nothing
    corr = (corr + corr.transpose(-1, -2)) / 2
    eig = torch.linalg.eigvalsh(corr).clamp(min=0)
    return -(torch.log(eig + JACOV_K) + 1.0 / (eig + JACOV_K)).sum(-1)


def _layer_scores(model, input_ids: torch.Tensor, criteria: tuple[str, ...], counted: torch.Tensor | None = None,
                  attention_mask: torch.Tensor | None = None, read: torch.Tensor | None = None, features=(),
                  at: torch.Tensor | None = None):
    """One forward-backward pass (two backwards with grasp); yields (layer, scores, feats) per layer.

    scores: {criterion: {"heads": (B,T,H), "neurons": (B,T,F)}} for per-token criteria, {"heads": (H,),
    "neurons": (F,)} for jacov, in float32 (float64 for a float64 model) on the model's device.
    counted (B, T) bool: the positions whose next-token prediction is the example's loss (default: all but the
    last). read (B, T) bool: the positions whose gradients jacov's Jacobians gather (default: all).
    feats: {name: (B, T, E)} detached activations named in `features` (attn_output0 only at layer 0).
    at (B,) long: compute the per-token scores and feats at one position per example only, T = 1 in the shapes
    above (every per-token criterion is a function of its own token's activations and gradients, so the values
    are those of the full form at those positions; the (B·T, E) × (E, F) products of plainact, fisher and snip
    shrink to B rows). Not with jacov, which reads the whole batch.
    """
    config = model.config
    family = family_of(model)
    family.check_criteria(config)
    shape = family.sizes(config)
    num_heads, head_dim = shape.heads, shape.head_dim
    if input_ids.dim() == 1:
        input_ids = input_ids.unsqueeze(0)
    if input_ids.shape[1] < 2:
        raise HarnessError("an example needs at least 2 tokens to have a language-modelling loss")
    batch, seq = input_ids.shape
    names = {ALIASES.get(c, c) for c in criteria}
    grasp, jacov = "grasp" in names, "jacov" in names
    if jacov and at is not None:
        raise HarnessError("jacov reads every position of the batch: it has no per-position form (`at`)")
    if jacov and batch < 2:
        raise HarnessError("jacov needs a batch of at least 2 examples (it is the covariance of their Jacobians)")
    device = next(model.parameters()).device
    input_ids = input_ids.to(device)
    counted = torch.ones_like(input_ids, dtype=torch.bool) if counted is None else counted.to(device).bool().clone()
    counted[:, -1] = False  # the last token predicts nothing inside the example
    count = counted.sum(dim=1)
    if bool((count == 0).any()):
        raise HarnessError("an example has no token to compute its loss on")
    if attention_mask is not None:
        attention_mask = attention_mask.to(device)
    params = list(model.parameters())
    saved_grad = [p.requires_grad for p in params]
    was_training = model.training
    capture = _Capture(model, features)
    capture.shape = (batch, seq)
    layers = range(len(capture.layers))
    order = [(n, l) for l in layers for n in ("A", "Y", "act")]
    try:
        model.eval()
        for p in params:
            p.requires_grad_(False)
        with torch.enable_grad(), capture, _math_attention(grasp):
            # backward on each example's token sum (its mean loss times its count): the same gradients up to
            # a per-example factor undone below in float32, without fp16 underflow of gradients scaled by 1/count
            loss = _counted_loss(model, input_ids, attention_mask, counted)
            logits = None
            wanted = [capture.store[key] for key in order]
            grads = list(torch.autograd.grad(loss, wanted, allow_unused=True, create_graph=grasp))
            grads = [torch.zeros_like(w) if g is None else g for g, w in zip(grads, wanted)]
            hess = {}
            if grasp:  # Hg = ∂(g · stop(g))/∂(A, act): the Hessian of every head and neuron jointly times g
                pairs = [(key, i) for i, key in enumerate(order) if key[0] in ("A", "act")]
                dot = sum((grads[i] * grads[i].detach()).sum() for _, i in pairs)
                hg = torch.autograd.grad(dot, [wanted[i] for _, i in pairs], allow_unused=True)
                hess = {key: (torch.zeros_like(wanted[i]) if h is None else h.detach()) for (key, i), h in zip(pairs, hg)}
            grad = {key: g.detach() for key, g in zip(order, grads)}
        del logits, loss, grads, wanted
    finally:
        for p, flag in zip(params, saved_grad):
            p.requires_grad_(flag)
        model.train(was_training)

    work = torch.promote_types(next(model.parameters()).dtype, torch.float32)
    read = torch.ones(batch, seq, dtype=torch.bool, device=device) if read is None else read.to(device).bool()
    examples = torch.arange(batch, device=device)
    picked = None if at is None else at.to(device)
    width = seq if picked is None else 1  # the positions scored per example
    with torch.no_grad():
        for l, layer in enumerate(capture.layers):
            def view(t, scale=None):
                t = t.detach().reshape(batch, seq, -1)
                t = (t if picked is None else t[examples, picked].unsqueeze(1)).to(work)
                return t if scale is None else t / scale.to(t.device, work).view(batch, 1, 1)
            a, ga = view(capture.store[("A", l)]), view(grad[("A", l)], count)
            act, gact = view(capture.store[("act", l)]), view(grad[("act", l)], count)
            a4, ga4 = a.view(batch, width, num_heads, head_dim), ga.view(batch, width, num_heads, head_dim)
            x = view(capture.store[("x", l)])
            # the up-projection parts of the neurons (OPT: fc1; SwiGLU: gate and up) and ∂L/∂ their outputs
            parts = family.up_parts(layer)
            outputs = {name: view(capture.store[(f"part.{name}", l)]) for name, _ in parts} if len(parts) > 1 else {}
            gpres = family.pre_activation_grads(layer, outputs, act, gact)  # OPT: gact · 1[act > 0] (ReLU)
            weights = [module.weight.detach().to(work) for _, module in parts]
            rows = None
            if names & {"plainact", "snip"}:
                rows = [x.abs() @ w.abs().t() for w in weights]  # Σ_k |W[j,k] x[t,k]| per part
            elems = a4 * ga4
            dot = elems.sum(-1)  # (B, T, H)
            out = {}
            for c in names:
                if c == "l2norm":
                    out[c] = {"heads": a4.norm(dim=-1), "neurons": act.abs()}
                elif c == "gradnorm":
                    gnorm = gpres[0].abs() if len(gpres) == 1 else sum(g.square() for g in gpres).sqrt()
                    out[c] = {"heads": ga4.norm(dim=-1), "neurons": gnorm * x.norm(dim=-1, keepdim=True)}
                elif c == "plainact":
                    out[c] = {"heads": elems.abs().sum(-1), "neurons": _parts_sum(g.abs() * r for g, r in zip(gpres, rows))}
                elif c == "fisher":
                    size = weights[0].shape[1] * len(weights)  # the elements of θ_j
                    out[c] = {"heads": elems.square().mean(-1),
                              "neurons": _parts_sum(g.square() * (x.square() @ w.square().t())
                                                    for g, w in zip(gpres, weights)) / size}
                elif c == "snip":
                    biases = [m.bias.detach().to(work).abs() if m.bias is not None else 0.0 for _, m in parts]
                    gy = view(grad[("Y", l)], count)
                    w = family.linear(layer, "o").weight.detach().to(work)
                    col = gy.abs() @ w.abs()  # Σ_i |gY[t,i]| |W[i,c]|
                    heads = (col * a.abs()).view(batch, width, num_heads, head_dim).sum(-1)
                    out[c] = {"heads": heads, "neurons": _parts_sum(g.abs() * (r + b) for g, r, b in zip(gpres, rows, biases))}
                elif c == "grasp":
                    square = count.to(device, work).square()
                    ha = view(hess[("A", l)], square).view(batch, width, num_heads, head_dim)
                    hact = view(hess[("act", l)], square)
                    out[c] = {"heads": (ha * a4).abs().sum(-1), "neurons": (hact * act).abs()}
                elif c == "gradnorm_act":
                    out[c] = {"heads": ga4.norm(dim=-1), "neurons": gact.abs()}
                elif c == "plainact_act":
                    out[c] = {"heads": dot.abs(), "neurons": (act * gact).abs()}
                elif c == "fisher_act":
                    out[c] = {"heads": dot.square(), "neurons": (act * gact).square()}
                elif c == "jacov":
                    out[c] = _jacov_layer(ga4, gpres, x, read)
            feats = {}
            for name in features:
                if name == "attn_output0":
                    if l == 0:
                        feats[name] = view(capture.store[("Y", 0)])
                else:
                    feats[name] = view(capture.store[(name, l)])
            yield l, {c: out[ALIASES.get(c, c)] for c in criteria}, feats
    capture.store.clear()


def _parts_sum(terms):
    """Σ over the up-projection parts (one part: the term itself, bit for bit)."""
    terms = iter(terms)
    total = next(terms)
    for term in terms:
        total = total + term
    return total


def _jacov_layer(ga4: torch.Tensor, gpres: list, x: torch.Tensor, read: torch.Tensor) -> dict:
    """jacov of one layer's heads (H,) and neurons (F,) over the batch, from the gradients at `read` tokens;
    `gpres`: the gradients at the outputs of the neurons' up-projection parts (one for OPT's fc1)."""
    per_example = read.sum(dim=1)
    if bool((per_example != per_example[0]).any()):
        raise HarnessError("jacov compares Jacobians of the same size: read the same number of tokens per example")
    # heads: J_b = G[b, tokens read, h, :] flattened, the tokens aligned by their order within each example
    g_heads = torch.stack([g[r] for g, r in zip(ga4, read)])  # (B, n, H, D)
    head_size = g_heads.shape[1] * g_heads.shape[3]
    gram = torch.einsum("bthd,cthd->hbc", g_heads, g_heads)
    heads = _jacov(gram, g_heads.sum(dim=(1, 3)).t() / head_size, torch.diagonal(gram, dim1=-2, dim2=-1), head_size)
    # neurons: J_b = ∂L_b/∂θ_j = Σ over the tokens read of gp[t, j] · x[t, :] (the parts' rows side by side)
    jacs = [torch.einsum("btf,bte->fbe", gpre * read.to(gpre.dtype)[:, :, None], x) for gpre in gpres]  # (F, B, E)
    jac = jacs[0] if len(jacs) == 1 else torch.cat(jacs, dim=-1)
    gram_n = torch.einsum("fbe,fce->fbc", jac, jac)
    neurons = _jacov(gram_n, jac.mean(-1), torch.diagonal(gram_n, dim1=-2, dim2=-1), jac.shape[-1])
    return {"heads": heads, "neurons": neurons}


class _math_attention:
    """The math kernel of scaled-dot-product attention while `active` (it has a double backward)."""

    def __init__(self, active: bool):
        self.active, self.context = active, None

    def __enter__(self):
        if self.active:
            from torch.nn.attention import SDPBackend, sdpa_kernel

            self.context = sdpa_kernel([SDPBackend.MATH])
            self.context.__enter__()
        return self

    def __exit__(self, *exc):
        if self.context is not None:
            self.context.__exit__(*exc)


def score_example(model, input_ids: torch.Tensor, criteria: Iterable[str] = CRITERIA) -> dict:
    """Per-token scores of language-model text from one forward-backward pass.

    input_ids: (T,) for one example -> {criterion: {"heads": (T, L, H), "neurons": (T, L, F)}};
    (B, T) for B examples (each with its own loss) -> shapes (B, T, L, ·). float32 (float64 for a float64
    model), on the model's device. jacov has no per-token value (use `aggregate`). The model is left as it was
    (no hooks, parameters' requires_grad and train/eval mode restored; it runs in eval mode).
    """
    criteria = _check(criteria, CRITERIA)
    single = input_ids.dim() == 1
    per_layer: dict = {c: {u: [] for u in UNITS} for c in criteria}
    for _, scores, _ in _layer_scores(model, input_ids, criteria):
        for c in criteria:
            for u in UNITS:
                per_layer[c][u].append(scores[c][u])
    result = {c: {u: torch.stack(per_layer[c][u], dim=-2) for u in UNITS} for c in criteria}
    if single:
        result = {c: {u: t[0] for u, t in units.items()} for c, units in result.items()}
    return result


def _batches(batches, batch_size: int):
    if isinstance(batches, torch.Tensor) and batches.dim() == 2:
        return (batches[i:i + batch_size] for i in range(0, batches.shape[0], batch_size))
    return batches


def aggregate(model, batches, criteria: Iterable[str] = CRITERIA, log=None, batch_size: int | None = None) -> dict:
    """Mean per-token scores over every token of the calibration examples; jacov averaged over the batches.

    batches: a (N, T) tensor (cut into passes of `batch_size` examples: 1, or JACOV_BATCH when jacov is asked
    for) or an iterable of (T,) / (B, T) tensors (one pass each). Per-token criteria do not depend on how the
    examples are batched; jacov does (it is a property of a batch): batches of one example do not count for it.
    Returns {criterion: {"heads": (L, H), "neurons": (L, F)}} float32 on the CPU (sums kept in float64).
    Per-token score tensors are never held for all layers at once.
    """
    criteria = _check(criteria)
    jacov = [c for c in criteria if ALIASES.get(c, c) in STATIC_ONLY]
    if batch_size is None:
        batch_size = JACOV_BATCH if jacov else 1
    config = model.config
    num_layers = config.num_hidden_layers
    sizes = family_of(config).sizes(config).units()
    sums = {c: {u: torch.zeros(num_layers, sizes[u], dtype=torch.float64) for u in UNITS} for c in criteria}
    tokens = groups = seen = 0
    for index, batch in enumerate(_batches(batches, batch_size)):
        batch = batch.reshape(-1, batch.shape[-1])
        seen += batch.shape[0]
        asked = criteria if batch.shape[0] >= 2 else tuple(c for c in criteria if c not in jacov)
        if not asked:
            continue
        for l, scores, _ in _layer_scores(model, batch, asked):
            for c in asked:
                for u in UNITS:
                    value = scores[c][u].double()
                    sums[c][u][l] += (value if c in jacov else value.sum(dim=(0, 1))).cpu()
        tokens += batch.numel()
        groups += batch.shape[0] >= 2
        if log is not None:
            log(f"importance: example batch {index + 1} ({tokens} tokens)")
    if seen == 0:
        raise HarnessError("no calibration examples to compute importance from")
    if jacov and groups == 0:
        raise HarnessError("jacov needs batches of at least 2 examples; got batches of one")
    return {c: {u: (sums[c][u] / (groups if c in jacov else tokens)).float() for u in UNITS} for c in criteria}


# -- ShadowLLM's protocol: loss on the target output, importance read at the last context token -------------
@dataclass
class TargetScores:
    """What `score_targets` returns, one row per example (in the order given), float32 on the CPU.

    scores: {criterion: {"heads": (N, L, H), "neurons": (N, L, F)}} read at each example's last context token;
    features: {"attn_output0": (N, E), "layer_input": (N, L, E), "mlp_input": (N, L, E)} (those asked for), the
    model's activations at the same token (layer 0's attention output is ShadowLLM's predictor input);
    index: (N,) the token index read (the last context token: target start − 1).
    """

    scores: dict
    features: dict
    index: torch.Tensor


def _target_batch(examples):
    """Right-padded (input ids, attention mask, counted positions, read index) of a batch of examples."""
    rows, spans = [], []
    for example in examples:
        ids, (start, end) = list(example.ids), tuple(example.target)
        if not 1 <= start < end <= len(ids):
            raise HarnessError(f"target span {(start, end)} must lie inside the {len(ids)} tokens and leave at "
                               "least one context token before it")
        rows.append(ids[:end])  # the last target token is only the label of the one before it
        spans.append((start, end))
    width = max(len(r) for r in rows)
    input_ids = torch.ones(len(rows), width, dtype=torch.long)
    mask = torch.zeros(len(rows), width, dtype=torch.long)
    counted = torch.zeros(len(rows), width, dtype=torch.bool)
    for b, (row, (start, end)) in enumerate(zip(rows, spans)):
        input_ids[b, :len(row)] = torch.tensor(row)
        mask[b, :len(row)] = 1
        counted[b, start - 1:end - 1] = True  # position t predicts token t + 1: the target tokens
    index = torch.tensor([start - 1 for start, _ in spans])
    return input_ids, mask, counted, index


def _target_passes(model, examples: Sequence, criteria, batch_size: int, features=()):
    """(batch examples, index, where, per-layer list of (scores, feats)) for each pass over `examples`: index[b] is
    example b's last context token and scores[..][b, where[b]] its value there. Without jacov the per-token scores
    are computed at that token alone (`_layer_scores(at=...)`: T = 1, where all 0); with it, where = index."""
    if not examples:
        raise HarnessError("no calibration examples")
    per_position = not ({ALIASES.get(c, c) for c in criteria} & set(STATIC_ONLY))
    for start in range(0, len(examples), batch_size):
        chunk = examples[start:start + batch_size]
        input_ids, mask, counted, index = _target_batch(chunk)
        read = torch.zeros_like(counted)
        read[torch.arange(len(chunk)), index] = True
        layers = _layer_scores(model, input_ids, criteria, counted=counted, attention_mask=mask, read=read,
                               features=features, at=index if per_position else None)
        yield chunk, index, (torch.zeros_like(index) if per_position else index), layers


def score_targets(model, examples: Sequence, criteria: Iterable[str] = CRITERIA, *, batch_size: int = 8,
                  features: Iterable[str] = ("attn_output0",)) -> TargetScores:
    """ShadowLLM's calibration scores: per example, every criterion with the loss on the target output only,
    read at the last sequence index before the target (the last context token), as the paper trains its
    predictor ("the output of the first attention layer's last sequence index").

    examples: a sequence of objects with `ids` (the token ids of context + target, e.g. a few-shot prompt and
      its answer; harness.fewshot.CalibrationExample) and `target` = (start, end), the target's token span
      (start ≥ 1). The loss is the mean cross-entropy of the tokens ids[start:end], each predicted from its
      prefix (the model reads ids[:end]; attention is causal, so the predictions are those of lm-eval's input
      (context + continuation)[:-1], and tokens after the target are never read); the scores (per-token
      formulas of this module) and `features` are read at index start − 1, whose next-token prediction is the
      target's first token. Examples are right-padded into passes of `batch_size` (padding never changes an
      example's scores: each example has its own loss and attention mask).
    criteria: per-token criteria (CRITERIA); jacov has no per-example value (see `aggregate_targets`).
    features: activations to return at the same index (FEATURES).
    Returns a TargetScores (float32 on the CPU, float64 for a float64 model).
    """
    criteria = _check(criteria, CRITERIA)
    features = tuple(features)
    unknown = [f for f in features if f not in FEATURES]
    if unknown:
        raise HarnessError(f"unknown features {unknown}; valid: {', '.join(FEATURES)}")
    parts = {c: {u: [] for u in UNITS} for c in criteria}
    feats: dict = {f: [] for f in features}
    indices = []
    for chunk, index, where, layers in _target_passes(model, examples, criteria, batch_size, features):
        rows = torch.arange(len(chunk))
        per = {c: {u: [] for u in UNITS} for c in criteria}
        per_f: dict = {f: [] for f in features}
        for _, scores, layer_feats in layers:
            for c in criteria:
                for u in UNITS:
                    per[c][u].append(scores[c][u][rows, where.to(scores[c][u].device)].cpu())
            for f, value in layer_feats.items():
                per_f[f].append(value[rows, where.to(value.device)].cpu())
        for c in criteria:
            for u in UNITS:
                parts[c][u].append(torch.stack(per[c][u], dim=1))
        for f in features:
            parts_f = per_f[f]
            feats[f].append(parts_f[0] if f == "attn_output0" else torch.stack(parts_f, dim=1))
        indices.append(index)
    return TargetScores(scores={c: {u: torch.cat(parts[c][u]) for u in UNITS} for c in criteria},
                        features={f: torch.cat(v) for f, v in feats.items()}, index=torch.cat(indices))


def aggregate_targets(model, examples: Sequence, criteria: Iterable[str] = ALL_CRITERIA, *,
                      batch_size: int = JACOV_BATCH) -> dict:
    """ShadowLLM's aggregate importance (its static pruning, Figures 15-18): the mean over examples of the scores
    `score_targets` reads, and jacov averaged over the passes of `batch_size` examples (its Jacobians read at
    each example's last context token; a last pass of one example does not count for it).
    Returns {criterion: {"heads": (L, H), "neurons": (L, F)}} float32 on the CPU."""
    criteria = _check(criteria)
    jacov = [c for c in criteria if ALIASES.get(c, c) in STATIC_ONLY]
    config = model.config
    sizes = family_of(config).sizes(config).units()
    sums = {c: {u: torch.zeros(config.num_hidden_layers, sizes[u], dtype=torch.float64) for u in UNITS}
            for c in criteria}
    count = groups = 0
    for start in range(0, len(examples), batch_size):
        chunk = examples[start:start + batch_size]
        asked = criteria if len(chunk) >= 2 else tuple(c for c in criteria if c not in jacov)
        if not asked:
            continue
        for _, _, where, layers in _target_passes(model, chunk, asked, len(chunk)):
            rows = torch.arange(len(chunk))
            for l, scores, _ in layers:
                for c in asked:
                    for u in UNITS:
                        value = scores[c][u].double()
                        if c not in jacov:
                            value = value[rows, where.to(value.device)].sum(0)
                        sums[c][u][l] += value.cpu()
        count += len(chunk)
        groups += len(chunk) >= 2
    if count == 0:
        raise HarnessError("no calibration examples")
    if jacov and groups == 0:
        raise HarnessError("jacov needs passes of at least 2 examples")
    return {c: {u: (sums[c][u] / (groups if c in jacov else count)).float() for u in UNITS} for c in criteria}


IMPORTANCE_VERSION = 3

#: criteria computed together in one pass over the calibration data, by what their pass costs: the first-order
#: ones share one backward per example; grasp needs a second backward through the graph (about twice the memory);
#: jacov needs JACOV_BATCH examples in one backward (its batch is what it measures)
IMPORTANCE_GROUPS = {
    "first_order": tuple(c for c in ALL_CRITERIA if c not in ("grasp",) + STATIC_ONLY),
    "grasp": ("grasp",),
    "jacov": STATIC_ONLY,
}
#: GPU memory of a pass of each group, in backward_bytes of one calibration example (grasp's second backward keeps
#: the first one's graph; measured on OPT-13B: 8 examples with grasp took 96 GiB over the weights, 1.6x of 8)
GROUP_BACKWARDS = {"first_order": 1.0, "grasp": 2.0, "jacov": float(JACOV_BATCH)}


def importance_group(criterion: str) -> str:
    criterion = ALIASES.get(criterion, criterion)
    return next(group for group, members in IMPORTANCE_GROUPS.items() if criterion in members)


def fit_importance(ctx, criterion: str = "plainact"):
    """Aggregated importance of `criterion` and the criteria of its group (IMPORTANCE_GROUPS) from one pass
    over the calibration data, cached.

    One artefact (kind `importance`) per group holds `<criterion>.heads` (L, H) and `<criterion>.neurons` (L, F)
    for every criterion of the group, so static variants of one group share a pass, and a variant never pays
    for another group's memory (grasp's double backward, jacov's batch). First-order criteria and grasp are
    scored one example per pass; jacov in passes of `importance_batch` examples (a method setting, default
    JACOV_BATCH).
    """
    group = importance_group(criterion)
    criteria = IMPORTANCE_GROUPS[group]
    batch_size = int(ctx.settings.get("importance_batch", JACOV_BATCH)) if group == "jacov" else 1
    inputs = {**ctx.base_key(), "criteria": list(criteria), "version": IMPORTANCE_VERSION,
              "criteria_version": CRITERIA_VERSION, "batch": batch_size}

    def build():
        ids = ctx.calibration_ids()
        if group == "jacov" and ids.shape[0] < 2:
            raise HarnessError(f"jacov needs at least 2 calibration examples (it is a property of a batch of "
                               f"examples); got {ids.shape[0]}: raise calib_samples")
        ctx.log(f"importance: {', '.join(criteria)} over {ids.shape[0]} calibration examples of {ids.shape[1]} tokens")
        scores = aggregate(ctx.model, ids, criteria, batch_size=batch_size)
        tensors = {f"{c}.{unit}": scores[c][unit] for c in criteria for unit in UNITS}
        return tensors, {"criteria": list(criteria), "examples": int(ids.shape[0]), "tokens": int(ids.numel()),
                         "batch": batch_size}

    return ctx.cache.get_or_build("importance", inputs, build)


TARGET_SCORES_VERSION = 1
#: Tokens (padded) per forward-backward pass of `fit_target_scores` (a method setting, `score_tokens`).
SCORE_TOKENS = 2048


def target_passes(examples: Sequence, max_tokens: int) -> list[list]:
    """Consecutive examples grouped into passes of at most `max_tokens` padded tokens (at least one example each)."""
    passes, current, width = [], [], 0
    for example in examples:
        length = int(example.target[1])
        if current and max(width, length) * (len(current) + 1) > max_tokens:
            passes.append(current)
            current, width = [], 0
        current.append(example)
        width = max(width, length)
    if current:
        passes.append(current)
    return passes


def fit_target_scores(ctx, fewshot, criterion: str, max_tokens: int = SCORE_TOKENS, keep: bool = True) -> dict:
    """`score_targets` of every few-shot example for one criterion, cached (kind `target_scores`): {"heads": (N, L, H)
    float32, "neurons": (N, L, F) bfloat16 (float32's range: no score becomes 0), "attn_output0": (N, E) float32},
    one row per example of `fewshot` (a harness.fewshot.FewShotSet), read at its last context token.

    The key holds the model, its dtype, the examples' content hash (FewShotSet.fingerprint), the criterion and
    CRITERIA_VERSION: changed examples or a changed definition are never served from an older artefact.
    keep=False: in the session's memory only, never written to the cache (harness.fewshot.keep_scores)."""
    criterion = ALIASES.get(criterion, criterion)
    _check((criterion,), CRITERIA)
    from harness.models import dtype_name

    inputs = {"model": ctx.session.model_identity, "dtype": dtype_name(ctx.session.dtype), "fewshot": fewshot.fingerprint,
              "criterion": criterion, "criteria_version": CRITERIA_VERSION, "features": ["attn_output0"],
              "version": TARGET_SCORES_VERSION}

    def build():
        from harness.progress import stage

        heads, neurons, feats = [], [], []
        # shortest first, so that a pass pads little (an example's scores do not depend on its pass)
        order = sorted(range(len(fewshot.examples)), key=lambda i: int(fewshot.examples[i].target[1]))
        passes = target_passes([fewshot.examples[i] for i in order], max_tokens)
        with stage(f"few-shot scores ({criterion}, loss on the target, read at the last context token)",
                   len(fewshot.examples), ctx.log, unit="examples") as bar:
            for chunk in passes:
                got = score_targets(ctx.model, chunk, (criterion,), batch_size=len(chunk), features=("attn_output0",))
                heads.append(got.scores[criterion]["heads"].float())
                neurons.append(got.scores[criterion]["neurons"].float().to(torch.bfloat16))
                feats.append(got.features["attn_output0"].float())
                bar.advance(len(chunk))
        inverse = torch.empty(len(order), dtype=torch.long)
        inverse[torch.tensor(order, dtype=torch.long)] = torch.arange(len(order))
        tensors = {"heads": torch.cat(heads)[inverse], "neurons": torch.cat(neurons)[inverse],
                   "attn_output0": torch.cat(feats)[inverse]}
        return tensors, {"criterion": criterion, "examples": len(fewshot.examples), "passes": len(passes),
                         "fewshot": fewshot.describe()}

    if not keep:
        return ctx.session.memo(("target_scores", fewshot.fingerprint, criterion), lambda: build()[0])
    return ctx.session.memo(("target_scores", fewshot.fingerprint, criterion),
                            lambda: ctx.cache.get_or_build("target_scores", inputs, build).tensors)
