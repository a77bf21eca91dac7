"""How an instance-segmentation loss becomes the five branch losses of Mask R-CNN (AutoLoss-Zero A.3).

The four detection branches are exactly those of ``components.tasks.detection.losses`` (same hooks, same inputs).
The mask branch (A.3: "the per-pixel softmax probabilities indicating foreground or background"):

* predictions: for each of the P positive RoIs (torchvision's sampled positives, as ``maskrcnn_loss``), the
  mask logit x of the RoI's *target* class at the mask resolution M (28 in the paper, the preset's on CPU);
  tree input ``y_hat`` = softmax of the 2-class logits ``[0, x]`` = ``(1 − σ(x), σ(x))`` = [bg, fg];
* targets: the ground-truth mask projected onto the RoI (torchvision's ``project_masks_on_boxes``, RoIAlign)
  and binarised at 0.5 (mmdetection's and detectron2's convention; torchvision keeps the soft RoIAlign values,
  which differ on boundary pixels only); tree input ``y`` = one-hot ``(1 − t, t)``; shape ``(P, 2, M, M)``;
* normalisation: Eq. 3 = the sum over (P, C, M, M) divided by P·M·M, i.e. the mean over the positive RoIs'
  pixels, as torchvision's ``maskrcnn_loss`` (a mean BCE); no positive RoI gives a zero loss. Weight 1.

A CE tree ``-(y log ŷ)`` on these inputs is torchvision's mask BCE (tests/test_instance_segmentation_losses.py).

Baselines (``BASELINES``): ``ce_smoothl1_bce`` (torchvision's losses; the mask BCE on the binarised targets, so a
CE mask tree reproduces it), ``ce_giou_bce`` and ``ce_iou_bce`` (loss graphs: CE, GIoU / IoU with weight 10,
CE mask; the rows of the paper's Table 6a with torchvision's smooth L1 in place of mmdetection's L1).
A graph may hold only some branches: the others use the ``ce_smoothl1_bce`` losses.
"""

from __future__ import annotations

from typing import Any, Callable, Mapping

import torch
import torch.nn.functional as F
from torch import Tensor
from torchvision.models.detection.roi_heads import project_masks_on_boxes

from components.errors import LossforgeError
from components.tasks.detection.losses import (BRANCHES as DETECTION_BRANCHES, CE_TREE, GIOU_TREE, IOU_TREE, LOSS_KEYS as
                                               DETECTION_LOSS_KEYS, BranchLossRoIHeads, DetectionLoss,
                                               GraphDetectionLoss, TorchvisionLoss, rpn_logits)

TASK = "instance_segmentation"
BRANCHES = DETECTION_BRANCHES + ("mask",)
LOSS_KEYS = {**DETECTION_LOSS_KEYS, "mask": "loss_mask"}
"""Branch -> the key torchvision's Mask R-CNN uses for it in the loss dict."""
MASK_THRESHOLD = 0.5  # RoIAlign-projected ground truth >= this is foreground


def mask_targets(gt_masks: list[Tensor], proposals: list[Tensor], matched_idxs: list[Tensor], size: int) -> Tensor:
    """Binary targets (P, M, M) of the positive RoIs (per image: masks (G, H, W), RoIs (P_k, 4), matched gt (P_k,))."""
    parts = [project_masks_on_boxes(m, p, i, size) for m, p, i in zip(gt_masks, proposals, matched_idxs)]
    if not parts:
        return torch.zeros((0, size, size))
    return (torch.cat(parts, dim=0) >= MASK_THRESHOLD).float()


def mask_inputs(logits: Tensor, targets: Tensor) -> dict[str, Tensor]:
    """Tree inputs of the mask branch from target-class logits and binary targets ``(..., P, M, M)``:
    ``y_hat`` = softmax([0, x]) = (1 − σ, σ), ``y`` = one-hot (1 − t, t), ``1``; shape ``(..., P, 2, M, M)``."""
    y_hat = torch.softmax(rpn_logits(logits), dim=-1).movedim(-1, -3)
    t = targets.to(y_hat.dtype)
    y = torch.stack([1 - t, t], dim=-3)
    return {"y_hat": y_hat, "y": y, "1": torch.ones_like(y)}


class InstanceSegmentationLoss(DetectionLoss):
    """The five branch losses of Mask R-CNN: the detection four plus `mask` (unweighted; see `weight`)."""

    def mask(self, logits: Tensor, targets: Tensor) -> Tensor:
        """Loss of the P positive RoIs: target-class mask logits and binary targets, both ``(P, M, M)``."""
        raise NotImplementedError


class TorchvisionMaskLoss(TorchvisionLoss, InstanceSegmentationLoss):
    """torchvision's Mask R-CNN losses (``ce_smoothl1_bce``): the detection defaults plus the mean mask BCE."""

    def mask(self, logits: Tensor, targets: Tensor) -> Tensor:
        if logits.numel() == 0:
            return logits.sum() * 0.0
        return F.binary_cross_entropy_with_logits(logits, targets.to(logits.dtype))


class GraphInstanceLoss(GraphDetectionLoss, InstanceSegmentationLoss):
    """A loss graph (task "instance_segmentation") as the five branch losses; branches it lacks use `fallback`
    (``TorchvisionMaskLoss`` by default) with the fallback's weights."""

    def __init__(self, graph: Any, fallback: InstanceSegmentationLoss | None = None):
        InstanceSegmentationLoss.__init__(self)  # GraphDetectionLoss.__init__ accepts detection graphs only
        if getattr(graph, "task", None) != TASK:
            raise LossforgeError(f"loss graph: task must be {TASK!r}, got {getattr(graph, 'task', None)!r}")
        self.graph = graph
        self.fallback = fallback if fallback is not None else TorchvisionMaskLoss()

    def mask(self, logits: Tensor, targets: Tensor) -> Tensor:
        if "mask" not in self.graph.branches:
            return self.fallback.mask(logits, targets)
        if logits.numel() == 0:
            return logits.sum() * 0.0
        return self.graph.branch_loss("mask", mask_inputs(logits, targets))


# ---------------------------------------------------------------------------------------------- baselines
def baseline_graph(reg_tree: str):
    """The graph CE (cls) + `reg_tree` (reg) + CE (mask) on all five branches, weights 1 / 10 / 1."""
    from components.search.graph import Branch, LossGraph, branch_inputs, default_branch_weight, parse_prefix

    branches = {}
    for b in BRANCHES:
        text = reg_tree if b.startswith("reg") else CE_TREE
        branches[b] = Branch(parse_prefix(text, inputs=branch_inputs(TASK, b)), default_branch_weight(TASK, b))
    return LossGraph(TASK, branches)


BASELINES: dict[str, Callable[[], InstanceSegmentationLoss]] = {
    "ce_smoothl1_bce": TorchvisionMaskLoss,
    "ce_giou_bce": lambda: GraphInstanceLoss(baseline_graph(GIOU_TREE)),
    "ce_iou_bce": lambda: GraphInstanceLoss(baseline_graph(IOU_TREE)),
}
"""Handcrafted instance-segmentation losses by name."""


def baseline_loss(name: str) -> InstanceSegmentationLoss:
    """The baseline registered under `name`; an unknown name lists the known ones."""
    if name not in BASELINES:
        raise LossforgeError(f"instance segmentation loss {name!r} unknown; known: {', '.join(BASELINES)}")
    return BASELINES[name]()


_DEFAULT = TorchvisionMaskLoss()


def mask_branch_loss(loss: DetectionLoss, mask_logits: Tensor, proposals: list[Tensor], gt_masks: list[Tensor],
                     gt_labels: list[Tensor], matched_idxs: list[Tensor]) -> Tensor:
    """The weighted mask loss of a Mask R-CNN step: the same arguments as torchvision's ``maskrcnn_loss``
    (all-class logits (P, K+1, M, M), positive RoIs, gt masks and labels, matched gt per RoI, lists per image).
    A loss without a ``mask`` method (a plain DetectionLoss) gets torchvision's mask BCE."""
    size = mask_logits.shape[-1]
    labels = torch.cat([gl[i] for gl, i in zip(gt_labels, matched_idxs)], dim=0) if gt_labels else torch.zeros(0, dtype=torch.long)
    targets = mask_targets(gt_masks, proposals, matched_idxs, size).to(mask_logits.device)
    logits = mask_logits[torch.arange(labels.shape[0], device=mask_logits.device), labels.to(mask_logits.device)]
    branch = loss if isinstance(loss, InstanceSegmentationLoss) else _DEFAULT
    value = branch.mask(logits, targets)
    return value.reshape(()) * (loss.weight("mask") if isinstance(loss, InstanceSegmentationLoss) else 1.0)


class BranchLossMaskRoIHeads(BranchLossRoIHeads):
    """torchvision's RoI heads with a mask head whose five training losses come from the loss: the box part as
    :class:`~components.tasks.detection.losses.BranchLossRoIHeads` (same sampling, same draws), the mask part
    as torchvision (positive RoIs, their matched ground truth) through :func:`mask_branch_loss`. Inference is
    torchvision's (``masks`` (N, 1, H, W) probabilities in the outputs)."""

    @property
    def detection_loss(self) -> DetectionLoss:
        loss = self.__dict__.get("_detection_loss")
        return loss if loss is not None else _DEFAULT

    # sample_proposals (the detection hook) keeps only the matched boxes; the two torchvision steps it calls
    # are wrapped to keep the matched ground-truth index of every sampled proposal too (the mask targets need it)
    def assign_targets_to_proposals(self, proposals, gt_boxes, gt_labels):
        matched_idxs, labels = super().assign_targets_to_proposals(proposals, gt_boxes, gt_labels)
        self.__dict__["_matched"] = list(matched_idxs)
        return matched_idxs, labels

    def subsample(self, labels):
        sampled = super().subsample(labels)
        self.__dict__["_sampled"] = list(sampled)
        return sampled

    def forward(self, features, proposals, image_shapes, targets=None):
        if not self.training:
            return super().forward(features, proposals, image_shapes, targets)
        if not self.has_mask():
            raise LossforgeError("BranchLossMaskRoIHeads needs a mask head (build_instance_segmenter)")
        for t in targets or []:
            if t["boxes"].dtype not in (torch.float, torch.double, torch.half):
                raise TypeError(f"target boxes must of float type, instead got {t['boxes'].dtype}")
            if t["labels"].dtype != torch.int64:
                raise TypeError(f"target labels must of int64 type, instead got {t['labels'].dtype}")
            if "masks" not in t:
                raise ValueError("instance segmentation targets need 'masks'")
        proposals, labels, regression_targets, matched_gt_boxes = self.sample_proposals(proposals, targets)
        matched = [m[s] for m, s in zip(self.__dict__.pop("_matched"), self.__dict__.pop("_sampled"))]
        box_features = self.box_head(self.box_roi_pool(features, proposals, image_shapes))
        class_logits, box_regression = self.box_predictor(box_features)
        losses = self.branch_losses(class_logits, box_regression, labels, regression_targets,
                                    torch.cat(proposals), torch.cat(matched_gt_boxes))
        positives = [torch.where(l > 0)[0] for l in labels]
        mask_proposals = [p[pos] for p, pos in zip(proposals, positives)]
        pos_matched = [m[pos] for m, pos in zip(matched, positives)]
        mask_logits = self.mask_predictor(self.mask_head(self.mask_roi_pool(features, mask_proposals, image_shapes)))
        losses[LOSS_KEYS["mask"]] = mask_branch_loss(self.detection_loss, mask_logits, mask_proposals,
                                                     [t["masks"] for t in targets], [t["labels"] for t in targets],
                                                     pos_matched)
        return [], losses


def branch_values(loss_dict: Mapping[str, Tensor]) -> dict[str, Tensor]:
    """The weighted branch losses of a Mask R-CNN loss dict, by branch name."""
    inverse = {v: k for k, v in LOSS_KEYS.items()}
    return {inverse.get(k, k): v for k, v in loss_dict.items()}


__all__ = ["BASELINES", "BRANCHES", "LOSS_KEYS", "BranchLossMaskRoIHeads", "GraphInstanceLoss",
           "InstanceSegmentationLoss", "TorchvisionMaskLoss", "baseline_graph", "baseline_loss", "branch_values",
           "mask_branch_loss", "mask_inputs", "mask_targets"]
