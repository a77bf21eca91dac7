"""How a detection loss becomes the four branch losses of Faster R-CNN (AutoLoss-Zero A.2).

torchvision's ``RegionProposalNetwork`` and ``RoIHeads`` compute their losses in fixed code; the subclasses
here (:class:`BranchLossRPN`, :class:`BranchLossRoIHeads`) run the same sampling (same matcher, same sampler,
same random draws, so a run with :class:`TorchvisionLoss` reproduces torchvision's loss values) and hand the
sampled predictions to a pluggable :class:`DetectionLoss`, per branch:

* classification (``cls_rpn``, ``cls_rcnn``): raw logits ``(N, C)`` of the N sampled anchors/proposals and
  their labels ``(N,)``. The RPN's single objectness logit x becomes the 2-class logits ``[0, x]``, whose
  softmax is ``(1 − σ(x), σ(x))`` = [bg, fg]. Tree inputs: ``y_hat`` = softmax, ``y`` = one-hot, shape
  ``(N, C, 1, 1)``; Eq. 3 divides the sum by N: the mean over sampled anchors/proposals, as torchvision's CE.
* regression (``reg_rpn``, ``reg_rcnn``): for the P positive samples only, the predicted deltas, their targets,
  the *decoded* predicted boxes (the module's own box coder, clamping included) and the matched ground-truth
  boxes, plus the number of sampled anchors/proposals. Tree inputs (paper [33], GIoU-style): intersection
  ``i``, union ``u`` and smallest enclosing box area ``e`` of predicted and target box, in pixels², shape
  ``(P, 1, 1, 1)``. Normalisation as torchvision (and mmdetection with a sampler): the sum over positives
  divided by the number of *sampled* anchors/proposals, i.e. Eq. 3 over the sampled set with o = 0 on
  negatives (``graph.branch_loss`` over positives × P / N).

The loss of the model (a dict under torchvision's keys, see ``LOSS_KEYS``) holds the *weighted* branch
losses, so the training loss is the plain sum of its values = Σ_b weight_b · loss_b (Eq. 4).

A loss graph may hold only some branches (e.g. a single published branch): the others use the torchvision
defaults (CE / smooth L1, weight 1), the setting in which the paper reports single-branch results.

Baselines (``BASELINES``): ``ce_smoothl1`` (torchvision's own losses), ``ce_giou`` and ``ce_iou`` (CE for both
classification branches, GIoU / IoU loss for both regression branches, weights 1 and 10 as the paper, [48]);
the last two are loss graphs, so they run through exactly the same code as searched losses. ``cse_autoloss_a`` and
``cse_autoloss_b`` are CSE-AutoLoss's published losses (components/cse/: their trees on the R-CNN head, CE + GIoU on
the RPN); a loss that sets ``box_iou_weight`` gets CSE-AutoLoss's IoU weight ``w`` as ``classification(..., iou=)``.
"""

from __future__ import annotations

import importlib
from typing import Any, Callable, Mapping, Optional

import torch
import torch.nn.functional as F
from torch import Tensor, nn
from torchvision.models.detection.roi_heads import RoIHeads
from torchvision.models.detection.rpn import RegionProposalNetwork, concat_box_prediction_layers

from components.errors import LossforgeError

BRANCHES = ("cls_rpn", "reg_rpn", "cls_rcnn", "reg_rcnn")
LOSS_KEYS = {"cls_rpn": "loss_objectness", "reg_rpn": "loss_rpn_box_reg",
             "cls_rcnn": "loss_classifier", "reg_rcnn": "loss_box_reg"}
"""Branch -> the key torchvision's detection models use for it in the loss dict."""


def box_areas(pred: Tensor, target: Tensor) -> tuple[Tensor, Tensor, Tensor]:
    """(intersection, union, enclosing area) of xyxy boxes `pred` and `target` (same shape ``(..., 4)``).

    A predicted box with x1 < x0 (possible for decoded deltas only in degenerate cases) has area 0.
    """
    px0, py0, px1, py1 = pred.unbind(-1)
    tx0, ty0, tx1, ty1 = target.unbind(-1)
    area_p = (px1 - px0).clamp(min=0) * (py1 - py0).clamp(min=0)
    area_t = (tx1 - tx0).clamp(min=0) * (ty1 - ty0).clamp(min=0)
    iw = (torch.minimum(px1, tx1) - torch.maximum(px0, tx0)).clamp(min=0)
    ih = (torch.minimum(py1, ty1) - torch.maximum(py0, ty0)).clamp(min=0)
    inter = iw * ih
    union = area_p + area_t - inter
    ew = torch.maximum(px1, tx1) - torch.minimum(px0, tx0)
    eh = torch.maximum(py1, ty1) - torch.minimum(py0, ty0)
    return inter, union, ew * eh


def rpn_logits(objectness: Tensor) -> Tensor:
    """2-class logits ``[0, x]`` of RPN objectness logits x ``(N,)``: softmax = (1 − σ(x), σ(x)) = [bg, fg]."""
    return torch.stack([torch.zeros_like(objectness), objectness], dim=-1)


def classification_inputs(logits: Tensor, labels: Tensor) -> dict[str, Tensor]:
    """Tree inputs of a classification branch: ``y_hat`` softmax, ``y`` one-hot, ``1``; shape ``(..., N, C, 1, 1)``."""
    y_hat = torch.softmax(logits, dim=-1)
    y = F.one_hot(labels.long(), logits.shape[-1]).to(y_hat.dtype)
    return {"y_hat": y_hat[..., None, None], "y": y[..., None, None], "1": torch.ones_like(y)[..., None, None]}


def regression_inputs(pred_boxes: Tensor, target_boxes: Tensor) -> dict[str, Tensor]:
    """Tree inputs of a regression branch: ``i``, ``u``, ``e`` (and ``1``), shape ``(..., P, 1, 1, 1)``."""
    i, u, e = box_areas(pred_boxes, target_boxes)
    shape = i.shape + (1, 1, 1)
    return {"i": i.reshape(shape), "u": u.reshape(shape), "e": e.reshape(shape), "1": torch.ones_like(i).reshape(shape)}


class DetectionLoss(nn.Module):
    """The four branch losses of Faster R-CNN; subclasses implement `classification` and `regression`.

    Both return the *unweighted* branch loss (a scalar); `weight(branch)` is its weight in the total.
    """

    def weight(self, branch: str) -> float:
        """Weight of `branch` in Σ_b weight_b · loss_b."""
        return 1.0

    def classification(self, branch: str, logits: Tensor, labels: Tensor) -> Tensor:
        """Loss of the N sampled anchors/proposals: logits ``(N, C)``, labels ``(N,)`` in 0..C-1."""
        raise NotImplementedError

    def regression(self, branch: str, *, pred_deltas: Tensor, target_deltas: Tensor, pred_boxes: Tensor,
                   target_boxes: Tensor, num_sampled: int) -> Tensor:
        """Loss of the P positives (deltas and decoded xyxy boxes ``(P, 4)``), normalised by `num_sampled`."""
        raise NotImplementedError

    def forward(self, *args, **kwargs):  # pragma: no cover - used through the Faster R-CNN hooks
        raise LossforgeError("a DetectionLoss is called by the detector (components.tasks.detection.models), not directly")


class TorchvisionLoss(DetectionLoss):
    """torchvision's Faster R-CNN losses (``ce_smoothl1``): BCE objectness, CE, smooth L1 (β = 1/9) on the
    deltas, summed over positives and divided by the number of sampled anchors/proposals; weights 1."""

    def classification(self, branch: str, logits: Tensor, labels: Tensor) -> Tensor:
        if branch == "cls_rpn":  # torchvision: BCE with logits on x = logit_fg − logit_bg
            return F.binary_cross_entropy_with_logits(logits[:, 1] - logits[:, 0], labels.to(logits.dtype))
        return F.cross_entropy(logits, labels)

    def regression(self, branch: str, *, pred_deltas: Tensor, target_deltas: Tensor, pred_boxes: Tensor,
                   target_boxes: Tensor, num_sampled: int) -> Tensor:
        return F.smooth_l1_loss(pred_deltas, target_deltas, beta=1 / 9, reduction="sum") / max(num_sampled, 1)


class GraphDetectionLoss(DetectionLoss):
    """A loss graph (task "detection") as the four branch losses; branches the graph lacks use `fallback`
    (torchvision's losses by default) with the fallback's weights."""

    def __init__(self, graph: Any, fallback: DetectionLoss | None = None):
        super().__init__()
        if getattr(graph, "task", None) != "detection":
            raise LossforgeError(f"loss graph: task must be 'detection', got {getattr(graph, 'task', None)!r}")
        self.graph = graph
        self.fallback = fallback if fallback is not None else TorchvisionLoss()

    def weight(self, branch: str) -> float:
        if branch in self.graph.branches:
            return float(self.graph.branches[branch].weight)
        return self.fallback.weight(branch)

    def classification(self, branch: str, logits: Tensor, labels: Tensor) -> Tensor:
        if branch not in self.graph.branches:
            return self.fallback.classification(branch, logits, labels)
        return self.graph.branch_loss(branch, classification_inputs(logits, labels))

    def regression(self, branch: str, *, pred_deltas: Tensor, target_deltas: Tensor, pred_boxes: Tensor,
                   target_boxes: Tensor, num_sampled: int) -> Tensor:
        if branch not in self.graph.branches:
            return self.fallback.regression(branch, pred_deltas=pred_deltas, target_deltas=target_deltas,
                                            pred_boxes=pred_boxes, target_boxes=target_boxes, num_sampled=num_sampled)
        return graph_regression(self.graph, branch, pred_deltas, pred_boxes, target_boxes, num_sampled)

    def extra_repr(self) -> str:
        return self.graph.formula()


# ---------------------------------------------------------------------------------------------- baselines
def _tree(text: str, branch: str):
    from components.search.graph import branch_inputs, parse_prefix

    return parse_prefix(text, inputs=branch_inputs("detection", branch))


CE_TREE = "neg(mul(y,log(y_hat)))"
GIOU_TREE = "add(1,add(1,neg(add(mul(i,inv(u)),mul(u,inv(e))))))"  # 1 − i/u + (e − u)/e = 2 − i/u − u/e
IOU_TREE = "add(1,neg(mul(i,inv(u))))"  # 1 − i/u


def baseline_graph(reg_tree: str):
    """The graph CE (cls) + `reg_tree` (reg) on all four branches, weights 1 / 10 (paper A.2)."""
    from components.search.graph import Branch, LossGraph, default_branch_weight

    branches = {}
    for b in BRANCHES:
        branches[b] = Branch(_tree(CE_TREE if b.startswith("cls") else reg_tree, b), default_branch_weight("detection", b))
    return LossGraph("detection", branches)


GRAPH_TASK_LOSSES: dict[str, str] = {"detection_cse": "components.cse.losses"}
"""Loss graphs of other tasks this task trains: graph task -> the module whose `graph_loss(graph)` and
`published_loss(name)` build them. Found by name and imported on use, like the search methods' registry: that
package (CSE-AutoLoss, which puts its trees on the R-CNN head) depends on this one, not the other way round."""


def graph_task_module(graph_task: str) -> Any:
    """The module registered in GRAPH_TASK_LOSSES for `graph_task` (imported now)."""
    return importlib.import_module(GRAPH_TASK_LOSSES[graph_task])


def graph_regression(graph: Any, branch: str, pred_deltas: Tensor, pred_boxes: Tensor, target_boxes: Tensor,
                     num_sampled: int) -> Tensor:
    """A regression tree of `graph` on the decoded positives' i, u, e, summed over positives and divided by the
    sampled anchors / proposals (torchvision's normalisation); 0 (with a graph to the deltas) without positives."""
    positives = pred_boxes.shape[0]
    if positives == 0:
        return pred_deltas.sum() * 0.0
    loss = graph.branch_loss(branch, regression_inputs(pred_boxes, target_boxes))
    return loss * (positives / max(num_sampled, 1))


BASELINES: dict[str, Callable[[], DetectionLoss]] = {
    "ce_smoothl1": TorchvisionLoss,
    "ce_giou": lambda: GraphDetectionLoss(baseline_graph(GIOU_TREE)),
    "ce_iou": lambda: GraphDetectionLoss(baseline_graph(IOU_TREE)),
    # CSE-AutoLoss's published losses on the R-CNN head (components/cse/losses.py; RPN: CE + GIoU)
    "cse_autoloss_a": lambda: graph_task_module("detection_cse").published_loss("cse_autoloss_a"),
    "cse_autoloss_b": lambda: graph_task_module("detection_cse").published_loss("cse_autoloss_b"),
}
"""Handcrafted detection losses by name."""


def baseline_loss(name: str) -> DetectionLoss:
    """The baseline registered under `name`; an unknown name lists the known ones."""
    if name not in BASELINES:
        raise LossforgeError(f"detection loss {name!r} unknown; known: {', '.join(BASELINES)}")
    return BASELINES[name]()


# ---------------------------------------------------------------------------------------------- hooks
def _weighted(loss: DetectionLoss, branch: str, value: Tensor) -> Tensor:
    return value.reshape(()) * loss.weight(branch)


class _LossHolder:
    """Mixin: the module's DetectionLoss, kept out of the module tree (no state_dict entries, not deep-copied
    with the template's parameters twice); torchvision's losses when none is set."""

    def set_detection_loss(self, loss: DetectionLoss | None) -> None:
        object.__setattr__(self, "_detection_loss", loss)

    @property
    def detection_loss(self) -> DetectionLoss:
        loss = self.__dict__.get("_detection_loss")
        return loss if loss is not None else _DEFAULT


_DEFAULT = TorchvisionLoss()


class BranchLossRPN(_LossHolder, RegionProposalNetwork):
    """torchvision's RPN whose training losses come from the detection loss (``cls_rpn``, ``reg_rpn``).

    Inference is torchvision's; training repeats torchvision's forward and loss sampling step by step
    (same calls in the same order, so the same random draws) and keeps the anchors and matched boxes that
    the regression inputs need.
    """

    def forward(self, images, features, targets: Optional[list[dict[str, Tensor]]] = None):
        if not self.training:
            return super().forward(images, features, targets)
        if targets is None:
            raise ValueError("targets should not be None")
        features = list(features.values())
        objectness, pred_bbox_deltas = self.head(features)
        anchors = self.anchor_generator(images, features)
        num_images = len(anchors)
        num_anchors_per_level = [o[0].shape[0] * o[0].shape[1] * o[0].shape[2] for o in objectness]
        objectness, pred_bbox_deltas = concat_box_prediction_layers(objectness, pred_bbox_deltas)
        proposals = self.box_coder.decode(pred_bbox_deltas.detach(), anchors).view(num_images, -1, 4)
        boxes, _ = self.filter_proposals(proposals, objectness, images.image_sizes, num_anchors_per_level)
        labels, matched_gt_boxes = self.assign_targets_to_anchors(anchors, targets)
        regression_targets = self.box_coder.encode(matched_gt_boxes, anchors)
        losses = self.branch_losses(objectness, pred_bbox_deltas, labels, regression_targets,
                                    torch.cat(anchors), torch.cat(matched_gt_boxes))
        return boxes, losses

    def branch_losses(self, objectness: Tensor, pred_bbox_deltas: Tensor, labels: list[Tensor],
                      regression_targets: list[Tensor], anchors: Tensor, matched_gt_boxes: Tensor) -> dict[str, Tensor]:
        """Weighted ``cls_rpn`` / ``reg_rpn`` losses under torchvision's keys (sampling as ``compute_loss``)."""
        sampled_pos, sampled_neg = self.fg_bg_sampler(labels)
        pos = torch.where(torch.cat(sampled_pos, dim=0))[0]
        neg = torch.where(torch.cat(sampled_neg, dim=0))[0]
        sampled = torch.cat([pos, neg], dim=0)
        objectness = objectness.flatten()
        labels = torch.cat(labels, dim=0)
        regression_targets = torch.cat(regression_targets, dim=0)
        loss = self.detection_loss
        cls = loss.classification("cls_rpn", rpn_logits(objectness[sampled]), labels[sampled].long())
        pred_deltas = pred_bbox_deltas[pos]
        pred_boxes = self.box_coder.decode_single(pred_deltas, anchors[pos])
        reg = loss.regression("reg_rpn", pred_deltas=pred_deltas, target_deltas=regression_targets[pos],
                              pred_boxes=pred_boxes, target_boxes=matched_gt_boxes[pos], num_sampled=sampled.numel())
        return {LOSS_KEYS["cls_rpn"]: _weighted(loss, "cls_rpn", cls), LOSS_KEYS["reg_rpn"]: _weighted(loss, "reg_rpn", reg)}


class BranchLossRoIHeads(_LossHolder, RoIHeads):
    """torchvision's box RoI heads whose training losses come from the detection loss (``cls_rcnn``,
    ``reg_rcnn``); box heads only (no masks or keypoints). Inference is torchvision's."""

    def forward(self, features, proposals, image_shapes, targets=None):
        if not self.training:
            return super().forward(features, proposals, image_shapes, targets)
        if self.has_mask() or self.has_keypoint():
            raise LossforgeError("BranchLossRoIHeads supports box heads only")
        for t in targets or []:
            if t["boxes"].dtype not in (torch.float, torch.double, torch.half):
                raise TypeError(f"target boxes must of float type, instead got {t['boxes'].dtype}")
            if t["labels"].dtype != torch.int64:
                raise TypeError(f"target labels must of int64 type, instead got {t['labels'].dtype}")
        proposals, labels, regression_targets, matched_gt_boxes = self.sample_proposals(proposals, targets)
        box_features = self.box_head(self.box_roi_pool(features, proposals, image_shapes))
        class_logits, box_regression = self.box_predictor(box_features)
        losses = self.branch_losses(class_logits, box_regression, labels, regression_targets,
                                    torch.cat(proposals), torch.cat(matched_gt_boxes))
        return [], losses

    def sample_proposals(self, proposals: list[Tensor], targets):
        """``select_training_samples`` of torchvision (same calls, same random draws), also returning the
        matched ground-truth boxes: (proposals, labels, regression targets, matched boxes), lists per image."""
        self.check_targets(targets)
        if targets is None:
            raise ValueError("targets should not be None")
        dtype, device = proposals[0].dtype, proposals[0].device
        gt_boxes = [t["boxes"].to(dtype) for t in targets]
        gt_labels = [t["labels"] for t in targets]
        proposals = self.add_gt_proposals(proposals, gt_boxes)
        matched_idxs, labels = self.assign_targets_to_proposals(proposals, gt_boxes, gt_labels)
        sampled_inds = self.subsample(labels)
        matched_gt_boxes = []
        for k in range(len(proposals)):
            inds = sampled_inds[k]
            proposals[k], labels[k], matched_idxs[k] = proposals[k][inds], labels[k][inds], matched_idxs[k][inds]
            boxes = gt_boxes[k] if gt_boxes[k].numel() else torch.zeros((1, 4), dtype=dtype, device=device)
            matched_gt_boxes.append(boxes[matched_idxs[k]])
        regression_targets = self.box_coder.encode(matched_gt_boxes, proposals)
        return proposals, labels, regression_targets, matched_gt_boxes

    def branch_losses(self, class_logits: Tensor, box_regression: Tensor, labels: list[Tensor],
                      regression_targets: list[Tensor], proposals: Tensor, matched_gt_boxes: Tensor) -> dict[str, Tensor]:
        """Weighted ``cls_rcnn`` / ``reg_rcnn`` losses under torchvision's keys (as ``fastrcnn_loss``)."""
        labels = torch.cat(labels, dim=0)
        regression_targets = torch.cat(regression_targets, dim=0)
        loss = self.detection_loss
        n = class_logits.shape[0]
        # CSE-AutoLoss's IoU weight w (components/cse/losses.py): only for losses that ask for it
        iou = {"iou": self.sample_ious(box_regression, labels, proposals, matched_gt_boxes)} if getattr(
            loss, "box_iou_weight", False) else {}
        cls = loss.classification("cls_rcnn", class_logits, labels, **iou)
        pos = torch.where(labels > 0)[0]
        pred_deltas = box_regression.reshape(n, box_regression.size(-1) // 4, 4)[pos, labels[pos]]
        pred_boxes = self.box_coder.decode_single(pred_deltas, proposals[pos])
        reg = loss.regression("reg_rcnn", pred_deltas=pred_deltas, target_deltas=regression_targets[pos],
                              pred_boxes=pred_boxes, target_boxes=matched_gt_boxes[pos], num_sampled=labels.numel())
        return {LOSS_KEYS["cls_rcnn"]: _weighted(loss, "cls_rcnn", cls),
                LOSS_KEYS["reg_rcnn"]: _weighted(loss, "reg_rcnn", reg)}

    def sample_ious(self, box_regression: Tensor, labels: Tensor, proposals: Tensor, matched_gt_boxes: Tensor) -> Tensor:
        """IoU (no gradient) of each sampled proposal's decoded box for its labelled class with its matched
        ground-truth box; 0 for background proposals."""
        with torch.no_grad():
            n = box_regression.shape[0]
            deltas = box_regression.reshape(n, box_regression.size(-1) // 4, 4)[torch.arange(n, device=labels.device), labels]
            inter, union, _ = box_areas(self.box_coder.decode_single(deltas, proposals), matched_gt_boxes)
            return torch.where(labels > 0, inter / union.clamp(min=1e-6), torch.zeros_like(inter))


def branch_values(loss_dict: Mapping[str, Tensor]) -> dict[str, Tensor]:
    """The weighted branch losses of a detector's loss dict, by branch name."""
    inverse = {v: k for k, v in LOSS_KEYS.items()}
    return {inverse.get(k, k): v for k, v in loss_dict.items()}


__all__ = ["BASELINES", "BRANCHES", "LOSS_KEYS", "BranchLossRPN", "BranchLossRoIHeads", "DetectionLoss",
           "GraphDetectionLoss", "TorchvisionLoss", "baseline_graph", "baseline_loss", "box_areas",
           "branch_values", "classification_inputs", "regression_inputs", "rpn_logits"]
