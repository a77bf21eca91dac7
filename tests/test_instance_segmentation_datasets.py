"""Instance segmentation data: the detection reader plus masks (RLE, uncompressed RLE, polygons), boxes and masks
aligned, the ground truth with segmentations, one-line errors naming file and field."""

from __future__ import annotations

import json
import shutil

import numpy as np
import pytest
import torch
from pycocotools import mask as mask_utils

from components.errors import LossforgeError
from components.tasks.instance_segmentation.datasets import InstanceSegmentationDataset, open_instance_dataset
from components.tasks.segmentation.shapes import ensure_shapes


@pytest.fixture(scope="module")
def shapes(tmp_path_factory):
    return ensure_shapes(tmp_path_factory.mktemp("ins") / "shapes", num_train=4, num_test=2, image_size=64, seed=0)


def test_masks_match_the_annotations_and_the_boxes(shapes):
    ds = open_instance_dataset(shapes, split="train")
    assert isinstance(ds, InstanceSegmentationDataset) and len(ds) == 4
    coco = json.loads((shapes / "annotations" / "instances_train.json").read_text())
    for k in range(len(ds)):
        image, target = ds[k]
        masks = target["masks"]
        assert masks.dtype == torch.uint8 and masks.shape == (len(target["boxes"]), 64, 64)
        anns = [a for a in coco["annotations"] if a["image_id"] == int(target["image_id"]) and not a.get("iscrowd")]
        for m, ann, box in zip(masks, anns, target["boxes"]):
            rle = {"size": ann["segmentation"]["size"], "counts": ann["segmentation"]["counts"].encode()}
            assert np.array_equal(m.numpy(), mask_utils.decode(rle))
            ys, xs = torch.where(m > 0)  # the box encloses its mask
            assert float(xs.min()) >= float(box[0]) - 1e-6 and float(xs.max()) + 1 <= float(box[2]) + 1e-6
    sub = ds.subset([ds.ids[1]])
    assert isinstance(sub, InstanceSegmentationDataset) and torch.equal(sub[0][1]["masks"], ds[1][1]["masks"])
    gt = ds.coco_ground_truth()
    assert all("segmentation" in a for a in gt["annotations"]) and len(gt["annotations"]) == len(coco["annotations"])


def _copy(shapes, tmp_path, edit):
    root = tmp_path / "copy"
    shutil.copytree(shapes, root)
    path = root / "annotations" / "instances_train.json"
    data = json.loads(path.read_text())
    edit(data)
    path.write_text(json.dumps(data))
    return root


def test_polygons_and_uncompressed_rle(shapes, tmp_path):
    def edit(data):
        a, b = data["annotations"][0], data["annotations"][1]
        x, y, w, h = a["bbox"]
        a["segmentation"] = [[x, y, x + w, y, x + w, y + h, x, y + h]]  # a polygon: the box itself
        rle = mask_utils.decode({"size": b["segmentation"]["size"], "counts": b["segmentation"]["counts"].encode()})
        flat = rle.flatten(order="F")
        runs, value, count = [], 0, 0
        for v in flat:
            if v != value:
                runs.append(count)
                value, count = v, 0
            count += 1
        runs.append(count)
        b["segmentation"] = {"size": b["segmentation"]["size"], "counts": runs}

    root = _copy(shapes, tmp_path, edit)
    ds = open_instance_dataset(root, split="train")
    original = open_instance_dataset(shapes, split="train")
    data = json.loads((root / "annotations" / "instances_train.json").read_text())
    first_image = data["annotations"][0]["image_id"]
    k = next(i for i in range(len(ds)) if int(ds[i][1]["image_id"]) == first_image)
    polygon = ds[k][1]["masks"][0]
    x, y, w, h = data["annotations"][0]["bbox"]
    assert int(polygon.sum()) == pytest.approx(w * h, rel=0.25) and int(polygon[int(y + h / 2), int(x + w / 2)]) == 1
    assert torch.equal(ds[k][1]["masks"][1], original[k][1]["masks"][1])  # uncompressed RLE = the same mask


def test_errors_name_file_and_field(shapes, tmp_path):
    root = _copy(shapes, tmp_path, lambda d: d["annotations"][0].pop("segmentation"))
    with pytest.raises(LossforgeError, match=r"instances_train\.json: annotations\[id=\d+\]\.segmentation: missing"):
        open_instance_dataset(root, split="train")
    shutil.rmtree(root)

    def bad_size(d):
        d["annotations"][0]["segmentation"]["size"] = [32, 32]

    root = _copy(shapes, tmp_path, bad_size)
    ds = open_instance_dataset(root, split="train")
    with pytest.raises(LossforgeError, match=r"segmentation: RLE size \[32, 32\] is not the image size \[64, 64\]"):
        ds.validate()
