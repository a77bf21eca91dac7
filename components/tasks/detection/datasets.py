"""COCO-format detection data: any COCO instances JSON + image folder, incl. the embedded shapes layout.

Items are ``(image, target)``: ``image`` float32 ``(3, H, W)`` in [0, 1] (torchvision's detection models
normalise inside their transform), ``target`` = ``{"boxes": (G, 4) float32 xyxy in pixels,
"labels": (G,) int64 in 1..K, "image_id": int64 (the COCO image id)}``.

Decisions:
- Categories are sorted by COCO id and renumbered 1..K (0 = background), as segmentation's COCO reader does,
  so ``num_classes`` = K + 1 is what torchvision's ``FasterRCNN(num_classes=...)`` takes.
- Sample ids (``.ids``) are image file stems, the ids split manifests hold (as for segmentation).
- Training targets leave out crowd annotations and zero-width/height boxes (torchvision's COCO reference
  does the same); the evaluation ground truth (``coco_ground_truth``) keeps every annotation, crowds included,
  so COCOeval ignores detections on crowds as it does on COCO.
- Layouts: a COCO ``.json``; a folder with ``annotations/instances_<split>.json`` (COCO, the shapes data) or
  ``train.json`` + ``val.json`` (in the folder or ``annotations/``); the image folder is the first of
  ``<split>/``, ``JPEGImages/``, ``images/``, the folder, that holds the listed ``file_name``s.
- Malformed data is a one-line :class:`DetectionDatasetError` naming the file and field: invalid JSON, a
  missing ``images``/``annotations``/``categories`` list, an unknown category or image id, a bbox that is
  not 4 numbers, a box outside the image (0.5 px tolerance), a missing image file, an image whose size is not
  the annotated one. `DetectionDataset.validate` (run on every image before a search) also decodes each image to
  its end. A box of zero width or height is not an error: real datasets have them (COCO does; torchvision's
  reference scripts drop them too), and training drops them.
"""

from __future__ import annotations

import json
import math
import os
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Mapping, Sequence

import numpy as np
import torch
from PIL import Image, UnidentifiedImageError
from torch.utils.data import Dataset

from components.errors import LossforgeError

BOX_TOLERANCE = 0.5  # px a box may exceed the image (rounding in exported annotations)


class DetectionDatasetError(LossforgeError):
    """Unreadable, missing or inconsistent detection dataset files."""


@dataclass(frozen=True)
class DetectionSample:
    """One image: id (file stem), file, COCO image record and its annotations (validated)."""

    id: str
    image: Path
    record: dict
    annotations: tuple[dict, ...]
    source: Path  # the annotation JSON it comes from


def _read_json(path: Path) -> dict:
    try:
        data = json.loads(path.read_text(encoding="utf-8"))
    except FileNotFoundError:
        raise DetectionDatasetError(f"{path}: COCO annotation file not found") from None
    except json.JSONDecodeError as exc:
        raise DetectionDatasetError(f"{path}: invalid JSON ({exc.msg} at line {exc.lineno})") from None
    except OSError as exc:
        raise DetectionDatasetError(f"{path}: unreadable ({exc})") from None
    if not isinstance(data, dict):
        raise DetectionDatasetError(f"{path}: not a COCO instances file (top level is not an object)")
    for key in ("images", "annotations", "categories"):
        if not isinstance(data.get(key), list):
            raise DetectionDatasetError(f"{path}: not a COCO instances file (missing list '{key}')")
    return data


def _number(value: Any) -> bool:
    return isinstance(value, (int, float)) and not isinstance(value, bool) and math.isfinite(value)


def _check_annotation(path: Path, ann: dict, record: dict) -> None:
    """One-line error for a malformed bbox or one outside its image."""
    where = f"{path}: annotations[id={ann.get('id')}]"
    box = ann.get("bbox")
    if not (isinstance(box, list) and len(box) == 4 and all(_number(v) for v in box)):
        raise DetectionDatasetError(f"{where}.bbox: expected [x, y, width, height] numbers, got {box!r}")
    x, y, w, h = box
    if w < 0 or h < 0:
        raise DetectionDatasetError(f"{where}.bbox: negative width/height {box}")
    width, height = record.get("width"), record.get("height")
    if _number(width) and _number(height):
        t = BOX_TOLERANCE
        if x < -t or y < -t or x + w > width + t or y + h > height + t:
            raise DetectionDatasetError(
                f"{where}.bbox: box {box} is outside image {record.get('file_name')} ({width}x{height})")


def _default_images_dir(path: Path, file_names: Sequence[str] = ()) -> Path:
    """The image folder of a COCO JSON: the first candidate that holds one of the first listed images (COCO's
    ``<split>/``, ``JPEGImages/``, ``images/`` next to ``annotations/`` or to the JSON, or that folder itself)."""
    split = path.stem.split("_", 1)[-1]  # COCO: annotations/instances_val2017.json -> val2017; train.json -> train
    near, up = path.parent, path.parent.parent
    upper = [up / split, up / "JPEGImages", up / "images", near / "images", up]
    nearer = [near / split, near / "JPEGImages", near / "images", near]
    ordered = upper + nearer if near.name == "annotations" else nearer + upper
    dirs = [c for c in dict.fromkeys(ordered) if c.is_dir()]
    names = list(file_names)[:5]
    for folder in dirs:
        if any((folder / name).is_file() for name in names):
            return folder
    return dirs[0] if dirs else near


def read_coco(path: str | os.PathLike, images_dir: str | os.PathLike | None = None
              ) -> tuple[list[dict], list[DetectionSample]]:
    """(categories sorted by id, samples in file order) of a COCO instances JSON; checks every field."""
    path = Path(path)
    data = _read_json(path)
    cats = data["categories"]
    for k, c in enumerate(cats):
        if not isinstance(c, dict) or not isinstance(c.get("id"), int) or not isinstance(c.get("name"), str):
            raise DetectionDatasetError(f"{path}: categories[{k}] needs an int 'id' and a str 'name'")
    if not cats:
        raise DetectionDatasetError(f"{path}: 'categories' is empty")
    if len({c["id"] for c in cats}) != len(cats):
        raise DetectionDatasetError(f"{path}: duplicate category ids in 'categories'")
    cats = sorted(cats, key=lambda c: c["id"])
    records: dict[Any, dict] = {}
    for k, img in enumerate(data["images"]):
        if not isinstance(img, dict) or "id" not in img or not isinstance(img.get("file_name"), str):
            raise DetectionDatasetError(f"{path}: images[{k}] needs an 'id' and a str 'file_name'")
        if img["id"] in records:
            raise DetectionDatasetError(f"{path}: images[{k}]: duplicate image id {img['id']!r}")
        records[img["id"]] = img
    if images_dir is None:
        images_dir = _default_images_dir(path, [r["file_name"] for r in records.values()])
    images_dir = Path(images_dir)
    known = {c["id"] for c in cats}
    anns: dict[Any, list[dict]] = {i: [] for i in records}
    for k, ann in enumerate(data["annotations"]):
        if not isinstance(ann, dict):
            raise DetectionDatasetError(f"{path}: annotations[{k}] is not an object")
        if ann.get("category_id") not in known:
            raise DetectionDatasetError(
                f"{path}: annotations[id={ann.get('id')}].category_id {ann.get('category_id')!r} is not in 'categories'")
        if ann.get("image_id") not in records:
            raise DetectionDatasetError(
                f"{path}: annotations[id={ann.get('id')}].image_id {ann.get('image_id')!r} is not in 'images'")
        _check_annotation(path, ann, records[ann["image_id"]])
        anns[ann["image_id"]].append(ann)
    samples = []
    stems: set[str] = set()
    for img_id, img in records.items():
        stem = Path(img["file_name"]).stem
        if stem in stems:
            raise DetectionDatasetError(f"{path}: two images have the file stem {stem!r} (ids must be unique)")
        stems.add(stem)
        samples.append(DetectionSample(stem, images_dir / img["file_name"], img, tuple(anns[img_id]), path))
    return cats, samples


class DetectionDataset(Dataset):
    """COCO-format detection samples; items ``(image (3,H,W) in [0,1], {"boxes", "labels", "image_id"})``."""

    def __init__(self, samples: Sequence[DetectionSample], categories: Sequence[dict], *, name: str = "dataset",
                 cache: bool = True):
        if not samples:
            raise DetectionDatasetError(f"{name}: no images (empty split or list)")
        self.samples = list(samples)
        self.categories = [dict(c) for c in categories]
        self.label_of = {c["id"]: k + 1 for k, c in enumerate(self.categories)}
        self.name = name
        self._cache: dict[int, tuple[torch.Tensor, dict]] | None = {} if cache else None
        missing = [s.image for s in self.samples if not s.image.exists()]
        if missing:
            raise DetectionDatasetError(f"{missing[0]}: image listed in {self.samples[0].source.name} not found"
                                        + (f" (and {len(missing) - 1} more)" if len(missing) > 1 else ""))

    @property
    def ids(self) -> list[str]:
        """Sample ids (image file stems) in dataset order."""
        return [s.id for s in self.samples]

    @property
    def classes(self) -> tuple[str, ...]:
        """Class names, index = label ("background" first)."""
        return ("background",) + tuple(c["name"] for c in self.categories)

    @property
    def num_classes(self) -> int:
        """Number of classes, background included (K + 1)."""
        return len(self.categories) + 1

    def __len__(self) -> int:
        return len(self.samples)

    def __getitem__(self, index: int) -> tuple[torch.Tensor, dict]:
        if self._cache is not None and index in self._cache:
            image, target = self._cache[index]
            return image, {k: v.clone() for k, v in target.items()}
        item = self._load(self.samples[index])
        if self._cache is not None:
            self._cache[index] = item
            return item[0], {k: v.clone() for k, v in item[1].items()}
        return item

    def _load(self, sample: DetectionSample) -> tuple[torch.Tensor, dict]:
        try:
            with Image.open(sample.image) as im:
                array = np.array(im.convert("RGB"))
        except FileNotFoundError:
            raise DetectionDatasetError(f"{sample.image}: image file not found") from None
        except (UnidentifiedImageError, OSError, SyntaxError) as exc:
            raise DetectionDatasetError(f"{sample.image}: unreadable image ({type(exc).__name__}: {exc})") from None
        h, w = array.shape[:2]
        rec = sample.record
        if (rec.get("height"), rec.get("width")) not in ((h, w), (None, None)):
            raise DetectionDatasetError(f"{sample.source}: image {rec['file_name']} is {w}x{h} but annotated as "
                                        f"{rec.get('width')}x{rec.get('height')}")
        boxes, labels = self.target_boxes(sample, w, h)
        image = torch.from_numpy(np.ascontiguousarray(array)).permute(2, 0, 1).float().div_(255.0)
        target = {"boxes": boxes, "labels": labels, "image_id": torch.tensor(self.image_id(sample), dtype=torch.int64)}
        return image, target

    def target_boxes(self, sample: DetectionSample, width: float | None = None, height: float | None = None
                     ) -> tuple[torch.Tensor, torch.Tensor]:
        """Training boxes (G, 4) xyxy and labels (G,) of a sample: no crowds, no empty boxes, clipped to the image."""
        width = sample.record.get("width") if width is None else width
        height = sample.record.get("height") if height is None else height
        boxes, labels = [], []
        for ann in sample.annotations:
            if ann.get("iscrowd"):
                continue
            x, y, bw, bh = (float(v) for v in ann["bbox"])
            x0, y0, x1, y1 = x, y, x + bw, y + bh
            if width is not None and height is not None:
                x0, x1 = min(max(x0, 0.0), float(width)), min(max(x1, 0.0), float(width))
                y0, y1 = min(max(y0, 0.0), float(height)), min(max(y1, 0.0), float(height))
            if x1 <= x0 or y1 <= y0:
                continue
            boxes.append([x0, y0, x1, y1])
            labels.append(self.label_of[ann["category_id"]])
        return (torch.tensor(boxes, dtype=torch.float32).reshape(-1, 4),
                torch.tensor(labels, dtype=torch.int64).reshape(-1))

    def image_id(self, sample_or_index: DetectionSample | int) -> int:
        """The COCO image id as an int (evaluation key); non-int ids are numbered by dataset position + 1."""
        sample = self.samples[sample_or_index] if isinstance(sample_or_index, int) else sample_or_index
        raw = sample.record["id"]
        if isinstance(raw, int) and not isinstance(raw, bool):
            return raw
        return self.samples.index(sample) + 1

    def subset(self, ids: Sequence[str]) -> "DetectionDataset":
        """The samples with `ids`, in that order; an unknown id is an error."""
        by_id = {s.id: s for s in self.samples}
        missing = [i for i in ids if i not in by_id]
        if missing:
            raise DetectionDatasetError(f"{self.name}: id(s) {missing[:3]} not in the dataset")
        return DetectionDataset([by_id[i] for i in ids], self.categories, name=self.name, cache=self._cache is not None)

    def validate(self, workers: int = 4) -> None:
        """Check every sample before a long run starts, without caching anything: the image decodes (all of it)
        and has its annotated size, and every box lies inside it (a zero-size box is dropped by training, not an
        error: real datasets have them). The first bad sample is a one-line error naming the file and the
        annotation."""
        from concurrent.futures import ThreadPoolExecutor

        with ThreadPoolExecutor(max_workers=max(1, workers)) as pool:
            for _ in pool.map(self.check_sample, self.samples):  # in order: the first bad sample is reported
                pass

    def check_sample(self, sample: DetectionSample) -> tuple[int, int]:
        """Decode `sample`'s image and check its boxes against it (see `validate`); returns (width, height)."""
        from components.tasks.segmentation.datasets import DatasetError, check_image

        try:
            w, h = check_image(sample.image)
        except DatasetError as exc:
            raise DetectionDatasetError(str(exc)) from None
        rec = sample.record
        if (rec.get("height"), rec.get("width")) not in ((h, w), (None, None)):
            raise DetectionDatasetError(f"{sample.source}: image {rec['file_name']} is {w}x{h} but annotated as "
                                        f"{rec.get('width')}x{rec.get('height')}")
        for ann in sample.annotations:
            _check_annotation(sample.source, ann, {"file_name": rec["file_name"], "width": w, "height": h})
        return w, h

    def coco_ground_truth(self) -> dict:
        """This dataset as an in-memory COCO dict (all annotations, crowds included; category ids = labels)."""
        images, annotations = [], []
        for sample in self.samples:
            rec = sample.record
            iid = self.image_id(sample)
            images.append({"id": iid, "file_name": rec["file_name"], "width": rec.get("width"),
                           "height": rec.get("height")})
            for ann in sample.annotations:
                x, y, w, h = (float(v) for v in ann["bbox"])
                annotations.append({
                    "id": len(annotations) + 1, "image_id": iid, "category_id": self.label_of[ann["category_id"]],
                    "bbox": [x, y, w, h], "area": float(ann.get("area", w * h)),
                    "iscrowd": int(bool(ann.get("iscrowd", 0))),
                })
        categories = [{"id": k + 1, "name": c["name"]} for k, c in enumerate(self.categories)]
        return {"images": images, "annotations": annotations, "categories": categories}


def detection_collate(batch):
    """DataLoader collate: (list of images, list of targets) — images may differ in size."""
    return [b[0] for b in batch], [b[1] for b in batch]


def open_coco_detection(annotation_json: str | os.PathLike, images_dir: str | os.PathLike | None = None,
                        ids: Sequence[str] | None = None, **kwargs) -> DetectionDataset:
    """A COCO instances JSON; `ids` (file stems) select and order the images (all, sorted by id, if None)."""
    path = Path(annotation_json)
    cats, samples = read_coco(path, images_dir)
    by_id = {s.id: s for s in samples}
    if ids is None:
        order = sorted(by_id)
    else:
        order = list(ids)
        missing = [i for i in order if i not in by_id]
        if missing:
            raise DetectionDatasetError(f"{path}: image id(s) {missing[:3]} not in the annotation file")
    return DetectionDataset([by_id[i] for i in order], cats, name=str(path), **kwargs)


PLAIN_SPLITS = ("train", "val", "test")  # <split>.json, in the folder or in annotations/


def split_files(path: Path) -> dict[str, Path]:
    """Split name -> annotation JSON of a dataset folder: ``annotations/instances_<split>.json`` (COCO), else
    ``train.json`` / ``val.json`` / ``test.json`` in ``annotations/`` or in the folder; {} if none."""
    files = {f.stem[len("instances_"):]: f for f in sorted((path / "annotations").glob("instances_*.json"))}
    for folder in (path / "annotations", path):
        if not files:
            files = {n: folder / f"{n}.json" for n in PLAIN_SPLITS if (folder / f"{n}.json").is_file()}
    return files


def _pick_split(path: Path, files: Mapping[str, Path], split: str) -> str:
    """`split`, or the only split whose name starts with it (``val`` -> ``val2017``)."""
    if split in files:
        return split
    prefixed = [n for n in files if n.startswith(split)]
    if len(prefixed) == 1:
        return prefixed[0]
    raise DetectionDatasetError(f"{path}: no split {split!r} (found: {', '.join(files)})")


def open_detection_dataset(path: str | os.PathLike, *, split: str | None = "train",
                           ids: Sequence[str] | None = None, **kwargs) -> DetectionDataset:
    """Open a detection dataset: a COCO ``.json`` file, or a folder with ``annotations/instances_<split>.json``
    or ``train.json`` + ``val.json`` (in the folder or in ``annotations/``); images in ``<split>/``,
    ``JPEGImages/``, ``images/`` or the folder itself (``file_name`` may hold sub-folders).

    With `ids` (e.g. from a split manifest) the ids are looked up in `split` first, then in the other splits
    (which must have the same categories); they come back in the order given.
    """
    path = Path(path)
    if not path.exists():
        raise DetectionDatasetError(f"{path}: dataset not found")
    if path.is_file():
        if path.suffix.lower() != ".json":
            raise DetectionDatasetError(f"{path}: not a detection dataset (expected a folder or a COCO .json file)")
        return open_coco_detection(path, ids=ids, **kwargs)
    files = split_files(path)
    if not files:
        raise DetectionDatasetError(f"{path}: no COCO annotation files (expected annotations/instances_<split>.json, "
                                    "or train.json + val.json in the folder or in annotations/)")
    split = split or "train"
    if ids is None:
        return open_coco_detection(files[_pick_split(path, files, split)], **kwargs)
    found: dict[str, DetectionSample] = {}
    categories = None
    for name in sorted(files, key=lambda n: n != split):
        cats, samples = read_coco(files[name])
        if categories is None:
            categories = cats
        elif [(c["id"], c["name"]) for c in cats] != [(c["id"], c["name"]) for c in categories]:
            raise DetectionDatasetError(f"{files[name]}: categories differ from those of split {split!r}")
        for s in samples:
            found.setdefault(s.id, s)
        if all(i in found for i in ids):
            break
    missing = [i for i in ids if i not in found]
    if missing:
        raise DetectionDatasetError(f"{path}: id(s) {list(missing[:3])} not in any split ({', '.join(files)})")
    return DetectionDataset([found[i] for i in ids], categories or [], name=str(path), **kwargs)


__all__ = ["DetectionDataset", "DetectionDatasetError", "DetectionSample", "detection_collate",
           "open_coco_detection", "open_detection_dataset", "read_coco", "split_files"]
