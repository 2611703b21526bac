import math

import torch
import torch.nn.functional as F

from harness.perplexity import perplexity, windows
from tests.conftest import tiny_model


def test_windows_non_overlapping_drop_the_tail():
    assert windows(10, 4, 4) == [(0, 4, 0), (4, 8, 0)]


def test_windows_with_stride_score_every_token_once():
    spans = windows(20, 8, 4)
    scored = []
    for start, end, first in spans:
        scored += list(range(start + max(first, 1), end))
    assert scored == list(range(1, spans[-1][1]))


def test_perplexity_is_exp_of_mean_token_nll():
    model = tiny_model()
    ids = torch.randint(3, 50000, (100,))
    result = perplexity(model, ids, seqlen=32)
    nll, count = 0.0, 0
    for i in range(3):
        x = ids[i * 32:(i + 1) * 32][None]
        logits = model(input_ids=x).logits
        nll += F.cross_entropy(logits[0, :-1], x[0, 1:], reduction="sum").item()
        count += 31
    assert result["n"] == 3 and result["tokens"] == count
    assert math.isclose(result["value"], math.exp(nll / count), rel_tol=1e-5)
    assert result["stderr"] > 0
    assert perplexity(model, ids, seqlen=32, limit=1)["n"] == 1
