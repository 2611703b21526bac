"""The lm-eval adapter (`harness-masked`) with the masked engine applied: dense is the unmasked model,
padding never counts as a token, token-scope masks are causal, generation works with the KV cache."""
import pytest

pytest.importorskip("lm_eval")

import torch  # noqa: E402
from lm_eval.api.instance import Instance  # noqa: E402

from harness.engine import Allocation, MaskedEngine  # noqa: E402
from harness.lmeval import make_adapter  # noqa: E402
from methods.random import RandomPolicy  # noqa: E402
from tests.conftest import tiny_model  # noqa: E402

SHORT = ("The cat sat on the", " mat")
LONG = ("A much longer context that will force the shorter request in the same batch to be padded on the right", " end")


def ll(lm, pairs):
    requests = [Instance("loglikelihood", {}, pair, idx) for idx, pair in enumerate(pairs)]
    return [value for value, _ in lm.loglikelihood(requests, disable_tqdm=True)]


def random_engine(model, sparsity=0.5, scope="token"):
    config = model.config
    policy = RandomPolicy(0, {"heads": config.num_attention_heads, "neurons": config.ffn_dim}, config.num_hidden_layers)
    return MaskedEngine(model, policy, Allocation(heads=sparsity, neurons=sparsity, scope=scope))


@pytest.fixture(scope="module")
def model():
    return tiny_model()


@pytest.fixture(scope="module")
def lm(model, tokenizer):
    return make_adapter(model, tokenizer, batch_size=4)


def test_adapter_is_registered_with_lm_eval(lm):
    from lm_eval.api.registry import get_model

    assert get_model("harness-masked") is type(lm)


def test_dense_masked_equals_unmasked(model, lm, tokenizer):
    from lm_eval.models.huggingface import HFLM

    pairs = [SHORT, LONG, ("Hello", " world, again")]
    plain = ll(HFLM(pretrained=model, tokenizer=tokenizer, batch_size=4), pairs)  # lm-eval's own, no engine
    unmasked = ll(lm, pairs)
    with MaskedEngine(model, None, Allocation()).applied():  # the `dense` method installs no policy
        dense = ll(lm, pairs)
    with random_engine(model, sparsity=0.0).applied():  # a policy at sparsity 0: hooks run, nothing skipped
        zero = ll(lm, pairs)
    assert dense == unmasked
    torch.testing.assert_close(torch.tensor(unmasked), torch.tensor(plain), rtol=0, atol=1e-4)
    torch.testing.assert_close(torch.tensor(zero), torch.tensor(unmasked), rtol=0, atol=1e-5)


def test_token_scope_continuation_does_not_depend_on_later_tokens(model, lm, tokenizer):
    """Under `random` (token scope) a prefix's logits are the same whatever follows it."""
    ids = tokenizer("The quick brown fox jumps over the lazy dog and keeps running")["input_ids"]
    short, longer = torch.tensor([ids[:6]]), torch.tensor([ids])
    with random_engine(model).applied():
        a = lm._model_call(short)
        b = lm._model_call(longer)[:, :6]
    torch.testing.assert_close(a, b, rtol=0, atol=1e-5)
    with random_engine(model).applied():
        sparse = ll(lm, [SHORT])
    assert sparse != ll(lm, [SHORT])  # the masks change the answer


@pytest.mark.parametrize("scope", ["token", "request"])
def test_batching_and_padding_do_not_change_answers(model, lm, scope):
    """A request alone and batched with a longer one (so right-padded) gets the same loglikelihood:
    padding is marked invalid, so request scope picks the last real token, never a pad."""
    engine = random_engine(model, scope=scope)
    with engine.applied():
        alone = ll(lm, [SHORT])[0]
        batched = ll(lm, [SHORT, LONG])
    assert abs(alone - batched[0]) < 1e-4


def test_request_scope_continuations_of_one_context_get_the_same_mask(model, lm):
    """lm-eval scores each choice on (context + choice)[:-1]: under request scope every choice must be scored
    under the mask of the context's last token, not one chosen from its own continuation."""
    context = "The cat sat on the"
    pairs = [(context, " mat"), (context, " warm red blanket by the fire")]
    seen = []
    hook = model.model.decoder.register_forward_hook(lambda m, a, o: seen.append(dict(engine.state.keep)))
    try:
        engine = random_engine(model, scope="token")
        with engine.applied():
            ll(lm, pairs)
        token_masks = seen.pop()
        engine = random_engine(model, scope="request")
        with engine.applied():
            ll(lm, pairs)
        request_masks = seen.pop()
    finally:
        hook.remove()
    last_context = len(lm.tok_encode(context)) - 1
    for key, keep in request_masks.items():
        assert keep.shape[0] == 2
        expected = token_masks[key][0, last_context]
        assert (token_masks[key][1, last_context] == expected).all()  # the same token at the same position
        assert (keep[0] == expected).all() and (keep[1] == expected).all(), key


def test_request_scope_rolling_windows_take_the_mask_of_their_context(model, lm):
    """loglikelihood_rolling scores a whole text; its first window's context is lm-eval's prefix token alone, so
    the request's mask is the one chosen at that token, never at a token being scored."""
    seen = []
    hook = model.model.decoder.register_forward_hook(lambda m, a, o: seen.append(dict(engine.state.keep)))
    request = [Instance("loglikelihood_rolling", {}, ("The quick brown fox jumps over the lazy dog",), 0)]
    try:
        engine = random_engine(model, scope="token")
        with engine.applied():
            lm.loglikelihood_rolling(request, disable_tqdm=True)
        token_masks = seen.pop()
        engine = random_engine(model, scope="request")
        with engine.applied():
            lm.loglikelihood_rolling(request, disable_tqdm=True)
        request_masks = seen.pop()
    finally:
        hook.remove()
    for key, keep in request_masks.items():
        assert (keep[0] == token_masks[key][0, 0]).all(), key
        assert not (token_masks[key][0] == token_masks[key][0, 0]).all()  # token masks do differ along the text


def test_padding_is_not_counted_as_tokens(model, lm, tokenizer):
    engine = random_engine(model)
    with engine.applied():
        ll(lm, [SHORT, LONG])
    _, tokens = engine.meter.counts("heads")
    real = sum(len(tokenizer(ctx + cont)["input_ids"]) - 1 for ctx, cont in (SHORT, LONG))
    assert tokens[0] == real  # each row scored on its real tokens only (inputs drop the last token)


@pytest.mark.parametrize("scope", ["token", "request"])
def test_generate_until_with_the_kv_cache(model, lm, scope):
    requests = [Instance("generate_until", {}, ("Once upon a time", {"until": ["\n\n"], "max_gen_toks": 6,
                                                                   "do_sample": False}), 0),
                Instance("generate_until", {}, ("A much longer prompt, so that the batch is left-padded", {
                    "until": ["\n\n"], "max_gen_toks": 6, "do_sample": False}), 1)]
    unmasked = lm.generate_until(requests, disable_tqdm=True)
    with MaskedEngine(model, None, Allocation()).applied():
        dense = lm.generate_until(requests, disable_tqdm=True)
    engine = random_engine(model, scope=scope)
    with engine.applied():
        sparse = lm.generate_until(requests, disable_tqdm=True)
    assert dense == unmasked
    assert all(isinstance(text, str) for text in sparse)
    skipped, tokens = engine.meter.counts("heads")
    assert tokens[0] > 0 and abs(sum(skipped) / (sum(tokens) * model.config.num_attention_heads) - 0.5) < 1e-6
