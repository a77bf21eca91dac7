"""Box AP: COCOeval on in-memory ground truth (perfect = 1, nothing = 0) and the probe's per-image AP."""

from __future__ import annotations

import math

import pytest
import torch

from components.tasks.detection.datasets import open_detection_dataset
from components.tasks.detection.metrics import (BoxMetrics, canonical_metric_name, coco_box_metrics,
                                                image_average_precision)
from components.tasks.segmentation.shapes import ensure_shapes


@pytest.fixture(scope="module")
def val(tmp_path_factory):
    root = ensure_shapes(tmp_path_factory.mktemp("det") / "shapes", num_train=2, num_test=5, image_size=64, seed=1)
    return open_detection_dataset(root, split="val")


def _outputs(val, shift=0.0, score=None):
    for i in range(len(val)):
        t = val[i][1]
        boxes = t["boxes"].clone()
        boxes[:, 2:] += shift
        scores = torch.ones(len(boxes)) if score is None else score(len(boxes))
        yield int(t["image_id"]), {"boxes": boxes, "labels": t["labels"], "scores": scores}


def test_perfect_detections_score_one(val):
    meter = BoxMetrics(val)
    for image_id, out in _outputs(val):
        meter.update([image_id], [out])
    assert meter.compute() == {"mAP": 1.0, "AP50": 1.0, "AP75": 1.0}


def test_no_detections_score_zero_and_no_ground_truth_is_nan(val):
    assert BoxMetrics(val).compute() == {"mAP": 0.0, "AP50": 0.0, "AP75": 0.0}
    gt = val.coco_ground_truth()
    empty = {**gt, "annotations": []}
    assert all(math.isnan(v) for v in coco_box_metrics(empty, []).values())


def test_metric_name_aliases():
    assert canonical_metric_name("ap50") == "AP50" and canonical_metric_name("mAP") == "mAP"


def test_per_image_ap_matches_cocoeval(val):
    gen = torch.Generator().manual_seed(0)
    for image_id, out in _outputs(val, shift=2.0, score=lambda n: torch.rand(n, generator=gen)):
        t = next(val[i][1] for i in range(len(val)) if int(val[i][1]["image_id"]) == image_id)
        # one image: COCOeval on that image alone vs the small implementation
        gt = val.coco_ground_truth()
        gt = {**gt, "images": [im for im in gt["images"] if im["id"] == image_id],
              "annotations": [a for a in gt["annotations"] if a["image_id"] == image_id]}
        gt["categories"] = [c for c in gt["categories"] if c["id"] in {a["category_id"] for a in gt["annotations"]}]
        meter_results = BoxMetrics.__new__(BoxMetrics)
        meter_results.ground_truth, meter_results.results = gt, []
        meter_results.update([image_id], [out])
        coco = meter_results.compute()
        for name, thresholds in (("mAP", None), ("AP50", (0.5,)), ("AP75", (0.75,))):
            kwargs = {} if thresholds is None else {"iou_thresholds": thresholds}
            mine = image_average_precision(out["boxes"], out["scores"], out["labels"], t["boxes"], t["labels"], **kwargs)
            assert mine == pytest.approx(coco[name], abs=1e-9), (image_id, name)
    assert image_average_precision(torch.zeros(0, 4), torch.zeros(0), torch.zeros(0), t["boxes"], t["labels"]) == 0.0
