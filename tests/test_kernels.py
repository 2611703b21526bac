"""The Triton kernels (run by the interpreter on CPU) against float64 torch references.

Each check poisons the output with NaN first (every element must be written), draws fresh non-zero random
inputs, and uses index sets of several sizes, also ones that are not multiples of the block sizes.
"""
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch

pytest.importorskip("triton")
pytestmark = pytest.mark.filterwarnings("ignore::DeprecationWarning")

from kernels import checks  # noqa: E402

DTYPES = [torch.float32, torch.float16, torch.bfloat16]
IDS = ["fp32", "fp16", "bf16"]


@pytest.mark.parametrize("dtype", DTYPES, ids=IDS)
@pytest.mark.parametrize("batch,keep", [(1, 5), (3, 24), (8, 13)])
def test_fc1_gather(dtype, batch, keep):
    checks.check_fc1(d=40, F=48, keep=keep, batch=batch, dtype=dtype, seed=keep)


@pytest.mark.parametrize("dtype", DTYPES, ids=IDS)
@pytest.mark.parametrize("batch,keep", [(1, 7), (2, 48), (8, 19)])
def test_fc2_gather(dtype, batch, keep):
    checks.check_fc2(d=40, F=48, keep=keep, batch=batch, dtype=dtype, seed=keep, residual=batch == 2)


@pytest.mark.parametrize("dtype", DTYPES, ids=IDS)
@pytest.mark.parametrize("batch,keep,part", [(1, 1, "qkv"), (4, 3, "q"), (8, 5, "kv")])
def test_qkv_heads(dtype, batch, keep, part):
    checks.check_qkv(d=48, H=6, hd=8, keep=keep, batch=batch, dtype=dtype, seed=keep, part=part)


@pytest.mark.parametrize("dtype", DTYPES, ids=IDS)
@pytest.mark.parametrize("batch,keep", [(1, 2), (5, 6)])
def test_out_proj_heads(dtype, batch, keep):
    checks.check_out_proj(d=48, H=6, hd=8, keep=keep, batch=batch, dtype=dtype, seed=keep)


@pytest.mark.parametrize("dtype", [torch.float32, torch.float16], ids=["fp32", "fp16"])
def test_kv_to_cache_writes_only_selected_heads_at_pos(dtype):
    checks.check_kv_to_cache(d=32, H=4, hd=8, T=20, keep=2, batch=2, dtype=dtype, seed=1)


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16], ids=["fp32", "bf16"])
@pytest.mark.parametrize("batch,pos", [(1, 0), (1, 23), (2, 37)])
def test_head_attention(dtype, batch, pos, monkeypatch):
    from kernels import gemv

    checks.check_attention(H=4, hd=16, T=40, keep=3, batch=batch, pos=pos, dtype=dtype, seed=pos)
    # the early-K/V path of static masks (PDL prefetch mode; the interpreter has no PDL wait, the masking is the same)
    monkeypatch.setattr(gemv, "PDL_MODE", "prefetch")
    checks.check_attention(H=4, hd=16, T=40, keep=3, batch=batch, pos=pos, dtype=dtype, seed=pos, fixed=True)


@pytest.mark.parametrize("dtype", DTYPES, ids=IDS)
def test_kv_recompute_fills_only_missing_entries(dtype):
    checks.check_recompute(d=32, H=4, hd=8, T=40, keep=2, batch=2, pos=33, dtype=dtype, seed=3)


# -- the decode step's fused operations ------------------------------------------------------------------------
@pytest.mark.parametrize("dtype", DTYPES, ids=IDS)
@pytest.mark.parametrize("part", ["qkv", "kv", "q"])
def test_qkv_to_cache_routes_q_and_kv(dtype, part):
    checks.check_qkv_to_cache(d=48, H=4, hd=8, T=12, keep=3, batch=3, dtype=dtype, part=part, seed=11)


@pytest.mark.parametrize("dtype", DTYPES, ids=IDS)
@pytest.mark.parametrize("batch,keep", [(1, False), (3, True)])
def test_layer_norm_of_the_fp32_stream(dtype, batch, keep):
    checks.check_layer_norm(d=40, T=6, batch=batch, dtype=dtype, keep=keep, seed=15)


@pytest.mark.parametrize("dtype", DTYPES, ids=IDS)
@pytest.mark.parametrize("batch,pos,T", [(1, 0, 48), (2, 17, 48), (3, 40, 48), (2, 9, 12)])
def test_attend_then_out_proj_add(dtype, batch, pos, T):
    """T=48: three chunks combined by the last program (its counters reset); T=12: one chunk writes directly."""
    checks.check_attend_out_proj(d=40, H=5, hd=8, T=T, keep=3, batch=batch, pos=pos, dtype=dtype, seed=12)


@pytest.mark.parametrize("dtype", DTYPES, ids=IDS)
@pytest.mark.parametrize("batch,keep", [(1, 7), (3, 24)])
def test_fc2_add(dtype, batch, keep):
    checks.check_fc2_add(d=40, F=64, keep=keep, batch=batch, dtype=dtype, seed=14)


@pytest.mark.parametrize("dtype", [torch.float32, torch.float16])
def test_tensor_core_form_at_batch_16_equals_the_references(dtype, monkeypatch):
    """KERNELS_DOT_BATCH: at batch >= it the rows and cols GEMVs run tl.dot over a batch tile; every projection of
    the step gives its reference's result (QKV routed into the cache, fc1, out_proj and fc2 into the stream)."""
    from kernels import gemv

    monkeypatch.setattr(gemv, "DOT_BATCH", 16)
    checks.check_fc1(d=40, F=48, keep=13, batch=16, dtype=dtype, seed=1)
    checks.check_fc2_add(d=40, F=64, keep=21, batch=16, dtype=dtype, seed=2)
    checks.check_qkv_to_cache(d=48, H=4, hd=8, T=12, keep=3, batch=16, dtype=dtype, part="qkv", seed=3)
    checks.check_attend_out_proj(d=40, H=5, hd=8, T=24, keep=3, batch=16, pos=9, dtype=dtype, seed=4)


# -- top-k selection of the predictors -------------------------------------------------------------------------
@pytest.mark.parametrize("shape,k", [((1, 40), 20), ((3, 40), 7), ((2, 3, 37), 5), ((1, 300), 299), ((1, 8), 1)])
def test_topk_select_is_the_set_of_the_k_largest_batch_means(shape, k):
    from kernels.topk import select_triton

    g = torch.Generator().manual_seed(sum(shape) + k)
    scores = torch.randn(*shape, generator=g) * torch.tensor(10.0) ** torch.randint(-3, 3, shape, generator=g)
    scores[..., 0] = -scores[..., 0].abs()  # negative values in play
    got = select_triton(scores, k)
    expected = torch.topk(scores.mean(0, keepdim=True), k, dim=-1).indices
    assert got.dtype == torch.int32 and got.shape == expected.shape
    assert torch.equal(got.sort(-1).values.long(), expected.sort(-1).values)
    assert torch.equal(got.long(), got.long().sort(-1).values), "indices come back in ascending order"


def test_topk_select_breaks_ties_at_the_threshold_by_lowest_index():
    from kernels.topk import select_triton

    scores = torch.tensor([[1.0, 5.0, 3.0, 3.0, 3.0, -2.0, 3.0]])
    assert select_triton(scores, 3).tolist() == [[1, 2, 3]]
    assert select_triton(scores, 1).tolist() == [[1]]
    assert select_triton(scores, 7).tolist() == [[0, 1, 2, 3, 4, 5, 6]]


def _kept_by_lowest_k_mask(scores, k):
    from harness.engine import lowest_k_mask

    return lowest_k_mask(scores, scores.shape[-1] - k)


@pytest.mark.parametrize("search", ["bisect", "histogram", "radix4"])
@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16, torch.float32])
@pytest.mark.parametrize("shape,k", [((1, 40), 20), ((1, 2560), 256), ((3, 2, 300), 30)])
def test_topk_select_is_the_masked_engines_choice_in_every_dtype(dtype, shape, k, search):
    """The decode engine keeps what the masked engine keeps: the complement of lowest_k_mask's skipped units,
    from 16-bit keys for half-precision rows (two blocks: 2560 = 2048 + 512), ties included (planted)."""
    from kernels.topk import select_triton

    g = torch.Generator().manual_seed(shape[-1] + k)
    scores = (torch.randn(*shape, generator=g) * 3).round().to(dtype)  # rounded: many ties at the threshold
    scores[..., 1] = -0.0
    scores[..., 2] = 0.0
    got = select_triton(scores, k, search=search)
    mean = scores.float().mean(0).to(dtype) if shape[0] > 1 else scores[0]  # the batch mean, in the scores' dtype
    keep = _kept_by_lowest_k_mask(mean, k)
    expected = keep.reshape(-1, shape[-1]).nonzero()[:, 1].view(*shape[1:-1], k)
    assert got.dtype == torch.int32 and torch.equal(got[0].long(), expected)


def test_topk_kernel_compiles_for_hopper():
    """The compiler's front end checks what the interpreter does not (types across branches, names defined in a
    loop): the top-k kernel builds to sm_90 PTX for every dtype, batch combine and search (a subprocess, as above)."""
    code = ("from kernels import checks\n"
            "for case in [(0, False, False), (1, True, False), (0, False, True), (2, False, False), (0, False, False, 1),\n"
            "             (1, True, False, 1), (0, False, True, 2), (1, True, False, 2)]:\n"
            "    assert 'ret;' in checks.topk_ptx(*case)\n")
    env = {k: v for k, v in os.environ.items() if k != "TRITON_INTERPRET"}
    done = subprocess.run([sys.executable, "-c", code], env=env, capture_output=True, text=True, timeout=300,
                          cwd=Path(__file__).resolve().parents[1])
    assert done.returncode == 0, done.stderr[-2000:]


@pytest.mark.parametrize("search", ["bisect", "histogram", "radix4"])
def test_topk_union_of_the_batch_has_a_device_count_and_each_sequences_set(search):
    from kernels.topk import select, select_triton

    g = torch.Generator().manual_seed(5)
    scores = torch.randn(3, 2, 64, generator=g).half()
    out, counts = torch.full((2, 64), -1, dtype=torch.int32), torch.zeros(2, dtype=torch.int32)
    select_triton(scores, 8, combine="union", out=out, counts=counts, search=search)
    for row in range(2):
        expected = torch.zeros(64, dtype=torch.bool)
        for b in range(3):
            expected |= _kept_by_lowest_k_mask(scores[b, row], 8)
        n = int(counts[row])
        assert n == int(expected.sum()) and 8 <= n <= 24
        assert out[row, :n].tolist() == expected.nonzero().flatten().tolist()  # ascending
    out_torch, counts_torch = torch.zeros_like(out), torch.zeros_like(counts)
    select(scores, 8, combine="union", out=out_torch, counts=counts_torch, triton_kernel=False)
    assert torch.equal(counts_torch, counts)
    with pytest.raises(ValueError, match="union"):
        select(scores, 8, combine="union")
    with pytest.raises(ValueError, match="combine"):
        select(scores, 8, combine="max")


@pytest.mark.parametrize("V, batch", [(5000, 1), (4096, 3), (37, 2)])
def test_argmax_is_torch_argmax_with_ties(V, batch):
    checks.check_argmax(V, batch, seed=V)


@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16, torch.float32])
def test_embed_is_the_models_sum(dtype):
    checks.check_embed(d=40, V=50, T=9, batch=2, dtype=dtype, seed=2)


@pytest.mark.parametrize("name", ["rows", "cols", "rows_dot", "cols_dot", "layer_norm", "attend", "attend_early"])
def test_step_kernels_build_for_hopper_with_and_without_pdl(name):
    """The PDL variants compile to sm_90 PTX and through ptxas here (no GPU): griddepcontrol.wait and
    .launch_dependents appear with PDL on, never with it off. (A subprocess: the interpreter, on in these
    tests, patches triton.language and cannot compile.)"""
    cases = [(False, False), (True, False)] + ([(True, True)] if name in ("rows", "cols") else [])
    code = ("import sys; from kernels import checks\n"
            f"for pdl, prefetch in {cases!r}:\n"
            f"    ptx = checks.hopper_ptx({name!r}, pdl, prefetch)\n"
            "    print(pdl, 'griddepcontrol.wait' in ptx, 'griddepcontrol.launch_dependents' in ptx)")
    env = {k: v for k, v in os.environ.items() if k != "TRITON_INTERPRET"}
    done = subprocess.run([sys.executable, "-c", code], env=env, capture_output=True, text=True, timeout=300,
                          cwd=Path(__file__).resolve().parents[1])
    assert done.returncode == 0, done.stderr[-2000:]
    lines = done.stdout.split()
    assert len(lines) == 3 * len(cases), done.stdout
    for i, (pdl, _) in enumerate(cases):
        assert lines[3 * i: 3 * i + 3] == [str(pdl)] * 3, (done.stdout, pdl)


def test_pdl_modes_are_checked_and_off_without_hopper():
    from kernels import gemv

    with pytest.raises(ValueError, match="KERNELS_PDL"):
        gemv.set_pdl("2")
    assert gemv.set_pdl("prefetch") == "0" and gemv.PDL is False  # the interpreter (and CPUs) never use PDL
    with gemv.pdl_off():
        assert gemv.PDL_MODE == "0"
