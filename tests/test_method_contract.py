"""The two-faced method contract (methods/__init__.py): a method is one file for every suite, latency included.

A toy method defined in this module alone, with its masked-engine `policy` and its sparse-engine `decode_source`,
is found by harness.decoding.source_for through the method registry and gives the masked engine's logits on the
sparse decode engine; `masked_only` follows from whether a method defines `decode_source`.
"""
import pytest
import torch

from harness.decoding import source_for
from harness.engine import Allocation, MaskPolicy
from harness.errors import HarnessError
from kernels.decode import SparseDecoder, StaticMasks
from kernels.equivalence import relative_errors, sparse_engine_logits
from methods import REGISTRY, Method, discover, has_decode_source, register
from tests.method_policies import PromptDense, masked_logits
from tests.test_latency import F_DIM, H, L, _model

pytestmark = pytest.mark.filterwarnings("ignore::DeprecationWarning")


class EvenPolicy(MaskPolicy):
    """Fixed scores: every even-indexed head and neuron scores 1, every odd one 0 (at half sparsity: the evens)."""

    token_independent = True

    def head_scores(self, layer, state, head_out):
        return (torch.arange(head_out.shape[2]) % 2 == 0).float().expand(*head_out.shape[:3])

    def neuron_scores(self, layer, state, act):
        return (torch.arange(act.shape[-1]) % 2 == 0).float().expand(*act.shape)


class EvenUnits(Method):
    """The toy method: one class, both faces. Its decode source is its own code (not static's)."""

    name = "toy-even"
    description = "toy: even heads and neurons"

    def policy(self, ctx, allocation, artefact):
        return EvenPolicy()

    def decode_source(self, policy, allocation, model):
        assert allocation.heads == allocation.neurons == 0.5
        c = model.config
        return StaticMasks([list(range(0, c.num_attention_heads, 2))] * c.num_hidden_layers,
                           [list(range(0, c.ffn_dim, 2))] * c.num_hidden_layers)


class MaskedOnlyToy(Method):
    name = "toy-masked-only"

    def policy(self, ctx, allocation, artefact):
        return EvenPolicy()


@pytest.fixture
def toys():
    discover()
    added = [register(EvenUnits), register(MaskedOnlyToy)]
    yield added
    for cls in added:
        REGISTRY.pop(cls.name, None)


def test_a_method_defined_in_one_module_runs_on_the_sparse_engine(toys):
    model = _model()
    g = torch.Generator().manual_seed(7)
    prompt, tokens = torch.randint(0, 512, (1, 5), generator=g), torch.randint(0, 512, (6,), generator=g)
    allocation = Allocation(0.5, 0.5)
    expected = masked_logits(model, PromptDense(EvenPolicy()), allocation, prompt, tokens)
    method = EvenUnits(None)
    assert not method.masked_only
    for given in (method, "toy-even"):  # a Method, or its label resolved through the registry
        source = source_for(given, method.policy(None, allocation, None), allocation, model)
        engine = SparseDecoder(model, source, max_len=16, kv="recompute", backend="torch")
        assert engine.heads_kept == [H // 2] * L and engine.neurons_kept == [F_DIM // 2] * L
        errors, agree = relative_errors(sparse_engine_logits(engine, prompt, tokens), expected)
        assert max(errors) < 1e-5 and all(agree), errors


def test_latency_validation_takes_a_method_with_a_decode_source_and_refuses_one_without(toys):
    from types import SimpleNamespace

    from harness.validate import check_methods

    config = SimpleNamespace(allocation="local", scope="token")
    decode = [SimpleNamespace(name="decode", masked=False)]
    check_methods(config, ["toy-even", "dejavu", "static"], decode)
    with pytest.raises(HarnessError, match="toy-masked-only has no mask source for the sparse decode engine"):
        check_methods(config, ["toy-even", "toy-masked-only"], decode)
    model = _model()
    with pytest.raises(HarnessError, match="toy-masked-only has no mask source .* methods with one: .*toy-even"):
        source_for("toy-masked-only", EvenPolicy(), Allocation(0.5, 0.5), model)
    with pytest.raises(HarnessError, match="local allocation"):  # the dispatcher's own checks come first
        source_for("toy-even", EvenPolicy(), Allocation(0.5, 0.5, mode="global"), model)
    with pytest.raises(HarnessError, match="token-scope"):
        source_for("toy-even", EvenPolicy(), Allocation(0.5, 0.5, scope="request"), model)
    assert source_for("toy-masked-only", None, Allocation(0.5, 0.5), model).static  # None policy: dense


def test_masked_only_follows_from_decode_source():
    methods = discover()
    for name, cls in methods.items():
        assert cls.masked_only == (not has_decode_source(cls)), name
    for name in ("dense", "static", "dejavu", "shadow", "timewise"):
        assert has_decode_source(methods[name]), name

    class Inconsistent(Method):
        name = "toy-inconsistent"
        masked_only = True

        def policy(self, ctx, allocation, artefact):
            return None

        def decode_source(self, policy, allocation, model):
            return None

    with pytest.raises(RuntimeError, match="masked_only"):
        register(Inconsistent)
    assert "toy-inconsistent" not in REGISTRY
