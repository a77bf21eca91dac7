"""The OpenMMLab loss modules (components/openmmlab/losses.py) give the native losses' values on the same inputs,
called the way mmseg / mmdet / mmpose heads call them. Plain torch: runs without OpenMMLab installed."""

from __future__ import annotations

import random

import pytest
import torch

from components.errors import LossforgeError
from components.openmmlab.losses import (SearchedBBoxLoss, SearchedClsLoss, SearchedKeypointLoss, SearchedLoss,
                                         SearchedMaskLoss, SurrogateLoss)
from components.search.graph_json import load_graph
from components.tasks.detection.losses import GraphDetectionLoss, rpn_logits
from components.tasks.instance_segmentation.losses import GraphInstanceLoss
from components.tasks.loss_registry import build_loss
from components.tasks.pose.losses import GraphPoseLoss

DET = "examples/losses/autolosszero_det_all_branches.json"
INS = "examples/losses/autolosszero_ins_all_branches.json"


def _close(a, b):
    torch.testing.assert_close(a, b, rtol=1e-6, atol=1e-7)


def test_mmseg_searched_loss_equals_the_native_graph_loss_with_ignored_and_ohem_pixels():
    gen = torch.Generator().manual_seed(0)
    logits = torch.randn(2, 4, 12, 12, generator=gen) * 3
    label = torch.randint(0, 4, (2, 12, 12), generator=gen)
    label[0, :3] = 255
    for path in ("examples/losses/autolosszero_seg_miou.json", "examples/losses/autolosszero_seg_bf1.json"):
        native = build_loss({"type": "graph", "path": path})
        module = SearchedLoss(path=path, loss_weight=0.5)
        _close(module(logits, label, weight=None, ignore_index=255), 0.5 * native(logits, label))
        # mmseg's OHEM weight: pixels of weight 0 count as ignored
        weight = (torch.rand(2, 12, 12, generator=gen) > 0.3).float()
        _close(module(logits, label, weight=weight, ignore_index=255),
               0.5 * native(logits, torch.where(weight > 0, label, torch.full_like(label, 255))))
    assert module.loss_name == "loss_searched"


def test_mmseg_surrogate_loss_equals_the_native_surrogate(tmp_path):
    from components.surrogates.metric_surrogates import SurrogateSpec, save_surrogate

    rng = random.Random(3)
    theta = {"mIoU.and": [rng.random() for _ in range(6)], "mIoU.or": [rng.random() for _ in range(6)]}
    path = save_surrogate(SurrogateSpec({"mIoU": 1.0, "BF1": 0.5}, theta=theta), tmp_path / "s.json")
    gen = torch.Generator().manual_seed(1)
    logits, label = torch.randn(2, 3, 16, 16, generator=gen), torch.randint(0, 3, (2, 16, 16), generator=gen)
    label[1, 5:] = 255
    native = build_loss({"type": "surrogate", "path": str(path)}, num_classes=3)
    _close(SurrogateLoss(path=str(path))(logits, label, ignore_index=255), native(logits, label))
    with pytest.raises(LossforgeError, match="ignore_index 0 differs"):
        SurrogateLoss(path=str(path))(logits, label, ignore_index=0)


def _sampled(gen, m, n_sampled):
    weights = torch.zeros(m)
    weights[torch.randperm(m, generator=gen)[:n_sampled]] = 1.0
    return weights


def test_mmdet_rpn_cls_loss_per_level_adds_up_to_the_native_loss():
    """RPN: one sigmoid channel, label 0 = foreground, 1 = background, called once per FPN level."""
    gen = torch.Generator().manual_seed(2)
    native = GraphDetectionLoss(load_graph(DET))
    module = SearchedClsLoss(path=DET, branch="cls_rpn", use_sigmoid=True)
    levels = [60, 25]
    scores = [torch.randn(m, 1, generator=gen) * 2 for m in levels]
    labels = [torch.randint(0, 2, (m,), generator=gen) for m in levels]
    weights = [_sampled(gen, m, k) for m, k in zip(levels, (20, 12))]
    avg_factor = sum(int(w.sum()) for w in weights)
    ours = sum(module(s, lab, w, avg_factor=avg_factor) for s, lab, w in zip(scores, labels, weights))
    keep = torch.cat(weights) > 0
    x, lab = torch.cat(scores)[:, 0][keep], torch.cat(labels)[keep]
    expected = native.weight("cls_rpn") * native.classification("cls_rpn", rpn_logits(x), (lab == 0).long())
    _close(ours, expected)
    assert module(scores[0], labels[0], weights[0], avg_factor=5, reduction_override="none").shape == (60,)


def test_mmdet_rcnn_cls_loss_equals_the_native_loss_with_background_moved_first():
    gen = torch.Generator().manual_seed(3)
    native = GraphDetectionLoss(load_graph(DET))
    module = SearchedClsLoss(path=DET, branch="cls_rcnn")
    k = 4  # mmdet: classes 0..3, background 4; torchvision: background 0, classes 1..4
    scores, labels = torch.randn(40, k + 1, generator=gen) * 2, torch.randint(0, k + 1, (40,), generator=gen)
    ours = module(scores, labels, torch.ones(40), avg_factor=40.0)
    native_logits = torch.cat([scores[:, k:], scores[:, :k]], dim=1)
    _close(ours, native.weight("cls_rcnn") * native.classification("cls_rcnn", native_logits, (labels + 1) % (k + 1)))
    with pytest.raises(LossforgeError, match="use_sigmoid with 5 classes"):
        SearchedClsLoss(path=DET, branch="cls_rcnn", use_sigmoid=True)(scores, labels)


def _boxes(gen, m):
    xy = torch.rand(m, 2, generator=gen) * 50
    return torch.cat([xy, xy + 5 + torch.rand(m, 2, generator=gen) * 30], dim=1)


@pytest.mark.parametrize("branch", ["reg_rpn", "reg_rcnn"])
def test_mmdet_bbox_loss_on_decoded_boxes_equals_the_native_loss(branch):
    gen = torch.Generator().manual_seed(4)
    native = GraphDetectionLoss(load_graph(DET))
    module = SearchedBBoxLoss(path=DET, branch=branch)
    m, num_sampled = 30, 64
    pred, target = _boxes(gen, m), _boxes(gen, m)
    positive = torch.rand(m, generator=gen) > 0.5
    target[~positive] = 0.0  # mmdet leaves the negatives' targets at 0
    weight = positive[:, None].float().expand(m, 4)
    ours = module(pred, target, weight, avg_factor=num_sampled)
    expected = native.weight(branch) * native.regression(
        branch, pred_deltas=pred[positive], target_deltas=target[positive], pred_boxes=pred[positive],
        target_boxes=target[positive], num_sampled=num_sampled)
    _close(ours, expected)
    assert module.loss_weight == 10.0
    assert float(module(pred, target, torch.zeros(m, 4), avg_factor=num_sampled)) == 0.0
    with pytest.raises(LossforgeError, match="reg_decoded_bbox=True"):
        module(pred[:, :2], target[:, :2])


def test_mmdet_mask_loss_equals_the_native_mask_branch():
    gen = torch.Generator().manual_seed(5)
    native = GraphInstanceLoss(load_graph(INS))
    module = SearchedMaskLoss(path=INS)
    preds, labels = torch.randn(6, 3, 14, 14, generator=gen) * 2, torch.randint(0, 3, (6,), generator=gen)
    targets = (torch.rand(6, 14, 14, generator=gen) > 0.5).float()
    _close(module(preds, targets, labels), native.weight("mask") * native.mask(preds[torch.arange(6), labels], targets))
    with pytest.raises(LossforgeError, match="no 'mask' branch"):
        SearchedMaskLoss(path="examples/losses/autolosszero_ins_cls_rpn.json")


def test_mmpose_keypoint_loss_equals_the_native_pose_loss():
    gen = torch.Generator().manual_seed(6)
    path = "examples/losses/autolosszero_pose.json"
    pred, target = torch.randn(2, 5, 16, 12, generator=gen), torch.rand(2, 5, 16, 12, generator=gen)
    weights = (torch.rand(2, 5, generator=gen) > 0.3).float()
    native = GraphPoseLoss(load_graph(path))
    _close(SearchedKeypointLoss(path=path)(pred, target, weights), native(pred, target, weights))
    _close(SearchedKeypointLoss(path=path, use_target_weight=False)(pred, target, weights),
           native(pred, target, torch.ones(2, 5)))


def test_bad_configs_are_one_line_errors():
    with pytest.raises(LossforgeError, match="exactly one of 'path'"):
        SearchedClsLoss(branch="cls_rpn")
    with pytest.raises(LossforgeError, match="branch must be one of cls_rpn, cls_rcnn"):
        SearchedClsLoss(path=DET, branch="reg_rpn")
    with pytest.raises(LossforgeError, match="no 'reg_rpn' branch"):
        SearchedBBoxLoss(path="examples/losses/autolosszero_det_cls_rpn.json", branch="reg_rpn")
    with pytest.raises(LossforgeError, match="detection or instance_segmentation loss graph"):
        SearchedBBoxLoss(path="examples/losses/autolosszero_pose.json")
    with pytest.raises(LossforgeError, match="missing.json: file not found"):
        SearchedLoss(path="missing.json")
