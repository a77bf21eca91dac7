"""Properties of the parameterised curves g(y; θ): endpoints, monotonicity, identity, closed-form inversion."""

import itertools
import random

import pytest
import torch

from components.surrogates import bezier
from components.errors import LossforgeError

torch.set_num_threads(1)  # tiny tensors: threads only cost time on a shared CPU

CASES = [("bezier", 1), ("bezier", 2), ("bezier", 3), ("linear", 2), ("linear", 4)]


def _random_thetas(family, pieces, count, seed):
    rng = random.Random(seed)
    k = bezier.num_params(family, pieces)
    thetas = [[rng.random() for _ in range(k)] for _ in range(count)]
    # the faces and corners of the cube are allowed too
    thetas += [[rng.choice([0.0, 1.0]) for _ in range(k)] for _ in range(count // 4)]
    thetas += [[rng.choice([0.0, 1e-9, 1.0 - 1e-9, 1.0, rng.random()]) for _ in range(k)] for _ in range(count // 4)]
    return thetas


def test_parameter_counts_follow_the_paper():
    # 2n + 1 control points, 2n - 1 free ones, two coordinates each
    assert bezier.num_params("bezier", 2) == 6
    assert bezier.num_params("bezier", 4) == 14
    assert bezier.num_params("linear", 3) == 4
    assert len(bezier.control_points(bezier.identity_theta("bezier", 2), "bezier", 2)) == 5


@pytest.mark.parametrize("family,pieces", CASES)
def test_identity_theta_gives_identity(family, pieces):
    ys = torch.linspace(0, 1, 1001, dtype=torch.float64)
    g = bezier.PiecewiseCurve(bezier.identity_theta(family, pieces), family, pieces)
    torch.testing.assert_close(g(ys), ys, atol=1e-12, rtol=0)
    # any θ with θ_u = θ_v is an identity too (control points on the diagonal)
    rng = random.Random(3)
    th = []
    for _ in range(bezier.num_free_points(family, pieces)):
        t = rng.random()
        th += [t, t]
    torch.testing.assert_close(bezier.PiecewiseCurve(th, family, pieces)(ys), ys, atol=1e-9, rtol=0)


@pytest.mark.parametrize("family,pieces", CASES)
def test_endpoints_and_monotone_for_random_theta(family, pieces):
    ys = torch.linspace(0, 1, 4001)
    ends = torch.tensor([0.0, 1.0])
    for theta in _random_thetas(family, pieces, 200, seed=pieces):
        g = bezier.PiecewiseCurve(theta, family, pieces)
        out = g(ys)
        assert torch.isfinite(out).all()
        assert out.min() >= 0.0 and out.max() <= 1.0 + 1e-6
        assert float((out[1:] - out[:-1]).min()) >= -1e-6, theta
        e = g(ends)
        assert float(e[0]) == 0.0 and float(e[1]) == 1.0, (theta, e)


def test_control_points_monotone_and_fixed_ends():
    for theta in _random_thetas("bezier", 3, 100, seed=7):
        pts = bezier.control_points(theta, "bezier", 3)
        assert pts[0] == (0.0, 0.0) and pts[-1] == (1.0, 1.0)
        for (u0, v0), (u1, v1) in itertools.pairwise(pts):
            assert u1 > u0 and v1 > v0


def test_linear_hand_worked_example():
    # θ = (0.5, 0.25) → squeezed (0.5, 0.2505) → one interior knot at (0.5, 0.2505)
    g = bezier.PiecewiseCurve([0.5, 0.25], "linear", 2)
    m = bezier.MARGIN
    v = m + (1 - 2 * m) * 0.25
    assert bezier.control_points([0.5, 0.25], "linear", 2) == [(0.0, 0.0), (0.5, v), (1.0, 1.0)]
    out = g(torch.tensor([0.25, 0.5, 0.75], dtype=torch.float64))
    torch.testing.assert_close(out, torch.tensor([v / 2, v, v + (1 - v) / 2], dtype=torch.float64))


@pytest.mark.parametrize("pieces", [1, 2, 3])
def test_bezier_matches_parametric_definition(pieces):
    """Points (u(s), v(s)) of Eq. 12 computed forward must lie on the evaluated curve g(u) = v."""
    s = torch.linspace(0, 1, 257, dtype=torch.float64)
    for theta in _random_thetas("bezier", pieces, 20, seed=11 + pieces)[:20]:
        pts = torch.tensor(bezier.control_points(theta, "bezier", pieces), dtype=torch.float64)
        g = bezier.PiecewiseCurve(theta, "bezier", pieces)
        for k in range(pieces):
            b0, b1, b2 = pts[2 * k], pts[2 * k + 1], pts[2 * k + 2]
            curve = (1 - s)[:, None] ** 2 * b0 + 2 * (s * (1 - s))[:, None] * b1 + s[:, None] ** 2 * b2
            torch.testing.assert_close(g(curve[:, 0]), curve[:, 1], atol=1e-7, rtol=0)


@pytest.mark.parametrize("family,pieces", CASES)
def test_gradients_finite_everywhere(family, pieces):
    for theta in _random_thetas(family, pieces, 40, seed=5):
        g = bezier.PiecewiseCurve(theta, family, pieces)
        knots = [u for u, _ in bezier.control_points(theta, family, pieces)]
        y = torch.tensor([0.0, 1.0, 0.5, 1e-7, 1 - 1e-7] + knots, requires_grad=True)
        g(y).sum().backward()
        assert torch.isfinite(y.grad).all(), (theta, y.grad)


def test_vectorised_any_shape_and_dtype():
    theta = [0.3, 0.8, 0.4, 0.2, 0.9, 0.6]
    g = bezier.PiecewiseCurve(theta)
    y = torch.rand(2, 3, 4, 5)
    out = g(y)
    assert out.shape == y.shape and out.dtype == torch.float32
    flat = torch.stack([g(v.reshape(1)) for v in y.flatten()]).reshape(y.shape)
    torch.testing.assert_close(out, flat)
    torch.testing.assert_close(g(y.double()).float(), out, atol=1e-6, rtol=0)


def test_bad_theta_and_family_are_clear_errors():
    with pytest.raises(LossforgeError, match="expected 6 values"):
        bezier.PiecewiseCurve([0.5] * 5)
    with pytest.raises(LossforgeError, match="outside"):
        bezier.PiecewiseCurve([0.5] * 5 + [1.5])
    with pytest.raises(LossforgeError, match="outside"):
        bezier.PiecewiseCurve([0.5] * 5 + [float("nan")])
    with pytest.raises(LossforgeError, match="unknown 'spline'"):
        bezier.num_params("spline", 2)
    with pytest.raises(LossforgeError, match="pieces"):
        bezier.num_params("bezier", 0)


def test_sample_curve_for_plots():
    ys, gs = bezier.sample_curve(bezier.identity_theta(), points=11)
    assert len(ys) == 11 and gs[0] == 0.0 and abs(gs[-1] - 1.0) < 1e-12
    assert all(abs(a - b) < 1e-12 for a, b in zip(ys, gs))


@pytest.mark.parametrize("family,pieces", CASES)
def test_analytic_derivative_matches_finite_differences(family, pieces):
    for theta in _random_thetas(family, pieces, 8, seed=21)[:8]:
        g = bezier.PiecewiseCurve(theta, family, pieces)
        knots = [u for u, _ in bezier.control_points(theta, family, pieces)]
        y = torch.rand(64, dtype=torch.float64, generator=torch.Generator().manual_seed(2)) * 0.98 + 0.01
        y = y[torch.tensor([min(abs(v - k) for k in knots) > 1e-4 for v in y.tolist()])]  # away from the knots
        torch.autograd.gradcheck(g, (y.requires_grad_(),), eps=1e-7, atol=1e-5, rtol=1e-4)
