"""Dataset readers on real files: VOC (split, ids, list file, VOCaug list), folder pair, COCO, auto-detect;
and bad input, each a one-line DatasetError naming the offending file."""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image

from components.errors import LossforgeError
from components.tasks.segmentation.datasets import (
    IMAGENET_MEAN,
    IMAGENET_STD,
    VOC_CLASSES,
    DatasetError,
    open_coco,
    open_folder_pair,
    open_segmentation_dataset,
    open_voc,
    read_class_list,
)
from components.tasks.segmentation.shapes import SHAPES_CLASSES, generate_shapes

SIZE = 64


@pytest.fixture(scope="module")
def shapes(tmp_path_factory) -> Path:
    """A small shapes dataset, PNG images (lossless, so pixels can be compared exactly)."""
    return generate_shapes(tmp_path_factory.mktemp("readers") / "shapes", 8, 3, SIZE, 5, image_format="png")


@pytest.fixture()
def copy(shapes, tmp_path) -> Path:
    """A private copy of the dataset that a test may damage."""
    return Path(shutil.copytree(shapes, tmp_path / "shapes"))


def pil_array(path: Path, mode: str | None = None) -> np.ndarray:
    with Image.open(path) as im:
        return np.array(im.convert(mode) if mode else im)


def train_ids(root: Path) -> list[str]:
    return (root / "ImageSets" / "Segmentation" / "train.txt").read_text().split()


def assert_matches_files(ds, image_dir: Path, mask_dir: Path, ext: str = ".png") -> None:
    """Every item equals the files read independently with PIL (normalize=False datasets)."""
    for k, sid in enumerate(ds.ids):
        image, mask = ds[k]
        assert image.dtype == torch.float32 and image.shape == (3, SIZE, SIZE)
        assert mask.dtype == torch.int64 and mask.shape == (SIZE, SIZE)
        expected = torch.from_numpy(pil_array(image_dir / f"{sid}{ext}", "RGB")).permute(2, 0, 1).float() / 255
        torch.testing.assert_close(image, expected)
        assert torch.equal(mask, torch.from_numpy(pil_array(mask_dir / f"{sid}.png").astype(np.int64)))


def one_line_error(fn, *names: str) -> str:
    """Call fn, expect a one-line DatasetError whose message names every string in `names`."""
    with pytest.raises(DatasetError) as info:
        fn()
    message = str(info.value)
    assert isinstance(info.value, LossforgeError) and "\n" not in message
    for name in names:
        assert name in message, message
    return message


# ------------------------------------------------------------------------------------------- VOC
def test_voc_by_split_name(shapes):
    ds = open_voc(shapes, split="train", normalize=False)
    assert ds.ids == train_ids(shapes) and len(ds) == 8
    assert ds.classes == SHAPES_CLASSES and ds.num_classes == len(SHAPES_CLASSES)  # from classes.txt
    assert_matches_files(ds, shapes / "JPEGImages", shapes / "SegmentationClass")
    val = open_voc(shapes, split="val")
    assert val.ids == ["val_00000", "val_00001", "val_00002"]
    assert open_voc(shapes).ids == ds.ids  # default: train


def test_voc_by_ids_and_by_list_file(shapes, tmp_path):
    ids = ["train_00005", "val_00001", "train_00000"]
    assert open_voc(shapes, ids=ids).ids == ids
    listing = tmp_path / "my_list.txt"
    listing.write_text("# a comment\ntrain_00003\n\n  train_00001  \nval_00002\n")
    ds = open_voc(shapes, list_file=listing, normalize=False)
    assert ds.ids == ["train_00003", "train_00001", "val_00002"]
    assert_matches_files(ds, shapes / "JPEGImages", shapes / "SegmentationClass")
    assert open_voc(shapes, list_file="trainval").ids == train_ids(shapes) + ["val_00000", "val_00001", "val_00002"]


def test_voc_aug_two_column_list(copy):
    """VOCaug (SBD) lists give image and mask paths relative to the root, masks in SegmentationClassAug/."""
    aug = copy / "SegmentationClassAug"
    aug.mkdir()
    ids = train_ids(copy)[:4]
    for sid in ids:  # greyscale masks, as the SBD conversion scripts write them
        Image.fromarray(pil_array(copy / "SegmentationClass" / f"{sid}.png"), mode="L").save(aug / f"{sid}.png")
    listing = copy / "ImageSets" / "Segmentation" / "train_aug.txt"
    listing.write_text("".join(f"/JPEGImages/{i}.png /SegmentationClassAug/{i}.png\n" for i in ids))
    ds = open_voc(copy, split="train_aug", normalize=False)
    assert ds.ids == ids
    assert_matches_files(ds, copy / "JPEGImages", aug)


def test_voc_without_class_list_uses_the_21_voc_classes(copy):
    (copy / "classes.txt").unlink()
    ds = open_voc(copy)
    assert ds.classes == VOC_CLASSES and ds.num_classes == 21
    ds.validate()  # shapes labels 0..7 are valid VOC labels
    assert open_voc(copy, classes=list(SHAPES_CLASSES)).classes == SHAPES_CLASSES
    one_line_error(lambda: open_voc(copy, classes=copy / "missing.txt"), str(copy / "missing.txt"))


# ------------------------------------------------------------------------------------------- folder pair
def make_folder_pair(shapes: Path, root: Path, ids: list[str]) -> Path:
    """images/ (JPEG) + masks/ (greyscale PNG class indices) + classes.txt, built from the shapes files."""
    (root / "images").mkdir(parents=True)
    (root / "masks").mkdir()
    for sid in ids:
        Image.open(shapes / "JPEGImages" / f"{sid}.png").save(root / "images" / f"{sid}.png")
        mask = pil_array(shapes / "SegmentationClass" / f"{sid}.png")
        Image.fromarray(mask, mode="L").save(root / "masks" / f"{sid}.png")
    (root / "classes.txt").write_text("\n".join(SHAPES_CLASSES) + "\n")
    return root


def test_folder_pair(shapes, tmp_path):
    ids = train_ids(shapes)[:5]
    root = make_folder_pair(shapes, tmp_path / "pair", ids)
    ds = open_folder_pair(root / "images", root / "masks", root / "classes.txt", normalize=False)
    assert ds.ids == sorted(ids) and ds.classes == SHAPES_CLASSES
    assert_matches_files(ds, root / "images", root / "masks")
    chosen = open_folder_pair(root / "images", root / "masks", list(SHAPES_CLASSES), ids=ids[3:1:-1])
    assert chosen.ids == ids[3:1:-1]


def test_folder_pair_with_upper_case_extensions(shapes, tmp_path):
    root = make_folder_pair(shapes, tmp_path / "pair", train_ids(shapes)[:2])
    for path in (root / "images").iterdir():
        Image.open(path).save(path.with_suffix(".JPG"), format="JPEG")
        path.unlink()
    ds = open_segmentation_dataset(root)
    assert ds.ids == train_ids(shapes)[:2] and ds[1][0].shape == (3, SIZE, SIZE)


# ------------------------------------------------------------------------------------------- COCO
def test_coco_rasterises_to_the_voc_masks(shapes):
    ds = open_coco(shapes / "annotations" / "instances_train.json", normalize=False)
    assert ds.ids == train_ids(shapes)
    assert ds.classes == SHAPES_CLASSES  # background + categories in id order
    assert_matches_files(ds, shapes / "JPEGImages", shapes / "SegmentationClass")
    sub = open_coco(shapes / "annotations" / "instances_val.json", shapes / "JPEGImages", ids=["val_00002"])
    assert sub.ids == ["val_00002"]


def test_coco_2017_layout_finds_the_image_folder(shapes, tmp_path):
    """COCO itself: annotations/instances_val2017.json with the images in val2017/."""
    root = tmp_path / "coco"
    (root / "annotations").mkdir(parents=True)
    shutil.copy(shapes / "annotations" / "instances_val.json", root / "annotations" / "instances_val2017.json")
    shutil.copytree(shapes / "JPEGImages", root / "val2017")
    ds = open_segmentation_dataset(root, split="val2017")
    assert ds.ids == ["val_00000", "val_00001", "val_00002"]
    assert ds.samples[0].image == root / "val2017" / "val_00000.png"
    assert torch.equal(ds[1][1], open_voc(shapes, split="val")[1][1])


def test_coco_polygons_and_crowd_regions(tmp_path):
    """A hand-written COCO file: a polygon square of class 2 and a crowd box (→ ignore)."""
    (tmp_path / "images").mkdir()
    Image.new("RGB", (10, 8), (10, 20, 30)).save(tmp_path / "images" / "a.jpg")
    coco = {
        "images": [{"id": 7, "file_name": "a.jpg", "width": 10, "height": 8}],
        "categories": [{"id": 3, "name": "cat"}, {"id": 1, "name": "dog"}],
        "annotations": [
            {"id": 1, "image_id": 7, "category_id": 3, "iscrowd": 0, "area": 16,
             "segmentation": [[2, 2, 6, 2, 6, 6, 2, 6]]},
            {"id": 2, "image_id": 7, "category_id": 1, "iscrowd": 1, "area": 4,
             "segmentation": {"size": [8, 10], "counts": [72, 2, 6]}},  # uncompressed RLE, column-major
        ],
    }
    (tmp_path / "annotations").mkdir()
    (tmp_path / "annotations" / "instances_x.json").write_text(json.dumps(coco))
    ds = open_segmentation_dataset(tmp_path, split="x")
    assert ds.classes == ("background", "dog", "cat") and ds.ids == ["a"]
    mask = ds[0][1].numpy()
    expected = np.zeros((8, 10), dtype=np.int64)
    expected[2:6, 2:6] = 2  # pycocotools: polygon (2,2)-(6,6) covers pixels 2..5
    expected[0:2, 9] = 255  # RLE: 72 zeros (9 columns of 8), then 2 ones at the top of column 9
    np.testing.assert_array_equal(mask, expected)


# ------------------------------------------------------------------------------------------- auto-detect
def test_auto_detect_every_layout(shapes, tmp_path):
    voc = open_segmentation_dataset(shapes)
    assert voc.ids == train_ids(shapes)
    assert open_segmentation_dataset(shapes, split="val").ids == ["val_00000", "val_00001", "val_00002"]
    assert open_segmentation_dataset(shapes, ids=["val_00001"]).ids == ["val_00001"]

    pair = make_folder_pair(shapes, tmp_path / "pair", train_ids(shapes)[:3])
    assert open_segmentation_dataset(pair).ids == train_ids(shapes)[:3]

    coco_file = open_segmentation_dataset(shapes / "annotations" / "instances_val.json")
    assert coco_file.ids == ["val_00000", "val_00001", "val_00002"]

    coco_only = tmp_path / "coco"  # annotations/ + images/, no JPEGImages/
    shutil.copytree(shapes / "annotations", coco_only / "annotations")
    shutil.copytree(shapes / "JPEGImages", coco_only / "images")
    ds = open_segmentation_dataset(coco_only, split="train")
    assert ds.ids == train_ids(shapes)
    assert torch.equal(ds[3][1], voc[3][1])


def test_auto_detect_per_split_folder_pairs_and_ids_across_splits(shapes, tmp_path):
    """<split>/images + <split>/masks; ids from a manifest may come from any split (as the re-training
    opens the test ids)."""
    root = tmp_path / "pairs"
    make_folder_pair(shapes, root / "train", train_ids(shapes)[:4])
    make_folder_pair(shapes, root / "val", ["val_00000", "val_00001"])
    (root / "val" / "classes.txt").unlink()
    (root / "classes.txt").write_text("\n".join(SHAPES_CLASSES) + "\n")  # shared class list
    assert open_segmentation_dataset(root).ids == train_ids(shapes)[:4]
    val = open_segmentation_dataset(root, split="val")
    assert val.ids == ["val_00000", "val_00001"] and val.classes == SHAPES_CLASSES
    mixed = open_segmentation_dataset(root, ids=["val_00001", "train_00002"], size=32)
    assert mixed.ids == ["val_00001", "train_00002"] and mixed[0][1].shape == (32, 32)
    assert torch.equal(open_segmentation_dataset(root, ids=["val_00001"])[0][1], val[1][1])
    one_line_error(lambda: open_segmentation_dataset(root, split="test"), str(root), "'test'", "train, val")
    one_line_error(lambda: open_segmentation_dataset(root, ids=["train_00000", "nope"]), str(root), "'nope'")
    (root / "val" / "classes.txt").write_text("background\nthing\n")
    one_line_error(lambda: open_segmentation_dataset(root, ids=["val_00000"]), str(root), "other classes")


def test_coco_folder_ids_across_splits(shapes, tmp_path):
    root = tmp_path / "coco"
    shutil.copytree(shapes / "annotations", root / "annotations")
    shutil.copytree(shapes / "JPEGImages", root / "images")
    ds = open_segmentation_dataset(root, ids=["val_00002", "train_00001"])
    assert ds.ids == ["val_00002", "train_00001"]
    voc = open_voc(shapes, ids=["val_00002", "train_00001"])
    assert all(torch.equal(ds[k][1], voc[k][1]) for k in range(2))
    one_line_error(lambda: open_segmentation_dataset(root, split="test"), str(root), "'test'")


# ------------------------------------------------------------------------------------------- options
def test_resize_square_and_rectangular(shapes):
    full = open_voc(shapes, normalize=False)
    small = open_voc(shapes, size=32, normalize=False)
    image, mask = small[0]
    assert image.shape == (3, 32, 32) and mask.shape == (32, 32) and mask.dtype == torch.int64
    assert set(mask.unique().tolist()) <= set(full[0][1].unique().tolist())  # nearest: no new labels
    # a 2x box downsample of a flat region keeps its value: compare with the mean of each 2x2 block
    block = full[0][0].reshape(3, 32, 2, 32, 2).mean(dim=(2, 4))
    assert (image - block).abs().mean() < 0.05
    image, mask = open_voc(shapes, size=(48, 40))[1]
    assert image.shape == (3, 48, 40) and mask.shape == (48, 40)


def test_normalisation_on_and_off(shapes):
    raw = open_voc(shapes, normalize=False)[2][0]
    assert 0.0 <= raw.min() and raw.max() <= 1.0
    normalised = open_voc(shapes)[2][0]
    mean = torch.tensor(IMAGENET_MEAN).view(3, 1, 1)
    std = torch.tensor(IMAGENET_STD).view(3, 1, 1)
    torch.testing.assert_close(normalised, (raw - mean) / std)


def test_subset_class_histogram_and_cache(shapes):
    ds = open_voc(shapes, split="trainval", normalize=False)
    sub = ds.subset(["val_00002", "train_00001"])
    assert sub.ids == ["val_00002", "train_00001"] and sub.classes == ds.classes
    assert torch.equal(sub[0][1], ds[ds.ids.index("val_00002")][1])
    assert not sub.normalize and sub.size is None
    one_line_error(lambda: ds.subset(["train_00001", "nope"]), "'nope'")

    expected = np.zeros(len(SHAPES_CLASSES), dtype=np.int64)
    for sid in ds.ids:
        m = pil_array(shapes / "SegmentationClass" / f"{sid}.png")
        expected += np.bincount(m[m != 255].ravel(), minlength=len(SHAPES_CLASSES))
    hist = ds.class_histogram()
    assert hist.tolist() == expected.tolist() and (hist > 0).all()
    assert hist.sum() == len(ds) * SIZE * SIZE  # no ignore pixels without a band

    assert ds[0][1] is ds[0][1]  # cached
    uncached = open_voc(shapes, cache=False)
    assert uncached[0][1] is not uncached[0][1] and torch.equal(uncached[0][1], uncached[0][1])


def test_ignore_label_is_kept(tmp_path):
    root = generate_shapes(tmp_path / "band", 3, 1, SIZE, 0, ignore_band=2)
    ds = open_voc(root)
    ds.validate()
    masks = torch.stack([ds[k][1] for k in range(len(ds))])
    assert (masks == 255).any()
    assert ds.class_histogram().sum() == (masks != 255).sum()


# ------------------------------------------------------------------------------------------- bad input
def test_corrupt_image(copy):
    bad = copy / "JPEGImages" / "train_00002.jpg"
    (copy / "JPEGImages" / "train_00002.png").unlink()
    bad.write_bytes(b"this is not a JPEG file at all" * 10)
    ds = open_voc(copy)
    ds[0]  # other images still load
    one_line_error(lambda: ds[2], str(bad), "unreadable image")
    one_line_error(ds.validate, str(bad))


def test_truncated_image(copy):
    path = copy / "JPEGImages" / "train_00001.png"
    path.write_bytes(path.read_bytes()[:200])
    one_line_error(lambda: open_voc(copy)[1], str(path))


def test_label_outside_the_class_list(copy):
    mask = copy / "SegmentationClass" / "train_00003.png"
    arr = pil_array(mask)
    arr[5, 5] = len(SHAPES_CLASSES)  # 8: one past the last class
    arr[6, 6] = 255  # ignore is fine
    Image.fromarray(arr, mode="L").save(mask)
    message = one_line_error(lambda: open_voc(copy)[3], str(mask), "[8]")
    assert "255" in message  # explains that 255 is the ignore label


def test_image_and_mask_size_mismatch(copy):
    mask = copy / "SegmentationClass" / "train_00004.png"
    Image.fromarray(pil_array(mask)[:32, :48], mode="L").save(mask)
    one_line_error(lambda: open_voc(copy)[4], str(mask), "48x32", f"{SIZE}x{SIZE}")


def test_missing_mask_for_a_listed_id(copy):
    mask = copy / "SegmentationClass" / "train_00006.png"
    mask.unlink()
    one_line_error(lambda: open_voc(copy, split="train"), str(mask), "'train_00006'")
    one_line_error(lambda: open_voc(copy, ids=["train_00006"]), str(mask))


def test_missing_image_for_a_listed_id(copy):
    (copy / "JPEGImages" / "train_00000.png").unlink()
    one_line_error(lambda: open_voc(copy), str(copy / "JPEGImages" / "train_00000"), "not found")


def test_missing_and_empty_list_files(copy):
    missing = copy / "ImageSets" / "Segmentation" / "test.txt"
    one_line_error(lambda: open_voc(copy, split="test"), str(missing), "not found")
    one_line_error(lambda: open_voc(copy, list_file=copy / "nowhere.txt"), str(copy / "nowhere.txt"))
    empty = copy / "ImageSets" / "Segmentation" / "empty.txt"
    empty.write_text("\n# only a comment\n   \n")
    one_line_error(lambda: open_voc(copy, split="empty"), str(empty), "empty")


def test_malformed_and_dangling_voc_aug_lines(copy):
    listing = copy / "ImageSets" / "Segmentation" / "aug.txt"
    listing.write_text("/JPEGImages/train_00000.png /SegmentationClass/train_00000.png extra\n")
    one_line_error(lambda: open_voc(copy, split="aug"), str(listing), "malformed")
    listing.write_text("/JPEGImages/train_00000.png /SegmentationClassAug/train_00000.png\n")
    one_line_error(lambda: open_voc(copy, split="aug"), str(copy / "SegmentationClassAug" / "train_00000.png"),
                   str(listing))


def test_rgb_colour_mask(copy):
    mask = copy / "SegmentationClass" / "train_00001.png"
    Image.open(mask).convert("RGB").save(mask)  # what an image editor's "save as colour" gives
    one_line_error(lambda: open_voc(copy)[1], str(mask), "RGB")


def test_unknown_layout_and_missing_dataset(tmp_path):
    (tmp_path / "stuff").mkdir()
    (tmp_path / "stuff" / "readme.txt").write_text("hello")
    one_line_error(lambda: open_segmentation_dataset(tmp_path / "stuff"), str(tmp_path / "stuff"), "unknown")
    one_line_error(lambda: open_segmentation_dataset(tmp_path / "stuff" / "readme.txt"),
                   str(tmp_path / "stuff" / "readme.txt"))
    one_line_error(lambda: open_segmentation_dataset(tmp_path / "absent"), str(tmp_path / "absent"), "not found")
    one_line_error(lambda: open_voc(tmp_path / "absent"), str(tmp_path / "absent"))


def test_folder_pair_errors(shapes, tmp_path):
    root = make_folder_pair(shapes, tmp_path / "pair", train_ids(shapes)[:2])
    (root / "masks" / "train_00001.png").unlink()
    one_line_error(lambda: open_segmentation_dataset(root), str(root / "masks" / "train_00001.png"))
    one_line_error(lambda: open_folder_pair(root / "images", root / "nomasks", root / "classes.txt"),
                   str(root / "nomasks"))
    (root / "classes.txt").unlink()
    one_line_error(lambda: open_folder_pair(root / "images", root / "masks", root / "classes.txt"),
                   str(root / "classes.txt"))
    (root / "classes.txt").write_text("background\nthing\nthing\n")
    one_line_error(lambda: read_class_list(root / "classes.txt"), str(root / "classes.txt"), "duplicate")


def test_coco_bad_json_missing_image_and_bad_category(copy):
    ann = copy / "annotations" / "instances_train.json"
    data = json.loads(ann.read_text())
    ann.write_text(ann.read_text()[:-20])
    one_line_error(lambda: open_coco(ann), str(ann), "invalid JSON")
    one_line_error(lambda: open_segmentation_dataset(copy / "annotations" / "nope.json"),
                   str(copy / "annotations" / "nope.json"))

    (copy / "JPEGImages" / "train_00002.png").unlink()
    ann.write_text(json.dumps(data))
    one_line_error(lambda: open_coco(ann), str(copy / "JPEGImages" / "train_00002.png"))

    data["annotations"][0]["category_id"] = 99
    ann.write_text(json.dumps(data))
    one_line_error(lambda: open_coco(ann, ids=["train_00000"]), str(ann), "99")

    ann.write_text(json.dumps({"images": []}))
    one_line_error(lambda: open_coco(ann), str(ann), "annotations")


def test_coco_size_disagrees_with_the_image(copy):
    ann = copy / "annotations" / "instances_val.json"
    data = json.loads(ann.read_text())
    data["images"][0]["width"] = SIZE + 4
    ann.write_text(json.dumps(data))
    one_line_error(lambda: open_coco(ann)[0], str(ann), data["images"][0]["file_name"])
