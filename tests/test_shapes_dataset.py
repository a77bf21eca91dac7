"""The embedded shapes dataset: determinism, content, VOC files, COCO JSON (via pycocotools), ignore band."""

from __future__ import annotations

import hashlib
import json
import shutil
from pathlib import Path

import numpy as np
import pytest
from PIL import Image
from pycocotools.coco import COCO

from components.errors import LossforgeError
from components.tasks.segmentation.shapes import (
    SHAPES_CLASSES,
    SHAPES_KEYPOINTS,
    SHAPES_SKELETONS,
    content_hash,
    generate_shapes,
    render_scene,
)

NUM_TRAIN, NUM_TEST, SIZE, SEED = 12, 4, 64, 3


def file_hashes(root: Path) -> dict[str, str]:
    """sha256 of every file under root, by relative path."""
    return {p.relative_to(root).as_posix(): hashlib.sha256(p.read_bytes()).hexdigest()
            for p in sorted(root.rglob("*")) if p.is_file()}


def read_mask(path: Path) -> np.ndarray:
    with Image.open(path) as im:
        return np.array(im)


def boundary_fraction(mask: np.ndarray) -> float:
    """Share of a mask's pixels that have a 4-neighbour outside the mask."""
    p = np.pad(mask, 1, constant_values=False)
    interior = p[1:-1, 1:-1] & p[:-2, 1:-1] & p[2:, 1:-1] & p[1:-1, :-2] & p[1:-1, 2:]
    return 1.0 - interior.sum() / mask.sum()


@pytest.fixture(scope="module")
def shapes(tmp_path_factory) -> Path:
    return generate_shapes(tmp_path_factory.mktemp("gen") / "shapes", NUM_TRAIN, NUM_TEST, SIZE, SEED)


def ids_of(root: Path, split: str) -> list[str]:
    return (root / "ImageSets" / "Segmentation" / f"{split}.txt").read_text().split()


# ------------------------------------------------------------------------------------ determinism
def test_same_seed_gives_byte_identical_files_and_other_seed_differs(shapes, tmp_path):
    again = generate_shapes(tmp_path / "again", NUM_TRAIN, NUM_TEST, SIZE, SEED)
    first, second = file_hashes(shapes), file_hashes(again)
    assert first == second
    assert len(first) == 3 * (NUM_TRAIN + NUM_TEST) + 3 + 1 + 2 + 1  # images/masks/objects, lists, classes, coco, meta

    other = file_hashes(generate_shapes(tmp_path / "other", NUM_TRAIN, NUM_TEST, SIZE, SEED + 1))
    assert other.keys() == first.keys()
    images = [k for k in first if k.startswith("JPEGImages/")]
    assert all(first[k] != other[k] for k in images)
    assert first["classes.txt"] == other["classes.txt"]


def test_dataset_json_records_parameters_and_content_hash(shapes, tmp_path):
    meta = json.loads((shapes / "dataset.json").read_text())
    assert meta["params"]["seed"] == SEED and meta["params"]["image_size"] == SIZE
    assert meta["splits"] == {"train": NUM_TRAIN, "val": NUM_TEST}
    assert meta["classes"] == list(SHAPES_CLASSES) and meta["ignore_label"] == 255
    assert meta["content_sha256"] == content_hash(shapes)
    # the hash covers the content: one changed mask byte changes it
    copy = Path(shutil.copytree(shapes, tmp_path / "copy"))
    assert content_hash(copy) == meta["content_sha256"]
    mask = copy / "SegmentationClass" / "train_00000.png"
    arr = read_mask(mask)
    arr[0, 0] = (arr[0, 0] + 1) % len(SHAPES_CLASSES)
    im = Image.fromarray(arr, mode="P")
    im.putpalette(Image.open(shapes / "SegmentationClass" / "train_00000.png").getpalette())
    im.save(mask)
    assert content_hash(copy) != meta["content_sha256"]


def test_image_k_depends_only_on_seed_split_and_k(shapes, tmp_path):
    """A larger dataset with the same seed starts with the same images."""
    bigger = generate_shapes(tmp_path / "bigger", NUM_TRAIN + 2, NUM_TEST + 1, SIZE, SEED)
    small, big = file_hashes(shapes), file_hashes(bigger)
    for k in range(NUM_TRAIN):
        for name in (f"JPEGImages/train_{k:05d}.jpg", f"SegmentationClass/train_{k:05d}.png"):
            assert small[name] == big[name]
    assert small["JPEGImages/val_00000.jpg"] == big["JPEGImages/val_00000.jpg"]


# ------------------------------------------------------------------------------------ layout and content
def test_voc_layout_lists_and_classes(shapes):
    train, val = ids_of(shapes, "train"), ids_of(shapes, "val")
    assert len(train) == NUM_TRAIN and len(val) == NUM_TEST and not set(train) & set(val)
    assert ids_of(shapes, "trainval") == train + val
    assert (shapes / "classes.txt").read_text().split() == list(SHAPES_CLASSES)
    assert SHAPES_CLASSES[0] == "background" and len(SHAPES_CLASSES) >= 6
    for sid in train + val:
        with Image.open(shapes / "JPEGImages" / f"{sid}.jpg") as im:
            assert im.format == "JPEG" and im.mode == "RGB" and im.size == (SIZE, SIZE)
        for folder in ("SegmentationClass", "SegmentationObject"):
            with Image.open(shapes / folder / f"{sid}.png") as im:
                assert im.format == "PNG" and im.mode == "P" and im.size == (SIZE, SIZE)


def test_masks_use_the_voc_palette(shapes):
    with Image.open(shapes / "SegmentationClass" / "train_00000.png") as im:
        pal = im.getpalette()
    colour = lambda i: tuple(pal[3 * i: 3 * i + 3])  # noqa: E731
    # PASCAL VOC colours (from the VOC devkit): background, aeroplane, bicycle, bird, ..., person, ignore
    assert colour(0) == (0, 0, 0)
    assert colour(1) == (128, 0, 0)
    assert colour(2) == (0, 128, 0)
    assert colour(3) == (128, 128, 0)
    assert colour(7) == (128, 128, 128)
    assert colour(15) == (192, 128, 128)
    assert colour(255) == (224, 224, 192)


def test_every_class_appears_and_images_are_not_trivial(shapes):
    counts = np.zeros(256, dtype=np.int64)
    for sid in ids_of(shapes, "train"):
        m = read_mask(shapes / "SegmentationClass" / f"{sid}.png")
        counts += np.bincount(m.ravel(), minlength=256)
        with Image.open(shapes / "JPEGImages" / f"{sid}.jpg") as im:
            assert np.asarray(im).std() > 10  # textured, not a flat colour
    assert (counts[: len(SHAPES_CLASSES)] > 0).all(), counts[: len(SHAPES_CLASSES)]
    assert counts[len(SHAPES_CLASSES):].sum() == 0  # no labels beyond the classes, no ignore without a band
    # background is the largest class but objects cover a real share of the pixels
    assert 0.1 < counts[1:].sum() / counts.sum() < 0.9


def test_thin_structures_and_large_regions_exist(shapes):
    coco = COCO(str(shapes / "annotations" / "instances_train.json"))
    bar, ring = SHAPES_CLASSES.index("bar"), SHAPES_CLASSES.index("ring")
    thin, thick = [], []
    for ann in coco.loadAnns(coco.getAnnIds()):
        m = coco.annToMask(ann).astype(bool)
        if m.sum() < 12:
            continue
        frac = boundary_fraction(m)
        if ann["category_id"] in (bar, ring):
            # 1-3 px wide: about a third of the pixels at most are interior (occluders that overlap a
            # thin structure can leave a few more interior pixels at the crossing)
            assert frac >= 0.45, (ann["id"], frac)
            thin.append(frac)
        else:
            thick.append(frac)
    assert max(thin) >= 0.95  # some 1-2 px structure: every pixel is on the boundary
    assert min(thick) < 0.4  # and solid shapes whose pixels are mostly interior


def test_objects_occlude_each_other():
    occluded = 0
    for k in range(20):
        scene = render_scene(np.random.default_rng(k), image_size=SIZE)
        assert 2 <= len(scene.objects) <= 6
        for i, obj in enumerate(scene.objects, start=1):
            visible = scene.instances == i
            assert not (visible & ~obj.mask).any()  # visible pixels lie inside the object's full mask
            if (obj.mask & ~visible).any():  # part of it is hidden by a later object
                occluded += 1
                hidden = obj.mask & ~visible
                assert (scene.instances[hidden] > i).all()
    assert occluded >= 10


def test_shapes_vary_in_size_and_colour(shapes):
    coco = COCO(str(shapes / "annotations" / "instances_train.json"))
    areas = [a["area"] for a in coco.loadAnns(coco.getAnnIds()) if a["category_id"] in (1, 2, 3, 7)]
    assert max(areas) > 4 * min(areas)
    # colour is independent of the class: the mean colour of one class varies a lot across instances
    means = []
    for ann in coco.loadAnns(coco.getAnnIds(catIds=[SHAPES_CLASSES.index("square")])):
        img = coco.loadImgs(ann["image_id"])[0]
        with Image.open(shapes / "JPEGImages" / img["file_name"]) as im:
            pixels = np.asarray(im)[coco.annToMask(ann).astype(bool)]
        if len(pixels) > 20:
            means.append(pixels.mean(axis=0))
    assert len(means) >= 2 and np.ptp(np.array(means), axis=0).max() > 40


# ------------------------------------------------------------------------------------ COCO JSON
@pytest.mark.parametrize("split", ["train", "val"])
def test_coco_instances_rasterise_to_the_voc_class_masks(shapes, split):
    coco = COCO(str(shapes / "annotations" / f"instances_{split}.json"))
    assert [c["name"] for c in coco.loadCats(coco.getCatIds())] == list(SHAPES_CLASSES[1:])
    assert coco.getCatIds() == list(range(1, len(SHAPES_CLASSES)))
    images = coco.loadImgs(coco.getImgIds())
    assert sorted(Path(i["file_name"]).stem for i in images) == ids_of(shapes, split)
    for img in images:
        voc = read_mask(shapes / "SegmentationClass" / f"{Path(img['file_name']).stem}.png")
        assert (img["height"], img["width"]) == voc.shape
        raster = np.zeros_like(voc, dtype=np.int64)
        covered = np.zeros(voc.shape, dtype=np.int64)
        for ann in coco.loadAnns(coco.getAnnIds(imgIds=[img["id"]])):
            m = coco.annToMask(ann).astype(bool)
            assert m.sum() == ann["area"] > 0 and ann["iscrowd"] == 0
            ys, xs = np.nonzero(m)
            assert ann["bbox"] == [xs.min(), ys.min(), xs.max() - xs.min() + 1, ys.max() - ys.min() + 1]
            raster[m] = ann["category_id"]
            covered += m
        assert covered.max() <= 1  # visible instance masks are disjoint
        keep = voc != 255
        np.testing.assert_array_equal(raster[keep], voc[keep])


def test_coco_keypoints_follow_the_documented_schema(shapes):
    coco = COCO(str(shapes / "annotations" / "instances_train.json"))
    for cat in coco.loadCats(coco.getCatIds()):
        assert cat["keypoints"] == list(SHAPES_KEYPOINTS[cat["name"]])
        assert cat["skeleton"] == [list(e) for e in SHAPES_SKELETONS[cat["name"]]]
        assert all(1 <= i <= len(cat["keypoints"]) for e in cat["skeleton"] for i in e)
    seen_visibility = set()
    for ann in coco.loadAnns(coco.getAnnIds()):
        cat = coco.loadCats([ann["category_id"]])[0]
        kps = np.array(ann["keypoints"], dtype=float).reshape(-1, 3)
        assert len(kps) == len(cat["keypoints"])
        assert set(kps[:, 2]) <= {0, 1, 2}
        assert ann["num_keypoints"] == int((kps[:, 2] > 0).sum())
        assert (kps[kps[:, 2] == 0, :2] == 0).all()
        inside = kps[kps[:, 2] > 0]
        assert ((inside[:, :2] >= 0) & (inside[:, :2] <= SIZE)).all()
        seen_visibility |= set(kps[:, 2].astype(int).tolist())
        named = dict(zip(cat["keypoints"], kps))
        if cat["name"] == "bar" and (kps[:, 2] > 0).all():
            e1, e2, c = named["end_1"][:2], named["end_2"][:2], named["center"][:2]
            assert e1[0] <= e2[0]  # end_1 is the left-most end
            np.testing.assert_allclose((e1 + e2) / 2, c, atol=0.02)
        if cat["name"] == "ring" and (kps[:, 2] > 0).all():
            assert abs(named["top"][0] - named["bottom"][0]) < 0.02
            assert abs(named["left"][1] - named["right"][1]) < 0.02
            assert named["top"][1] < named["bottom"][1] and named["left"][0] < named["right"][0]
        for x, y, v in kps:
            if v == 2:  # visible: on (or next to) the instance's visible pixels
                m = coco.annToMask(ann)
                ix, iy = int(x - 0.5), int(y - 0.5)
                assert m[max(iy - 2, 0): iy + 3, max(ix - 2, 0): ix + 3].any()
    assert {1, 2} <= seen_visibility  # occluded and visible keypoints both occur


# ------------------------------------------------------------------------------------ options and errors
def test_ignore_band_puts_255_along_occlusion_boundaries(tmp_path):
    width = 2
    root = generate_shapes(tmp_path / "band", 6, 1, SIZE, SEED, ignore_band=width)
    plain = generate_shapes(tmp_path / "plain", 6, 1, SIZE, SEED)
    total_ignored = 0
    for sid in ids_of(root, "train"):
        banded = read_mask(root / "SegmentationClass" / f"{sid}.png")
        clean = read_mask(plain / "SegmentationClass" / f"{sid}.png")
        ignored = banded == 255
        total_ignored += ignored.sum()
        # only labels turn into 255; everything else is the plain mask
        np.testing.assert_array_equal(banded[~ignored], clean[~ignored])
        # each ignored pixel lies within `width` px (Chebyshev) of an instance drawn later (on the hidden side)
        objects = read_mask(plain / "SegmentationObject" / f"{sid}.png").astype(int)
        padded = np.pad(objects, width, mode="edge")
        for y, x in zip(*np.nonzero(ignored)):
            window = padded[y: y + 2 * width + 1, x: x + 2 * width + 1]
            assert (window > objects[y, x]).any()
        # the front-most object keeps all its pixels
        top = objects == objects.max()
        assert not ignored[top].any()
    assert total_ignored > 0


def test_png_format_is_lossless_and_listed_in_coco(tmp_path):
    root = generate_shapes(tmp_path / "png", 2, 1, SIZE, SEED, image_format="png")
    assert sorted(p.name for p in (root / "JPEGImages").iterdir()) == ["train_00000.png", "train_00001.png",
                                                                        "val_00000.png"]
    data = json.loads((root / "annotations" / "instances_train.json").read_text())
    assert [i["file_name"] for i in data["images"]] == ["train_00000.png", "train_00001.png"]


@pytest.mark.parametrize(
    "kwargs, field",
    [
        ({"num_train": 0}, "num_train"),
        ({"num_test": -1}, "num_test"),
        ({"image_size": 16}, "image_size"),
        ({"seed": -1}, "seed"),
        ({"image_format": "gif"}, "image_format"),
        ({"ignore_band": 11}, "ignore_band"),
        ({"min_objects": 5, "max_objects": 3}, "min_objects"),
    ],
)
def test_bad_parameters_are_one_line_errors_and_write_nothing(tmp_path, kwargs, field):
    args = {"num_train": 2, "num_test": 1, "image_size": SIZE, "seed": 0} | kwargs
    with pytest.raises(LossforgeError, match=field) as info:
        generate_shapes(tmp_path / "out", **args)
    assert "\n" not in str(info.value)
    assert list(tmp_path.iterdir()) == []


def test_refuses_to_overwrite_a_foreign_folder_but_replaces_an_earlier_dataset(tmp_path):
    foreign = tmp_path / "mine"
    foreign.mkdir()
    (foreign / "notes.txt").write_text("keep me")
    with pytest.raises(LossforgeError, match="mine"):
        generate_shapes(foreign, 2, 1, SIZE, 0)
    assert [p.name for p in foreign.iterdir()] == ["notes.txt"]

    root = generate_shapes(tmp_path / "ds", 3, 2, SIZE, 0)
    generate_shapes(root, 2, 1, SIZE, 1)  # smaller: the old files must be gone
    assert sorted(p.name for p in (root / "JPEGImages").iterdir()) == ["train_00000.jpg", "train_00001.jpg",
                                                                       "val_00000.jpg"]
    assert json.loads((root / "dataset.json").read_text())["params"]["seed"] == 1
    assert sorted(p.name for p in tmp_path.iterdir()) == ["ds", "mine"]  # no temporary folders left


def test_progress_callback_counts_every_image(tmp_path):
    calls = []
    generate_shapes(tmp_path / "p", 3, 2, SIZE, 0, progress=lambda done, total: calls.append((done, total)))
    assert calls == [(k, 5) for k in range(1, 6)]


def test_ensure_shapes_reuses_a_matching_dataset_and_regenerates_on_change(tmp_path):
    from components.tasks.segmentation.shapes import ensure_shapes

    root = tmp_path / "shapes"
    ensure_shapes(root, num_train=4, num_test=2, image_size=32, seed=0)
    image = root / "JPEGImages" / "train_00000.jpg"
    image.touch()  # a new mtime shows whether the next call rewrote the file
    touched = image.stat().st_mtime_ns
    ensure_shapes(root, num_train=4, num_test=2, image_size=32, seed=0)
    assert image.stat().st_mtime_ns == touched  # same parameters: nothing rewritten
    ensure_shapes(root, num_train=4, num_test=2, image_size=32, seed=1)
    assert image.stat().st_mtime_ns != touched  # another seed: regenerated
    assert len(list((root / "JPEGImages").glob("*.jpg"))) == 6
