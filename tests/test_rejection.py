"""Loss-rejection protocol: verdicts known a priori, agreement with the naive reference, clean rejections."""

from __future__ import annotations

import random

import numpy as np
import pytest
import torch

from components.errors import LossforgeError
from components.generation import TreeGenerator
from components.loss_graph import LossGraph, Node
from components.rejection import (
    ProbeObjective,
    ScreeningConfig,
    screen,
    screen_many,
    screen_naive,
)
from components.segmentation_task import build_screening_problem
from components.shapes_dataset import SHAPES_CLASSES, render_scene

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
    assert len(r.fingerprint) == 5


def test_target_agnostic_constant_loss_has_zero_gradient(problem):
    for root in (N("exp", L("y")), N("mean_nhw", N("add", L("y"), L("1")))):
        r = screen(seg(root), problem, PAPER)
        assert not r.accepted and r.reason == "zero_gradient"
        assert r.score == 0.0 and r.steps_run == 0 and r.fingerprint == (0.0,) * 5


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
