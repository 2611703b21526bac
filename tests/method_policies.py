"""Each decodable method's masked-engine policy with seeded (untrained) predictors of its own architecture, sized
from the model (OPT or Llama family): what the equivalence tests (masked engine = sparse decode engine) run."""
import torch

from harness.engine import Allocation, MaskedEngine, MaskPolicy
from harness.families import sizes_of

HIDDEN = 16  #: the predictors' hidden width (tiny models)


def seeded(predictor, seed):
    """N(0, 0.3) weights and a non-trivial input standardisation (mean, std), from `seed`."""
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for p in predictor.parameters():
            p.copy_(torch.randn(p.shape, generator=g) * 0.3)
        predictor.mean.copy_(torch.randn(predictor.mean.shape, generator=g))
        predictor.std.copy_(torch.rand(predictor.std.shape, generator=g) + 0.5)
    return predictor.eval()


def make_policy(label, model):
    """(policy, allocation) of the method `label` (static, random, dejavu[:variant], dejavu:shadowllm, shadow,
    timewise:current|last|time) for `model`."""
    from methods.dejavu import HEAD_INPUTS, DejaVuPolicy, LayerwiseShadowPolicy
    from methods.predictors import low_rank, mlp
    from methods.shadow import ShadowPolicy, shadow_predictor
    from methods.static import StaticPolicy
    from methods.timewise import DEFAULTS as TIMEWISE, TimewisePolicy, timewise_predictor

    size = sizes_of(model)
    L, D, H, F = size.layers, size.hidden, size.heads, size.ffn
    name, _, variant = label.partition(":")
    if name == "static":
        g = torch.Generator().manual_seed(11)
        return StaticPolicy(torch.rand(L, H, generator=g), torch.rand(L, F, generator=g)), Allocation(0.5, 0.7)
    if name == "random":
        from methods.random import RandomPolicy

        return RandomPolicy(5, {"heads": H, "neurons": F}, L), Allocation(0.5, 0.7)
    if label == "dejavu:shadowllm":  # per-layer one-hidden-layer MLPs on layer 0's attention output, layer 0 dense
        attn = {l: seeded(mlp(D, HIDDEN, H), 500 + l) for l in range(1, L)}
        neurons = {l: seeded(mlp(D, HIDDEN, F), 600 + l) for l in range(1, L)}
        return LayerwiseShadowPolicy(attn, neurons, L), Allocation(0.5, 0.7, dense_layers=(0,))
    if name == "dejavu":
        attn = {l: seeded(low_rank(D, HIDDEN, H), 100 + l) for l in range(L)}
        neurons = {l: seeded(low_rank(D, HIDDEN, F), 200 + l) for l in range(L)}
        return DejaVuPolicy(attn, neurons, HEAD_INPUTS[variant or None]), Allocation(0.5, 0.7)
    if name == "shadow":
        predictor = seeded(shadow_predictor(model.config, 2 * HIDDEN), 300)
        return ShadowPolicy(predictor, model.config), Allocation(0.5, 0.7, dense_layers=(0,))
    if name == "timewise":
        predictors = {l: seeded(timewise_predictor(D, H, {**TIMEWISE, "hidden": HIDDEN}), 400 + l) for l in range(L)}
        return TimewisePolicy(variant, predictors, 1), Allocation(0.5, 0.0)
    raise ValueError(f"no test policy for {label!r}")


class PromptDense(MaskPolicy):
    """A method's policy with every unit kept during the prompt (the sparse engine's prefill is dense); the policy
    still sees the prompt (timewise:time carries the last prompt token's state). Records the decode steps' head
    scores in `kept`."""

    def __init__(self, inner):
        self.inner, self.needs, self.decoding, self.kept = inner, inner.needs, False, []
        self.token_independent = inner.token_independent

    def begin(self, state):
        self.decoding = state.shape[1] == 1
        self.inner.begin(state)

    def head_scores(self, layer, state, head_out):
        scores = self.inner.head_scores(layer, state, head_out)
        if self.decoding and scores is not None:
            self.kept.append(("heads", layer, scores))
        return scores if self.decoding else None

    def neuron_scores(self, layer, state, act):
        scores = self.inner.neuron_scores(layer, state, act)
        return scores if self.decoding else None


@torch.no_grad()
def masked_logits(model, policy, allocation, prompt, tokens, engine_out=None):
    """Last-position logits of the prompt and of each following token (fed one at a time with the KV cache) under
    the masked engine; `engine_out` (a list) receives the engine."""
    engine = MaskedEngine(model, policy, allocation)
    with engine.applied():
        res = model(input_ids=prompt, use_cache=True)
        past, out = res.past_key_values, [res.logits[:, -1].float()]
        for token in tokens:
            res = model(input_ids=token.view(1, 1), past_key_values=past, use_cache=True)
            past = res.past_key_values
            out.append(res.logits[:, -1].float())
    if engine_out is not None:
        engine_out.append(engine)
    return out
