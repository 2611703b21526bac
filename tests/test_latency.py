"""Latency: method predictors as the sparse engine's mask sources, and the latency suite on a CPU.

1. For each method (static, dejavu, shadow, timewise:current/last/time) the sparse decode engine, fed by the
   method's mask source (its `Method.decode_source`, dispatched by harness/decoding.py), gives the logits of the masked engine (harness/engine.py) with the
   method's own policy, token by token (tiny OPT, float32; the prompt is dense in both engines): the
   predictors read the same tensors and choose the same units in both engines.
2. `harness run --suite latency` on a tiny model writes records with every latency field.
"""
import json

import pytest
import torch

from harness.engine import Allocation, MaskedEngine
from kernels.decode import SparseDecoder
from kernels.equivalence import relative_errors, sparse_engine_logits
from harness.decoding import source_for
from kernels.sources import reference_source
from tests.conftest import tiny_model
from tests.method_policies import PromptDense, make_policy, masked_logits

pytestmark = pytest.mark.filterwarnings("ignore::DeprecationWarning")

L, H, F_DIM, D = 3, 4, 128, 64
PROMPT, STEPS = 5, 6


def _model():
    model = tiny_model(seed=3, vocab_size=512, hidden_size=D, word_embed_proj_dim=D, ffn_dim=F_DIM,
                       num_attention_heads=H, num_hidden_layers=L)
    with torch.no_grad():
        for param in model.parameters():
            if param.dim() == 1:
                param.add_(torch.randn_like(param) * 0.1)
    return model


@pytest.fixture(scope="module")
def setup():
    model = _model()
    g = torch.Generator().manual_seed(7)
    return model, torch.randint(0, 512, (1, PROMPT), generator=g), torch.randint(0, 512, (STEPS,), generator=g)


METHODS = ["static", "dejavu", "dejavu:attn-input", "dejavu:shadowllm", "shadow", "timewise:current", "timewise:last",
           "timewise:time"]
CASES = [(m, "torch") for m in METHODS] + [(m, "triton") for m in ("dejavu", "shadow", "timewise:time")]


@pytest.mark.parametrize("label, backend", CASES)
def test_method_source_gives_the_masked_engines_logits(setup, label, backend):
    if backend == "triton":
        pytest.importorskip("triton")
    model, prompt, tokens = setup
    policy, allocation = make_policy(label, model)
    wrapped = PromptDense(policy)
    expected = masked_logits(model, wrapped, allocation, prompt, tokens)
    if label != "static":  # the predictors really choose per token: the kept heads change across steps
        sets = {}
        for unit, layer, scores in wrapped.kept:
            sets.setdefault(layer, set()).add(tuple(scores[0, -1].topk(H // 2).indices.sort().values.tolist()))
        assert any(len(s) > 1 for s in sets.values()), sets
    policy, allocation = make_policy(label, model)  # fresh state (timewise:time carries the previous token)
    source = source_for(label, policy, allocation, model)
    engine = SparseDecoder(model, source, max_len=16, kv="recompute", backend=backend)
    got = sparse_engine_logits(engine, prompt, tokens)
    errors, agree = relative_errors(got, expected)
    assert max(errors) < 1e-5 and all(agree), (label, errors)
    kept_h, kept_f = engine.heads_kept, engine.neurons_kept
    if label in ("shadow", "dejavu:shadowllm"):
        assert kept_h == [H, 2, 2] and kept_f[0] == F_DIM
    if label.startswith("timewise"):
        assert kept_f == [F_DIM] * L and kept_h == [2] * L
    reference = SparseDecoder(model, reference_source(source, L), max_len=16, kv="recompute", backend="torch")
    assert reference.heads_kept == kept_h and reference.neurons_kept == kept_f


def test_dejavu_source_reading_the_attention_input_is_not_the_masked_engines(setup):
    """The equivalence above depends on the source reading the tensor the policy reads: Deja Vu's source fed layer
    l−1's attention input for the heads of l (the `dejavu:attn-input` reading) no longer gives the default
    policy's logits (which read layer l−1's MLP input)."""
    from kernels.sources import keep_counts
    from methods.dejavu import DejaVuSource, head_source

    model, prompt, tokens = setup
    policy, allocation = make_policy("dejavu", model)
    expected = masked_logits(model, PromptDense(policy), allocation, prompt, tokens)
    policy, allocation = make_policy("dejavu", model)
    for reads, close in (("mlp_input", True), ("layer_input", False)):
        source = DejaVuSource(policy.attn, policy.mlp, keep_counts(allocation, L, H, F_DIM),
                              lambda layer, reads=reads: head_source(layer, reads))
        engine = SparseDecoder(model, source, max_len=16, kv="recompute", backend="torch")
        errors, _ = relative_errors(sparse_engine_logits(engine, prompt, tokens), expected)
        assert (max(errors) < 1e-5) == close, (reads, errors)


def test_sources_refuse_what_cannot_be_decoded(setup):
    from harness.errors import HarnessError

    model = setup[0]
    policy, _ = make_policy("dejavu", model)
    with pytest.raises(HarnessError, match="local allocation"):
        source_for("dejavu", policy, Allocation(0.5, 0.5, mode="global"), model).bind  # lookahead: no ranking
    with pytest.raises(HarnessError, match="local allocation"):
        tw, _ = make_policy("timewise:current", model)
        source_for("timewise:current", tw, Allocation(0.5, 0.0, mode="global"), model)
    with pytest.raises(HarnessError, match="token-scope"):
        source_for("dejavu", policy, Allocation(0.5, 0.5, scope="request"), model)
    static, _ = make_policy("static", model)  # a static ranking is fixed, so global allocation is decodable
    source = source_for("static", static, Allocation(0.5, 0.5, mode="global", dense_layers=(0,)), model)
    engine = SparseDecoder(model, source, max_len=8, backend="torch")
    assert engine.heads_kept[0] == H and sum(engine.heads_kept[1:]) == 2 * H - round(0.5 * H * 2)


# ------------------------------------------------------------------------------------------------------------
# the latency suite on a CPU
# ------------------------------------------------------------------------------------------------------------
FIELDS = ("prefill_ms", "token_ms", "token_ms_p90", "token_ms_p99", "request_ms", "tokens_per_s", "peak_mem_gb",
          "floor_ms")


@pytest.fixture(scope="module")
def latency_run(tiny_model_dir, tmp_path_factory):
    """suites/latency.yaml with a tiny model and tiny lengths: dense baselines + static/dejavu/shadow at
    h0.5/n0.5, then timewise at h0.5 into the same run folder."""
    import yaml
    from typer.testing import CliRunner

    from harness.cli import app
    from harness.suites import load_suite

    suite = load_suite("latency")
    suite["defaults"]["method_settings"]["latency"].update(prompt=6, new_tokens=4, warmup=1, repeats=2, copy_mb=8,
                                                             batch=[1, 2])
    suite["defaults"].update(calib_samples=4, calib_seqlen=16)
    tmp = tmp_path_factory.mktemp("latency")
    path = tmp / "latency.yaml"
    path.write_text(yaml.safe_dump(suite))
    out = tmp / "run"
    common = ["run", "--suite", path, "--model", tiny_model_dir, "--weights", "pretrained", "--dtype", "float32",
              "--device", "cpu", "--out", out, "--cache-dir", tmp / "cache"]
    runner = CliRunner()
    first = runner.invoke(app, [str(a) for a in common + ["--sparsity", "h0.5/n0.5"]], catch_exceptions=False)
    assert first.exit_code == 0, first.output
    second = runner.invoke(app, [str(a) for a in common + ["--methods", "timewise", "--sparsity", "h0.5"]],
                           catch_exceptions=False)
    assert second.exit_code == 0, second.output
    return out, [json.loads(line) for line in (out / "records.jsonl").read_text().splitlines()]


def test_latency_suite_records_every_field(latency_run):
    out, records = latency_run
    rows = {}
    assert {r["batch"] for r in records} == {1, 2}  # the batch sizes asked for, each its own records
    for r in records:
        if r["batch"] == 1:
            rows.setdefault((r["method_label"], r.get("engine")), {})[r["metric"]] = r
    assert set(rows) == {("dense · ours", "ours"), ("dense · hf-eager", "hf-eager"), ("dense · hf-static", "hf-static"),
                         ("static:plainact", "ours"), ("dejavu", "ours"), ("shadow:plainact", "ours"),
                         ("timewise:current", "ours")}, sorted(rows)
    for (label, engine), metrics in rows.items():
        assert set(FIELDS) <= set(metrics), (label, sorted(metrics))
        for name in FIELDS:
            assert metrics[name]["value"] > 0, (label, name)
        token = metrics["token_ms"]
        assert token["weights"] == "pretrained" and token["task"] == "decode" and token["timer"] == "host perf_counter"
        assert metrics["token_ms_p99"]["value"] >= metrics["token_ms"]["value"] - 1e-9
        assert token["n"] == 2 * 3  # repeats × (new_tokens − 1) steps
        if label.startswith("dense"):
            continue
        share = metrics["predictor_share"]["value"]
        assert 0.0 <= share <= 1.0
        if label.startswith("static"):
            assert share == 0.0
        else:
            assert token["reference_token_ms"] > 0 and token["predictor_bytes"] > 0
            assert metrics["floor_ms"]["value"] > token["floor_model_ms"]
        # kv=auto: both K/V policies measured, the faster one reported; the head-set change rate beside it
        assert set(token["token_ms_by_kv"]) == {"all", "recompute"} and token["kv_setting"] == "auto"
        assert token["kv"] == min(token["token_ms_by_kv"], key=token["token_ms_by_kv"].get)
        assert token["value"] == token["token_ms_by_kv"][token["kv"]]
        rate = token["head_change_rate"]
        assert rate == 0.0 if label.startswith("static") else 0.0 <= rate <= 1.0
        if label in ("dejavu", "timewise:current"):  # seeded-at-random predictors on a tiny model: sets change
            assert rate > 0.0
    assert rows[("dense · hf-static", "hf-static")]["token_ms"]["compiled"] is False  # CPU: not compiled
    sparse = rows[("dejavu", "ours")]["floor_ms"]
    dense = rows[("dense · ours", "ours")]["floor_ms"]
    assert sparse["weight_bytes"] < dense["weight_bytes"]
    achieved = {r["method_label"]: (r["achieved_heads"], r["achieved_neurons"]) for r in records}
    assert achieved["dejavu"] == (0.5, 0.5) and achieved["timewise:current"] == (0.5, 0.0)
    assert achieved["shadow:plainact"][0] == pytest.approx(0.25)  # layer 0 dense: one of two layers
    table = (out / "table.md").read_text()
    assert "dense · hf-eager" in table and "decode token_ms @ h0.5/n0.5" in table and "predictor_share" in table


def test_random_weights_are_said_in_every_record(latency_run):
    _, records = latency_run
    assert all(r["weights_note"] == "pretrained" for r in records)  # this run loads a checkpoint; random says so
    from harness.latency import settings_of
    from harness.errors import HarnessError
    from harness.spec import RunConfig

    with pytest.raises(HarnessError, match="unknown latency setting"):
        settings_of(RunConfig(method_settings={"latency": {"prompts": 3}}))
    with pytest.raises(HarnessError, match="valid: ours, hf-eager"):
        settings_of(RunConfig(method_settings={"latency": {"engines": ["vllm"]}}))


@pytest.mark.parametrize("label, backend", [("shadow", "torch"), ("dejavu:shadowllm", "torch"), ("shadow", "triton")])
def test_global_allocation_decodes_as_the_masked_engine_plans(setup, label, backend):
    """ShadowLLM's setting: one ranking of every later layer's scores per token. The decode engine's counts vary
    per layer and token (device-counted index sets), the masked engine's logits are reproduced, and the total
    kept per token is the allocation's."""
    if backend == "triton":
        pytest.importorskip("triton")
    from kernels.decode import Counted

    model, prompt, tokens = setup
    policy, _ = make_policy(label, model)
    allocation = Allocation(0.5, 0.7, mode="global", dense_layers=(0,))
    engine = MaskedEngine(model, policy, allocation)
    with torch.no_grad():  # the prompt dense (as the sparse engine's prefill), then every step under the plan
        res = model(input_ids=prompt, use_cache=True)
        past, expected = res.past_key_values, [res.logits[:, -1].float()]
        with engine.applied():
            for token in tokens:
                res = model(input_ids=token.view(1, 1), past_key_values=past, use_cache=True)
                past = res.past_key_values
                expected.append(res.logits[:, -1].float())
    policy, _ = make_policy(label, model)
    engine = SparseDecoder(model, source_for(label, policy, allocation, model), max_len=16, kv="recompute",
                           backend=backend)
    got, per_layer = [engine.prefill(prompt).float()], []
    for token in tokens:
        got.append(engine.step(token.view(1)).float())
        used = engine.heads_used
        assert all(isinstance(u, Counted) for u in used[1:])
        per_layer.append(tuple(int(u.count) for u in used[1:]))
    errors, agree = relative_errors(got, expected)
    assert max(errors) < 1e-5 and all(agree), errors
    assert all(sum(counts) == 2 * H - round(0.5 * H * 2) for counts in per_layer)  # the total is fixed
    assert len(set(per_layer)) > 1 or len(set(per_layer[0])) > 1, "the per-layer counts really vary"


def test_batch_union_keeps_each_sequences_own_set(setup):
    """Batch > 1 shares one index set: combine="union" keeps the union of each sequence's top-k (a device count
    between k and B·k); two copies of one prompt give that prompt's own set, so its logits are batch 1's."""
    from kernels.decode import Counted

    model, prompt, tokens = setup
    single = SparseDecoder(model, source_for("dejavu", make_policy("dejavu", model)[0], Allocation(0.5, 0.7), model),
                           max_len=16, kv="recompute", backend="torch")
    union_source = source_for("dejavu", make_policy("dejavu", model)[0], Allocation(0.5, 0.7), model)
    union_source.combine = "union"
    pair = SparseDecoder(model, union_source, max_len=16, kv="recompute", backend="torch", batch=2)
    a, b = single.prefill(prompt), pair.prefill(prompt.expand(2, -1))
    for token in tokens[:3]:
        a, b = single.step(token.view(1)), pair.step(token.view(1).expand(2))
        assert torch.allclose(b[0], a[0], atol=1e-5) and torch.allclose(b[1], a[0], atol=1e-5)
        assert all(isinstance(u, Counted) and int(u.count) == 2 for u in pair.heads_used)
    other = torch.randint(0, 512, (1, PROMPT), generator=torch.Generator().manual_seed(11))
    pair.prefill(torch.cat([prompt, other]))
    counts = set()
    for token in tokens:
        pair.step(token.view(1).expand(2))
        counts |= {int(u.count) for u in pair.heads_used}
    assert counts <= {2, 3, 4} and max(counts) > 2, counts


def _quantized(policy, kind):
    """The policy with every predictor's weights replaced by their 8-bit form (the fit's `predictor_weights`)."""
    from methods.predictors import quantize_predictor

    for attr in ("attn", "mlp", "predictors", "predictor"):
        for predictor in (getattr(policy, attr, None) or {}).values():
            quantize_predictor(predictor, kind)
    return policy


@pytest.mark.parametrize("label, backend, kind", [("dejavu", "triton", "int8"), ("dejavu:shadowllm", "triton", "int8"),
                                                  ("shadow", "triton", "int8"), ("timewise:time", "torch", "fp8"),
                                                  ("dejavu:attn-input", "torch", "int8")])
def test_eight_bit_predictors_decode_as_the_masked_engine_computes(setup, label, backend, kind):
    """predictor_weights int8/fp8: the decode step reads the 8-bit codes (half the bytes) and applies each row's
    scale in the GEMV, with the input standardised in the step (not folded), and gives the logits of the masked
    engine computing with the dequantized weights."""
    if backend == "triton":
        pytest.importorskip("triton")
    model, prompt, tokens = setup
    policy, allocation = make_policy(label, model)
    expected = masked_logits(model, PromptDense(_quantized(policy, kind)), allocation, prompt, tokens)
    policy, allocation = make_policy(label, model)
    source = source_for(label, _quantized(policy, kind), allocation, model)
    engine = SparseDecoder(model, source, max_len=16, kv="recompute", backend=backend)
    errors, agree = relative_errors(sparse_engine_logits(engine, prompt, tokens), expected)
    assert max(errors) < 1e-5 and all(agree), (label, errors)
    full = source_for(label, make_policy(label, model)[0], allocation, model)
    SparseDecoder(model, full, max_len=16, backend="torch")
    assert source.predictor_bytes() < 0.6 * full.predictor_bytes()  # 1-byte codes + fp32 row scales vs fp32 weights


@pytest.mark.parametrize("backend", ["torch", "triton"])
def test_random_masks_decode_as_the_masked_engine_draws_them(setup, backend):
    """random: the decode step hashes (seed, layer, unit, position, token) on the device as the masked engine does,
    so both engines keep the same units at every token."""
    if backend == "triton":
        pytest.importorskip("triton")
    from methods.random import RandomPolicy

    model, prompt, tokens = setup
    allocation = Allocation(0.5, 0.7)
    policy = RandomPolicy(3, {"heads": H, "neurons": F_DIM}, L)
    expected = masked_logits(model, PromptDense(policy), allocation, prompt, tokens)
    engine = SparseDecoder(model, source_for("random", policy, allocation, model), max_len=16, kv="recompute",
                           backend=backend)
    errors, agree = relative_errors(sparse_engine_logits(engine, prompt, tokens), expected)
    assert max(errors) < 1e-5 and all(agree), errors
