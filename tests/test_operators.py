"""Every primitive operator against hand-computed values (ε guards, pools at the borders, batching)."""

import inspect
import math

import pytest
import sympy
import torch

from components.errors import LossforgeError
from components.search.operators import (
    CSE_EPS,
    EPS,
    OPERATOR_SET_CONSTANTS,
    OPERATOR_SETS,
    SLog,
    SSqrt,
    get_operator_set,
)

AZL = OPERATOR_SETS["autoloss_zero"]
CSE = OPERATOR_SETS["cse"]


def t64(*values):
    return torch.tensor(values, dtype=torch.float64)


def grid(rows, dtype=torch.float64):
    """A (1, 1, H, W) tensor from a list of rows."""
    return torch.tensor(rows, dtype=dtype).reshape(1, 1, len(rows), len(rows[0]))


def test_set_contents_match_the_papers():
    assert list(AZL) == ["add", "mul", "neg", "abs", "inv", "log", "exp", "tanh", "square", "sqrt",
                         "mean_nhw", "mean_c", "max_pool3", "min_pool3"]
    assert sorted(CSE) == sorted(["neg", "exp", "log", "abs", "sqrt", "softmax", "softplus", "sigmoid", "gd",
                                  "alf", "erf", "erfc", "tanh", "relu", "sin", "cos", "add", "sub", "mul",
                                  "div", "dot"])
    assert EPS == 1e-12
    assert OPERATOR_SET_CONSTANTS == {"autoloss_zero": ("1",), "cse": ("1", "2", "3")}
    binary = {n for n, op in AZL.items() if op.arity == 2}
    assert binary == {"add", "mul"}
    assert {n for n, op in CSE.items() if op.arity == 2} == {"add", "sub", "mul", "div", "dot"}


def test_get_operator_set_unknown_name_is_a_clear_error():
    assert get_operator_set("cse") is CSE
    with pytest.raises(LossforgeError, match="unknown operator set 'nope'.*autoloss_zero"):
        get_operator_set("nope")


@pytest.mark.parametrize("set_name", ["autoloss_zero", "cse"])
def test_operator_metadata_is_consistent(set_name):
    x, y = sympy.symbols("x y", positive=True)
    for name, op in OPERATOR_SETS[set_name].items():
        assert op.name == name
        assert len(inspect.signature(op.fn).parameters) == op.arity
        assert f"def {op.fn_name}(" in op.torch_src
        assert isinstance(op.sympy_fn(*(x, y)[: op.arity]), sympy.Expr)
        op.latex.format(*["a", "b"][: op.arity])
        op.text.format(*["a", "b"][: op.arity])


@pytest.mark.parametrize("set_name", ["autoloss_zero", "cse"])
def test_every_operator_keeps_the_shape(set_name):
    a = torch.rand(2, 3, 4, 5) + 0.1
    b = torch.rand(2, 3, 4, 5) + 0.1
    for op in OPERATOR_SETS[set_name].values():
        out = op.fn(*(a, b)[: op.arity])
        assert out.shape == a.shape, op.name
        assert torch.isfinite(out).all(), op.name


def test_elementwise_autoloss_zero_hand_values():
    assert torch.equal(AZL["add"].fn(t64(1, 2), t64(3, -4)), t64(4, -2))
    assert torch.equal(AZL["mul"].fn(t64(1.5, 2), t64(2, -4)), t64(3, -8))
    assert torch.equal(AZL["neg"].fn(t64(1, -2)), t64(-1, 2))
    assert torch.equal(AZL["abs"].fn(t64(-3, 2)), t64(3, 2))
    assert torch.equal(AZL["square"].fn(t64(-3, 0.5)), t64(9, 0.25))
    assert torch.allclose(AZL["exp"].fn(t64(0, 1)), t64(1, math.e))
    assert torch.allclose(AZL["tanh"].fn(t64(0, 1)), t64(0, math.tanh(1)))


def test_inv_adds_eps_to_the_denominator():
    out = AZL["inv"].fn(t64(0, 1, 4))
    assert out[0] == pytest.approx(1e12)
    assert out[1] == 1 / (1 + 1e-12)
    assert out[2] == pytest.approx(0.25)
    assert torch.isinf(AZL["inv"].fn(t64(-1e-12)))[0]  # exactly as Table 1: 1/(x + ε), no abs


def test_log_is_sign_preserving_with_eps():
    out = AZL["log"].fn(t64(0, math.e, -math.e, 1, -1e-30))
    assert out[0] == 0  # sign(0) = 0
    assert out[1] == pytest.approx(1.0)
    assert out[2] == pytest.approx(-1.0)
    assert out[3] == pytest.approx(1e-12, rel=1e-3)  # log(1 + ε)
    assert out[4] == pytest.approx(-math.log(1e-12), rel=1e-6)  # -log(|x| + ε) with |x| << ε


def test_sqrt_is_sign_preserving_with_eps():
    out = AZL["sqrt"].fn(t64(0, 4, -9, 1e-30))
    assert out[0] == 0
    assert out[1] == pytest.approx(2.0)
    assert out[2] == pytest.approx(-3.0)
    assert out[3] == pytest.approx(1e-6, rel=1e-6)  # sqrt(ε)


def test_mean_nhw_and_mean_c_by_hand():
    # x[n, c, h, w]: N=2, C=2, H=1, W=2
    x = torch.tensor([[[[1.0, 2.0]], [[10.0, 20.0]]], [[[3.0, 4.0]], [[30.0, 40.0]]]])
    nhw = AZL["mean_nhw"].fn(x)
    assert torch.equal(nhw[:, 0], torch.full((2, 1, 2), 2.5))  # (1+2+3+4)/4
    assert torch.equal(nhw[:, 1], torch.full((2, 1, 2), 25.0))
    c = AZL["mean_c"].fn(x)
    assert torch.equal(c[0, 0], torch.tensor([[5.5, 11.0]]))
    assert torch.equal(c[1, 1], torch.tensor([[16.5, 22.0]]))


def test_pools_use_only_real_neighbours_at_borders():
    x = grid([[1, 2, 3], [4, 5, 6], [7, 8, 9]])
    assert torch.equal(AZL["max_pool3"].fn(x), grid([[5, 6, 6], [8, 9, 9], [8, 9, 9]]))
    assert torch.equal(AZL["min_pool3"].fn(x), grid([[1, 1, 2], [1, 1, 2], [4, 4, 5]]))
    # negative values: zero padding would show up as 0 at the borders
    assert torch.equal(AZL["max_pool3"].fn(-x), grid([[-1, -1, -2], [-1, -1, -2], [-4, -4, -5]]))
    # positive values: a min-pool padded with zeros would give 0 on the border
    assert AZL["min_pool3"].fn(x + 10).min() == 11


def test_pools_and_means_treat_leading_dims_as_independent_problems():
    torch.manual_seed(0)
    x = torch.randn(3, 2, 4, 5, 6)  # (B, N, C, H, W)
    for name in ("max_pool3", "min_pool3", "mean_nhw", "mean_c"):
        batched = AZL[name].fn(x)
        for b in range(3):
            assert torch.allclose(batched[b], AZL[name].fn(x[b])), name


def test_cse_guards_and_values():
    assert CSE["log"].fn(t64(0))[0] == pytest.approx(math.log(CSE_EPS))
    assert CSE["log"].fn(t64(math.e))[0] == pytest.approx(1.0)
    assert CSE["sqrt"].fn(t64(0))[0] == pytest.approx(1e-10)
    assert CSE["div"].fn(t64(3.0), t64(0.0))[0] == pytest.approx(3e20)
    assert CSE["div"].fn(t64(3.0), t64(2.0))[0] == pytest.approx(1.5)
    big = CSE["exp"].fn(torch.tensor([1000.0]))
    assert torch.isfinite(big).all() and big[0] == pytest.approx(math.exp(88), rel=1e-5)
    assert CSE["gd"].fn(t64(1.0))[0] == pytest.approx(2 * math.atan(math.tanh(0.5)))
    assert CSE["gd"].fn(t64(1.0))[0] == pytest.approx(0.8657694832396586)
    assert CSE["alf"].fn(t64(1.0))[0] == pytest.approx(1 / math.sqrt(2))
    assert CSE["softplus"].fn(t64(0.0))[0] == pytest.approx(math.log(2))
    assert CSE["sigmoid"].fn(t64(0.0))[0] == 0.5
    assert CSE["erf"].fn(t64(0.5))[0] == pytest.approx(math.erf(0.5))
    assert CSE["erfc"].fn(t64(0.5))[0] == pytest.approx(math.erfc(0.5))
    assert torch.equal(CSE["relu"].fn(t64(-1, 2)), t64(0, 2))
    assert CSE["sin"].fn(t64(1.0))[0] == pytest.approx(math.sin(1))
    assert CSE["cos"].fn(t64(1.0))[0] == pytest.approx(math.cos(1))
    assert torch.equal(CSE["sub"].fn(t64(5), t64(7)), t64(-2))


def test_cse_softmax_and_dot_act_over_channels():
    x = torch.tensor([[[[0.0]], [[math.log(3.0)]]]], dtype=torch.float64)  # N=1, C=2, H=W=1
    sm = CSE["softmax"].fn(x)
    assert torch.allclose(sm.flatten(), t64(0.25, 0.75))
    a = torch.tensor([[[[1.0, 2.0]], [[3.0, 4.0]]]])  # C=2, W=2
    b = torch.tensor([[[[5.0, 6.0]], [[7.0, 8.0]]]])
    d = CSE["dot"].fn(a, b)
    assert d.shape == a.shape
    assert torch.equal(d[0, 0], torch.tensor([[26.0, 44.0]]))  # 1*5+3*7, 2*6+4*8
    assert torch.equal(d[0, 1], d[0, 0])  # broadcast back over channels


def test_sympy_sign_preserving_functions():
    p = sympy.Symbol("p", positive=True)
    r = sympy.Symbol("r", real=True)
    assert SLog(p) == sympy.log(p)
    assert SLog(-p) == -sympy.log(p)
    assert SLog(sympy.Integer(0)) == 0
    assert isinstance(SLog(r), SLog)
    assert SSqrt(sympy.Integer(4)) == 2
    assert SSqrt(sympy.Integer(-9)) == -3
    assert isinstance(SSqrt(r), SSqrt)
