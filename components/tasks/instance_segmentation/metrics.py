"""Mask AP (COCO ``segm``): mAP@[.5:.95], AP50, AP75 with pycocotools, plus the box mAP (``box_mAP``).

Decisions:
- Detections: torchvision's Mask R-CNN outputs per image (``boxes``, ``scores``, ``labels``, ``masks`` (N, 1, H, W)
  probabilities in image pixels); masks are binarised at 0.5 (torchvision's COCO reference) and RLE-encoded as
  soon as they are added, so a whole evaluation set of full-size masks is never held in memory.
- Ground truth: ``InstanceSegmentationDataset.coco_ground_truth`` (every annotation with its segmentation,
  crowds included so COCOeval ignores detections on them). Category ids are the labels 1..K.
- The segm results carry no ``bbox`` (pycocotools' ``loadRes`` would otherwise take the bbox path and use box
  areas); the box mAP is the detection metric (``components.tasks.detection.metrics.coco_box_metrics``) on the
  same detections' boxes. No detections at all give 0, a dataset without annotations NaN.
"""

from __future__ import annotations

from typing import Iterable, Mapping, Sequence

import numpy as np
import torch
from torch import Tensor

from components.tasks.detection.metrics import (IOU_THRESHOLDS as BOX_IOU_THRESHOLDS, coco_box_metrics, detections_to_coco,
                                               resolve_metric_name)

METRIC_NAMES = ("mAP", "AP50", "AP75", "box_mAP")
DEFAULT_METRIC = "mAP"
MASK_THRESHOLD = 0.5
IOU_THRESHOLDS = {**BOX_IOU_THRESHOLDS, "box_mAP": BOX_IOU_THRESHOLDS["mAP"]}
_ALIASES = {"map": "mAP", "ap": "mAP", "segm_map": "mAP", "mask_map": "mAP", "ap50": "AP50", "ap75": "AP75",
            "box_map": "box_mAP", "bbox_map": "box_mAP"}


def canonical_metric_name(name: str) -> str:
    """`name` as one of METRIC_NAMES (case-insensitive aliases: map, segm_map, mask_map, ap50, ap75, bbox_map)."""
    return resolve_metric_name(name, METRIC_NAMES, _ALIASES, "instance segmentation")


def encode_mask(mask: np.ndarray) -> dict:
    """COCO RLE (str counts, JSON-able) of a binary (H, W) mask."""
    from pycocotools import mask as mask_utils

    rle = mask_utils.encode(np.asfortranarray(mask.astype(np.uint8)))
    return {"size": [int(v) for v in rle["size"]], "counts": rle["counts"].decode("ascii")}


def masks_to_coco(image_ids: Sequence[int], outputs: Sequence[Mapping[str, Tensor]],
                  threshold: float = MASK_THRESHOLD) -> list[dict]:
    """COCO segm results (RLE masks, no bbox) of torchvision-style outputs with ``masks`` (N, 1, H, W) or (N, H, W)."""
    results = []
    for image_id, out in zip(image_ids, outputs):
        masks = out["masks"].detach().cpu()
        if masks.numel() == 0:
            continue
        if masks.dim() == 4:
            masks = masks[:, 0]
        binary = (masks > threshold).numpy() if masks.is_floating_point() else masks.numpy().astype(bool)
        for m, score, label in zip(binary, out["scores"].detach().cpu().tolist(), out["labels"].detach().cpu().tolist()):
            results.append({"image_id": int(image_id), "category_id": int(label), "segmentation": encode_mask(m),
                            "score": float(score)})
    return results


def coco_segm_metrics(ground_truth: Mapping, results: list[dict]) -> dict[str, float]:
    """{"mAP", "AP50", "AP75"} (masks) of COCO segm `results` against the COCO dict `ground_truth`."""
    from components.tasks.detection.metrics import coco_metrics

    return coco_metrics(ground_truth, results, "segm", METRIC_NAMES[:3])


class MaskMetrics:
    """Accumulates Mask R-CNN outputs for a dataset, then ``compute()`` -> {"mAP", "AP50", "AP75", "box_mAP"}."""

    def __init__(self, dataset) -> None:
        self.ground_truth = dataset.coco_ground_truth()
        self.segm: list[dict] = []
        self.boxes: list[dict] = []

    def update(self, image_ids: Iterable[int], outputs: Sequence[Mapping[str, Tensor]]) -> None:
        """Add the outputs (in original image pixels) of the images `image_ids`."""
        ids = list(image_ids)
        self.segm.extend(masks_to_coco(ids, outputs))
        self.boxes.extend(detections_to_coco(ids, outputs))

    def compute(self) -> dict[str, float]:
        out = coco_segm_metrics(self.ground_truth, self.segm)
        out["box_mAP"] = coco_box_metrics(self.ground_truth, self.boxes)["mAP"]
        return out


def mask_iou(pred: Tensor, target: Tensor) -> Tensor:
    """IoU of binary masks over the last two dims (both empty: 1)."""
    pred, target = pred.bool(), target.bool()
    inter = (pred & target).flatten(-2).sum(-1).double()
    union = (pred | target).flatten(-2).sum(-1).double()
    return torch.where(union > 0, inter / union.clamp(min=1), torch.ones_like(union))


__all__ = ["DEFAULT_METRIC", "IOU_THRESHOLDS", "METRIC_NAMES", "MaskMetrics", "canonical_metric_name",
           "coco_segm_metrics", "encode_mask", "mask_iou", "masks_to_coco"]
