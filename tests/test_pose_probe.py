"""The pose screening probe: heatmap losses that learn pass the loss-rejection protocol (normalised gain, η = 0.6),
degenerate ones are rejected, a loss that overflows is stopped as NaN, and equivalent losses share a gradient
fingerprint; the task builds the probe and its losses."""

from __future__ import annotations

import pytest
import torch

from components.errors import LossforgeError
from components.search.equivalence import EquivalenceCache
from components.search.graph import Branch, LossGraph, branch_inputs, parse_prefix
from components.search.graph_json import load_graph
from components.search.screening import ScreeningConfig, screen
from components.tasks.base import get_task
from components.tasks.segmentation.shapes import ensure_shapes

CONFIG = ScreeningConfig(samples=3, steps=100, lr=0.01)  # the demo profile's pose screening


def pose_graph(tree: str) -> LossGraph:
    return LossGraph("pose", {"heatmap": Branch(parse_prefix(tree, inputs=branch_inputs("pose", "heatmap")))})


@pytest.fixture(scope="module")
def dataset(tmp_path_factory):
    root = ensure_shapes(tmp_path_factory.mktemp("pose") / "shapes", num_train=6, num_test=2, image_size=64, seed=0)
    return get_task("pose").open_dataset(root, split="train")


@pytest.fixture(scope="module")
def problem(dataset):
    return get_task("pose").screening_problem(dataset, "AP", samples=3, size=64, seed=0)


def test_probe_shapes_metric_and_perfect_predictions(problem, dataset):
    assert problem.task == "pose" and problem.metric_name == "AP" and problem.samples == 3
    assert problem.init_predictions.shape == problem.perfect_predictions.shape == (3, 1, dataset.num_keypoints, 16, 16)
    before = problem.metric(problem.init_predictions, problem.targets)
    best = problem.metric(problem.perfect_predictions, problem.targets)
    assert before.shape == (3,) and bool((before < 0.2).all())  # a random network's heatmaps miss the keypoints
    assert bool((best >= 0.6).all()) and bool((best > before).all())
    inputs = problem.build_inputs(problem.init_predictions, problem.targets)["heatmap"]
    assert torch.equal(inputs["y_hat"], problem.init_predictions)  # raw heatmaps, as in training
    assert torch.equal(inputs["y"], problem.perfect_predictions)


@pytest.mark.parametrize("name,loss,accepted", [
    ("mse", "square(add(y_hat,neg(y)))", True),
    ("l1", "abs(add(y_hat,neg(y)))", True),
    ("constant", "square(add(1,1))", False),
    ("target only", "square(y)", False),
    ("pushes away", "neg(square(add(y_hat,neg(y))))", False),
])
def test_screening_verdicts(problem, name, loss, accepted):
    result = screen(pose_graph(loss), problem, CONFIG)
    assert result.accepted is accepted, (name, result)


def test_table8_pose_loss_passes_and_an_overflowing_loss_is_stopped_as_nan(problem):
    table8 = screen(load_graph("examples/losses/autolosszero_pose.json"), problem, CONFIG)
    assert table8.accepted, table8
    overflow = screen(pose_graph("exp(inv(abs(y_hat)))"), problem, CONFIG)
    assert not overflow.accepted and overflow.reason.startswith("nan"), overflow


def test_equivalent_losses_share_a_fingerprint_and_the_cached_verdict(problem):
    cache = EquivalenceCache(None, problem.key)
    first = screen(pose_graph("square(add(y_hat,neg(y)))"), problem, CONFIG, cache=cache)
    second = screen(pose_graph("square(add(neg(y),y_hat))"), problem, CONFIG, cache=cache)
    assert first.fingerprint == second.fingerprint and second.cached and second.accepted == first.accepted


def test_task_builds_losses_and_refuses_other_branches(dataset):
    task = get_task("pose")
    assert task.metrics == ("AP", "AP50", "AP75") and task.reference_baseline == "mse"
    assert type(task.build_loss("mse", dataset)).__name__ == "MSEHeatmapLoss"
    assert type(task.build_loss("examples/losses/autolosszero_pose.json", dataset)).__name__ == "GraphPoseLoss"
    with pytest.raises(LossforgeError, match="pose"):
        task.build_loss("examples/losses/autolosszero_det_all_branches.json", dataset)
    with pytest.raises(LossforgeError, match="unknown"):
        task.build_loss("nonsense", dataset)
    with pytest.raises(LossforgeError, match="heatmap"):
        task.screening_problem(dataset, "AP", samples=3, size=64, seed=0, branches=("mask",))
