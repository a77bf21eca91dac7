"""The detection screening probe: published and handcrafted losses pass the default protocol (normalised
gain, η = 0.6), degenerate ones are rejected; per-branch probes; the probe's inputs are the training inputs."""

from __future__ import annotations

import pytest
import torch

from components.search.graph import Branch, LossGraph, branch_inputs, parse_prefix
from components.search.graph_json import load_graph
from components.search.screening import ScreeningConfig, screen
from components.tasks.detection.datasets import open_detection_dataset
from components.tasks.detection.losses import BRANCHES, CE_TREE, GIOU_TREE, baseline_graph
from components.tasks.detection.probe import build_screening_problem
from components.tasks.segmentation.shapes import ensure_shapes


def graph(trees: dict[str, str]) -> LossGraph:
    return LossGraph("detection", {
        b: Branch(parse_prefix(t, inputs=branch_inputs("detection", b)), 10.0 if b.startswith("reg") else 1.0)
        for b, t in trees.items()})


@pytest.fixture(scope="module")
def dataset(tmp_path_factory):
    root = ensure_shapes(tmp_path_factory.mktemp("det") / "shapes", num_train=8, num_test=1, image_size=64, seed=0)
    return open_detection_dataset(root, split="train")


@pytest.fixture(scope="module")
def problem(dataset):
    return build_screening_problem(dataset, "mAP", samples=5, size=64, seed=0)


def test_probe_shapes_and_metric_range(problem, dataset):
    assert problem.task == "detection" and problem.metric_name == "mAP" and problem.samples == 5
    assert problem.init_predictions.shape == problem.perfect_predictions.shape
    before = problem.metric(problem.init_predictions, problem.targets)
    best = problem.metric(problem.perfect_predictions, problem.targets)
    assert before.shape == (5,) and bool((before < 0.5).all())
    # ξ_max is computed, not assumed: 1 unless two boxes overlap above an NMS threshold (RPN: IoU 0.7),
    # as in sample 2 here (IoU 0.73), where the RPN's class-agnostic NMS keeps one of them
    assert bool((best > 0.7).all()) and int((best == 1.0).sum()) >= 4
    inputs = problem.build_inputs(problem.init_predictions, problem.targets)
    assert set(inputs) == set(BRANCHES)
    assert inputs["cls_rcnn"]["y_hat"].shape == (5, 32, dataset.num_classes, 1, 1)
    assert inputs["reg_rpn"]["i"].shape == (5, 8, 1, 1, 1)
    same = build_screening_problem(dataset, "mAP", samples=5, size=64, seed=0)
    assert same.key == problem.key and torch.equal(same.init_predictions, problem.init_predictions)
    assert build_screening_problem(dataset, "AP50", samples=5, size=64, seed=0).key != problem.key


@pytest.mark.parametrize("name, make, accepted", [
    ("table8", lambda: load_graph("examples/losses/autolosszero_det_all_branches.json"), True),
    ("ce_giou", lambda: baseline_graph(GIOU_TREE), True),
    ("constant", lambda: graph({b: "add(1,1)" for b in BRANCHES}), False),
    ("y_alone", lambda: graph({"cls_rpn": "neg(y)", "cls_rcnn": "log(y)", "reg_rpn": "add(1,1)", "reg_rcnn": "exp(1)"}), False),
    ("neg_prediction", lambda: graph({"cls_rpn": "neg(y_hat)", "cls_rcnn": "neg(y_hat)", "reg_rpn": "neg(i)", "reg_rcnn": "neg(i)"}), False),
])
def test_screening_verdicts(problem, name, make, accepted):
    result = screen(make(), problem, ScreeningConfig())
    assert result.accepted is accepted, (name, result)
    if accepted:
        assert result.score >= 0.6
    else:
        assert result.score is None or result.score < 0.3


@pytest.mark.parametrize("branch", BRANCHES)
def test_per_branch_probe(dataset, branch):
    problem = build_screening_problem(dataset, "mAP", samples=3, size=64, seed=1, branches=(branch,))
    good = CE_TREE if branch.startswith("cls") else GIOU_TREE
    bad = "neg(y_hat)" if branch.startswith("cls") else "neg(u)"
    cfg = ScreeningConfig(samples=3)
    assert screen(graph({branch: good}), problem, cfg).accepted
    assert not screen(graph({branch: bad}), problem, cfg).accepted
