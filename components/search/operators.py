"""Primitive operators that loss trees are built from, grouped in named operator sets.

Two sets:

* ``autoloss_zero`` -- the 14 operators of Table 1 of the AutoLoss-Zero paper, exactly as defined there
  (ε = 1e-12, sign-preserving Log and Sqrt, Inv = 1/(x+ε), aggregations Mean_nhw, Mean_c and 3×3
  max/min pooling with stride 1 and padding 1, all shape preserving).
* ``cse`` -- the CSE-AutoLoss primitive set (slides, section "Primitive Operators") with the guards of
  the released CSE-AutoLoss code: log(x + 1e-20), sqrt(x + 1e-20), x / (y + 1e-20), exp clamped at 88.
  ``softmax`` acts over channels; ``dot`` sums x·y over channels and broadcasts the result back over
  the channels so the shape is kept (so Eq. 3, which sums over C, counts a dot product C times).

Tensors have shape ``(*batch, N, C, H, W)``; aggregations act on the last four dims only.

Every :class:`Operator` carries its arity, its torch function, its SymPy form, a LaTeX and a plain-text
template, and ``torch_src`` -- the source code of its torch function, which the standalone ``.py``
export copies verbatim, so the exported module computes exactly what the in-process loss computes.
The torch functions below therefore use only ``torch`` and the module constants ``EPS``, ``CSE_EPS``
and ``CSE_EXP_MAX`` (which the export writes out too).
"""

from __future__ import annotations

import inspect
from dataclasses import dataclass, field
from typing import Callable

import sympy
import torch

from components.errors import LossforgeError

EPS = 1e-12
"""ε of Table 1 (AutoLoss-Zero)."""
CSE_EPS = 1e-20
"""Guard of the CSE-AutoLoss code for log, sqrt and division."""
CSE_EXP_MAX = 88.0
"""CSE-AutoLoss clamps the argument of exp at 88 (exp(88) is still finite in float32)."""

CONSTANT_VALUES: dict[str, float] = {"1": 1.0, "2": 2.0, "3": 3.0}
"""Constant leaves: a leaf named "1" evaluates to a tensor of ones, and so on."""


@dataclass(frozen=True)
class Operator:
    """One primitive operator.

    ``fn`` takes ``arity`` tensors and returns a tensor of the same shape; ``sympy_fn`` takes SymPy
    expressions; ``latex`` and ``text`` are ``str.format`` templates over the children's renderings
    (``{0}``, ``{1}``); ``precedence`` tells the text printer when to bracket (higher binds tighter);
    ``torch_src`` is the source of ``fn`` used by the ``.py`` export.
    """

    name: str
    arity: int
    fn: Callable[..., torch.Tensor] = field(repr=False)
    sympy_fn: Callable[..., sympy.Expr] = field(repr=False)
    latex: str
    torch_src: str = field(repr=False)
    text: str = ""
    precedence: int = 100
    commutative: bool = False

    @property
    def fn_name(self) -> str:
        """Name of the torch function (what the exported source calls)."""
        return self.fn.__name__


# --------------------------------------------------------------------------------------------
# Torch functions. Keep them self-contained: their source is copied into exported modules.
# --------------------------------------------------------------------------------------------


def azl_add(x, y):
    return x + y


def azl_mul(x, y):
    return x * y


def azl_neg(x):
    return -x


def azl_abs(x):
    return torch.abs(x)


def azl_inv(x):
    return 1.0 / (x + EPS)


def azl_log(x):
    return torch.sign(x) * torch.log(torch.abs(x) + EPS)


def azl_exp(x):
    return torch.exp(x)


def azl_tanh(x):
    return torch.tanh(x)


def azl_square(x):
    return x * x


def azl_sqrt(x):
    return torch.sign(x) * torch.sqrt(torch.abs(x) + EPS)


def azl_mean_nhw(x):
    return x.mean(dim=(-4, -2, -1), keepdim=True).expand_as(x)


def azl_mean_c(x):
    return x.mean(dim=-3, keepdim=True).expand_as(x)


def azl_max_pool3(x):
    flat = x.reshape(-1, 1, x.shape[-2], x.shape[-1])
    pooled = torch.nn.functional.max_pool2d(flat, kernel_size=3, stride=1, padding=1)
    return pooled.reshape(x.shape)


def azl_min_pool3(x):
    flat = -x.reshape(-1, 1, x.shape[-2], x.shape[-1])
    pooled = torch.nn.functional.max_pool2d(flat, kernel_size=3, stride=1, padding=1)
    return -pooled.reshape(x.shape)


def cse_neg(x):
    return -x


def cse_exp(x):
    return torch.exp(torch.clamp(x, max=CSE_EXP_MAX))


def cse_log(x):
    return torch.log(x + CSE_EPS)


def cse_abs(x):
    return torch.abs(x)


def cse_sqrt(x):
    return torch.sqrt(x + CSE_EPS)


def cse_softmax(x):
    return torch.softmax(x, dim=-3)


def cse_softplus(x):
    return torch.nn.functional.softplus(x)


def cse_sigmoid(x):
    return torch.sigmoid(x)


def cse_gd(x):
    return 2.0 * torch.atan(torch.tanh(0.5 * x))


def cse_alf(x):
    return x / torch.sqrt(1.0 + x * x)


def cse_erf(x):
    return torch.erf(x)


def cse_erfc(x):
    return torch.erfc(x)


def cse_tanh(x):
    return torch.tanh(x)


def cse_relu(x):
    return torch.relu(x)


def cse_sin(x):
    return torch.sin(x)


def cse_cos(x):
    return torch.cos(x)


def cse_add(x, y):
    return x + y


def cse_sub(x, y):
    return x - y


def cse_mul(x, y):
    return x * y


def cse_div(x, y):
    return x / (y + CSE_EPS)


def cse_dot(x, y):
    x, y = torch.broadcast_tensors(x, y)
    return (x * y).sum(dim=-3, keepdim=True).expand_as(x)


# --------------------------------------------------------------------------------------------
# SymPy forms. Aggregations and pools are named undefined functions; Log and Sqrt of Table 1 are
# sign-preserving, so they are SLog / SSqrt, which turn into plain log / sqrt as soon as SymPy knows
# the argument is positive (ε guards are left out, as in the paper's Table 8).
# --------------------------------------------------------------------------------------------


class _Named(sympy.Function):
    """An undefined SymPy function printed in LaTeX with a fixed name."""

    _latex_name = ""

    def _latex(self, printer):
        args = ", ".join(printer._print(a) for a in self.args)
        return rf"{self._latex_name}\left({args}\right)"


class MeanNHW(_Named):
    """Mean over (n, h, w), broadcast back."""

    nargs = 1
    _latex_name = r"\mathrm{Mean}_{nhw}"


class MeanC(_Named):
    """Mean over channels, broadcast back."""

    nargs = 1
    _latex_name = r"\mathrm{Mean}_{c}"


class MaxPool3(_Named):
    """3×3 max pooling, stride 1, padding 1."""

    nargs = 1
    _latex_name = r"\mathrm{Max\text{-}Pooling}"


class MinPool3(_Named):
    """3×3 min pooling, stride 1, padding 1."""

    nargs = 1
    _latex_name = r"\mathrm{Min\text{-}Pooling}"


class Softmax(_Named):
    """Softmax over channels."""

    nargs = 1
    _latex_name = r"\mathrm{softmax}"


class Gd(_Named):
    """Gudermannian function 2·atan(tanh(x/2))."""

    nargs = 1
    _latex_name = r"\mathrm{gd}"


class Dot(_Named):
    """Dot product over channels, broadcast back."""

    nargs = 2
    _latex_name = r"\mathrm{dot}"


class SLog(sympy.Function):
    """Sign-preserving log of Table 1: sign(x)·log(|x|) (ε omitted)."""

    nargs = 1

    @classmethod
    def eval(cls, x):
        if x.is_positive:
            return sympy.log(x)
        if x.is_negative:
            return -sympy.log(-x)
        if x.is_zero:
            return sympy.Integer(0)
        return None

    def _latex(self, printer):
        return rf"\log\left({printer._print(self.args[0])}\right)"


class SSqrt(sympy.Function):
    """Sign-preserving square root of Table 1: sign(x)·sqrt(|x|) (ε omitted)."""

    nargs = 1

    @classmethod
    def eval(cls, x):
        if x.is_nonnegative:
            return sympy.sqrt(x)
        if x.is_negative:
            return -sympy.sqrt(-x)
        return None

    def _latex(self, printer):
        return rf"\sqrt{{{printer._print(self.args[0])}}}"


def _op(fn, arity, sympy_fn, latex, text, precedence=100, commutative=False) -> Operator:
    name = fn.__name__.split("_", 1)[1]
    return Operator(
        name=name,
        arity=arity,
        fn=fn,
        sympy_fn=sympy_fn,
        latex=latex,
        torch_src=inspect.getsource(fn),
        text=text,
        precedence=precedence,
        commutative=commutative,
    )


# Precedences for the text printer: 10 sum, 20 product, 30 unary minus, 40 power, 100 atom/call.
_AUTOLOSS_ZERO = [
    _op(azl_add, 2, lambda a, b: a + b, r"{0} + {1}", "{0} + {1}", 10, True),
    _op(azl_mul, 2, lambda a, b: a * b, r"{0} \cdot {1}", "{0} * {1}", 20, True),
    _op(azl_neg, 1, lambda a: -a, r"-{0}", "-{0}", 30),
    _op(azl_abs, 1, sympy.Abs, r"\left|{0}\right|", "|{0}|"),
    _op(azl_inv, 1, lambda a: 1 / a, r"\frac{{1}}{{{0}}}", "1/{0}", 20),
    _op(azl_log, 1, SLog, r"\log\left({0}\right)", "log({0})"),
    _op(azl_exp, 1, sympy.exp, r"\exp\left({0}\right)", "exp({0})"),
    _op(azl_tanh, 1, sympy.tanh, r"\tanh\left({0}\right)", "tanh({0})"),
    _op(azl_square, 1, lambda a: a**2, r"{0}^{{2}}", "{0}^2", 40),
    _op(azl_sqrt, 1, SSqrt, r"\sqrt{{{0}}}", "sqrt({0})"),
    _op(azl_mean_nhw, 1, MeanNHW, r"\mathrm{{Mean}}_{{nhw}}\left({0}\right)", "Mean_nhw({0})"),
    _op(azl_mean_c, 1, MeanC, r"\mathrm{{Mean}}_{{c}}\left({0}\right)", "Mean_c({0})"),
    _op(azl_max_pool3, 1, MaxPool3, r"\mathrm{{Max\text{{-}}Pooling}}\left({0}\right)", "MaxPool3({0})"),
    _op(azl_min_pool3, 1, MinPool3, r"\mathrm{{Min\text{{-}}Pooling}}\left({0}\right)", "MinPool3({0})"),
]

_CSE = [
    _op(cse_neg, 1, lambda a: -a, r"-{0}", "-{0}", 30),
    _op(cse_exp, 1, sympy.exp, r"\exp\left({0}\right)", "exp({0})"),
    _op(cse_log, 1, sympy.log, r"\log\left({0}\right)", "log({0})"),
    _op(cse_abs, 1, sympy.Abs, r"\left|{0}\right|", "|{0}|"),
    _op(cse_sqrt, 1, sympy.sqrt, r"\sqrt{{{0}}}", "sqrt({0})"),
    _op(cse_softmax, 1, Softmax, r"\mathrm{{softmax}}\left({0}\right)", "softmax({0})"),
    _op(cse_softplus, 1, lambda a: sympy.log(1 + sympy.exp(a)), r"\mathrm{{softplus}}\left({0}\right)", "softplus({0})"),
    _op(cse_sigmoid, 1, lambda a: 1 / (1 + sympy.exp(-a)), r"\sigma\left({0}\right)", "sigmoid({0})"),
    _op(cse_gd, 1, Gd, r"\mathrm{{gd}}\left({0}\right)", "gd({0})"),
    _op(cse_alf, 1, lambda a: a / sympy.sqrt(1 + a**2), r"\mathrm{{alf}}\left({0}\right)", "alf({0})"),
    _op(cse_erf, 1, sympy.erf, r"\mathrm{{erf}}\left({0}\right)", "erf({0})"),
    _op(cse_erfc, 1, sympy.erfc, r"\mathrm{{erfc}}\left({0}\right)", "erfc({0})"),
    _op(cse_tanh, 1, sympy.tanh, r"\tanh\left({0}\right)", "tanh({0})"),
    _op(cse_relu, 1, lambda a: sympy.Max(0, a), r"\mathrm{{relu}}\left({0}\right)", "relu({0})"),
    _op(cse_sin, 1, sympy.sin, r"\sin\left({0}\right)", "sin({0})"),
    _op(cse_cos, 1, sympy.cos, r"\cos\left({0}\right)", "cos({0})"),
    _op(cse_add, 2, lambda a, b: a + b, r"{0} + {1}", "{0} + {1}", 10, True),
    _op(cse_sub, 2, lambda a, b: a - b, r"{0} - {1}", "{0} - {1}", 10),
    _op(cse_mul, 2, lambda a, b: a * b, r"{0} \cdot {1}", "{0} * {1}", 20, True),
    _op(cse_div, 2, lambda a, b: a / b, r"\frac{{{0}}}{{{1}}}", "{0} / {1}", 20),
    _op(cse_dot, 2, Dot, r"\mathrm{{dot}}\left({0}, {1}\right)", "dot({0}, {1})", 100, True),
]

OPERATOR_SETS: dict[str, dict[str, Operator]] = {
    "autoloss_zero": {op.name: op for op in _AUTOLOSS_ZERO},
    "cse": {op.name: op for op in _CSE},
}
"""Named operator sets: name -> {operator name -> Operator}, in a fixed order (used for sampling)."""

OPERATOR_SET_CONSTANTS: dict[str, tuple[str, ...]] = {
    "autoloss_zero": ("1",),
    "cse": ("1", "2", "3"),
}
"""Constant leaves each operator set may use (AutoLoss-Zero: the constant 1; CSE-AutoLoss: 1, 2, 3)."""


def get_operator_set(name: str) -> dict[str, Operator]:
    """Return the operator set called `name`; an unknown name is a LossforgeError listing the known ones."""
    try:
        return OPERATOR_SETS[name]
    except (KeyError, TypeError):
        known = ", ".join(OPERATOR_SETS)
        raise LossforgeError(f"unknown operator set {name!r} (known: {known})") from None
