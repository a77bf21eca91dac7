"""Pose data and keypoint AP: OKS AP against pycocotools on known keypoints, heatmap targets, the crops' mapping
back to image coordinates, sigmas, and one-line errors for bad keypoint files."""

from __future__ import annotations

import contextlib
import copy
import io
import json

import numpy as np
import pytest
import torch

from components.errors import LossforgeError
from components.tasks.pose.datasets import gaussian_heatmaps, heatmap_sigma, open_pose_dataset
from components.tasks.pose.metrics import (COCO_PERSON_SIGMAS, category_sigmas, coco_keypoint_metrics,
                                           decode_heatmaps, instance_ap, keypoint_metrics, keypoint_results, oks)
from components.tasks.segmentation.shapes import ensure_shapes

SIGMAS = np.array([0.05, 0.07, 0.05])


def _ground_truth(rng: np.random.Generator, images: int = 4) -> dict:
    """Known keypoints: 2 instances per image, 3 keypoints each (one occluded, v = 1; one unlabelled in image 0)."""
    anns = []
    for i in range(1, images + 1):
        for k in range(2):
            x, y, w, h = rng.uniform(5, 40), rng.uniform(5, 40), rng.uniform(15, 30), rng.uniform(15, 30)
            pts = rng.uniform([x, y], [x + w, y + h], size=(3, 2))
            vis = [2, 1, 0 if (i == 1 and k == 0) else 2]
            kps = [float(v) for p, s in zip(pts, vis) for v in (*(p if s else (0, 0)), s)]
            anns.append({"id": len(anns) + 1, "image_id": i, "category_id": 1, "bbox": [x, y, w, h], "area": w * h * 0.7,
                         "iscrowd": 0, "keypoints": kps, "num_keypoints": sum(s > 0 for s in vis)})
    return {"images": [{"id": i, "width": 80, "height": 80, "file_name": f"{i}.jpg"} for i in range(1, images + 1)],
            "annotations": anns, "categories": [{"id": 1, "name": "thing", "keypoints": ["a", "center", "b"]}]}


def _results(gt: dict, shift: float, rng: np.random.Generator) -> list[dict]:
    out = []
    for a in gt["annotations"]:
        kps = np.array(a["keypoints"], dtype=float).reshape(-1, 3)
        kps[:, :2] += rng.normal(0, shift, size=(3, 2)) if shift else 0.0
        kps[:, 2] = 1
        out.append({"image_id": a["image_id"], "category_id": 1, "keypoints": kps.reshape(-1).tolist(),
                    "score": float(rng.uniform(0.5, 1))})
    return out


def _cocoeval_by_hand(gt: dict, results: list[dict], sigmas: np.ndarray) -> np.ndarray:
    from pycocotools.coco import COCO
    from pycocotools.cocoeval import COCOeval

    with contextlib.redirect_stdout(io.StringIO()):
        coco = COCO()
        coco.dataset = copy.deepcopy(gt)
        coco.dataset["info"] = {}
        coco.createIndex()
        ev = COCOeval(coco, coco.loadRes(copy.deepcopy(results)), iouType="keypoints")
        ev.params.kpt_oks_sigmas = sigmas
        ev.evaluate()
        ev.accumulate()
        ev.summarize()
    return ev.stats[:3]


def test_perfect_keypoints_give_ap_1_and_shifted_ones_match_a_hand_built_cocoeval():
    rng = np.random.default_rng(0)
    gt = _ground_truth(rng)
    perfect = coco_keypoint_metrics(gt, _results(gt, 0.0, rng), SIGMAS)
    assert perfect == {"AP": 1.0, "AP50": 1.0, "AP75": 1.0}
    previous = 1.0
    for shift in (0.5, 1.5, 4.0):
        results = _results(gt, shift, np.random.default_rng(int(shift * 10)))
        ours = coco_keypoint_metrics(gt, results, SIGMAS)
        assert [ours["AP"], ours["AP50"], ours["AP75"]] == pytest.approx(_cocoeval_by_hand(gt, results, SIGMAS))
        assert ours["AP"] < previous  # larger shifts, lower AP
        previous = ours["AP"]
    assert coco_keypoint_metrics(gt, [], SIGMAS)["AP"] == 0.0


def test_oks_and_instance_ap_are_pycocotools_computeoks_for_one_instance():
    from pycocotools.cocoeval import COCOeval

    rng = np.random.default_rng(1)
    gt = _ground_truth(rng, images=1)
    results = _results(gt, 2.0, rng)
    ev = COCOeval(iouType="keypoints")
    ev.params.kpt_oks_sigmas = SIGMAS
    for a, r in zip(gt["annotations"], results):
        g, d = np.array(a["keypoints"]).reshape(-1, 3), np.array(r["keypoints"]).reshape(-1, 3)
        ev._gts, ev._dts = {(1, 1): [a]}, {(1, 1): [r]}
        ev.params.maxDets = [20]
        expected = ev.computeOks(1, 1)[0, 0]
        ours = oks(d[:, :2], g[:, :2], g[:, 2] > 0, a["area"], SIGMAS)
        assert ours == pytest.approx(expected)
        assert instance_ap(ours, "AP50") == float(ours >= 0.5)
        assert instance_ap(ours, "AP") == pytest.approx(np.mean([ours >= t for t in np.linspace(0.5, 0.95, 10)]))


def test_gaussian_targets_peak_at_the_keypoints_and_decode_back():
    points = torch.tensor([[3.3, 12.6], [8.0, 8.0], [15.2, 0.9], [20.0, 3.0]])
    maps, weights = gaussian_heatmaps(points, torch.tensor([1.0, 1.0, 1.0, 1.0]), (16, 16), heatmap_sigma(16))
    assert weights.tolist() == [1.0, 1.0, 1.0, 0.0]  # the last point lies outside the heatmap
    assert maps[3].abs().max() == 0
    for k in range(3):
        iy, ix = divmod(int(maps[k].argmax()), 16)
        assert abs(ix + 0.5 - points[k, 0]) <= 0.5 and abs(iy + 0.5 - points[k, 1]) <= 0.5  # argmax = the keypoint
        assert float(maps[k].max()) == pytest.approx(float(torch.exp(-((ix + .5 - points[k, 0]) ** 2 + (iy + .5 - points[k, 1]) ** 2)
                                                                   / (2 * heatmap_sigma(16) ** 2))))
    coords, _ = decode_heatmaps(maps[:3])
    assert (coords - points[:3]).abs().max() <= 0.5


@pytest.fixture(scope="module")
def shapes(tmp_path_factory):
    return ensure_shapes(tmp_path_factory.mktemp("pose") / "shapes", num_train=8, num_test=4, image_size=64, seed=0)


def test_embedded_shapes_crops_map_back_to_the_keypoints_and_score_ap_1(shapes):
    ds = open_pose_dataset(shapes, split="val")
    assert ds.num_keypoints == 32 and ds.heatmap_size == (16, 16) and len(ds) > 0
    gt_results, decoded, in_crop = [], [], []
    for i, inst in enumerate(ds.instances):
        crop, target = ds[i]
        assert crop.shape == (3, 64, 64) and target["heatmaps"].shape == (32, 16, 16)
        slots = ds.category_slots(inst.category_id)
        assert target["weights"].sum() == target["weights"][slots].sum() > 0  # only the category's own slots
        decoded += keypoint_results(ds, [i], target["heatmaps"][None])
        in_crop.append(target["weights"][slots].numpy() > 0)  # labelled and inside the crop
        kps = list(inst.annotation["keypoints"])
        kps[2::3] = [1] * (len(kps) // 3)
        gt_results.append({"image_id": inst.image_id, "category_id": inst.category_id, "keypoints": kps, "score": 1.0})
    for r, inst, keep in zip(decoded, ds.instances, in_crop):  # decoded targets land within half a heatmap pixel
        got = np.array(r["keypoints"]).reshape(-1, 3)[:, :2]
        want = np.array(inst.annotation["keypoints"]).reshape(-1, 3)[:, :2]
        assert np.abs(got - want)[keep].max() <= 0.5 * inst.scale * 4 + 1e-6  # 4 input pixels per heatmap pixel
    assert keypoint_metrics(ds, gt_results) == {"AP": 1.0, "AP50": 1.0, "AP75": 1.0}
    assert 0.5 < keypoint_metrics(ds, decoded)["AP"] < 1.0  # quantised heatmaps: close, not exact


def test_sigmas_coco_person_declared_and_shapes_default():
    person = {"id": 1, "name": "person", "keypoints": [f"k{i}" for i in range(17)]}
    assert category_sigmas(person).tolist() == list(COCO_PERSON_SIGMAS)
    assert category_sigmas({"name": "star", "keypoints": ["center", "tip_1"]}).tolist() == [0.07, 0.05]
    assert category_sigmas({"name": "x", "keypoints": ["a"], "sigmas": [0.2]}).tolist() == [0.2]
    with pytest.raises(LossforgeError, match="sigmas"):
        category_sigmas({"id": 3, "name": "x", "keypoints": ["a"], "sigmas": [0.2, 0.1]})


def test_bad_keypoints_are_one_line_errors_naming_the_file(shapes):
    source = shapes / "annotations" / "instances_train.json"
    data = json.loads(source.read_text())
    data["annotations"][0]["keypoints"] = data["annotations"][0]["keypoints"][:-3]
    bad = shapes / "annotations" / "broken_keypoints.json"  # next to the real one, so its images are found
    bad.write_text(json.dumps(data))
    with pytest.raises(LossforgeError) as err:
        open_pose_dataset(bad, ids=None)
    assert str(bad) in str(err.value) and "keypoints" in str(err.value) and "\n" not in str(err.value)
    data = json.loads(source.read_text())
    for c in data["categories"]:
        c.pop("keypoints")
    bad.write_text(json.dumps(data))
    with pytest.raises(LossforgeError, match="no category declares 'keypoints'"):
        open_pose_dataset(bad)
