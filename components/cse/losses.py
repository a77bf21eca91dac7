"""A CSE-AutoLoss graph (task `detection_cse`: branches ``cls`` and ``reg``) as the losses of a Faster R-CNN.

Decisions:
- The graph's trees replace the losses of the R-CNN box head (``cls_rcnn``, ``reg_rcnn``), as the released
  CSE-AutoLoss code replaces the bbox head's loss modules of an mmdetection Faster R-CNN; the RPN keeps its
  loss. Here the RPN uses CE + GIoU (`fallback`, the ``ce_giou`` baseline's trees), so CSE-AutoLoss-A against
  ``ce_giou`` differs only in the box head, the comparison of the slides (CE + GIoU → CSE-AutoLoss-A).
- Classification inputs, shape ``(N, C, 1, 1)`` over the N sampled proposals and C classes (background
  included): ``x`` the raw logits, ``y`` the one-hot label, ``w`` the IoU weight broadcast over the classes.
  ``w`` is the IoU of the proposal's decoded box prediction for its labelled class (detached) with its matched
  ground-truth box, 0 for background proposals; the box head hands it over as ``iou=`` because this loss sets
  ``box_iou_weight`` (components.tasks.detection.losses.BranchLossRoIHeads).
- Reduction: the tree output is averaged over proposals *and* classes (Eq. 3 divided by C). A `dot` is
  broadcast back over the C channels, so this is the per-proposal loss of CSE-AutoLoss-A (= CE per proposal
  for the CE tree, the scale of torchvision's CE); element-wise (sigmoid-form) trees get their class mean.
- Regression inputs as `GraphDetectionLoss` (``i``, ``u``, ``e`` of decoded positives in pixels², normalised by
  the number of sampled proposals).
"""

from __future__ import annotations

from typing import Any

import torch
import torch.nn.functional as F
from torch import Tensor

from components.errors import LossforgeError
from components.tasks.detection.losses import (GIOU_TREE, DetectionLoss, GraphDetectionLoss, baseline_graph,
                                               graph_regression)

BRANCH_OF = {"cls_rcnn": "cls", "reg_rcnn": "reg"}
"""Faster R-CNN branch -> the `detection_cse` branch whose tree computes it."""


def classification_inputs(logits: Tensor, labels: Tensor, iou: Tensor | None = None) -> dict[str, Tensor]:
    """Tree inputs ``x``, ``y``, ``w`` of N sampled proposals, shape ``(N, C, 1, 1)`` (w = 0 without `iou`)."""
    n, c = logits.shape
    y = F.one_hot(labels.long(), c).to(logits.dtype)
    w = torch.zeros(n, dtype=logits.dtype, device=logits.device) if iou is None else iou.to(logits.dtype)
    return {"x": logits[:, :, None, None], "y": y[:, :, None, None], "w": w[:, None, None, None].expand(n, c, 1, 1)}


class CSEDetectionLoss(DetectionLoss):
    """A `detection_cse` graph on the R-CNN head of Faster R-CNN, CE + GIoU on the RPN (module docstring)."""

    box_iou_weight = True  # the box head passes `iou=` (the w input) to `classification`

    def __init__(self, graph: Any, fallback: DetectionLoss | None = None):
        super().__init__()
        if getattr(graph, "task", None) != "detection_cse":
            raise LossforgeError(f"CSE loss graph: task must be 'detection_cse', got {getattr(graph, 'task', None)!r}")
        self.graph = graph
        self.fallback = fallback if fallback is not None else GraphDetectionLoss(baseline_graph(GIOU_TREE))

    def _own(self, branch: str) -> str | None:
        name = BRANCH_OF.get(branch)
        return name if name in self.graph.branches else None

    def weight(self, branch: str) -> float:
        own = self._own(branch)
        return float(self.graph.branches[own].weight) if own else self.fallback.weight(branch)

    def classification(self, branch: str, logits: Tensor, labels: Tensor, iou: Tensor | None = None) -> Tensor:
        own = self._own(branch)
        if own is None:
            return self.fallback.classification(branch, logits, labels)
        return self.graph.branch_loss(own, classification_inputs(logits, labels, iou)) / logits.shape[-1]

    def regression(self, branch: str, *, pred_deltas: Tensor, target_deltas: Tensor, pred_boxes: Tensor,
                   target_boxes: Tensor, num_sampled: int) -> Tensor:
        own = self._own(branch)
        if own is None:
            return self.fallback.regression(branch, pred_deltas=pred_deltas, target_deltas=target_deltas,
                                            pred_boxes=pred_boxes, target_boxes=target_boxes, num_sampled=num_sampled)
        return graph_regression(self.graph, own, pred_deltas, pred_boxes, target_boxes, num_sampled)

    def extra_repr(self) -> str:
        return self.graph.formula()


def graph_loss(graph: Any) -> CSEDetectionLoss:
    """A `detection_cse` graph as a detection loss (the detection task's GRAPH_TASK_LOSSES entry)."""
    return CSEDetectionLoss(graph)


def published_loss(name: str) -> CSEDetectionLoss:
    """`cse_autoloss_a` / `cse_autoloss_b` (or another name of `published.PUBLISHED`) as a detection loss."""
    from components.cse.published import published_graph

    return CSEDetectionLoss(published_graph(name))


__all__ = ["BRANCH_OF", "CSEDetectionLoss", "classification_inputs", "graph_loss", "published_loss"]
