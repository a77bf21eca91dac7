"""CSE-AutoLoss's convergence-property verification (components/cse/convergence.py), its published losses
(components/cse/published.py) and their use as Faster R-CNN losses (components/cse/losses.py)."""

from __future__ import annotations

import pytest
import torch

from components.cse import published as P
from components.cse.convergence import (CLS_NOT_CONVERGENT, CLS_NOT_FINITE, CLS_NOT_MONOTONE, REG_INCONSISTENT,
                                        build_probe, check_classification, check_regression)


@pytest.fixture(scope="module")
def probe():
    return build_probe(0)


@pytest.mark.parametrize("name,text", [("ce", P.CE_CLS), ("focal", P.FOCAL_CLS), ("cse_a", P.CSE_A_CLS),
                                       ("cse_b", P.CSE_B_CLS), ("bce", "neg(mul(y,log(sigmoid(x))))")])
def test_published_and_handcrafted_classification_losses_pass(probe, name, text):
    verdict = check_classification(P.tree(text, "cls"), probe)
    assert verdict.accepted, verdict


@pytest.mark.parametrize("name,text", [("giou", P.GIOU_REG), ("iou", P.IOU_REG), ("cse_a", P.CSE_A_REG),
                                       ("cse_b", P.CSE_B_REG)])
def test_published_and_handcrafted_regression_losses_pass(probe, name, text):
    verdict = check_regression(P.tree(text, "reg"), probe)
    assert verdict.accepted, verdict


@pytest.mark.parametrize("text,reason", [
    ("dot(y,log(softmax(x)))", CLS_NOT_MONOTONE),          # CE with the wrong sign: pushes the target logit down
    ("neg(dot(y,sin(x)))", CLS_NOT_MONOTONE),              # the gradient changes sign along the target logit
    ("neg(dot(y,relu(x)))", CLS_NOT_MONOTONE),             # flat (zero gradient) far from the optimum
    ("dot(y,exp(neg(x)))", None),                          # exponential loss: monotone, vanishes at the optimum
    ("neg(dot(y,x))", CLS_NOT_CONVERGENT),                 # monotone, but the gradient never vanishes
    ("neg(dot(y,mul(3,x)))", CLS_NOT_CONVERGENT),
    ("dot(softplus(2),x)", CLS_NOT_MONOTONE),              # pushes every logit down, the target's too
    ("div(1,sub(x,2))", CLS_NOT_FINITE),                   # a pole at x_t = 2: gradient 1e40, inf in float32
])
def test_classification_rejections_have_their_own_reason(probe, text, reason):
    verdict = check_classification(P.tree(text, "cls"), probe)
    assert verdict.accepted is (reason is None) and verdict.reason == (reason or ""), verdict
    if reason:
        assert verdict.detail


def test_a_loss_that_ignores_the_logits_is_not_monotone(probe):
    verdict = check_classification(P.tree("neg(dot(y,log(softmax(w))))", "cls"), probe)
    assert verdict.reason == CLS_NOT_MONOTONE


@pytest.mark.parametrize("text", ["neg(sub(2,add(div(i,u),div(u,e))))",  # −GIoU loss: rises towards the target
                                  "div(i,u)", "mul(3,i)"])
def test_regression_losses_that_rise_towards_the_target_are_rejected(probe, text):
    verdict = check_regression(P.tree(text, "reg"), probe)
    assert not verdict.accepted and verdict.reason == REG_INCONSISTENT


def test_a_constant_regression_loss_is_rejected(probe):
    verdict = check_regression(P.tree("add(1,2)", "reg"), probe)  # never lower at the target
    assert verdict.reason == REG_INCONSISTENT


def test_probe_is_deterministic_for_a_seed():
    a, b, c = build_probe(3), build_probe(3), build_probe(4)
    assert torch.equal(a.logits, b.logits) and torch.equal(a.paths, b.paths)
    assert not torch.equal(a.logits, c.logits)
    # paths end exactly at the target box and overlapping and disjoint starts both occur
    assert torch.allclose(a.paths[:, -1], a.targets)
    from components.tasks.detection.losses import box_areas

    inter = box_areas(a.paths[:, 0], a.targets)[0]
    assert (inter == 0).any() and (inter > 0).any()


def test_cse_b_trees_are_the_slides_formulas():
    g = torch.Generator().manual_seed(0)
    i = torch.rand(50, 1, 1, 1, generator=g, dtype=torch.float64) * 400
    u = i + torch.rand(50, 1, 1, 1, generator=g, dtype=torch.float64) * 900 + 1
    e = u + torch.rand(50, 1, 1, 1, generator=g, dtype=torch.float64) * 900
    slides = (3 * e * u + 12 * e + 3 * i + 3 * u + 18) / (-3 * e * u + i * u + u ** 2 - 15 * e + 5 * i + 5 * u)
    assert torch.allclose(P.tree(P.CSE_B_REG, "reg").evaluate({"i": i, "u": u, "e": e}), slides, rtol=1e-9)
    x = torch.randn(50, 4, 1, 1, generator=g, dtype=torch.float64)
    y = torch.nn.functional.one_hot(torch.randint(0, 4, (50,), generator=g), 4).to(x.dtype)[..., None, None]
    w = torch.rand(50, 1, 1, 1, generator=g, dtype=torch.float64).expand(50, 4, 1, 1)
    s, wy = torch.sigmoid(x), w * y
    gd = 2 * torch.atan(torch.tanh(x / 2))
    slides = -(wy * (1 + torch.erf(torch.sigmoid(1 - y))) * torch.log(s) + (gd - wy) * (s - wy) * torch.log(1 - s))
    assert torch.allclose(P.tree(P.CSE_B_CLS, "cls").evaluate({"x": x, "y": y, "w": w}), slides, rtol=1e-9)
    # CSE-AutoLoss-A: the stored example file is the same graph
    from pathlib import Path

    from components.search.graph_json import load_graph

    example = load_graph(Path(__file__).resolve().parents[1] / "examples" / "losses" / "cse_autoloss_a.json")
    assert example.canonical() == P.published_graph("cse_autoloss_a").canonical()


def test_cse_loss_on_the_box_head_is_ce_and_gets_the_iou_weight():
    """The CE tree of a detection_cse graph gives torchvision's CE on the box head, and the box head hands the
    IoU of each positive's decoded box to the classification (w), 0 for the background."""
    import torch.nn.functional as F

    from components.cse.losses import CSEDetectionLoss, classification_inputs
    from components.tasks.base import get_task

    logits = torch.randn(12, 5, generator=torch.Generator().manual_seed(1))
    labels = torch.tensor([0, 1, 2, 3, 4, 0, 1, 2, 3, 4, 0, 0])
    ce = CSEDetectionLoss(P.graph(P.CE_CLS, P.GIOU_REG))
    assert ce.classification("cls_rcnn", logits, labels).item() == pytest.approx(F.cross_entropy(logits, labels).item(), rel=1e-5)
    assert ce.weight("cls_rcnn") == 1.0 and ce.weight("reg_rcnn") == 10.0 and ce.weight("reg_rpn") == 10.0
    iou = torch.linspace(0, 1, 12)
    a = get_task("detection").build_loss("cse_autoloss_a")
    expected = ((1 + torch.sin(iou)) * F.cross_entropy(logits, labels, reduction="none")).mean()
    assert a.classification("cls_rcnn", logits, labels, iou=iou).item() == pytest.approx(expected.item(), rel=1e-5)
    assert classification_inputs(logits, labels)["w"].abs().sum() == 0
    # the box head's IoU weight: real sampled proposals of a tiny detector
    from components.tasks.detection.models import DetectorConfig, build_detector

    model = build_detector(DetectorConfig(name="t", min_size=64, max_size=64), 3, a)
    heads = model.roi_heads
    proposals = torch.tensor([[0., 0., 20., 20.], [10., 10., 30., 30.], [40., 40., 60., 60.]])
    gt = torch.tensor([[0., 0., 20., 20.], [12., 10., 30., 30.], [0., 0., 5., 5.]])
    regression = torch.zeros(3, 3 * 4)  # zero deltas: the decoded box is the proposal
    w = heads.sample_ious(regression, torch.tensor([1, 2, 0]), proposals, gt)
    assert w.tolist() == pytest.approx([1.0, 18 * 20 / 400, 0.0])


def test_published_losses_are_detection_baselines_by_name():
    from components.cse.losses import CSEDetectionLoss
    from components.tasks.base import get_task

    task = get_task("detection")
    for name in ("cse_autoloss_a", "cse_autoloss_b"):
        loss = task.build_loss(name)
        assert isinstance(loss, CSEDetectionLoss) and loss.graph.canonical() == P.published_graph(name).canonical()
    # a searched detection_cse graph (loss JSON / spec) trains through the detection task too
    from components.search.graph_json import graph_to_dict

    spec = {"type": "graph", "graph": graph_to_dict(P.published_graph("cse_autoloss_b"))}
    assert isinstance(task.build_loss(spec), CSEDetectionLoss)
