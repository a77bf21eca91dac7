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

Evaluation is vectorised torch (bucketize + gather + closed-form inverse of the quadratic in u); it is called
on every pixel of every training step. The kernels ``bezier_kernel`` / ``linear_kernel`` only use torch so
``metric_surrogates.export_surrogate_module_source`` copies their source into standalone modules.
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


def bezier_kernel(y: torch.Tensor, knots: torch.Tensor, table: torch.Tensor) -> torch.Tensor:
    """Evaluate a piecewise quadratic Bézier g at every element of y (any shape), see curve_tables()."""
    y = y.clamp(0.0, 1.0)
    idx = torch.bucketize(y.detach().contiguous(), knots, right=True)
    u0, u2, a = table[:, 0][idx], table[:, 1][idx], table[:, 2][idx]
    v0, v1, v2 = table[:, 3][idx], table[:, 4][idx], table[:, 5][idx]
    x = ((y - u0) / (u2 - u0).clamp_min(1e-30)).clamp(0.0, 1.0)
    x = torch.where(y >= u2, torch.ones_like(x), x)
    # u(s) = 2as + (1 − 2a)s² = x  →  s = x / (a + sqrt(a² + (1 − 2a)x)); a² + (1 − 2a)x is written as
    # (a − x)² + x(1 − x) (no cancellation, ≥ min(a, 1 − a)² > 0), and s = 1 exactly at the piece end.
    s = x / (a + torch.sqrt(((a - x) ** 2 + x * (1.0 - x)).clamp_min(1e-30)))
    s = torch.where(x >= 1.0, torch.ones_like(s), s)
    t = 1.0 - s
    return t * t * v0 + 2.0 * s * t * v1 + s * s * v2


def linear_kernel(y: torch.Tensor, knots: torch.Tensor, table: torch.Tensor) -> torch.Tensor:
    """Evaluate a piecewise linear g at every element of y (any shape), see curve_tables()."""
    y = y.clamp(0.0, 1.0)
    idx = torch.bucketize(y.detach().contiguous(), knots, right=True)
    u0, u2, v0, v1 = table[:, 0][idx], table[:, 1][idx], table[:, 2][idx], table[:, 3][idx]
    x = ((y - u0) / (u2 - u0).clamp_min(1e-30)).clamp(0.0, 1.0)
    x = torch.where(y >= u2, torch.ones_like(x), x)
    return v0 * (1.0 - x) + v1 * x


KERNELS = {"bezier": bezier_kernel, "linear": linear_kernel}


class PiecewiseCurve(nn.Module):
    """g(y; θ) as an nn.Module (no trainable parameters; the tables are buffers that follow .to(device))."""

    def __init__(self, theta: Sequence[float], family: str = "bezier", pieces: int = 2):
        super().__init__()
        self.family, self.pieces = family, pieces
        self.theta = validate_theta(theta, family, pieces)
        knots, rows = curve_tables(self.theta, family, pieces)
        # float64 tables, cast to the input's dtype/device at every call (exact for float64 inputs)
        self.register_buffer("knots", torch.tensor(knots, dtype=torch.float64), persistent=False)
        self.register_buffer("table", torch.tensor(rows, dtype=torch.float64), persistent=False)

    @property
    def control_points(self) -> list[tuple[float, float]]:
        """Control points (Bézier) or knots (linear), endpoints included."""
        return control_points(self.theta, self.family, self.pieces)

    def forward(self, y: torch.Tensor) -> torch.Tensor:
        return KERNELS[self.family](y, self.knots.to(y), self.table.to(y))


def sample_curve(theta: Sequence[float], family: str = "bezier", pieces: int = 2, points: int = 101) -> tuple[list[float], list[float]]:
    """(ys, g(ys)) on an even grid of [0, 1], e.g. for plotting the searched curves."""
    ys = torch.linspace(0.0, 1.0, points, dtype=torch.float64)
    curve = PiecewiseCurve(theta, family, pieces)
    with torch.no_grad():
        gs = curve(ys)
    return ys.tolist(), gs.tolist()
