"""Same masks, both engines: run harness.engine.MaskedEngine (Hugging Face model + hooks) and the sparse decode
engine on one prompt and the same decode tokens, and compare the logits of every step.

A *schedule* `schedule(step, layer) -> (head_idx, neuron_idx)` gives the kept units of decode step `step`
(0 = the first token after the prompt); the prompt is dense in both engines (the sparse engine's prefill is a
dense pass). `ScheduleSource` feeds a schedule to the sparse engine, `SchedulePolicy` to the masked engine.
"""
from __future__ import annotations

import torch

from harness.engine import Allocation, MaskedEngine, MaskPolicy


class ScheduleSource:
    """Mask source for kernels.decode.SparseDecoder; the step is counted at layer 0 (eager mode only)."""

    def __init__(self, schedule):
        self.schedule = schedule
        self.step = -1

    def __call__(self, layer, hidden):
        if layer == 0:
            self.step += 1
        return self.schedule(self.step, layer)


class SchedulePolicy(MaskPolicy):
    """The masked engine's policy for a schedule: keeps every unit during the prompt (a multi-token call)."""

    def __init__(self, schedule, num_heads, ffn_dim):
        self.schedule, self.num_heads, self.ffn_dim = schedule, num_heads, ffn_dim
        self.step = -1
        self.decoding = False

    def begin(self, state):
        self.decoding = state.shape[1] == 1
        if self.decoding:
            self.step += 1

    def _scores(self, n, index, state):
        scores = torch.zeros(*state.shape, n, device=state.positions.device)
        scores[..., index.to(scores.device).long()] = 1.0
        return scores

    def head_scores(self, layer, state, head_out):
        if not self.decoding:
            return None
        return self._scores(self.num_heads, self.schedule(self.step, layer)[0], state)

    def neuron_scores(self, layer, state, act):
        if not self.decoding:
            return None
        return self._scores(self.ffn_dim, self.schedule(self.step, layer)[1], state)


def random_schedule(num_heads, ffn_dim, keep_heads, keep_neurons, *, per_step=True, seed=0):
    """A seeded random choice of kept heads/neurons per (step, layer) (or per layer only: per_step=False)."""
    def schedule(step, layer):
        g = torch.Generator().manual_seed(seed + 1000 * (step if per_step else 0) + layer)
        heads = torch.randperm(num_heads, generator=g)[:keep_heads].sort().values
        return heads, torch.randperm(ffn_dim, generator=g)[:keep_neurons].sort().values
    return schedule


@torch.no_grad()
def masked_engine_logits(model, schedule, prompt, tokens, keep_heads, keep_neurons):
    """Logits (B, vocab) after the prompt and after each decode token, from the masked engine."""
    config = model.config
    H, F = config.num_attention_heads, config.ffn_dim
    allocation = Allocation(heads=1 - keep_heads / H, neurons=1 - keep_neurons / F)
    engine = MaskedEngine(model, SchedulePolicy(schedule, H, F), allocation)
    assert engine.skip_count("heads") == H - keep_heads and engine.skip_count("neurons") == F - keep_neurons
    out = []
    with engine.applied():
        res = model(input_ids=prompt, use_cache=True)
        past = res.past_key_values
        out.append(res.logits[:, -1].float())
        for token in tokens:
            res = model(input_ids=token.view(-1, 1).to(prompt.device), past_key_values=past, use_cache=True)
            past = res.past_key_values
            out.append(res.logits[:, -1].float())
    return out


@torch.no_grad()
def sparse_engine_logits(engine, prompt, tokens):
    out = [engine.prefill(prompt).float()]
    for token in tokens:
        out.append(engine.step(token.view(-1)).float().clone())
    return out


def relative_errors(got, expected):
    """‖got − expected‖ / ‖expected‖ per step, and whether the argmax token agrees at each step."""
    errors = [((a.double() - b.double()).norm() / b.double().norm()).item() for a, b in zip(got, expected)]
    agree = [bool((a.argmax(-1) == b.argmax(-1)).all()) for a, b in zip(got, expected)]
    return errors, agree
