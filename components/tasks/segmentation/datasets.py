"""Readers for segmentation data: PASCAL VOC layout, image/mask folder pairs, COCO JSON.

Every reader returns a :class:`SegmentationDataset`, a torch ``Dataset`` whose items are
``(image, mask)``: ``image`` float32 ``(3, H, W)`` normalised with the ImageNet mean/std (the ResNet
backbones expect it; ``normalize=False`` gives [0, 1]), ``mask`` int64 ``(H, W)`` with class indices
``0..C-1`` and ``255`` for ignored pixels. Bad data is a one-line :class:`DatasetError` naming the file:
an unreadable image, a mask label outside the class list, an image/mask size mismatch, a missing file.
"""

from __future__ import annotations

import json
import os
from dataclasses import dataclass
from pathlib import Path
from typing import Callable, Iterable, Sequence

import numpy as np
import torch
import torch.nn.functional as F
from PIL import Image, UnidentifiedImageError
from torch.utils.data import Dataset

from components.errors import LossforgeError

IGNORE_INDEX = 255
IMAGENET_MEAN = (0.485, 0.456, 0.406)
IMAGENET_STD = (0.229, 0.224, 0.225)
IMAGE_EXTENSIONS = (".jpg", ".jpeg", ".png", ".bmp", ".tif", ".tiff")
VOC_CLASSES = (
    "background", "aeroplane", "bicycle", "bird", "boat", "bottle", "bus", "car", "cat", "chair", "cow",
    "diningtable", "dog", "horse", "motorbike", "person", "pottedplant", "sheep", "sofa", "train", "tvmonitor",
)


class DatasetError(LossforgeError):
    """Unreadable, missing or inconsistent dataset files."""


@dataclass(frozen=True)
class Sample:
    """One item of a dataset: its id, image file and a way to get its label map."""

    id: str
    image: Path
    mask: Path | None = None  # a class-index PNG; None when `rasterize` builds the mask (COCO)
    rasterize: Callable[[int, int], np.ndarray] | None = None


def read_image(path: Path) -> np.ndarray:
    """An RGB image as uint8 (H, W, 3); an unreadable file is a DatasetError naming it."""
    try:
        with Image.open(path) as im:
            return np.array(im.convert("RGB"))
    except FileNotFoundError:
        raise DatasetError(f"{path}: image file not found") from None
    except (UnidentifiedImageError, OSError, SyntaxError) as exc:
        raise DatasetError(f"{path}: unreadable image ({exc.__class__.__name__}: {exc})") from None


def check_image(path: Path) -> tuple[int, int]:
    """(width, height) of an image after decoding all of it (a truncated JPEG fails here, not in training);
    JPEGs decode at 1/8 scale (`draft`), which still reads the whole file. Errors name the file."""
    try:
        with Image.open(path) as im:
            size = im.size
            im.draft("RGB", (max(1, size[0] // 8), max(1, size[1] // 8)))
            im.load()
            return size
    except FileNotFoundError:
        raise DatasetError(f"{path}: image file not found") from None
    except (UnidentifiedImageError, OSError, SyntaxError, ValueError) as exc:
        raise DatasetError(f"{path}: unreadable image ({exc.__class__.__name__}: {exc})") from None


def read_mask(path: Path) -> np.ndarray:
    """A label map (H, W) from a palette ('P') or greyscale PNG; RGB colour masks are rejected."""
    try:
        with Image.open(path) as im:
            if im.mode not in ("P", "L", "I", "I;16"):
                raise DatasetError(
                    f"{path}: mask has mode {im.mode}; expected a palette or greyscale PNG of class indices")
            return np.asarray(im).astype(np.int64)
    except FileNotFoundError:
        raise DatasetError(f"{path}: mask file not found") from None
    except (UnidentifiedImageError, OSError, SyntaxError) as exc:
        raise DatasetError(f"{path}: unreadable mask ({exc.__class__.__name__}: {exc})") from None


class SegmentationDataset(Dataset):
    """(image, mask) pairs with class names; optional resize, normalisation and in-memory cache."""

    def __init__(
        self,
        samples: Sequence[Sample],
        classes: Sequence[str],
        *,
        size: int | tuple[int, int] | None = None,
        normalize: bool = True,
        cache: bool = True,
        ignore_index: int = IGNORE_INDEX,
        name: str = "dataset",
    ):
        if not samples:
            raise DatasetError(f"{name}: no images (empty split or list)")
        if len(classes) < 2:
            raise DatasetError(f"{name}: need at least 2 classes, got {list(classes)}")
        self.samples = list(samples)
        self.classes = tuple(classes)
        self.size = (size, size) if isinstance(size, int) else (tuple(size) if size else None)
        self.normalize = normalize
        self.ignore_index = ignore_index
        self.name = name
        self._cache: dict[int, tuple[torch.Tensor, torch.Tensor]] | None = {} if cache else None

    @property
    def ids(self) -> list[str]:
        """Sample ids in dataset order."""
        return [s.id for s in self.samples]

    @property
    def num_classes(self) -> int:
        """Number of classes, background included."""
        return len(self.classes)

    def __len__(self) -> int:
        return len(self.samples)

    def __getitem__(self, index: int) -> tuple[torch.Tensor, torch.Tensor]:
        if self._cache is not None and index in self._cache:
            return self._cache[index]
        item = self._load(self.samples[index])
        if self._cache is not None:
            self._cache[index] = item
        return item

    def _checked_mask(self, sample: Sample, h: int, w: int) -> np.ndarray:
        """The label map of `sample` for an h x w image; a size mismatch or a label outside the classes is an
        error naming the mask file (or the image of a rasterised COCO sample)."""
        if sample.mask is not None:
            mask = read_mask(sample.mask)
            where = sample.mask
        else:
            mask = sample.rasterize(h, w)  # type: ignore[misc]
            where = sample.image
        if mask.shape != (h, w):
            raise DatasetError(
                f"{where}: mask size {mask.shape[1]}x{mask.shape[0]} does not match image size {w}x{h} "
                f"({sample.image})")
        bad = np.unique(mask[(mask != self.ignore_index) & ((mask < 0) | (mask >= self.num_classes))])
        if bad.size:
            raise DatasetError(
                f"{where}: label(s) {bad[:5].tolist()} outside the {self.num_classes} classes "
                f"(0..{self.num_classes - 1}, {self.ignore_index} = ignore)")
        return mask

    def _load(self, sample: Sample) -> tuple[torch.Tensor, torch.Tensor]:
        image = read_image(sample.image)
        h, w = image.shape[:2]
        mask = self._checked_mask(sample, h, w)
        img = torch.from_numpy(np.ascontiguousarray(image)).permute(2, 0, 1).float().div_(255.0)
        msk = torch.from_numpy(np.ascontiguousarray(mask)).long()
        if self.size is not None and (h, w) != self.size:
            img = F.interpolate(img[None], size=self.size, mode="bilinear", align_corners=False, antialias=True)[0]
            msk = F.interpolate(msk[None, None].float(), size=self.size, mode="nearest")[0, 0].long()
        if self.normalize:
            mean = torch.tensor(IMAGENET_MEAN).view(3, 1, 1)
            std = torch.tensor(IMAGENET_STD).view(3, 1, 1)
            img = (img - mean) / std
        return img, msk

    def subset(self, ids: Iterable[str]) -> "SegmentationDataset":
        """The samples with the given ids, in that order; an unknown id is a DatasetError."""
        by_id = {s.id: s for s in self.samples}
        chosen = []
        for i in ids:
            if i not in by_id:
                raise DatasetError(f"{self.name}: id {i!r} is not in the dataset")
            chosen.append(by_id[i])
        return SegmentationDataset(chosen, self.classes, size=self.size, normalize=self.normalize,
                                   cache=self._cache is not None, ignore_index=self.ignore_index, name=self.name)

    def validate(self, workers: int = 4) -> None:
        """Check every sample before a long run starts: the image decodes (all of it), the mask decodes, has the
        image's size and only known labels. The first bad file is a DatasetError naming it. Threads: PIL and
        numpy release the GIL while decoding; nothing is cached or converted to tensors."""
        from concurrent.futures import ThreadPoolExecutor

        def check(sample: Sample) -> None:
            w, h = check_image(sample.image)
            self._checked_mask(sample, h, w)

        with ThreadPoolExecutor(max_workers=max(1, workers)) as pool:
            for _ in pool.map(check, self.samples):  # in order: the first bad sample is reported
                pass

    def class_histogram(self) -> torch.Tensor:
        """Pixel count per class over the whole dataset (ignored pixels excluded)."""
        hist = torch.zeros(self.num_classes, dtype=torch.long)
        for i in range(len(self)):
            m = self[i][1]
            hist += torch.bincount(m[m != self.ignore_index].flatten(), minlength=self.num_classes)
        return hist


# ------------------------------------------------------------------------------------------ helpers
def read_class_list(path: str | os.PathLike) -> list[str]:
    """Class names, one per line (index = label, background first)."""
    path = Path(path)
    try:
        names = [line.strip() for line in path.read_text(encoding="utf-8").splitlines() if line.strip()]
    except FileNotFoundError:
        raise DatasetError(f"{path}: class list not found") from None
    if len(names) < 2:
        raise DatasetError(f"{path}: a class list needs at least 2 classes (background first)")
    if len(set(names)) != len(names):
        raise DatasetError(f"{path}: duplicate class names")
    return names


def _classes_arg(classes: Sequence[str] | str | os.PathLike) -> list[str]:
    if isinstance(classes, (str, os.PathLike)):
        return read_class_list(classes)
    return list(classes)


def _find_image(folder: Path, stem: str) -> Path:
    for ext in IMAGE_EXTENSIONS + tuple(e.upper() for e in IMAGE_EXTENSIONS):  # a.jpg or A.JPG (cameras)
        candidate = folder / f"{stem}{ext}"
        if candidate.exists():
            return candidate
    raise DatasetError(f"{folder / stem}.*: image file not found (tried {', '.join(IMAGE_EXTENSIONS)})")


def _read_list(path: Path) -> list[str]:
    try:
        lines = [line.strip() for line in path.read_text(encoding="utf-8").splitlines()]
    except FileNotFoundError:
        raise DatasetError(f"{path}: list file not found") from None
    lines = [line for line in lines if line and not line.startswith("#")]
    if not lines:
        raise DatasetError(f"{path}: list file is empty")
    return lines


# ------------------------------------------------------------------------------------------ readers
def open_voc(
    root: str | os.PathLike,
    ids: Sequence[str] | None = None,
    list_file: str | os.PathLike | None = None,
    *,
    split: str | None = None,
    classes: Sequence[str] | str | os.PathLike | None = None,
    mask_dir: str = "SegmentationClass",
    **kwargs,
) -> SegmentationDataset:
    """A PASCAL VOC layout folder (JPEGImages/, SegmentationClass/, ImageSets/Segmentation/).

    Choose images by `ids`, by `list_file` (a path, or a name such as "train" looked up in
    ImageSets/Segmentation/; lines are plain ids or VOCaug pairs "/JPEGImages/x.jpg /SegmentationClassAug/x.png"),
    or by `split` (same as a list name; default "train"). Classes come from `classes`, else root/classes.txt,
    else the 21 VOC classes.
    """
    root = Path(root)
    if not root.is_dir():
        raise DatasetError(f"{root}: dataset folder not found")
    if classes is None:
        classes = read_class_list(root / "classes.txt") if (root / "classes.txt").exists() else list(VOC_CLASSES)
    names = _classes_arg(classes)
    samples: list[Sample] = []
    if ids is None:
        if list_file is None:
            list_file = split or "train"
        lf = Path(list_file)
        if not lf.exists() and lf.suffix == "" and len(lf.parts) == 1:
            lf = root / "ImageSets" / "Segmentation" / f"{lf}.txt"
        for line in _read_list(lf):
            parts = line.split()
            if len(parts) == 2:  # VOCaug style: image path and mask path relative to root
                img, msk = (root / p.lstrip("/") for p in parts)
                for p in (img, msk):
                    if not p.exists():
                        raise DatasetError(f"{p}: listed in {lf} but not found")
                samples.append(Sample(img.stem, img, msk))
            elif len(parts) == 1:
                samples.append(_voc_sample(root, parts[0], mask_dir))
            else:
                raise DatasetError(f"{lf}: malformed line {line!r} (expected an id or 'image mask')")
    else:
        samples = [_voc_sample(root, i, mask_dir) for i in ids]
    return SegmentationDataset(samples, names, name=str(root), **kwargs)


def _voc_sample(root: Path, sample_id: str, mask_dir: str) -> Sample:
    image = _find_image(root / "JPEGImages", sample_id)
    mask = root / mask_dir / f"{sample_id}.png"
    if not mask.exists():
        raise DatasetError(f"{mask}: mask file not found for id {sample_id!r}")
    return Sample(sample_id, image, mask)


def open_folder_pair(
    images: str | os.PathLike,
    masks: str | os.PathLike,
    classes: Sequence[str] | str | os.PathLike,
    ids: Sequence[str] | None = None,
    **kwargs,
) -> SegmentationDataset:
    """A plain images/ + masks/ folder pair matched by file stem; masks are class-index PNGs."""
    images, masks = Path(images), Path(masks)
    for folder in (images, masks):
        if not folder.is_dir():
            raise DatasetError(f"{folder}: folder not found")
    names = _classes_arg(classes)
    if ids is None:
        ids = sorted(p.stem for p in images.iterdir() if p.suffix.lower() in IMAGE_EXTENSIONS)
    samples = []
    for i in ids:
        image = _find_image(images, i)
        mask = masks / f"{i}.png"
        if not mask.exists():
            raise DatasetError(f"{mask}: mask file not found for image {image.name}")
        samples.append(Sample(i, image, mask))
    return SegmentationDataset(samples, names, name=str(images.parent), **kwargs)


def _number(value: object) -> bool:
    return isinstance(value, (int, float)) and not isinstance(value, bool) and np.isfinite(value)


def _check_coco_fields(path: Path, data: dict) -> None:
    """One-line errors for the COCO fields the rasteriser reads: categories[].id/name, images[].id/file_name,
    annotations[].image_id/category_id and their polygons or RLE (a missing or empty segmentation draws nothing)."""
    for k, c in enumerate(data["categories"]):
        if not isinstance(c, dict) or not isinstance(c.get("id"), int) or not isinstance(c.get("name"), str):
            raise DatasetError(f"{path}: categories[{k}] needs an int 'id' and a str 'name' (got {c!r:.80})")
    if len({c["id"] for c in data["categories"]}) != len(data["categories"]):
        raise DatasetError(f"{path}: duplicate category ids in 'categories'")
    image_ids = set()
    for k, img in enumerate(data["images"]):
        if not isinstance(img, dict) or "id" not in img or not isinstance(img.get("file_name"), str):
            raise DatasetError(f"{path}: images[{k}] needs an 'id' and a str 'file_name' (got {img!r:.80})")
        try:
            image_ids.add(img["id"])
        except TypeError:
            raise DatasetError(f"{path}: images[{k}].id: expected a number or a string "
                               f"(got {img['id']!r:.40})") from None
    for k, ann in enumerate(data["annotations"]):
        if not isinstance(ann, dict):
            raise DatasetError(f"{path}: annotations[{k}] is not an object")
        where = f"{path}: annotations[id={ann.get('id', k)}]"
        try:
            known_image = ann.get("image_id") in image_ids
        except TypeError:
            known_image = False
        if not known_image:
            raise DatasetError(f"{where}.image_id {ann.get('image_id')!r:.40} is not in 'images'")
        seg = ann.get("segmentation")
        if not seg:
            continue
        if isinstance(seg, list):
            if not all(isinstance(poly, list) and len(poly) >= 6 and len(poly) % 2 == 0 and all(map(_number, poly))
                       for poly in seg):
                raise DatasetError(f"{where}.segmentation: polygons must be lists of >= 3 x, y number pairs")
        elif isinstance(seg, dict):
            size = seg.get("size")
            if not (isinstance(size, list) and len(size) == 2 and all(isinstance(v, int) for v in size)
                    and isinstance(seg.get("counts"), (str, list))):
                raise DatasetError(f"{where}.segmentation: RLE needs 'size' [h, w] and 'counts'")
        else:
            raise DatasetError(f"{where}.segmentation: expected polygons or RLE (got {type(seg).__name__})")


def open_coco(
    annotation_json: str | os.PathLike,
    images_dir: str | os.PathLike | None = None,
    ids: Sequence[str] | None = None,
    **kwargs,
) -> SegmentationDataset:
    """COCO instance annotations rasterised into class maps (categories → 1..K in id order, 0 = background).

    Sample ids are image file stems. Crowd regions become the ignore label. `images_dir` defaults to
    the first folder that exists of: COCO's ``<root>/train2017`` for ``<root>/annotations/instances_train2017.json``,
    ``<root>/JPEGImages``, ``<root>/images``, ``images/`` next to the JSON, ``<root>``.
    """
    from pycocotools import mask as mask_utils

    path = Path(annotation_json)
    try:
        data = json.loads(path.read_text(encoding="utf-8"))
    except FileNotFoundError:
        raise DatasetError(f"{path}: COCO annotation file not found") from None
    except json.JSONDecodeError as exc:
        raise DatasetError(f"{path}: invalid JSON ({exc.msg} at line {exc.lineno})") from None
    if not isinstance(data, dict):
        raise DatasetError(f"{path}: not a COCO instances file (top level is not an object)")
    for key in ("images", "annotations", "categories"):
        if not isinstance(data.get(key), list):
            raise DatasetError(f"{path}: not a COCO instances file (missing list '{key}')")
    _check_coco_fields(path, data)
    cats = sorted(data["categories"], key=lambda c: c["id"])
    label_of = {c["id"]: k + 1 for k, c in enumerate(cats)}
    names = ["background"] + [c["name"] for c in cats]
    if images_dir is None:
        split_dir = path.parent.parent / path.stem.split("_", 1)[-1]  # COCO: annotations/instances_val2017.json
        candidates = [split_dir, path.parent.parent / "JPEGImages", path.parent.parent / "images",
                      path.parent / "images", path.parent.parent]
        images_dir = next((c for c in candidates if c.is_dir()), path.parent)
    images_dir = Path(images_dir)
    anns_by_image: dict[int, list[dict]] = {}
    for ann in data["annotations"]:
        if ann.get("category_id") not in label_of:
            raise DatasetError(f"{path}: annotation {ann.get('id')} has unknown category_id {ann.get('category_id')}")
        anns_by_image.setdefault(ann["image_id"], []).append(ann)
    wanted = set(ids) if ids is not None else None
    by_stem = {}
    for img in data["images"]:
        stem = Path(img["file_name"]).stem
        if wanted is not None and stem not in wanted:
            continue
        file = images_dir / img["file_name"]
        if not file.exists():
            raise DatasetError(f"{file}: image listed in {path.name} not found")
        anns = anns_by_image.get(img["id"], [])

        def rasterize(h: int, w: int, anns=anns, img=img) -> np.ndarray:
            if (img.get("height"), img.get("width")) not in ((h, w), (None, None)):
                raise DatasetError(f"{path}: image {img['file_name']} is {w}x{h} but annotated as "
                                   f"{img.get('width')}x{img.get('height')}")
            out = np.zeros((h, w), dtype=np.int64)
            for ann in sorted(anns, key=lambda a: -float(a.get("area", 0))):  # small objects drawn last
                seg = ann.get("segmentation")
                if not seg:
                    continue
                if isinstance(seg, dict) and list(seg.get("size", ())) != [h, w]:
                    raise DatasetError(f"{path}: annotations[id={ann.get('id')}].segmentation: RLE size "
                                       f"{seg.get('size')} is not the image size [{h}, {w}]")
                try:
                    if isinstance(seg, list):
                        rle = mask_utils.merge(mask_utils.frPyObjects(seg, h, w))
                    elif isinstance(seg.get("counts"), list):
                        rle = mask_utils.frPyObjects(seg, h, w)
                    else:
                        rle = {**seg, "counts": seg["counts"].encode("ascii")} if isinstance(seg["counts"], str) else seg
                    m = mask_utils.decode(rle).astype(bool)
                except (ValueError, TypeError, IndexError, OverflowError, UnicodeError) as exc:
                    raise DatasetError(f"{path}: annotations[id={ann.get('id')}].segmentation: cannot decode "
                                       f"({type(exc).__name__}: {exc})") from None
                out[m] = IGNORE_INDEX if ann.get("iscrowd") else label_of[ann["category_id"]]
            return out

        by_stem[stem] = Sample(stem, file, None, rasterize)
    order = list(ids) if ids is not None else sorted(by_stem)
    missing = [i for i in order if i not in by_stem]
    if missing:
        raise DatasetError(f"{path}: image id(s) {missing[:3]} not in the annotation file")
    return SegmentationDataset([by_stem[i] for i in order], names, name=str(path), **kwargs)


def open_segmentation_dataset(
    path: str | os.PathLike,
    *,
    split: str = "train",
    ids: Sequence[str] | None = None,
    **kwargs,
) -> SegmentationDataset:
    """Open any supported layout, detected from what is at `path`:

    - a ``.json`` file: COCO instances;
    - a folder with ``JPEGImages/`` (VOC layout; `split` names the ImageSets list when `ids` is None);
    - a folder with ``images/`` + ``masks/`` + ``classes.txt`` (folder pair, no splits);
    - a folder with ``<split>/images/`` + ``<split>/masks/`` (folder pair per split; ``classes.txt`` in
      ``<split>/`` or in the folder);
    - a folder with ``annotations/instances_<split>.json`` (COCO).

    With `ids` (e.g. from a split manifest) the ids may come from any split of a per-split layout:
    they are looked up in `split` first, then in the other splits.
    """
    path = Path(path)
    if not path.exists():
        raise DatasetError(f"{path}: dataset not found")
    if path.is_file():
        if path.suffix.lower() == ".json":
            return open_coco(path, ids=ids, **kwargs)
        raise DatasetError(f"{path}: not a dataset (expected a folder or a COCO .json file)")
    if (path / "JPEGImages").is_dir():
        return open_voc(path, ids=ids, split=split, **kwargs)
    if (path / "images").is_dir() and (path / "masks").is_dir():
        return open_folder_pair(path / "images", path / "masks", path / "classes.txt", ids=ids, **kwargs)

    def pair_split(name: str) -> Callable[..., SegmentationDataset]:
        folder = path / name
        classes = folder / "classes.txt" if (folder / "classes.txt").exists() else path / "classes.txt"
        return lambda **kw: open_folder_pair(folder / "images", folder / "masks", classes, **kw)

    def coco_split(name: str) -> Callable[..., SegmentationDataset]:
        return lambda **kw: open_coco(path / "annotations" / f"instances_{name}.json", **kw)

    openers: dict[str, Callable[..., SegmentationDataset]] = {}
    for folder in sorted(p for p in path.iterdir() if (p / "images").is_dir() and (p / "masks").is_dir()):
        openers[folder.name] = pair_split(folder.name)
    if not openers and (path / "annotations").is_dir():
        for file in sorted((path / "annotations").glob("instances_*.json")):
            openers[file.stem[len("instances_"):]] = coco_split(file.stem[len("instances_"):])
    if not openers:
        raise DatasetError(
            f"{path}: unknown dataset layout (expected VOC JPEGImages/, images/+masks/+classes.txt, "
            "<split>/images/+<split>/masks/, or annotations/instances_<split>.json)")
    if ids is None:
        if split not in openers:
            raise DatasetError(f"{path}: no split {split!r} (found: {', '.join(openers)})")
        return openers[split](**kwargs)
    return _ids_from_splits(path, openers, split, ids, kwargs)


def _ids_from_splits(path: Path, openers: dict, split: str, ids: Sequence[str], kwargs: dict) -> SegmentationDataset:
    """The samples with `ids`, looked up in split `split` first, then in the others (same classes)."""
    reader_kwargs = {k: kwargs.pop(k) for k in ("images_dir",) if k in kwargs}
    found: dict[str, Sample] = {}
    classes: tuple[str, ...] | None = None
    for name in sorted(openers, key=lambda n: n != split):
        part = openers[name](**reader_kwargs)
        if classes is None:
            classes = part.classes
        elif part.classes != classes:
            raise DatasetError(f"{path}: split {name!r} has other classes than split {split!r}")
        for sample in part.samples:
            found.setdefault(sample.id, sample)
        if all(i in found for i in ids):
            break
    missing = [i for i in ids if i not in found]
    if missing:
        raise DatasetError(f"{path}: id(s) {missing[:3]} not in any split ({', '.join(openers)})")
    return SegmentationDataset([found[i] for i in ids], classes, name=str(path), **kwargs)
