"""Detection data: the COCO reader on the embedded shapes layout, ids/splits, and one-line errors."""

from __future__ import annotations

import json
import shutil

import pytest
import torch

from components.errors import LossforgeError
from components.tasks.detection.datasets import DetectionDatasetError, open_detection_dataset
from components.tasks.segmentation.shapes import SHAPES_CLASSES, ensure_shapes


@pytest.fixture(scope="module")
def shapes(tmp_path_factory):
    return ensure_shapes(tmp_path_factory.mktemp("det") / "shapes", num_train=6, num_test=3, image_size=64, seed=0)


def test_reads_embedded_layout(shapes):
    ds = open_detection_dataset(shapes, split="train")
    assert len(ds) == 6 and ds.ids[0] == "train_00000"
    assert ds.num_classes == len(SHAPES_CLASSES) and ds.classes == SHAPES_CLASSES
    image, target = ds[0]
    assert image.shape == (3, 64, 64) and image.dtype == torch.float32
    assert 0.0 <= float(image.min()) and float(image.max()) <= 1.0
    boxes, labels = target["boxes"], target["labels"]
    assert boxes.dtype == torch.float32 and labels.dtype == torch.int64 and len(boxes) == len(labels) > 0
    assert bool((boxes[:, 2] > boxes[:, 0]).all() and (boxes[:, 3] > boxes[:, 1]).all())
    assert float(boxes.min()) >= 0 and float(boxes.max()) <= 64
    assert int(labels.min()) >= 1 and int(labels.max()) < ds.num_classes
    coco = json.loads((shapes / "annotations" / "instances_train.json").read_text())
    first = [a for a in coco["annotations"] if a["image_id"] == coco["images"][0]["id"]]
    x, y, w, h = first[0]["bbox"]
    assert boxes[0].tolist() == pytest.approx([x, y, x + w, y + h])
    ds.validate()
    assert len(open_detection_dataset(shapes, split="val")) == 3


def test_ids_in_order_from_any_split(shapes):
    ds = open_detection_dataset(shapes, split="train", ids=["val_00001", "train_00003"])
    assert ds.ids == ["val_00001", "train_00003"]
    direct = open_detection_dataset(shapes / "annotations" / "instances_val.json")
    assert direct.ids == ["val_00000", "val_00001", "val_00002"]
    assert torch.equal(ds[0][1]["boxes"], direct[1][1]["boxes"])
    with pytest.raises(LossforgeError, match="not in any split"):
        open_detection_dataset(shapes, ids=["nope"])
    with pytest.raises(LossforgeError, match="no split 'test'"):
        open_detection_dataset(shapes, split="test")


def _copy(shapes, tmp_path, edit):
    root = tmp_path / "bad"
    shutil.copytree(shapes, root)
    path = root / "annotations" / "instances_train.json"
    data = json.loads(path.read_text())
    edit(data, root)
    path.write_text(json.dumps(data))
    return root, path


@pytest.mark.parametrize("edit, pattern", [
    (lambda d, r: d["annotations"][0].__setitem__("bbox", [1, 2, 3]), r"annotations\[id=1\]\.bbox: expected"),
    (lambda d, r: d["annotations"][0].__setitem__("bbox", [50, 50, 30, 5]), r"annotations\[id=1\]\.bbox: box .* outside image"),
    (lambda d, r: d["annotations"][0].__setitem__("category_id", 99), r"category_id 99 is not in 'categories'"),
    (lambda d, r: d["annotations"][0].__setitem__("image_id", 12345), r"image_id 12345 is not in 'images'"),
    (lambda d, r: d.pop("categories"), r"missing list 'categories'"),
    (lambda d, r: (r / "JPEGImages" / "train_00002.jpg").unlink(), r"train_00002\.jpg: image listed in instances_train\.json not found"),
])
def test_malformed_data_is_one_line_error(shapes, tmp_path, edit, pattern):
    root, path = _copy(shapes, tmp_path, edit)
    with pytest.raises(DetectionDatasetError, match=pattern) as info:
        open_detection_dataset(root, split="train")
    assert "\n" not in str(info.value)
    assert "instances_train.json" in str(info.value) or "train_00002" in str(info.value)


def test_invalid_json_and_missing_path(tmp_path):
    bad = tmp_path / "x.json"
    bad.write_text("{not json")
    with pytest.raises(DetectionDatasetError, match=r"x\.json: invalid JSON"):
        open_detection_dataset(bad)
    with pytest.raises(DetectionDatasetError, match="dataset not found"):
        open_detection_dataset(tmp_path / "missing")


def test_crowd_and_empty_boxes_are_not_training_targets(shapes, tmp_path):
    def edit(d, r):
        first = d["images"][0]["id"]
        anns = [a for a in d["annotations"] if a["image_id"] == first]
        anns[0]["iscrowd"] = 1
        anns[1]["bbox"] = [3.0, 3.0, 0.0, 4.0]
    root, _ = _copy(shapes, tmp_path, edit)
    ds = open_detection_dataset(root, split="train")
    ref = open_detection_dataset(shapes, split="train")
    assert len(ds[0][1]["boxes"]) == len(ref[0][1]["boxes"]) - 2
    gt = ds.coco_ground_truth()  # evaluation keeps every annotation, crowds flagged
    assert sum(a["iscrowd"] for a in gt["annotations"]) == 1
