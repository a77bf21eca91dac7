"""Keypoint AP: COCO's OKS-based AP, AP50 and AP75 with pycocotools, the heatmap decoding, and a per-crop AP
for the screening probe.

* :func:`decode_heatmaps` — SimpleBaseline's decoding: the argmax of each heatmap plus a quarter-pixel offset
  towards the higher neighbour, as continuous heatmap coordinates (pixel centres at i + 0.5); the peak value is
  the keypoint's confidence.
* :func:`keypoint_metrics` — the reported metrics: predictions mapped back to image coordinates (``PoseInstance``:
  image = crop origin + heatmap position / heatmap-per-image scale), one COCO keypoints result per crop (score =
  mean peak value of its category's keypoints), ``COCOeval(iouType="keypoints")`` with that category's sigmas.
  pycocotools takes one sigma vector for all categories, so each category is evaluated on its own and the AP is
  the mean over the categories with ground truth, which is exactly what one COCOeval over all categories would
  report (its summary averages the per-category precisions, each over the same thresholds and recalls).
* Sigmas (``category_sigmas``): a category's own ``sigmas`` list when its JSON declares one (a Lossforge
  extension), COCO's 17 for COCO's ``person`` with 17 keypoints, otherwise the embedded shapes' choice: 0.05 for
  points that are image features (corners, tips, vertices, ends, extreme points of an outline) and 0.07 for a
  ``center`` (not a visible feature: harder to place). With k = 2σ, OKS 0.5 at a distance of
  1.18·k·sqrt(area) px, i.e. 2.4 px for a 20 x 20 px shape (0.05), 3.3 px for its centre: between COCO's
  sharpest landmarks (eyes, 0.025) and its joints (hips, 0.107), as the geometric points are sharp but small.
* :func:`instance_ap` — the probe's per-sample ξ: one crop, one prediction, so COCO's AP at threshold t is
  1 when OKS ≥ t, else 0; the metric averages that over its thresholds (mAP: .50:.05:.95).
"""

from __future__ import annotations

import math
from typing import Mapping, Sequence

import numpy as np
import torch
from torch import Tensor

from components.errors import LossforgeError
from components.tasks.detection.metrics import coco_metrics, resolve_metric_name

METRIC_NAMES = ("AP", "AP50", "AP75")
DEFAULT_METRIC = "AP"
OKS_THRESHOLDS = {"AP": tuple(np.round(np.linspace(0.5, 0.95, 10), 2).tolist()), "AP50": (0.5,), "AP75": (0.75,)}
_ALIASES = {"ap": "AP", "map": "AP", "keypoint_ap": "AP", "ap50": "AP50", "ap75": "AP75"}
COCO_PERSON_SIGMAS = (0.026, 0.025, 0.025, 0.035, 0.035, 0.079, 0.079, 0.072, 0.072, 0.062, 0.062, 0.107, 0.107,
                      0.087, 0.087, 0.089, 0.089)
"""pycocotools' default ``kpt_oks_sigmas`` (COCO person: nose, eyes, ears, shoulders, elbows, wrists, hips, ...)."""
FEATURE_SIGMA = 0.05
CENTER_SIGMA = 0.07


def canonical_metric_name(name: str) -> str:
    """`name` as one of METRIC_NAMES (case-insensitive aliases: ap, map, ap50, ap75)."""
    return resolve_metric_name(name, METRIC_NAMES, _ALIASES, "pose")


def category_sigmas(category: Mapping) -> np.ndarray:
    """Per-keypoint OKS sigmas of a COCO category (module doc)."""
    names = list(category.get("keypoints") or [])
    if category.get("sigmas") is not None:
        sigmas = category["sigmas"]
        if not (isinstance(sigmas, list) and len(sigmas) == len(names)
                and all(isinstance(s, (int, float)) and s > 0 for s in sigmas)):
            raise LossforgeError(f"categories[id={category.get('id')}].sigmas: expected {len(names)} positive numbers")
        return np.asarray(sigmas, dtype=np.float64)
    if category.get("name") == "person" and len(names) == 17:
        return np.asarray(COCO_PERSON_SIGMAS)
    return np.asarray([CENTER_SIGMA if n == "center" else FEATURE_SIGMA for n in names])


def decode_heatmaps(heatmaps: Tensor) -> tuple[Tensor, Tensor]:
    """(coords (..., K, 2) x, y in continuous heatmap coordinates, peak values (..., K)) of (..., K, h, w) maps."""
    h, w = heatmaps.shape[-2:]
    flat = heatmaps.detach().float().reshape(*heatmaps.shape[:-2], h * w)
    peak, idx = flat.max(dim=-1)
    px, py = idx % w, idx // w
    maps = heatmaps.detach().float()

    def at(y: Tensor, x: Tensor) -> Tensor:
        return maps.reshape(-1, h, w)[torch.arange(y.numel()), y.reshape(-1), x.reshape(-1)].reshape(y.shape)

    right, left = at(py, (px + 1).clamp(max=w - 1)), at(py, (px - 1).clamp(min=0))
    down, up = at((py + 1).clamp(max=h - 1), px), at((py - 1).clamp(min=0), px)
    inner_x = (px > 0) & (px < w - 1)
    inner_y = (py > 0) & (py < h - 1)
    x = px.float() + 0.5 + torch.where(inner_x, 0.25 * torch.sign(right - left), torch.zeros_like(peak))
    y = py.float() + 0.5 + torch.where(inner_y, 0.25 * torch.sign(down - up), torch.zeros_like(peak))
    return torch.stack([x, y], dim=-1), peak


def oks(pred: np.ndarray, gt: np.ndarray, visible: np.ndarray, area: float, sigmas: np.ndarray) -> float:
    """COCO's object keypoint similarity of one prediction (K, 2) with one ground truth (K, 2) (visible (K,) bool);
    pycocotools' formula (``COCOeval.computeOks``) for an instance with labelled keypoints."""
    if not visible.any():
        return 0.0
    var = (2 * sigmas[visible]) ** 2
    d2 = ((pred[visible] - gt[visible]) ** 2).sum(-1)
    e = d2 / var / (area + np.spacing(1)) / 2
    return float(np.exp(-e).mean())


def instance_ap(oks_value: float, metric: str) -> float:
    """AP of one crop with one prediction: the share of the metric's OKS thresholds the prediction meets."""
    thresholds = OKS_THRESHOLDS[canonical_metric_name(metric)]
    return sum(oks_value >= t for t in thresholds) / len(thresholds)


def keypoint_results(dataset, indices: Sequence[int], heatmaps: Tensor) -> list[dict]:
    """COCO keypoint results of crops `indices` of `dataset` from their predicted heatmaps (N, K, h, w)."""
    coords, peaks = decode_heatmaps(heatmaps)
    ratio = dataset.heatmap_size[1] / dataset.input_size[1]  # heatmap pixels per input pixel
    results = []
    for row, index in enumerate(indices):
        inst = dataset.instances[int(index)]
        slots = dataset.category_slots(inst.category_id)
        xy = coords[row, slots].double().numpy() / ratio * inst.scale + np.array([inst.x0, inst.y0])
        keypoints = np.concatenate([xy, np.ones((xy.shape[0], 1))], axis=1).reshape(-1)
        score = float(peaks[row, slots].mean())
        results.append({"image_id": int(inst.image_id), "category_id": int(inst.category_id),
                        "keypoints": [float(v) for v in keypoints], "score": score if math.isfinite(score) else 0.0})
    return results


def coco_keypoint_metrics(ground_truth: Mapping, results: list[dict], sigmas: np.ndarray,
                          names: Sequence[str] = METRIC_NAMES) -> dict[str, float]:
    """AP, AP50, AP75 (COCOeval keypoints stats 0-2) of `results` on the COCO dict `ground_truth` with `sigmas`;
    NaN without annotations, 0 without results (detection's COCOeval runner with iouType "keypoints")."""
    return coco_metrics(ground_truth, results, "keypoints", names, sigmas)


def keypoint_metrics(dataset, results: list[dict]) -> dict[str, float]:
    """AP, AP50, AP75 of keypoint `results` on `dataset`: per category (its own sigmas), mean over the categories
    with labelled instances (module doc)."""
    per_category = []
    for cat in dataset.categories:
        gt = dataset.coco_ground_truth(cat["id"])
        if not any(a["num_keypoints"] > 0 and not a["iscrowd"] for a in gt["annotations"]):
            continue
        mine = [r for r in results if r["category_id"] == cat["id"]]
        per_category.append(coco_keypoint_metrics(gt, mine, category_sigmas(cat)))
    if not per_category:
        return {name: math.nan for name in METRIC_NAMES}
    return {name: float(np.mean([m[name] for m in per_category])) for name in METRIC_NAMES}


class KeypointMeter:
    """Collects predicted heatmaps of crops (``update(indices, heatmaps)``) and computes `keypoint_metrics`."""

    def __init__(self, dataset):
        self.dataset = dataset
        self.results: list[dict] = []

    def update(self, indices: Sequence[int], heatmaps: Tensor) -> None:
        self.results += keypoint_results(self.dataset, indices, heatmaps.cpu())

    def compute(self) -> dict[str, float]:
        return keypoint_metrics(self.dataset, self.results)


__all__ = ["COCO_PERSON_SIGMAS", "DEFAULT_METRIC", "KeypointMeter", "METRIC_NAMES", "OKS_THRESHOLDS",
           "canonical_metric_name", "category_sigmas", "coco_keypoint_metrics", "decode_heatmaps", "instance_ap",
           "keypoint_metrics", "keypoint_results", "oks"]
