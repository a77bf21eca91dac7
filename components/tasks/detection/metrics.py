"""Box AP: COCO's mAP@[.5:.95], AP50 and AP75 with pycocotools, and a small per-image AP for the probe.

* :func:`coco_box_metrics` — the reported metrics: ground truth built in memory from the dataset
  (``DetectionDataset.coco_ground_truth``, crowds kept so COCOeval ignores detections on them), detections
  as COCO results (xywh), ``COCOeval(iouType="bbox")``; fractions in [0, 1]. No detections at all gives 0
  (pycocotools cannot load an empty result list); a dataset without annotations gives NaN (undefined).
* :func:`image_average_precision` — COCO-style AP of one image's detections (greedy matching in score
  order, 101-point interpolated precision, mean over the classes present in the image and over the IoU
  thresholds), used as the screening probe's per-sample ξ (``components.tasks.detection.probe``), where a
  COCOeval object per sample and step would cost too much.
"""

from __future__ import annotations

import contextlib
import io
import math
from typing import Iterable, Mapping, Sequence

import numpy as np
import torch
from torch import Tensor

from components.errors import LossforgeError

METRIC_NAMES = ("mAP", "AP50", "AP75")
DEFAULT_METRIC = "mAP"
IOU_THRESHOLDS = {"mAP": tuple(np.round(np.linspace(0.5, 0.95, 10), 2).tolist()), "AP50": (0.5,), "AP75": (0.75,)}
_ALIASES = {"map": "mAP", "ap": "mAP", "bbox_map": "mAP", "ap50": "AP50", "ap75": "AP75"}


def resolve_metric_name(name: str, names: Sequence[str], aliases: Mapping[str, str], what: str) -> str:
    """`name` if it is one of `names`, else its case-insensitive alias; a one-line error naming `what`'s metrics.
    (Shared by the COCO-metric tasks: detection, instance segmentation, pose.)"""
    if name in names:
        return name
    key = str(name).lower()
    if key in aliases:
        return aliases[key]
    raise LossforgeError(f"{what} metric {name!r} unknown (known: {', '.join(names)})")


def canonical_metric_name(name: str) -> str:
    """`name` as one of METRIC_NAMES (case-insensitive aliases: map, ap, ap50, ap75)."""
    return resolve_metric_name(name, METRIC_NAMES, _ALIASES, "detection")


def detections_to_coco(image_ids: Sequence[int], outputs: Sequence[Mapping[str, Tensor]]) -> list[dict]:
    """COCO result dicts (xywh boxes) of torchvision-style outputs ``{"boxes", "scores", "labels"}`` per image."""
    results = []
    for image_id, out in zip(image_ids, outputs):
        boxes = out["boxes"].detach().float().cpu()
        if boxes.numel() == 0:
            continue
        xywh = torch.cat([boxes[:, :2], boxes[:, 2:] - boxes[:, :2]], dim=1).tolist()
        for box, score, label in zip(xywh, out["scores"].detach().cpu().tolist(), out["labels"].detach().cpu().tolist()):
            results.append({"image_id": int(image_id), "category_id": int(label), "bbox": [float(v) for v in box],
                            "score": float(score)})
    return results


def coco_metrics(ground_truth: Mapping, results: list[dict], iou_type: str = "bbox",
                 names: Sequence[str] = METRIC_NAMES, sigmas: Sequence[float] | None = None) -> dict[str, float]:
    """`names` (the first COCOeval stats: AP, AP50, AP75) of COCO `results` against the COCO dict `ground_truth`
    (pycocotools COCOeval, `iou_type` "bbox", "segm" or "keypoints" with the OKS `sigmas`); NaN without
    annotations, 0 without results. The inputs are copied: COCO.loadRes and createIndex modify what they are given."""
    import copy

    from pycocotools.coco import COCO
    from pycocotools.cocoeval import COCOeval

    if not ground_truth.get("annotations"):
        return {name: math.nan for name in names}
    if not results:
        return {name: 0.0 for name in names}
    with contextlib.redirect_stdout(io.StringIO()):
        gt = COCO()
        gt.dataset = copy.deepcopy(dict(ground_truth))
        gt.dataset.setdefault("info", {})  # pycocotools 2.0.10's loadRes reads it (a COCO file may lack it)
        gt.createIndex()
        dt = gt.loadRes(copy.deepcopy(results))
        ev = COCOeval(gt, dt, iouType=iou_type)
        if sigmas is not None:
            ev.params.kpt_oks_sigmas = np.asarray(sigmas, dtype=np.float64)
        ev.params.imgIds = sorted(gt.getImgIds())
        ev.evaluate()
        ev.accumulate()
        ev.summarize()
    stats = ev.stats
    return {name: (float(stats[k]) if stats[k] >= 0 else math.nan) for k, name in enumerate(names)}


def coco_box_metrics(ground_truth: Mapping, results: list[dict]) -> dict[str, float]:
    """{"mAP", "AP50", "AP75"} of COCO box `results` against the COCO dict `ground_truth`."""
    return coco_metrics(ground_truth, results, "bbox")


class BoxMetrics:
    """Accumulates model outputs for a dataset, then ``compute()`` -> {"mAP", "AP50", "AP75"}."""

    def __init__(self, dataset) -> None:
        self.ground_truth = dataset.coco_ground_truth()
        self.results: list[dict] = []

    def update(self, image_ids: Iterable[int], outputs: Sequence[Mapping[str, Tensor]]) -> None:
        """Add the outputs (in original image pixels) of the images `image_ids`."""
        self.results.extend(detections_to_coco(list(image_ids), outputs))

    def compute(self) -> dict[str, float]:
        return coco_box_metrics(self.ground_truth, self.results)


# ---------------------------------------------------------------------------------------------- per image
def _iou_matrix(a: np.ndarray, b: np.ndarray) -> np.ndarray:
    """IoU (len(a), len(b)) of xyxy boxes, COCO's continuous convention (no +1)."""
    area_a = np.clip(a[:, 2] - a[:, 0], 0, None) * np.clip(a[:, 3] - a[:, 1], 0, None)
    area_b = np.clip(b[:, 2] - b[:, 0], 0, None) * np.clip(b[:, 3] - b[:, 1], 0, None)
    lt = np.maximum(a[:, None, :2], b[None, :, :2])
    rb = np.minimum(a[:, None, 2:], b[None, :, 2:])
    wh = np.clip(rb - lt, 0, None)
    inter = wh[..., 0] * wh[..., 1]
    union = area_a[:, None] + area_b[None, :] - inter
    return np.where(union > 0, inter / np.where(union > 0, union, 1.0), 0.0)


_RECALL_POINTS = np.linspace(0.0, 1.0, 101)


def _class_ap(det_boxes: np.ndarray, det_scores: np.ndarray, gt_boxes: np.ndarray, thresholds: np.ndarray) -> np.ndarray:
    """AP per IoU threshold of one class in one image (COCO: greedy matching, 101-point interpolation)."""
    g = len(gt_boxes)
    t = len(thresholds)
    if len(det_boxes) == 0:
        return np.zeros(t)
    order = np.argsort(-det_scores, kind="mergesort")
    ious = _iou_matrix(det_boxes[order], gt_boxes)  # (D, G)
    taken = np.zeros((t, g), dtype=bool)
    tp = np.zeros((t, len(order)))
    for d in range(len(order)):
        cand = np.where(taken, -1.0, ious[d][None, :])  # (T, G)
        best = cand.argmax(axis=1)
        value = cand[np.arange(t), best]
        hit = value >= thresholds - 1e-10
        taken[np.arange(t)[hit], best[hit]] = True
        tp[hit, d] = 1.0
    ctp = np.cumsum(tp, axis=1)
    cfp = np.cumsum(1.0 - tp, axis=1)
    recall = ctp / g
    precision = ctp / np.maximum(ctp + cfp, np.finfo(float).eps)
    precision = np.maximum.accumulate(precision[:, ::-1], axis=1)[:, ::-1]  # precision envelope
    ap = np.zeros(t)
    for k in range(t):
        idx = np.searchsorted(recall[k], _RECALL_POINTS, side="left")
        valid = idx < recall.shape[1]
        ap[k] = np.where(valid, precision[k][np.minimum(idx, recall.shape[1] - 1)], 0.0).sum() / len(_RECALL_POINTS)
    return ap


def image_average_precision(boxes: Tensor | np.ndarray, scores: Tensor | np.ndarray, labels: Tensor | np.ndarray,
                            gt_boxes: Tensor | np.ndarray, gt_labels: Tensor | np.ndarray,
                            iou_thresholds: Sequence[float] = IOU_THRESHOLDS["mAP"]) -> float:
    """AP of one image's detections: mean over the classes with ground truth in the image and over the IoU
    thresholds; NaN when the image has no ground truth. Detections of other classes are ignored."""
    as_np = lambda x: x.detach().cpu().double().numpy() if isinstance(x, Tensor) else np.asarray(x, dtype=float)  # noqa: E731
    boxes, scores, labels = as_np(boxes).reshape(-1, 4), as_np(scores).reshape(-1), as_np(labels).reshape(-1)
    gt_boxes, gt_labels = as_np(gt_boxes).reshape(-1, 4), as_np(gt_labels).reshape(-1)
    if len(gt_boxes) == 0:
        return math.nan
    thresholds = np.asarray(iou_thresholds, dtype=float)
    per_class = [
        _class_ap(boxes[labels == c], scores[labels == c], gt_boxes[gt_labels == c], thresholds).mean()
        for c in np.unique(gt_labels)
    ]
    return float(np.mean(per_class))


__all__ = ["BoxMetrics", "DEFAULT_METRIC", "IOU_THRESHOLDS", "METRIC_NAMES", "canonical_metric_name",
           "coco_box_metrics", "detections_to_coco", "image_average_precision"]
