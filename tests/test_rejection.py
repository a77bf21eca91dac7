"""Loss-rejection protocol: verdicts known a priori, agreement with the naive reference, clean rejections."""

from __future__ import annotations

import random

import numpy as np
import pytest
import torch

from components.search import operators

from components.search import screening as rejection
from components.errors import LossforgeError
from components.search.generation import TreeGenerator
from components.search.graph import LossGraph, Node
from components.search.screening import (
    ProbeObjective,
    ScreeningConfig,
    screen,
    screen_naive,
)
from components.search.parallel_screening import screen_many
from components.tasks.segmentation.probe import build_screening_problem
from components.tasks.segmentation.shapes import SHAPES_CLASSES, render_scene

from screening_support import seg, shapes_items

L, N = Node.leaf, Node.apply


@pytest.fixture(scope="module")
def problem():
    """A real probe: 5 embedded-shapes scenes at 24², predictions of a random DeepLabV3+ (8 classes)."""
    return build_screening_problem(shapes_items(8), "mIoU", num_classes=len(SHAPES_CLASSES), samples=5,
                                   size=24, seed=0)


@pytest.fixture(scope="module")
def small_problem():
    """The same kind of probe, smaller (3 samples at 12²), for the many-candidate comparisons."""
    return build_screening_problem(shapes_items(8), "mIoU", num_classes=len(SHAPES_CLASSES), samples=3,
                                   size=12, seed=1)


@pytest.fixture(scope="module", autouse=True)
def one_thread():
    before = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(before)


CE = seg(N("neg", N("log", N("mul", L("y_hat"), L("y")))))
PAPER = ScreeningConfig(steps=150)  # paper protocol (lr 1e-3, momentum 0.9, η 0.6), fewer steps for speed


def test_cross_entropy_passes_on_real_probe(problem):
    r = screen(CE, problem, PAPER)
    assert r.accepted and r.reason == "accepted"
    assert 0.6 <= r.score <= 1.0 and r.steps_run == 150
    assert len(r.fingerprint) == 2 * 5  # 5 norms, 5 signed projections


def test_target_agnostic_constant_loss_has_zero_gradient(problem):
    for root in (N("exp", L("y")), N("mean_nhw", N("add", L("y"), L("1")))):
        r = screen(seg(root), problem, PAPER)
        assert not r.accepted and r.reason == "zero_gradient"
        assert r.score == 0.0 and r.steps_run == 0 and r.fingerprint == (0.0,) * 10


def test_exploding_loss_is_rejected_as_nan(problem):
    explode = seg(N("exp", N("exp", N("inv", N("mul", L("y_hat"), L("y"))))))  # exp(exp(1/(ŷy))) = inf
    r = screen(explode, problem, PAPER)
    assert not r.accepted and r.reason in ("nan_loss", "nan_gradient") and r.score is None


def test_loss_that_maximises_error_is_below_threshold(problem):
    anti = seg(N("log", N("mul", L("y_hat"), L("y"))))  # minimising log p_y drives p_y to 0
    r = screen(anti, problem, PAPER)
    assert not r.accepted and r.reason == "below_threshold" and r.score <= 0.0


def test_candidate_that_raises_is_rejected_with_the_error(problem):
    pose = LossGraph.single("pose", "heatmap", N("square", L("y_hat")))  # no "heatmap" inputs on this probe
    r = screen(pose, problem, PAPER)
    assert not r.accepted and r.reason.startswith("error: ") and "heatmap" in r.reason


def test_early_check_rejects_hopeless_loss_early(problem):
    hopeless = seg(N("square", L("y_hat")))  # target-agnostic: pushes towards uniform predictions
    r = screen(hopeless, problem, ScreeningConfig(steps=150, early_check_step=30))
    assert r.reason == "early_reject" and r.steps_run == 30
    good = screen(CE, problem, ScreeningConfig(steps=150, early_check_step=30))
    assert good.accepted and good.steps_run == 150


def test_threshold_is_configurable(problem):
    r = screen(CE, problem, ScreeningConfig(steps=150, threshold=1.01))
    assert not r.accepted and r.reason == "below_threshold" and r.score >= 0.6


def _stream(n, seed=0):
    gen = TreeGenerator("autoloss_zero", depth=3, rng=random.Random(seed))
    out = [CE]
    while len(out) < n:
        g = gen.random_graph("segmentation") if len(out) < 8 else gen.offspring(out[gen.rng.randrange(len(out))])[0]
        out.append(g)
    return out


def test_fast_screen_agrees_with_naive_reference(small_problem):
    """Batched + folded + early exits give the reference's verdicts, reasons, scores and fingerprints."""
    cfg = ScreeningConfig(samples=3, steps=30, lr=0.05, threshold=0.05)
    for graph in _stream(16, seed=3):
        fast, naive = screen(graph, small_problem, cfg), screen_naive(graph, small_problem, cfg)
        assert (fast.accepted, fast.reason, fast.fingerprint) == (naive.accepted, naive.reason, naive.fingerprint), graph.canonical()
        if naive.score is not None:
            assert fast.score == pytest.approx(naive.score, abs=1e-9), graph.canonical()


def test_folded_objective_equals_tree_evaluation(small_problem):
    """ProbeObjective (constant sub-trees folded, samples batched) = per-sample Σ of LossTree.evaluate."""
    problem = small_problem
    pred = problem.init_predictions
    for graph in _stream(12, seed=5):
        objective = ProbeObjective(graph, problem, samples=3)
        inputs = problem.build_inputs(pred, problem.targets)["seg"]
        with torch.no_grad():
            expected = torch.stack([graph.branches["seg"].tree.evaluate({k: v[b:b + 1] for k, v in inputs.items()}).sum()
                                    for b in range(3)])
            got = objective.per_sample(pred)
        assert torch.allclose(got, expected, rtol=1e-5, atol=1e-5, equal_nan=True), graph.canonical()


def test_screening_is_deterministic_and_frozen_exit_is_exact(small_problem):
    problem = small_problem
    cfg = ScreeningConfig(samples=3, steps=40, lr=0.05, threshold=0.05)
    slow = ScreeningConfig(samples=3, steps=40, lr=0.05, threshold=0.05, stop_when_frozen=False)
    for graph in _stream(8, seed=7):
        a, b, c = screen(graph, problem, cfg), screen(graph, problem, cfg), screen(graph, problem, slow)
        assert (a.accepted, a.score, a.reason, a.fingerprint) == (b.accepted, b.score, b.reason, b.fingerprint)
        assert (a.accepted, a.score, a.reason) == (c.accepted, c.score, c.reason)


def test_screen_many_with_processes_equals_sequential(small_problem):
    problem = small_problem
    graphs = _stream(8, seed=11) + [CE]
    cfg = ScreeningConfig(samples=3, steps=20, lr=0.05, threshold=0.05)
    seq = [screen(g, problem, cfg) for g in graphs]
    par = screen_many(graphs, problem, cfg, workers=2)
    assert [(r.accepted, r.reason, r.score) for r in par] == [(r.accepted, r.reason, r.score) for r in seq]
    assert par[-1].cached  # CE appears twice: the second is a gradient-duplicate


def test_config_validation():
    with pytest.raises(LossforgeError, match="momentum"):
        ScreeningConfig(momentum=1.0)
    with pytest.raises(LossforgeError, match="early_check_step"):
        ScreeningConfig(steps=10, early_check_step=20)
    with pytest.raises(LossforgeError, match="samples"):
        ScreeningConfig(samples=0)
    assert ScreeningConfig().digest() != ScreeningConfig(steps=499).digest()
    assert ScreeningConfig().digest() == ScreeningConfig(stop_when_frozen=False).digest()


def test_more_samples_than_probe_is_an_error_result(problem):
    r = screen(CE, problem, ScreeningConfig(samples=6, steps=5))
    assert not r.accepted and r.reason.startswith("error: ") and "6 samples" in r.reason


def test_ignored_pixels_are_masked_in_the_objective():
    rng = np.random.default_rng(3)
    items = []
    for _ in range(3):
        scene = render_scene(rng, image_size=32, ignore_band=2)
        items.append((torch.from_numpy(scene.image).permute(2, 0, 1).float() / 255.0,
                      torch.from_numpy(scene.labels.astype(np.int64))))
    problem = build_screening_problem(items, "mIoU", num_classes=len(SHAPES_CLASSES), samples=3, size=16, seed=0)
    assert problem.valid is not None and problem.valid.min() == 0
    square = seg(N("square", L("y_hat")))  # non-zero at every pixel, so masking is visible
    got = ProbeObjective(square, problem, samples=3).per_sample(problem.init_predictions)
    p = torch.softmax(problem.init_predictions, dim=-3)
    keep = (problem.targets != 255).unsqueeze(-3)
    expected = (p.square() * keep).flatten(1).sum(dim=1)
    assert torch.allclose(got, expected, rtol=1e-5)
    cfg = ScreeningConfig(samples=3, steps=20, lr=0.05, threshold=0.05)
    fast, naive = screen(CE, problem, cfg), screen_naive(CE, problem, cfg)
    assert fast.accepted and (fast.reason, fast.fingerprint) == (naive.reason, naive.fingerprint)
    assert fast.score == pytest.approx(naive.score, abs=1e-9)


# ---------------------------------------------------------------------------------------------------
# The hand-written backward, the pooling and the reuse of unchanged steps give autograd's numbers.


def _autograd_loss_and_grad(objective, pred):
    with torch.enable_grad():
        losses = objective.per_sample(pred)
        return losses.detach(), rejection._grad(losses, pred)


def _same_values(a, b):
    """Equal, NaN where the other is NaN (-0.0 == 0.0: no value differs)."""
    return torch.equal(a.isnan(), b.isnan()) and torch.equal(torch.nan_to_num(a, nan=0.0), torch.nan_to_num(b, nan=0.0))


def _random_graphs(n, seed, operator_set="autoloss_zero"):
    gen = TreeGenerator(operator_set, depth=3, rng=random.Random(seed))
    out = []
    while len(out) < n:
        fresh = len(out) < 10 or gen.rng.random() < 0.3
        out.append(gen.random_graph("segmentation") if fresh else gen.offspring(out[gen.rng.randrange(len(out))])[0])
    return out


@pytest.mark.parametrize("ignore_band, size", [(0, 12), (1, 12), (1, 10)])
@pytest.mark.parametrize("chunked", [False, True])
def test_hand_written_backward_is_autograd_bit_for_bit(monkeypatch, ignore_band, size, chunked):
    """Random Table-1 trees (pools, means, signed log/sqrt, inv, ...): the same gradient as autograd, bit for
    bit, on the first call (inputs through autograd) and the later ones (softmax called directly, one sample
    at a time when `chunked` and a sample fills whole SIMD blocks: 8·12² does, 8·10² does not), also at
    large logits (saturated softmax, ties in the pools)."""
    monkeypatch.setattr(ProbeObjective, "CHUNK_MIN_NUMEL", 0 if chunked else 1 << 40)
    problem = build_screening_problem(shapes_items(6, ignore_band=ignore_band), "mIoU", num_classes=8,
                                      samples=3, size=size, seed=2)
    assert (problem.valid is not None) == bool(ignore_band)
    for graph in _random_graphs(80, seed=13 + ignore_band):
        objective = ProbeObjective(graph, problem, samples=3)
        assert objective.manual, graph.canonical()
        for scale in (1.0, 40.0):
            pred = (problem.init_predictions[:3] * scale).clone().requires_grad_(True)
            want_losses, want = _autograd_loss_and_grad(objective, pred)
            for _ in range(2):  # the first call probes the inputs, the second uses the direct softmax
                losses, grad = objective._manual_loss_and_grad(pred)
                assert _same_values(grad, want), (graph.canonical(), scale)
                assert torch.allclose(losses, want_losses, rtol=1e-6, equal_nan=True), (graph.canonical(), scale)
        assert objective.is_constant() or objective._softmax is not None  # the direct softmax was used


def test_pooling_routes_the_gradient_as_pytorchs_kernel():
    """_Pool3 (separable max, the kernel's first-maximum indices computed from masks) = max_pool2d /
    −max_pool2d(−x) with autograd: ties (integer values, signed zeros), non-finite inputs (PyTorch's
    forward kernel) and gradients."""
    gen = torch.Generator().manual_seed(0)
    cases = [torch.randint(0, 3, (2, 1, 3, 9, 7), generator=gen).float(),
             torch.randint(-1, 2, (2, 1, 3, 9, 7), generator=gen).float() * 0.0,  # +0.0 and -0.0
             torch.randn(2, 1, 3, 9, 7, generator=gen)]
    with_inf = torch.randn(2, 1, 3, 9, 7, generator=gen)
    with_inf[0, 0, 1, 4, 3], with_inf[1, 0, 2, 0, 0] = float("inf"), float("-inf")
    cases.append(with_inf)
    for sign in (1, -1):
        for x in cases:
            for g in (torch.randn(x.shape, generator=gen), torch.full(x.shape, float("inf"))):
                leaf = x.clone().requires_grad_(True)
                with torch.enable_grad():
                    flat = leaf.reshape(-1, 1, *x.shape[-2:])
                    ref = torch.nn.functional.max_pool2d(flat if sign > 0 else -flat, 3, 1, 1)
                    ref = (ref if sign > 0 else -ref).reshape(x.shape)
                want, = torch.autograd.grad(ref, leaf, g)
                pool = rejection._Pool3(sign)
                _, ref_idx = torch.nn.functional.max_pool2d(flat.detach() * sign, 3, 1, 1, return_indices=True)
                for _ in range(2):  # buffers are reused
                    out, saved = pool.fwd(x)
                    got = pool.bwd(saved, g, [True])[0][0]
                    assert _same_values(out, ref.detach()) and _same_values(got, want), (sign, x.flatten()[:5])
                    assert torch.equal(saved[1], ref_idx)


def test_unchanged_steps_are_reused_and_a_settled_run_stops(small_problem):
    """Mean_c(ŷ) is 1/C whatever ŷ: its gradient is rounding noise (~1e-7), and at the paper's lr no update
    moves the logits. The steps are reused (momentum only) and the run stops once the momentum is at its
    fixed point; the outcome is the naive reference's, and the same with stop_when_frozen off (all steps,
    reused)."""
    graph = seg(N("mean_c", L("y_hat")))
    cfg = ScreeningConfig(samples=3, steps=300, lr=1e-3, threshold=0.05)
    fast, naive = screen(graph, small_problem, cfg), screen_naive(graph, small_problem, cfg)
    assert (fast.accepted, fast.reason, fast.score, fast.fingerprint) == (naive.accepted, naive.reason, naive.score, naive.fingerprint)
    assert fast.score == 0.0 and 0 < fast.steps_run < 300
    slow = screen(graph, small_problem, ScreeningConfig(samples=3, steps=300, lr=1e-3, threshold=0.05, stop_when_frozen=False))
    assert (slow.accepted, slow.reason, slow.score) == (fast.accepted, fast.reason, fast.score) and slow.steps_run == 300


def test_screen_equals_the_autograd_path(small_problem, monkeypatch):
    """Whole runs: with the hand-written backward the outcome (verdict, reason, g, fingerprint, steps) is
    the one of the autograd objective, exactly."""
    cfg = ScreeningConfig(samples=3, steps=40, lr=0.05, threshold=0.05)
    graphs = _stream(24, seed=17)
    fast = [screen(g, small_problem, cfg) for g in graphs]
    monkeypatch.setattr(rejection, "_manual_rules", lambda: {})
    slow = [screen(g, small_problem, cfg) for g in graphs]
    key = lambda r: (r.accepted, r.reason, r.score, r.fingerprint, r.steps_run)  # noqa: E731
    assert [key(r) for r in fast] == [key(r) for r in slow]
    assert not ProbeObjective(CE, small_problem, samples=3).manual  # (the monkeypatch did switch it off)


def test_constant_pooling_is_folded_with_the_same_values(small_problem):
    """Constant sub-trees with 3×3 pooling (of y, of 1) are folded with _Pool3's forward: the values of
    max_pool2d, also for the -inf/inf an exploding constant can hold."""
    y = small_problem.build_inputs(small_problem.init_predictions, small_problem.targets)["seg"]["y"]
    exploding = torch.exp(torch.exp(torch.exp(y * 10)))  # inf where y = 1
    for fn in (operators.azl_max_pool3, operators.azl_min_pool3):
        for x in (y, -y, exploding, -exploding):
            assert _same_values(rejection._fold_fn(fn)(x), fn(x)), fn.__name__
