"""The mask branch really comes from the tree: a CE mask tree equals torchvision's maskrcnn_loss on the same
inputs; inside Mask R-CNN, the five branches come from the loss (same sampling for every loss)."""

from __future__ import annotations

import pytest
import torch
from torchvision.models.detection.roi_heads import maskrcnn_loss

from components.search.graph import Branch, LossGraph, branch_inputs, parse_prefix
from components.search.graph_json import load_graph
from components.tasks.base import get_task
from components.tasks.detection.losses import CE_TREE
from components.tasks.instance_segmentation.datasets import open_instance_dataset
from components.tasks.instance_segmentation.losses import (BRANCHES, GraphInstanceLoss, TorchvisionMaskLoss,
                                                           baseline_loss, branch_values, mask_branch_loss, mask_inputs)
from components.tasks.instance_segmentation.models import MaskRCNNConfig, build_instance_segmenter, seed_samplers
from components.tasks.segmentation.shapes import ensure_shapes

TINY = MaskRCNNConfig(name="tiny", min_size=64, max_size=64, rpn_batch_size_per_image=32, box_batch_size_per_image=32)


def mask_graph(text: str, weight: float = 1.0) -> LossGraph:
    tree = parse_prefix(text, inputs=branch_inputs("instance_segmentation", "mask"))
    return LossGraph("instance_segmentation", {"mask": Branch(tree, weight)})


def _rois():
    """Two images' gt masks and positive RoIs placed on half pixels, where RoIAlign samples pixel centres exactly:
    torchvision's soft mask targets are then binary, so its BCE and the one-hot inputs see the same targets."""
    gen = torch.Generator().manual_seed(0)
    masks = [(torch.rand(3, 64, 64, generator=gen) > 0.5).to(torch.uint8) for _ in range(2)]
    rois, matched, labels = [], [], []
    for k in range(2):
        starts = torch.randint(0, 30, (4, 2), generator=gen).float() - 0.5
        rois.append(torch.cat([starts, starts + 28.0], dim=1))  # 28 px over 28 bins: one sample per bin, on a pixel
        matched.append(torch.randint(0, 3, (4,), generator=gen))
        labels.append(torch.randint(1, 5, (3,), generator=gen))
    logits = torch.randn(8, 5, 28, 28, generator=gen) * 3
    return logits, rois, masks, labels, matched


def test_ce_mask_tree_equals_torchvision_maskrcnn_loss():
    logits, rois, masks, labels, matched = _rois()
    reference = maskrcnn_loss(logits, rois, masks, labels, matched)
    ce = mask_branch_loss(GraphInstanceLoss(mask_graph(CE_TREE)), logits, rois, masks, labels, matched)
    default = mask_branch_loss(TorchvisionMaskLoss(), logits, rois, masks, labels, matched)
    table8 = load_graph("examples/losses/autolosszero_ins_mask.json")  # |log(y ŷ)| is CE on one-hot targets
    searched = mask_branch_loss(GraphInstanceLoss(table8), logits, rois, masks, labels, matched)
    assert float(ce) == pytest.approx(float(reference), rel=1e-5)
    assert float(default) == pytest.approx(float(reference), rel=1e-6)
    assert float(searched) == pytest.approx(float(reference), rel=1e-5)
    doubled = mask_branch_loss(GraphInstanceLoss(mask_graph(CE_TREE, 2.0)), logits, rois, masks, labels, matched)
    assert float(doubled) == pytest.approx(2 * float(reference), rel=1e-5)  # the branch weight applies
    sq = mask_branch_loss(GraphInstanceLoss(mask_graph("square(add(y,neg(y_hat)))")), logits, rois, masks, labels, matched)
    assert float(sq) != pytest.approx(float(reference), rel=1e-2)  # another tree, another value


def test_mask_inputs_are_the_two_class_softmax():
    x = torch.tensor([[[0.0, 2.0], [-1.0, 30.0]]])  # (P=1, 2, 2)
    t = torch.tensor([[[0.0, 1.0], [1.0, 1.0]]])
    inputs = mask_inputs(x, t)
    assert inputs["y_hat"].shape == inputs["y"].shape == (1, 2, 2, 2)
    assert torch.allclose(inputs["y_hat"][:, 1], torch.sigmoid(x)) and torch.allclose(inputs["y_hat"].sum(1), torch.ones(1, 2, 2))
    assert torch.equal(inputs["y"][:, 1], t) and torch.equal(inputs["y"][:, 0], 1 - t)


@pytest.fixture(scope="module")
def batch(tmp_path_factory):
    root = ensure_shapes(tmp_path_factory.mktemp("ins") / "shapes", num_train=2, num_test=1, image_size=64, seed=2)
    ds = open_instance_dataset(root, split="train")
    return ds, [ds[i] for i in range(2)]


def _losses(ds, items, loss):
    torch.manual_seed(0)
    model = build_instance_segmenter(TINY, ds.num_classes, loss)
    # moderate mask logits: a probability of |x| > ~17 saturates in float32 (the tree sees log(ε)), BCE with
    # logits does not; the random init reaches |x| ~ 30 and the two then differ by ~1 %
    with torch.no_grad():
        model.roi_heads.mask_predictor.mask_fcn_logits.weight.mul_(0.1)
    seed_samplers(model, 5)
    model.train()
    torch.manual_seed(1)
    return branch_values(model([i for i, _ in items], [dict(t) for _, t in items]))


def test_the_five_branches_come_from_the_loss(batch):
    ds, items = batch
    default = _losses(ds, items, None)
    assert set(default) == set(BRANCHES)
    ce = _losses(ds, items, GraphInstanceLoss(mask_graph(CE_TREE)))
    for b in BRANCHES:  # the mask-only graph: its CE tree reproduces the default mask BCE, the rest are the defaults
        assert float(ce[b]) == pytest.approx(float(default[b]), rel=1e-5), b
    task = get_task("instance_segmentation")
    giou = _losses(ds, items, task.build_loss("ce_giou_bce"))
    assert float(giou["mask"]) == pytest.approx(float(default["mask"]), rel=1e-5)
    assert float(giou["cls_rcnn"]) == pytest.approx(float(default["cls_rcnn"]), rel=1e-5)
    assert float(giou["reg_rcnn"]) != pytest.approx(float(default["reg_rcnn"]), rel=1e-3)
    table8 = _losses(ds, items, task.build_loss("examples/losses/autolosszero_ins_all_branches.json"))
    assert all(torch.isfinite(v) for v in table8.values())
    sq = _losses(ds, items, GraphInstanceLoss(mask_graph("square(add(y,neg(y_hat)))")))
    assert float(sq["mask"]) != pytest.approx(float(default["mask"]), rel=1e-2)
    total = sum(_losses(ds, items, baseline_loss("ce_smoothl1_bce")).values())
    assert torch.isfinite(total) and total.requires_grad
