"""The four Faster R-CNN branch losses come from the loss object: torchvision's values for ce_smoothl1,
the trees of a loss graph otherwise (CE graph = torchvision CE, GIoU graph = torchvision's GIoU loss)."""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F
from torchvision.models.detection.roi_heads import RoIHeads
from torchvision.models.detection.rpn import RegionProposalNetwork
from torchvision.ops import generalized_box_iou_loss

from components.errors import LossforgeError
from components.search.graph import Branch, LossGraph, branch_inputs, parse_prefix
from components.search.graph_json import load_graph
from components.tasks.detection.datasets import open_detection_dataset
from components.tasks.detection.losses import (CE_TREE, GIOU_TREE, IOU_TREE, GraphDetectionLoss, TorchvisionLoss,
                                               baseline_loss, classification_inputs, regression_inputs, rpn_logits)
from components.tasks.detection.models import DetectorConfig, build_detector, set_detection_loss
from components.tasks.segmentation.shapes import ensure_shapes

TINY = DetectorConfig(name="tiny", min_size=64, max_size=64, rpn_batch_size_per_image=32, box_batch_size_per_image=32)


def graph(trees: dict[str, str], weight_reg: float = 10.0) -> LossGraph:
    return LossGraph("detection", {
        b: Branch(parse_prefix(t, inputs=branch_inputs("detection", b)), weight_reg if b.startswith("reg") else 1.0)
        for b, t in trees.items()})


@pytest.fixture(scope="module")
def batch(tmp_path_factory):
    root = ensure_shapes(tmp_path_factory.mktemp("det") / "shapes", num_train=2, num_test=1, image_size=64, seed=2)
    ds = open_detection_dataset(root, split="train")
    images, targets = zip(*[ds[i] for i in range(2)])
    return list(images), list(targets), ds.num_classes


def _branch_losses(model, images, targets, seed=0):
    """Run the four hooked branches (training mode) once: {torchvision key: weighted loss}."""
    model.train()
    torch.manual_seed(seed)
    return {k: v.detach() for k, v in model(images, [dict(t) for t in targets]).items()}


def _torchvision_losses(model, images, targets, seed=0):
    """The same network through torchvision's own (un-hooked) RPN and RoIHeads forward code."""
    model.train()
    torch.manual_seed(seed)
    images_t, targets_t = model.transform(images, [dict(t) for t in targets])
    features = model.backbone(images_t.tensors)
    proposals, rpn_losses = RegionProposalNetwork.forward(model.rpn, images_t, features, targets_t)
    _, roi_losses = RoIHeads.forward(model.roi_heads, features, proposals, images_t.image_sizes, targets_t)
    return {k: v.detach() for k, v in {**rpn_losses, **roi_losses}.items()}


@pytest.fixture(scope="module")
def model(batch):
    torch.manual_seed(0)
    return build_detector(TINY, batch[2])


def test_ce_smoothl1_is_torchvisions_loss(model, batch):
    images, targets, _ = batch
    set_detection_loss(model, baseline_loss("ce_smoothl1"))
    mine = _branch_losses(model, images, targets)
    ref = _torchvision_losses(model, images, targets)
    assert mine.keys() == ref.keys()
    for key in ref:
        torch.testing.assert_close(mine[key], ref[key], rtol=1e-6, atol=1e-7)


def test_ce_graph_gives_torchvisions_ce(model, batch):
    images, targets, _ = batch
    ce_only = GraphDetectionLoss(graph({"cls_rpn": CE_TREE, "cls_rcnn": CE_TREE}))  # regression: torchvision fallback
    set_detection_loss(model, ce_only)
    mine = _branch_losses(model, images, targets)
    set_detection_loss(model, None)
    ref = _torchvision_losses(model, images, targets)
    for key in ref:
        torch.testing.assert_close(mine[key], ref[key], rtol=1e-4, atol=1e-6)


def test_branch_values_come_from_the_trees(model, batch):
    images, targets, num_classes = batch
    set_detection_loss(model, GraphDetectionLoss(graph({b: "add(1,1)" for b in ("cls_rpn", "reg_rpn", "cls_rcnn", "reg_rcnn")})))
    out = _branch_losses(model, images, targets)
    # Eq. 3 of a constant 2: Σ over N samples and C classes / N = 2·C; regression: 2·P/N_sampled (≤ 2), × weight 10
    assert float(out["loss_objectness"]) == pytest.approx(2 * 2)
    assert float(out["loss_classifier"]) == pytest.approx(2 * num_classes)
    for key in ("loss_rpn_box_reg", "loss_box_reg"):
        assert 0 < float(out[key]) <= 20 + 1e-5


def test_giou_and_iou_trees_equal_the_box_losses():
    gen = torch.Generator().manual_seed(0)
    xy = torch.rand(50, 2, generator=gen) * 40
    pred = torch.cat([xy, xy + 1 + torch.rand(50, 2, generator=gen) * 20], dim=1)
    target = pred + torch.randn(50, 4, generator=gen) * 4
    target = torch.cat([target[:, :2], torch.maximum(target[:, 2:], target[:, :2] + 1)], dim=1)
    inputs = regression_inputs(pred, target)
    assert inputs["i"].shape == (50, 1, 1, 1)
    giou = parse_prefix(GIOU_TREE, inputs=branch_inputs("detection", "reg_rcnn")).evaluate(inputs).reshape(-1)
    torch.testing.assert_close(giou, generalized_box_iou_loss(pred, target, reduction="none"), rtol=1e-5, atol=1e-5)
    iou = parse_prefix(IOU_TREE, inputs=branch_inputs("detection", "reg_rpn")).evaluate(inputs).reshape(-1)
    from torchvision.ops import box_iou

    torch.testing.assert_close(iou, 1 - box_iou(pred, target).diagonal(), rtol=1e-5, atol=1e-5)
    # as a branch loss: Eq. 3 over positives × P / N_sampled = sum / N_sampled
    loss = baseline_loss("ce_giou").regression("reg_rcnn", pred_deltas=torch.zeros(50, 4), target_deltas=torch.zeros(50, 4),
                                               pred_boxes=pred, target_boxes=target, num_sampled=200)
    torch.testing.assert_close(loss, generalized_box_iou_loss(pred, target, reduction="sum") / 200, rtol=1e-5, atol=1e-6)


def test_classification_inputs_and_rpn_softmax():
    x = torch.tensor([-2.0, 0.0, 3.0])
    inputs = classification_inputs(rpn_logits(x), torch.tensor([0, 1, 1]))
    assert inputs["y_hat"].shape == (3, 2, 1, 1)
    torch.testing.assert_close(inputs["y_hat"][:, 1, 0, 0], torch.sigmoid(x))
    ce = GraphDetectionLoss(graph({"cls_rpn": CE_TREE})).classification("cls_rpn", rpn_logits(x), torch.tensor([0, 1, 1]))
    torch.testing.assert_close(ce, F.binary_cross_entropy_with_logits(x, torch.tensor([0.0, 1.0, 1.0])), rtol=1e-5, atol=1e-6)
    tv = TorchvisionLoss().classification("cls_rpn", rpn_logits(x), torch.tensor([0, 1, 1]))
    torch.testing.assert_close(ce, tv, rtol=1e-5, atol=1e-6)


def test_published_graph_trains_one_step_and_rejects_other_tasks(model, batch):
    images, targets, _ = batch
    loss = GraphDetectionLoss(load_graph("examples/losses/autolosszero_det_all_branches.json"))
    assert loss.weight("reg_rcnn") == 10.0 and loss.weight("cls_rpn") == 1.0
    set_detection_loss(model, loss)
    model.train()
    total = sum(model(images, [dict(t) for t in targets]).values())
    total.backward()
    assert torch.isfinite(total) and any(p.grad is not None and p.grad.abs().sum() > 0 for p in model.parameters())
    model.zero_grad(set_to_none=True)
    set_detection_loss(model, None)
    with pytest.raises(LossforgeError, match="task must be 'detection'"):
        GraphDetectionLoss(LossGraph.single("segmentation", "seg", parse_prefix(CE_TREE).root))
    with pytest.raises(LossforgeError, match="unknown; known: ce_smoothl1"):
        baseline_loss("nope")
