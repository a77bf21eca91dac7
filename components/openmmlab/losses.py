"""Searched losses as OpenMMLab loss modules: the call conventions of mmseg's decode heads, mmdet's RPN / R-CNN
/ mask heads and mmpose's heatmap heads, computed with the project's own loss code.

This file needs only torch and the project (no OpenMMLab import), so its values are tested on every machine;
``components.openmmlab.registry`` registers the classes in the OpenMMLab MODELS registries.

Each module turns OpenMMLab's arguments into the inputs of the native loss and returns what the native loss
returns on the same predictions (tests/test_openmmlab_losses.py):

* mmseg (``SearchedLoss``, ``SurrogateLoss``): ``forward(cls_score (N,C,H,W), label (N,H,W), weight=None,
  ignore_index=255)`` -> the segmentation task's ``build_loss`` module (``GraphSegLoss`` / the Auto Seg-Loss
  ``SurrogateLoss``) times ``loss_weight``. A per-pixel ``weight`` (mmseg's OHEM sampler) keeps the pixels with
  weight > 0 (the others are ignored): a loss tree has no per-pixel weights.
* mmdet classification (``SearchedClsLoss``, branch ``cls_rpn`` | ``cls_rcnn``): ``forward(cls_score (M, C'),
  labels (M,), label_weights (M,), avg_factor)``. mmdet's labels put background last (index C; the RPN's one
  sigmoid channel is class 0 = foreground); the native loss puts it first, so the logits are reordered as
  ``components.tasks.detection.losses`` expects (one channel x becomes ``[0, x]``, as torchvision's RPN).
  The rows with label weight > 0 are mmdet's sampled anchors / proposals and ``avg_factor`` their number, so
  ``Σ_rows w·o / avg_factor`` is the native Eq. 3 mean over the sampled set; mmdet calls the RPN loss once per
  FPN level with the same avg_factor, and the per-level values add up to the native loss of all levels.
* mmdet regression (``SearchedBBoxLoss``, ``reg_rpn`` | ``reg_rcnn``): ``forward(pred (M,4), target (M,4),
  weight (M,4), avg_factor)`` on *decoded* xyxy boxes, so the head needs ``reg_decoded_bbox=True`` (the exported
  snippet sets it; mmdet's GIoU configs do the same). Positives are the rows with weight > 0; the value is
  ``Σ_pos o / avg_factor`` = the native ``branch_loss × P / num_sampled``.
* mmdet mask (``SearchedMaskLoss``): ``forward(mask_pred (P,K,M,M), mask_targets (P,M,M), labels (P,))``: the
  target class's logit map, as ``components.tasks.instance_segmentation.losses.mask_inputs``.
* mmpose (``SearchedKeypointLoss``): ``forward(output (N,K,h,w), target, target_weights (N,K))`` ->
  ``GraphPoseLoss``.

``loss_weight`` defaults to the branch's weight in the loss graph (10 for the regression branches), so the sum
of the head's losses is the native Eq. 4 total; ``reduction_override="none"`` (mmdet's OHEM) gives the weighted
per-row values, ``"sum"`` their sum.
"""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any

import torch
from torch import Tensor, nn

from components.errors import LossforgeError

DETECTION_TASKS = ("detection", "instance_segmentation")
CLS_BRANCHES = ("cls_rpn", "cls_rcnn")
REG_BRANCHES = ("reg_rpn", "reg_rcnn")


def load_loss_graph(path: str | None, graph: Mapping[str, Any] | None, what: str):
    """The loss graph of a module config: ``path`` (a lossforge.loss/1 file) or ``graph`` (its dict)."""
    from components.search import graph_json

    if (path is None) == (graph is None):
        raise LossforgeError(f"{what}: give exactly one of 'path' (a lossforge.loss/1 JSON file) or 'graph'")
    return graph_json.load_graph(path) if path is not None else graph_json.graph_from_dict(dict(graph), f"{what}.graph")


def _branch(graph: Any, branch: str, tasks: tuple[str, ...], what: str):
    if graph.task not in tasks:
        raise LossforgeError(f"{what}: a {' or '.join(tasks)} loss graph is needed, got task {graph.task!r}")
    if branch not in graph.branches:
        raise LossforgeError(f"{what}: the loss graph has no {branch!r} branch (has: {', '.join(graph.branches)}); "
                             "keep the head's default loss for it")
    return graph.branches[branch]


def _weight(loss_weight: float | None, default: float, what: str) -> float:
    value = default if loss_weight is None else loss_weight
    if isinstance(value, bool) or not isinstance(value, (int, float)):
        raise LossforgeError(f"{what}: loss_weight must be a number, got {value!r}")
    return float(value)


def _reduce(rows: Tensor, weights: Tensor, avg_factor: float | None, reduction: str) -> Tensor:
    """mmdet's weighted reduction of per-row tree outputs; rows with weight 0 contribute exactly 0."""
    if reduction not in ("none", "mean", "sum"):
        raise LossforgeError(f"reduction_override must be none, mean or sum, got {reduction!r}")
    kept = torch.where(weights > 0, rows * weights, torch.zeros((), dtype=rows.dtype, device=rows.device))
    if reduction == "none":
        return kept
    total = kept.sum()
    if reduction == "sum":
        return total
    return total / (float(avg_factor) if avg_factor is not None else max(rows.shape[0], 1))


class SearchedLoss(nn.Module):
    """mmseg ``loss_decode``: a searched segmentation loss graph (``type='SearchedLoss', path='best.json'``)."""

    def __init__(self, path: str | None = None, graph: Mapping[str, Any] | None = None, target: str | None = None,
                 boundary: str | None = None, boundary_width: int | None = None, loss_weight: float = 1.0,
                 loss_name: str = "loss_searched") -> None:
        super().__init__()
        from components.tasks.loss_registry import build_loss

        spec: dict[str, Any] = {"type": "graph"}
        if (path is None) == (graph is None):
            raise LossforgeError("SearchedLoss: give exactly one of 'path' (a lossforge.loss/1 JSON file) or 'graph'")
        spec.update({"path": path} if path is not None else {"graph": dict(graph)})
        for key, value in (("target", target), ("boundary", boundary), ("boundary_width", boundary_width)):
            if value is not None:
                spec[key] = value
        self.loss = build_loss(spec)
        self.loss_weight = _weight(loss_weight, 1.0, "SearchedLoss")
        self._loss_name = loss_name

    @property
    def loss_name(self) -> str:
        """The key of this loss in mmseg's loss dict (must start with ``loss_`` to be optimised)."""
        return self._loss_name

    def forward(self, cls_score: Tensor, label: Tensor, weight: Tensor | None = None, ignore_index: int = 255,
                **kwargs: Any) -> Tensor:
        self.loss.ignore_index = ignore_index
        return self.loss_weight * self.loss(cls_score, _drop_unweighted(label, weight, ignore_index))


class SurrogateLoss(nn.Module):
    """mmseg ``loss_decode``: an Auto Seg-Loss surrogate (``type='SurrogateLoss', path='surrogate.json'``).
    The number of classes is read from the logits on the first call unless given."""

    def __init__(self, path: str | None = None, spec: Mapping[str, Any] | None = None, num_classes: int | None = None,
                 loss_weight: float = 1.0, loss_name: str = "loss_surrogate") -> None:
        super().__init__()
        from components.surrogates import metric_surrogates

        if (path is None) == (spec is None):
            raise LossforgeError("SurrogateLoss: give exactly one of 'path' (a lossforge.surrogate/1 JSON file) or 'spec'")
        self.spec = metric_surrogates.load_surrogate(path) if path is not None else \
            metric_surrogates.SurrogateSpec.from_dict(dict(spec))
        self.num_classes = num_classes
        self.loss_weight = _weight(loss_weight, 1.0, "SurrogateLoss")
        self._loss_name = loss_name
        self.loss = None if num_classes is None else metric_surrogates.SurrogateLoss(self.spec, int(num_classes))

    @property
    def loss_name(self) -> str:
        """The key of this loss in mmseg's loss dict."""
        return self._loss_name

    def forward(self, cls_score: Tensor, label: Tensor, weight: Tensor | None = None, ignore_index: int = 255,
                **kwargs: Any) -> Tensor:
        from components.surrogates import metric_surrogates

        if self.loss is None:
            self.loss = metric_surrogates.SurrogateLoss(self.spec, int(cls_score.shape[1])).to(cls_score.device)
        if ignore_index != self.spec.ignore_index:
            raise LossforgeError(f"SurrogateLoss: the head's ignore_index {ignore_index} differs from the surrogate "
                                 f"file's {self.spec.ignore_index}")
        return self.loss_weight * self.loss(cls_score, _drop_unweighted(label, weight, ignore_index))


def _drop_unweighted(label: Tensor, weight: Tensor | None, ignore_index: int) -> Tensor:
    """`label` with the pixels of weight 0 (mmseg's OHEM sampler) set to `ignore_index`."""
    if label.dim() == 4 and label.shape[1] == 1:
        label = label[:, 0]
    if weight is None:
        return label
    return torch.where(weight.reshape(label.shape) > 0, label, torch.full_like(label, ignore_index))


class SearchedClsLoss(nn.Module):
    """mmdet ``loss_cls`` of the RPN (``branch='cls_rpn'``, ``use_sigmoid=True``: one objectness channel) or of
    the R-CNN box head (``branch='cls_rcnn'``, softmax over K+1 classes, background last)."""

    def __init__(self, path: str | None = None, graph: Mapping[str, Any] | None = None, branch: str = "cls_rcnn",
                 use_sigmoid: bool = False, loss_weight: float | None = None) -> None:
        super().__init__()
        if branch not in CLS_BRANCHES:
            raise LossforgeError(f"SearchedClsLoss: branch must be one of {', '.join(CLS_BRANCHES)}, got {branch!r}")
        self.graph = load_loss_graph(path, graph, "SearchedClsLoss")
        self.tree_branch = _branch(self.graph, branch, DETECTION_TASKS, "SearchedClsLoss")
        self.branch = branch
        self.use_sigmoid = bool(use_sigmoid)
        self.loss_weight = _weight(loss_weight, self.tree_branch.weight, "SearchedClsLoss")

    def native_logits(self, cls_score: Tensor, labels: Tensor) -> tuple[Tensor, Tensor]:
        """Logits and labels in the native order (background = class 0) of mmdet's (background last)."""
        from components.tasks.detection.losses import rpn_logits

        channels = cls_score.shape[-1]
        if channels == 1:  # sigmoid: the one channel is the foreground (label 0), label 1 is background
            return rpn_logits(cls_score[:, 0]), (labels == 0).long()
        if self.use_sigmoid:
            raise LossforgeError(f"SearchedClsLoss: use_sigmoid with {channels} classes is not supported "
                                 "(a searched classification loss acts on softmax probabilities)")
        logits = torch.cat([cls_score[:, -1:], cls_score[:, :-1]], dim=1)
        return logits, (labels.long() + 1) % channels

    def forward(self, cls_score: Tensor, labels: Tensor, weight: Tensor | None = None, avg_factor: float | None = None,
                reduction_override: str | None = None, **kwargs: Any) -> Tensor:
        from components.tasks.detection.losses import classification_inputs

        logits, native = self.native_logits(cls_score, labels)
        rows = self.tree_branch.tree.evaluate(classification_inputs(logits, native)).sum(dim=(-3, -2, -1))
        weights = torch.ones_like(rows) if weight is None else weight.reshape(-1).to(rows.dtype)
        return self.loss_weight * _reduce(rows, weights, avg_factor, reduction_override or "mean")


class SearchedBBoxLoss(nn.Module):
    """mmdet ``loss_bbox`` of the RPN (``branch='reg_rpn'``) or the R-CNN box head (``'reg_rcnn'``), on decoded
    boxes: the head must set ``reg_decoded_bbox=True``."""

    def __init__(self, path: str | None = None, graph: Mapping[str, Any] | None = None, branch: str = "reg_rcnn",
                 loss_weight: float | None = None) -> None:
        super().__init__()
        if branch not in REG_BRANCHES:
            raise LossforgeError(f"SearchedBBoxLoss: branch must be one of {', '.join(REG_BRANCHES)}, got {branch!r}")
        self.graph = load_loss_graph(path, graph, "SearchedBBoxLoss")
        self.tree_branch = _branch(self.graph, branch, DETECTION_TASKS, "SearchedBBoxLoss")
        self.branch = branch
        self.loss_weight = _weight(loss_weight, self.tree_branch.weight, "SearchedBBoxLoss")

    def forward(self, pred: Tensor, target: Tensor, weight: Tensor | None = None, avg_factor: float | None = None,
                reduction_override: str | None = None, **kwargs: Any) -> Tensor:
        from components.tasks.detection.losses import regression_inputs

        if pred.shape[-1] != 4 or target.shape != pred.shape:
            raise LossforgeError(f"SearchedBBoxLoss: pred and target must be decoded boxes (M, 4), got "
                                 f"{tuple(pred.shape)} and {tuple(target.shape)} (set reg_decoded_bbox=True)")
        weights = torch.ones(pred.shape[0], dtype=pred.dtype, device=pred.device) if weight is None else \
            (weight.reshape(pred.shape[0], -1) > 0).any(dim=1).to(pred.dtype)
        # positives only: negatives' boxes may be anything (mmdet leaves their targets at 0)
        pos = weights > 0
        rows = torch.zeros(pred.shape[0], dtype=pred.dtype, device=pred.device)
        if bool(pos.any()):
            out = self.tree_branch.tree.evaluate(regression_inputs(pred[pos], target[pos]))
            rows = rows.index_put((pos.nonzero()[:, 0],), out.reshape(-1))
        elif (reduction_override or "mean") != "none":
            return pred.sum() * 0.0
        return self.loss_weight * _reduce(rows, weights, avg_factor, reduction_override or "mean")


class SearchedMaskLoss(nn.Module):
    """mmdet ``loss_mask`` of an FCN mask head: the ``mask`` branch of an instance-segmentation loss graph."""

    def __init__(self, path: str | None = None, graph: Mapping[str, Any] | None = None,
                 loss_weight: float | None = None, use_mask: bool = True) -> None:
        super().__init__()
        self.graph = load_loss_graph(path, graph, "SearchedMaskLoss")
        self.tree_branch = _branch(self.graph, "mask", ("instance_segmentation",), "SearchedMaskLoss")
        self.loss_weight = _weight(loss_weight, self.tree_branch.weight, "SearchedMaskLoss")

    def forward(self, mask_pred: Tensor, mask_targets: Tensor, labels: Tensor, weight: Tensor | None = None,
                avg_factor: float | None = None, reduction_override: str | None = None, **kwargs: Any) -> Tensor:
        from components.search.graph import reduce_eq3
        from components.tasks.instance_segmentation.losses import mask_inputs

        if mask_pred.shape[0] == 0:
            return mask_pred.sum() * 0.0
        logits = mask_pred[torch.arange(mask_pred.shape[0], device=mask_pred.device), labels.long()]
        return self.loss_weight * reduce_eq3(self.tree_branch.tree.evaluate(mask_inputs(logits, mask_targets)))


class SearchedKeypointLoss(nn.Module):
    """mmpose heatmap-head ``loss``: the ``heatmap`` branch of a pose loss graph, masked by the joint weights
    (``GraphPoseLoss``); its weight times ``loss_weight / branch weight`` (default: the graph's weight)."""

    def __init__(self, path: str | None = None, graph: Mapping[str, Any] | None = None,
                 use_target_weight: bool = True, loss_weight: float | None = None) -> None:
        super().__init__()
        from components.tasks.pose.losses import BRANCH, GraphPoseLoss

        self.graph = load_loss_graph(path, graph, "SearchedKeypointLoss")
        branch = _branch(self.graph, BRANCH, ("pose",), "SearchedKeypointLoss")
        self.loss = GraphPoseLoss(self.graph)
        self.use_target_weight = bool(use_target_weight)
        self.scale = _weight(loss_weight, branch.weight, "SearchedKeypointLoss") / branch.weight if branch.weight \
            else 0.0

    def forward(self, output: Tensor, target: Tensor, target_weights: Tensor | None = None,
                mask: Tensor | None = None) -> Tensor:
        if mask is not None:
            raise LossforgeError("SearchedKeypointLoss: per-pixel heatmap masks are not supported")
        n, k = output.shape[:2]
        weights = target_weights if (self.use_target_weight and target_weights is not None) else \
            torch.ones((n, k), dtype=output.dtype, device=output.device)
        weights = weights.reshape(n, k)
        return self.scale * self.loss(output, target, weights)
