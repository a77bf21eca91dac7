"""Mask AP: perfect masks score 1, nothing scores 0, and MaskMetrics equals pycocotools run on the files."""

from __future__ import annotations

import contextlib
import io
import json
import math

import numpy as np
import pytest
import torch
from pycocotools.coco import COCO
from pycocotools.cocoeval import COCOeval

from components.tasks.instance_segmentation.datasets import open_instance_dataset
from components.tasks.instance_segmentation.metrics import MaskMetrics, canonical_metric_name, mask_iou
from components.tasks.segmentation.shapes import ensure_shapes


@pytest.fixture(scope="module")
def root(tmp_path_factory):
    return ensure_shapes(tmp_path_factory.mktemp("ins") / "shapes", num_train=2, num_test=5, image_size=64, seed=1)


def _outputs(val, perturb=None):
    gen = torch.Generator().manual_seed(0)
    for i in range(len(val)):
        t = val[i][1]
        masks = t["masks"].float()
        scores = torch.ones(len(masks))
        if perturb:
            masks = torch.stack([torch.roll(m, shifts=int(s), dims=1) for m, s in zip(masks, torch.randint(-2, 3, (len(masks),), generator=gen))])
            scores = torch.rand(len(masks), generator=gen)
        yield int(t["image_id"]), {"boxes": t["boxes"], "labels": t["labels"], "scores": scores, "masks": masks[:, None]}


def test_perfect_masks_score_one_and_nothing_scores_zero(root):
    val = open_instance_dataset(root, split="val")
    meter = MaskMetrics(val)
    for image_id, out in _outputs(val):
        meter.update([image_id], [out])
    assert meter.compute() == {"mAP": 1.0, "AP50": 1.0, "AP75": 1.0, "box_mAP": 1.0}
    assert MaskMetrics(val).compute() == {"mAP": 0.0, "AP50": 0.0, "AP75": 0.0, "box_mAP": 0.0}
    assert canonical_metric_name("segm_map") == "mAP" and canonical_metric_name("bbox_map") == "box_mAP"


def test_matches_pycocotools_on_the_annotation_file(root, tmp_path):
    val = open_instance_dataset(root, split="val")
    meter = MaskMetrics(val)
    for image_id, out in _outputs(val, perturb=True):
        meter.update([image_id], [out])
    mine = meter.compute()
    assert 0.0 < mine["mAP"] < 1.0
    # reference: pycocotools on the dataset's own JSON (category ids are the COCO ids there: map the labels back)
    raw = json.loads((root / "annotations" / "instances_val.json").read_text())
    cat_of_label = {k + 1: c["id"] for k, c in enumerate(sorted(raw["categories"], key=lambda c: c["id"]))}
    results = [{**r, "category_id": cat_of_label[r["category_id"]]} for r in meter.segm]
    (tmp_path / "res.json").write_text(json.dumps(results))
    with contextlib.redirect_stdout(io.StringIO()):
        gt = COCO(str(root / "annotations" / "instances_val.json"))
        ev = COCOeval(gt, gt.loadRes(str(tmp_path / "res.json")), iouType="segm")
        ev.evaluate()
        ev.accumulate()
        ev.summarize()
    for k, name in enumerate(("mAP", "AP50", "AP75")):
        assert mine[name] == pytest.approx(float(ev.stats[k]), abs=1e-9), name


def test_mask_iou():
    a = torch.zeros(2, 4, 4, dtype=torch.bool)
    a[0, :2] = True
    b = torch.zeros(2, 4, 4, dtype=torch.bool)
    b[0, :1] = True
    assert mask_iou(a, b).tolist() == [0.5, 1.0] and not math.isnan(float(mask_iou(a, b)[1]))
    assert np.isclose(float(mask_iou(a[:1], a[:1])), 1.0)
