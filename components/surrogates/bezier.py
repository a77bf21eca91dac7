"""Parameterised monotone curves g(y; θ) on [0, 1] for the Auto Seg-Loss surrogates (§4.2 of the paper).

Two families, both with g(0) = 0, g(1) = 1 and g non-decreasing *by construction* for every θ ∈ [0, 1]^k:

- ``"bezier"``: piecewise quadratic Bézier curve with ``pieces`` = n segments and 2n + 1 control points
  B_0 = (0, 0), B_1, ..., B_{2n} = (1, 1). The 2n − 1 free points come from θ by the paper's cumulative
  mapping, per axis: B_i = B_{i−1} + θ_i · (1 − B_{i−1}). k = 2 · (2n − 1) (6 for the default n = 2).
- ``"linear"``: piecewise linear curve through n + 1 knots B_0 = (0, 0), ..., B_n = (1, 1), the n − 1 free
  knots mapped from θ the same way. k = 2 · (n − 1).

θ is a flat list ``[θ_1u, θ_1v, θ_2u, θ_2v, ...]`` (u = input axis y, v = output axis g).
Before the mapping each θ is squeezed into [MARGIN, 1 − MARGIN] so every segment has a positive width on the
u axis: g stays a continuous function (no vertical jumps, exact endpoints) even for θ on the faces of the cube.
Any θ with θ_u = θ_v for every point gives g(y) = y; ``identity_theta`` returns the evenly spaced one.

Evaluation is vectorised torch (0/1 piece masks + closed-form inverse of the quadratic in u, analytic
derivative in a custom autograd Function); it is called on every pixel of every training step. The kernels
(``KERNEL_SOURCE_OBJECTS``) only use torch, so ``metric_surrogates.export_surrogate_module_source`` copies
their source into standalone modules.
"""

from __future__ import annotations

import math
from collections.abc import Sequence

import torch
from torch import nn

from components.errors import LossforgeError

FAMILIES = ("bezier", "linear")
MARGIN = 1e-3  # θ is squeezed into [MARGIN, 1 - MARGIN] before mapping to control points


def _check_family(family: str, pieces: int) -> None:
    if family not in FAMILIES:
        raise LossforgeError(f"curve family: unknown {family!r} (expected one of {', '.join(FAMILIES)})")
    if isinstance(pieces, bool) or not isinstance(pieces, int) or pieces < 1 or pieces > 16:
        raise LossforgeError(f"curve pieces: {pieces!r} is not an integer in [1, 16]")


def num_free_points(family: str, pieces: int) -> int:
    """Number of free 2-d control points (or knots) of a curve."""
    _check_family(family, pieces)
    return 2 * pieces - 1 if family == "bezier" else pieces - 1


def num_params(family: str = "bezier", pieces: int = 2) -> int:
    """Length k of θ for one curve (two coordinates per free control point)."""
    return 2 * num_free_points(family, pieces)


def identity_theta(family: str = "bezier", pieces: int = 2) -> list[float]:
    """θ of the evenly spaced control points on the diagonal: g(y) = y."""
    m = num_free_points(family, pieces)
    total = m + 1  # number of intervals between B_0 and the last point
    out: list[float] = []
    for i in range(1, m + 1):
        t = 1.0 / (total - i + 1)  # (i/total - (i-1)/total) / (1 - (i-1)/total)
        out += [t, t]
    return out


def validate_theta(theta: Sequence[float], family: str = "bezier", pieces: int = 2, name: str = "theta") -> list[float]:
    """Return θ as a list of floats, or raise LossforgeError naming `name` when its length or values are bad."""
    k = num_params(family, pieces)
    try:
        values = [float(v) for v in theta]
    except (TypeError, ValueError):
        raise LossforgeError(f"{name}: expected a list of {k} numbers, got {theta!r}") from None
    if len(values) != k:
        raise LossforgeError(f"{name}: expected {k} values for a {pieces}-piece {family} curve, got {len(values)}")
    for v in values:
        if not (0.0 <= v <= 1.0) or math.isnan(v):
            raise LossforgeError(f"{name}: value {v!r} is outside [0, 1]")
    return values


def control_points(theta: Sequence[float], family: str = "bezier", pieces: int = 2) -> list[tuple[float, float]]:
    """All control points (Bézier) or knots (linear), endpoints included, as (u, v) pairs."""
    values = validate_theta(theta, family, pieces)
    pts = [(0.0, 0.0)]
    u = v = 0.0
    for i in range(0, len(values), 2):
        tu = MARGIN + (1.0 - 2.0 * MARGIN) * values[i]
        tv = MARGIN + (1.0 - 2.0 * MARGIN) * values[i + 1]
        u = u + tu * (1.0 - u)
        v = v + tv * (1.0 - v)
        pts.append((u, v))
    pts.append((1.0, 1.0))
    return pts


def curve_tables(theta: Sequence[float], family: str = "bezier", pieces: int = 2) -> tuple[list[float], list[list[float]]]:
    """(interior knots on u, per-piece rows) consumed by the kernels.

    Bézier rows: [u0, u2, a, v0, v1, v2] with a = (u1 − u0) / (u2 − u0) ∈ (0, 1) (u of the middle point,
    normalised to the piece). Linear rows: [u0, u1, v0, v1].
    """
    pts = control_points(theta, family, pieces)
    step = 2 if family == "bezier" else 1
    rows: list[list[float]] = []
    for p in range(pieces):
        (u0, v0), (u2, v2) = pts[step * p], pts[step * (p + 1)]
        width = u2 - u0
        if family == "bezier":
            u1, v1 = pts[2 * p + 1]
            rows.append([u0, u2, (u1 - u0) / width, v0, v1, v2])
        else:
            rows.append([u0, u2, v0, v2])
    knots = [pts[step * p][0] for p in range(1, pieces)]
    return knots, rows


def piece_masks(y: torch.Tensor, knots: list[float]) -> list[torch.Tensor]:
    """0/1 maps [y >= knot] (in y's dtype), one per interior knot."""
    return [(y >= knot).to(y.dtype) for knot in knots]


def piece_value(masks: list[torch.Tensor], column: list[float]) -> torch.Tensor | float:
    """Per-element value of a per-piece constant: column[k] where knot_{k-1} <= y < knot_k.

    Exact at y = 0 (column[0]); a float for a single piece. Arithmetic on 0/1 masks (much faster on CPU
    than bucketize + gathers)."""
    out: torch.Tensor | float = column[0]
    for k, mask in enumerate(masks):
        step = mask * (column[k + 1] - column[k])
        out = step.add_(out) if isinstance(out, float) else out.add_(step)
    return out


def bezier_value_and_slope(y: torch.Tensor, knots: list[float], rows: list[list[float]]) -> tuple[torch.Tensor, torch.Tensor]:
    """g(y) and dg/dy of a piecewise quadratic Bézier (rows [u0, u2, a, v0, v1, v2] per piece, see curve_tables)."""
    y = y.clamp(0.0, 1.0)
    m = piece_masks(y, knots)
    u0 = piece_value(m, [r[0] for r in rows])
    inv_w = piece_value(m, [1.0 / (r[1] - r[0]) for r in rows])
    a = piece_value(m, [r[2] for r in rows])
    e0 = piece_value(m, [r[3] for r in rows])
    e1 = piece_value(m, [2.0 * (r[4] - r[3]) for r in rows])
    e2 = piece_value(m, [r[3] - 2.0 * r[4] + r[5] for r in rows])
    x = (y - u0).mul_(inv_w).clamp_(0.0, 1.0)
    # u(s) = 2as + (1 − 2a)s² = x  →  s = x / (a + sqrt(a² + (1 − 2a)x)); a² + (1 − 2a)x is written as
    # (a − x)² + x(1 − x): no cancellation, and ≥ min(a, 1 − a)² > 0
    d = (x - a).square_()
    q = (1.0 - x).mul_(x).add_(d).sqrt_().add_(a)
    s = x.div_(q)
    g = (s * e2).add_(e1).mul_(s).add_(e0)
    # dg/dy = (dv/ds) / (du/ds · width) = (e1 + 2 e2 s) / (2 (a + (1 − 2a) s) · width)
    slope = (s * e2).mul_(2.0).add_(e1).mul_(inv_w)
    den = (s * (1.0 - 2.0 * a)).add_(a).mul_(2.0)
    slope.div_(den)
    g.masked_fill_(y >= 1.0, 1.0)  # g(1) = 1 exactly, whatever the rounding of s
    return g, slope


def linear_value_and_slope(y: torch.Tensor, knots: list[float], rows: list[list[float]]) -> tuple[torch.Tensor, torch.Tensor]:
    """g(y) and dg/dy of a piecewise linear curve (rows [u0, u1, v0, v1] per piece, see curve_tables)."""
    y = y.clamp(0.0, 1.0)
    m = piece_masks(y, knots)
    u0 = piece_value(m, [r[0] for r in rows])
    inv_w = piece_value(m, [1.0 / (r[1] - r[0]) for r in rows])
    v0 = piece_value(m, [r[2] for r in rows])
    slope = piece_value(m, [(r[3] - r[2]) / (r[1] - r[0]) for r in rows])
    x = (y - u0).mul_(inv_w).clamp_(0.0, 1.0)
    rise = piece_value(m, [r[3] - r[2] for r in rows])
    g = x.mul_(rise).add_(v0)
    g.masked_fill_(y >= 1.0, 1.0)
    if isinstance(slope, float):
        slope = torch.full_like(y, slope)
    return g, slope


class CurveFunction(torch.autograd.Function):
    """g(y) with its analytic derivative saved for backward (one tensor instead of a graph of ~30 ops)."""

    @staticmethod
    def forward(ctx, y, knots, rows, is_bezier):
        g, slope = (bezier_value_and_slope if is_bezier else linear_value_and_slope)(y, knots, rows)
        ctx.save_for_backward(slope)
        return g

    @staticmethod
    def backward(ctx, grad):
        (slope,) = ctx.saved_tensors
        return grad * slope, None, None, None


def bezier_kernel(y: torch.Tensor, knots: list[float], rows: list[list[float]]) -> torch.Tensor:
    """Evaluate a piecewise quadratic Bézier g at every element of y (any shape), differentiable in y."""
    return CurveFunction.apply(y, knots, rows, True)


def linear_kernel(y: torch.Tensor, knots: list[float], rows: list[list[float]]) -> torch.Tensor:
    """Evaluate a piecewise linear g at every element of y (any shape), differentiable in y."""
    return CurveFunction.apply(y, knots, rows, False)


KERNELS = {"bezier": bezier_kernel, "linear": linear_kernel}
# everything the kernels need, in order: copied verbatim into exported standalone modules
KERNEL_SOURCE_OBJECTS = (piece_masks, piece_value, bezier_value_and_slope, linear_value_and_slope, CurveFunction,
                         bezier_kernel, linear_kernel)


class PiecewiseCurve(nn.Module):
    """g(y; θ) as an nn.Module (no trainable parameters; the per-piece constants are Python floats, so the
    module works on any device and dtype)."""

    def __init__(self, theta: Sequence[float], family: str = "bezier", pieces: int = 2):
        super().__init__()
        self.family, self.pieces = family, pieces
        self.theta = validate_theta(theta, family, pieces)
        self.knots, self.rows = curve_tables(self.theta, family, pieces)

    @property
    def control_points(self) -> list[tuple[float, float]]:
        """Control points (Bézier) or knots (linear), endpoints included."""
        return control_points(self.theta, self.family, self.pieces)

    def forward(self, y: torch.Tensor) -> torch.Tensor:
        return KERNELS[self.family](y, self.knots, self.rows)


def sample_curve(theta: Sequence[float], family: str = "bezier", pieces: int = 2, points: int = 101) -> tuple[list[float], list[float]]:
    """(ys, g(ys)) on an even grid of [0, 1], e.g. for plotting the searched curves."""
    ys = torch.linspace(0.0, 1.0, points, dtype=torch.float64)
    curve = PiecewiseCurve(theta, family, pieces)
    with torch.no_grad():
        gs = curve(ys)
    return ys.tolist(), gs.tolist()
