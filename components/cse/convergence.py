"""Convergence-property verification of CSE-AutoLoss (slides, "Convergence-Simulation Modules"): cheap checks on
sampled inputs that every branch tree must pass before a detector is trained with it.

Classification (inputs x logits, y one-hot, w IoU weight): *monotone and convergent* in the sense of the
slides' BCE derivation (∂BCE/∂x = −1 + σ(x): negative everywhere, zero only as x → ∞). On `logit_samples`
sampled proposals (C classes, the other logits uniform in [−3, 3]) the target logit x_t is swept over a grid
in [−6, 3]:

* monotone: ∂L/∂x_t < 0 at every grid point (a descent step raises the target logit), and |∂L/∂x_t| ≥
  `min_gradient` where x_t ≤ 0 (the gradient does not vanish far from the optimum: a flat stretch there counts
  as not monotone);
* convergent: |∂L/∂x_t| ≤ `gradient_tolerance` at the optimum, x_t = 30 (the target's softmax probability is 1 in
  float64 up to e⁻²⁷).

Decisions: the target is a foreground class and w = 1 (the optimum of a proposal: its class certain and its
box perfect). The grid stops at x_t = 3 (σ = 0.95): CSE-AutoLoss-B's target-logit gradient turns positive at
x_t ≈ 3.7 for w = 1 (its minimum lies at σ ≈ 0.98, not at infinity), so "monotone up to near-certainty" is what
the published losses satisfy; its gradient still vanishes at x_t = 30. Background targets are left out because
sigmoid-form losses of one-stage detectors (CSE-AutoLoss-B) treat the background as all-zero targets, and w < 1
because there the optimum of an IoU-aware target (B) is a finite logit. Only the target logit is checked (the slides' criterion), in float64; losses and gradients must
also be finite once cast to float32, the precision a detector trains in.

Regression (inputs i, u, e): *distance-loss consistency*: on `box_samples` sampled pairs (target box T, start
box P₀ in a 128-pixel frame, some of them not overlapping T) the predicted box moves to T along the straight
line of its corners, P(α) = T + α (P₀ − T), α = 1 → 0 in 16 steps. The loss must never rise on the way
(relative tolerance 1e-6: flat stretches, e.g. IoU loss while the boxes do not overlap, are allowed) and must
end strictly lower at T than at P₀.

Every verdict carries its own rejection reason (`REASONS`), which the `cse` method counts in its funnel.
"""

from __future__ import annotations

import time
from dataclasses import dataclass
from typing import Any

import torch

from components.tasks.detection.losses import box_areas

CLS_NOT_FINITE = "cls_not_finite"
CLS_NOT_MONOTONE = "cls_not_monotone"
CLS_NOT_CONVERGENT = "cls_not_convergent"
REG_NOT_FINITE = "reg_not_finite"
REG_INCONSISTENT = "reg_inconsistent"
REASONS = (CLS_NOT_FINITE, CLS_NOT_MONOTONE, CLS_NOT_CONVERGENT, REG_NOT_FINITE, REG_INCONSISTENT)
"""Rejection reasons of the convergence checks (funnel counters `rejected_<reason>`)."""

GRID = torch.linspace(-6.0, 3.0, 10, dtype=torch.float64)
OPTIMUM_LOGIT = 30.0
PATH_STEPS = 16
FRAME = 128.0


@dataclass(frozen=True)
class Verdict:
    """Outcome of one check: accepted, or the rejection reason and a one-line detail."""

    accepted: bool
    reason: str = ""
    detail: str = ""
    seconds: float = 0.0


@dataclass(frozen=True)
class ConvergenceProbe:
    """The sampled inputs of both checks (built once per search from a seed; see `build_probe`)."""

    logits: torch.Tensor  # (S, G, C): sample s at grid point g (target logit = GRID[g])
    labels: torch.Tensor  # (S,) foreground targets
    optimum: torch.Tensor  # (S, C): the same samples with the target logit at OPTIMUM_LOGIT
    paths: torch.Tensor  # (S, PATH_STEPS + 1, 4): predicted boxes from P0 (index 0) to T (last)
    targets: torch.Tensor  # (S, 4)
    min_gradient: float
    gradient_tolerance: float


def build_probe(seed: int = 0, *, num_classes: int = 5, logit_samples: int = 32, box_samples: int = 64,
                min_gradient: float = 1e-4, gradient_tolerance: float = 1e-3) -> ConvergenceProbe:
    """Sampled logits and box paths for the checks, drawn from a generator seeded by `seed` (deterministic)."""
    g = torch.Generator().manual_seed(seed)
    s, c, k = logit_samples, num_classes, len(GRID)
    others = torch.rand(s, c, generator=g, dtype=torch.float64) * 6 - 3
    labels = torch.randint(1, c, (s,), generator=g)
    rows = torch.arange(s)
    logits = others[:, None, :].repeat(1, k, 1)
    logits[rows[:, None], torch.arange(k)[None, :], labels[:, None]] = GRID[None, :]
    optimum = others.clone()
    optimum[rows, labels] = OPTIMUM_LOGIT
    # target boxes 8-64 px wide; starts: a jittered box (overlapping or not) of 4-96 px
    size = lambda n, lo, hi: lo + torch.rand(n, 2, generator=g, dtype=torch.float64) * (hi - lo)  # noqa: E731
    t_wh = size(box_samples, 8, 64)
    t_xy = torch.rand(box_samples, 2, generator=g, dtype=torch.float64) * (FRAME - t_wh)
    targets = torch.cat([t_xy, t_xy + t_wh], dim=1)
    p_wh = size(box_samples, 4, 96)
    p_c = t_xy + t_wh / 2 + (torch.rand(box_samples, 2, generator=g, dtype=torch.float64) - 0.5) * 2 * (t_wh + p_wh)
    starts = torch.cat([p_c - p_wh / 2, p_c + p_wh / 2], dim=1)
    alpha = torch.linspace(1.0, 0.0, PATH_STEPS + 1, dtype=torch.float64)
    paths = targets[:, None, :] + alpha[None, :, None] * (starts - targets)[:, None, :]
    return ConvergenceProbe(logits, labels, optimum, paths, targets, float(min_gradient), float(gradient_tolerance))


def _target_gradient(tree: Any, logits: torch.Tensor, labels: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """(∂(per-proposal loss)/∂x_t, tree output) for logits (..., C) and labels broadcast to (...); w = 1."""
    x = logits.detach().clone().requires_grad_(True)
    c = x.shape[-1]
    y = torch.nn.functional.one_hot(labels, c).to(x.dtype).expand_as(x)
    inputs = {"x": x[..., None, None], "y": y[..., None, None], "w": torch.ones_like(x)[..., None, None]}
    out = tree.evaluate(inputs)
    grad = torch.autograd.grad(out.sum(), x, allow_unused=True)[0] if out.requires_grad else None
    if grad is None:  # the loss does not depend on the logits: a zero gradient (not monotone)
        grad = torch.zeros_like(x)
    return grad.gather(-1, labels.expand(x.shape[:-1]).unsqueeze(-1)).squeeze(-1), out


def check_classification(tree: Any, probe: ConvergenceProbe) -> Verdict:
    """Monotone and convergent in the target logit (module docstring)."""
    start = time.perf_counter()
    s, k, _ = probe.logits.shape
    try:
        with torch.enable_grad():
            grad, out = _target_gradient(tree, probe.logits, probe.labels[:, None].expand(s, k))
            grad_opt, out_opt = _target_gradient(tree, probe.optimum, probe.labels)
    except (RuntimeError, ValueError) as exc:
        return Verdict(False, CLS_NOT_FINITE, f"evaluation failed: {exc}", time.perf_counter() - start)
    seconds = lambda: time.perf_counter() - start  # noqa: E731
    if not all(torch.isfinite(t.float()).all() for t in (out, grad, out_opt, grad_opt)):  # detectors train in float32
        return Verdict(False, CLS_NOT_FINITE, "non-finite loss or gradient (in float32) on the sampled logits",
                       seconds())
    worst = float(grad.max())
    if worst >= 0:
        where = int(grad.max(dim=0).values.argmax())
        return Verdict(False, CLS_NOT_MONOTONE, f"dL/dx_t = {worst:.3g} >= 0 at x_t = {float(GRID[where]):g}",
                       seconds())
    far = grad[:, GRID <= 0].abs()
    if float(far.min()) < probe.min_gradient:
        return Verdict(False, CLS_NOT_MONOTONE, f"|dL/dx_t| = {float(far.min()):.3g} far from the optimum (x_t <= 0; "
                       f"needs >= {probe.min_gradient:g})", seconds())
    at_optimum = float(grad_opt.abs().max())
    if at_optimum > probe.gradient_tolerance:
        return Verdict(False, CLS_NOT_CONVERGENT, f"|dL/dx_t| = {at_optimum:.3g} at the optimum "
                       f"(needs <= {probe.gradient_tolerance:g})", seconds())
    return Verdict(True, seconds=seconds())


def check_regression(tree: Any, probe: ConvergenceProbe) -> Verdict:
    """Distance-loss consistency on the sampled box paths (module docstring)."""
    start = time.perf_counter()
    s, steps, _ = probe.paths.shape
    i, u, e = box_areas(probe.paths, probe.targets[:, None, :].expand(s, steps, 4))
    shape = (s, steps, 1, 1, 1)
    try:
        with torch.no_grad():
            out = tree.evaluate({"i": i.reshape(shape), "u": u.reshape(shape), "e": e.reshape(shape)})
    except (RuntimeError, ValueError) as exc:
        return Verdict(False, REG_NOT_FINITE, f"evaluation failed: {exc}", time.perf_counter() - start)
    loss = out.reshape(s, steps)
    seconds = lambda: time.perf_counter() - start  # noqa: E731
    if not torch.isfinite(loss.float()).all():
        return Verdict(False, REG_NOT_FINITE, "non-finite loss (in float32) on the sampled boxes", seconds())
    scale = loss.abs().amax(dim=1, keepdim=True).clamp(min=1e-12)
    rise = (loss[:, 1:] - loss[:, :-1]) / scale
    if float(rise.max()) > 1e-6:
        return Verdict(False, REG_INCONSISTENT, f"the loss rises by {float(rise.max()):.3g} (relative) as the box "
                       "approaches its target", seconds())
    gain = (loss[:, 0] - loss[:, -1]) / scale[:, 0]
    if float(gain.min()) <= 1e-6:
        return Verdict(False, REG_INCONSISTENT, "the loss at the target is not below the loss at the start",
                       seconds())
    return Verdict(True, seconds=seconds())


def check_branch(branch: str, tree: Any, probe: ConvergenceProbe) -> Verdict:
    """The check of a `detection_cse` branch ("cls" or "reg")."""
    return check_classification(tree, probe) if branch == "cls" else check_regression(tree, probe)


__all__ = ["CLS_NOT_CONVERGENT", "CLS_NOT_FINITE", "CLS_NOT_MONOTONE", "ConvergenceProbe", "REASONS",
           "REG_INCONSISTENT", "REG_NOT_FINITE", "Verdict", "build_probe", "check_branch", "check_classification",
           "check_regression"]
