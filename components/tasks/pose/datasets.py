"""Top-down pose data: one crop per annotated instance of a COCO keypoints dataset, with Gaussian target heatmaps.

Items are ``(crop (3, H, W) in [0, 1], {"heatmaps": (K, h, w), "weights": (K,), "index": ()})``; ``index`` points
into ``dataset.instances`` (image, category, annotation and the crop's mapping back to image coordinates).

Decisions:
- The COCO reader is the detection task's (``open_detection_dataset``: layouts, split lookup by ids, box checks);
  this module adds the keypoint checks and the crops. ``ids`` are image ids (file stems), so the search's split
  manifests work unchanged; ``len(dataset)`` is the number of crops (instances), not of images.
- Instances: non-crowd annotations with a positive box and at least one labelled keypoint (``v > 0``), of
  categories that declare ``keypoints``. Top-down with ground-truth boxes (the paper uses the person detections
  of SimpleBaseline [58]; a dataset here carries no detections).
- Categories with different keypoint counts (the embedded shapes: 3-6 per class): the heatmap channels are the
  *union of the categories' keypoint slots*, concatenated in category-id order (``slot_offset``; COCO person:
  17 channels). An instance's target uses only its category's slots; the other slots get weight 0, so they are
  masked out of the loss, and evaluation decodes only the instance's own slots. A network thus learns one set of
  heatmaps per category (as multi-category keypoint models do) rather than mixing unrelated points in a channel.
- Crop (SimpleBaseline): the box centre, the box grown to the input aspect ratio (aspect preserved) and by
  ``padding`` (1.25), sampled bilinearly (PIL affine, outside the image = 0) to the input size. Coordinates are
  continuous (COCO: pixel i covers [i, i+1)); heatmap pixel centres are at i + 0.5.
- Targets: an unnormalised Gaussian (peak 1) per keypoint at its sub-pixel heatmap position, sigma =
  2 * heatmap_width / 48 (SimpleBaseline: sigma 2 on 48x64 heatmaps; 0.67 at 16 px). Weight 1 for a labelled
  keypoint (``v > 0``: the paper's "visible joints", mmpose's target_weight) that lies inside the heatmap, else 0.
- No augmentation: flips need flip pairs, which generic categories do not declare.
"""

from __future__ import annotations

import os
from dataclasses import dataclass
from pathlib import Path
from typing import Sequence

import numpy as np
import torch
from PIL import Image, UnidentifiedImageError
from torch.utils.data import Dataset

from components.tasks.detection.datasets import (DetectionDataset, DetectionDatasetError, _number,
                                                 open_detection_dataset)

PADDING = 1.25
CACHE_MAX_PIXELS = 128 * 128


class PoseDatasetError(DetectionDatasetError):
    """Unreadable, missing or inconsistent keypoint annotations."""


def heatmap_sigma(heatmap_width: int) -> float:
    """Gaussian sigma in heatmap pixels: SimpleBaseline's 2 px at width 48, scaled with the width."""
    return 2.0 * heatmap_width / 48.0


@dataclass(frozen=True)
class PoseInstance:
    """One crop: where it comes from and how it maps back (image x = x0 + crop_x * scale, same for y)."""

    sample: int          # index into the detection dataset's samples
    image_id: int        # COCO image id (evaluation key)
    category_id: int
    annotation: dict
    x0: float
    y0: float
    scale: float         # image pixels per input pixel (same in x and y: aspect preserved)
    area: float          # the annotation's area (OKS scale)


def crop_box(box: Sequence[float], input_size: tuple[int, int], padding: float = PADDING
             ) -> tuple[float, float, float]:
    """(x0, y0, scale) of the crop of an xywh `box` at `input_size` (H, W): centred, input aspect, × padding."""
    x, y, w, h = (float(v) for v in box)
    in_h, in_w = input_size
    aspect = in_w / in_h
    cx, cy = x + w / 2, y + h / 2
    w, h = max(w, 1e-3), max(h, 1e-3)
    if w > aspect * h:
        h = w / aspect
    else:
        w = h * aspect
    w, h = w * padding, h * padding
    return cx - w / 2, cy - h / 2, w / in_w


def crop_image(image: Image.Image, x0: float, y0: float, scale: float, input_size: tuple[int, int]) -> torch.Tensor:
    """(3, H, W) float crop in [0, 1]: input pixel (u, v) samples image point (x0 + u·scale, y0 + v·scale)."""
    in_h, in_w = input_size
    out = image.transform((in_w, in_h), Image.Transform.AFFINE, data=(scale, 0.0, x0, 0.0, scale, y0),
                          resample=Image.Resampling.BILINEAR, fillcolor=(0, 0, 0))
    return torch.from_numpy(np.asarray(out, dtype=np.uint8).copy()).permute(2, 0, 1).float().div_(255.0)


def gaussian_heatmaps(points: torch.Tensor, visible: torch.Tensor, heatmap_size: tuple[int, int], sigma: float
                      ) -> tuple[torch.Tensor, torch.Tensor]:
    """Targets (K, h, w) and weights (K,) of K keypoints `points` (K, 2) in continuous heatmap coordinates.

    A keypoint that is not `visible` or lies outside the heatmap gets an all-zero map and weight 0."""
    h, w = heatmap_size
    xs = torch.arange(w, dtype=torch.float32) + 0.5
    ys = torch.arange(h, dtype=torch.float32) + 0.5
    inside = (points[:, 0] >= 0) & (points[:, 0] < w) & (points[:, 1] >= 0) & (points[:, 1] < h)
    weights = (visible.bool() & inside).float()
    dx = (xs[None, :] - points[:, 0:1]) ** 2          # (K, w)
    dy = (ys[None, :] - points[:, 1:2]) ** 2          # (K, h)
    maps = torch.exp(-(dy[:, :, None] + dx[:, None, :]) / (2 * sigma * sigma))
    return maps * weights[:, None, None], weights


class PoseDataset(Dataset):
    """Top-down crops of a COCO keypoints dataset (module doc); `input_size` / `heatmap_size` are (H, W)."""

    def __init__(self, detection: DetectionDataset, input_size: tuple[int, int] = (64, 64),
                 heatmap_size: tuple[int, int] | None = None, *, cache: bool = True):
        self.detection = detection
        self.input_size = (int(input_size[0]), int(input_size[1]))
        self.heatmap_size = (tuple(int(v) for v in heatmap_size) if heatmap_size is not None
                             else (self.input_size[0] // 4, self.input_size[1] // 4))
        self.name = detection.name
        self.categories = [c for c in detection.categories if c.get("keypoints")]
        source = detection.samples[0].source
        if not self.categories:
            raise PoseDatasetError(f"{source}: no category declares 'keypoints' (not a COCO keypoints dataset)")
        self.slot_offset: dict[int, int] = {}
        self.keypoint_names: list[str] = []
        for cat in self.categories:
            names = cat["keypoints"]
            if not isinstance(names, list) or not all(isinstance(n, str) for n in names):
                raise PoseDatasetError(f"{source}: categories[id={cat['id']}].keypoints must be a list of names")
            self.slot_offset[cat["id"]] = len(self.keypoint_names)
            self.keypoint_names += [f"{cat['name']}/{n}" for n in names]
        self.instances: list[PoseInstance] = []
        for k, sample in enumerate(detection.samples):
            image_id = detection.image_id(sample)
            for ann in sample.annotations:
                self._check_keypoints(sample.source, ann)
                if not self._usable(ann):
                    continue
                x0, y0, scale = crop_box(ann["bbox"], self.input_size)
                _, _, bw, bh = ann["bbox"]
                self.instances.append(PoseInstance(k, image_id, ann["category_id"], ann, x0, y0, scale,
                                                   float(ann.get("area", bw * bh))))
        # crops are kept in memory only when small (the CPU proxy's 64x64: ~50 KB per crop with its heatmaps); at
        # COCO scale (150k crops at 256x192) they are re-cropped every time
        small = self.input_size[0] * self.input_size[1] <= CACHE_MAX_PIXELS
        self._cache: dict[int, tuple[torch.Tensor, dict]] | None = {} if cache and small else None
        self._cache_requested = cache

    # ------------------------------------------------------------------ layout
    @property
    def num_keypoints(self) -> int:
        """Heatmap channels: the union of the categories' keypoint slots."""
        return len(self.keypoint_names)

    def category_slots(self, category_id: int) -> slice:
        """The channels of `category_id`'s keypoints."""
        cat = next(c for c in self.categories if c["id"] == category_id)
        start = self.slot_offset[category_id]
        return slice(start, start + len(cat["keypoints"]))

    @property
    def ids(self) -> list[str]:
        """Image ids (file stems) in dataset order (what split manifests hold)."""
        return self.detection.ids

    @property
    def num_classes(self) -> int:
        """Categories with keypoints, plus one (background), as the detection datasets count."""
        return len(self.categories) + 1

    def _check_keypoints(self, source: Path, ann: dict) -> None:
        cat = next((c for c in self.detection.categories if c["id"] == ann["category_id"]), None)
        if "keypoints" not in ann or cat is None or not cat.get("keypoints"):
            return
        kps, n = ann["keypoints"], len(cat["keypoints"])
        where = f"{source}: annotations[id={ann.get('id')}].keypoints"
        if not (isinstance(kps, list) and len(kps) == 3 * n and all(_number(v) for v in kps)):
            raise PoseDatasetError(f"{where}: expected {3 * n} numbers (x, y, v for the {n} keypoints of "
                                   f"{cat['name']!r}), got {kps!r:.80}")
        if any(v not in (0, 1, 2) for v in kps[2::3]):
            raise PoseDatasetError(f"{where}: visibility flags must be 0, 1 or 2, got {kps[2::3]}")

    def _usable(self, ann: dict) -> bool:
        if ann.get("iscrowd") or ann["category_id"] not in self.slot_offset or "keypoints" not in ann:
            return False
        _, _, w, h = ann["bbox"]
        return w > 0 and h > 0 and any(v > 0 for v in ann["keypoints"][2::3])

    # ------------------------------------------------------------------ items
    def __len__(self) -> int:
        return len(self.instances)

    def load_image(self, instance: PoseInstance) -> Image.Image:
        sample = self.detection.samples[instance.sample]
        try:
            with Image.open(sample.image) as im:
                return im.convert("RGB")
        except FileNotFoundError:
            raise PoseDatasetError(f"{sample.image}: image file not found") from None
        except (UnidentifiedImageError, OSError, SyntaxError) as exc:
            raise PoseDatasetError(f"{sample.image}: unreadable image ({type(exc).__name__}: {exc})") from None

    def item(self, index: int, input_size: tuple[int, int] | None = None,
             heatmap_size: tuple[int, int] | None = None) -> tuple[torch.Tensor, dict]:
        """Crop `index` at `input_size` with targets at `heatmap_size` (default: the dataset's), uncached."""
        input_size = self.input_size if input_size is None else input_size
        heatmap_size = self.heatmap_size if heatmap_size is None else heatmap_size
        inst = self.instances[index]
        x0, y0, scale = crop_box(inst.annotation["bbox"], input_size)
        crop = crop_image(self.load_image(inst), x0, y0, scale, input_size)
        kps = torch.tensor(inst.annotation["keypoints"], dtype=torch.float32).reshape(-1, 3)
        ratio = heatmap_size[1] / input_size[1]
        points = torch.zeros(self.num_keypoints, 2)
        visible = torch.zeros(self.num_keypoints)
        slots = self.category_slots(inst.category_id)
        points[slots] = (kps[:, :2] - torch.tensor([x0, y0])) / scale * ratio
        visible[slots] = (kps[:, 2] > 0).float()
        maps, weights = gaussian_heatmaps(points, visible, heatmap_size, heatmap_sigma(heatmap_size[1]))
        return crop, {"heatmaps": maps, "weights": weights, "index": torch.tensor(index)}

    def __getitem__(self, index: int) -> tuple[torch.Tensor, dict]:
        if self._cache is not None and index in self._cache:
            return self._cache[index]
        item = self.item(index)
        if self._cache is not None:
            self._cache[index] = item
        return item

    # ------------------------------------------------------------------ checks and evaluation
    def validate(self) -> None:
        """The detection checks (every image decodes at its annotated size, boxes inside it); keypoints were
        checked when the dataset was opened; a dataset without a single usable instance is an error."""
        self.detection.validate()
        if not self.instances:
            raise PoseDatasetError(f"{self.name}: no instance with labelled keypoints (v > 0) in the selected images")

    def coco_ground_truth(self, category_id: int) -> dict:
        """The COCO keypoints ground truth of one category over this dataset's images (crowds and instances
        without labelled keypoints kept: COCOeval ignores them), for ``metrics.keypoint_metrics``."""
        images, annotations = [], []
        for sample in self.detection.samples:
            rec = sample.record
            iid = self.detection.image_id(sample)
            images.append({"id": iid, "file_name": rec["file_name"], "width": rec.get("width"),
                           "height": rec.get("height")})
            for ann in sample.annotations:
                if ann["category_id"] != category_id or "keypoints" not in ann:
                    continue
                x, y, w, h = (float(v) for v in ann["bbox"])
                kps = [float(v) for v in ann["keypoints"]]
                annotations.append({
                    "id": len(annotations) + 1, "image_id": iid, "category_id": category_id, "bbox": [x, y, w, h],
                    "area": float(ann.get("area", w * h)), "iscrowd": int(bool(ann.get("iscrowd", 0))),
                    "keypoints": kps, "num_keypoints": int(sum(v > 0 for v in kps[2::3])),
                })
        return {"images": images, "annotations": annotations,
                "categories": [{"id": category_id, "name": "c"}]}


def open_pose_dataset(path: str | os.PathLike, *, split: str | None = "train", ids: Sequence[str] | None = None,
                      input_size: tuple[int, int] = (64, 64), heatmap_size: tuple[int, int] | None = None,
                      cache: bool = True) -> PoseDataset:
    """A COCO keypoints dataset in any layout the detection reader opens (``open_detection_dataset``), or COCO's
    own: a folder with ``annotations/person_keypoints_<split>.json`` and the images in ``<split>/`` (``val`` picks
    ``val2017``)."""
    from components.tasks.detection.datasets import open_coco_detection

    folder = Path(path)
    coco = {f.stem[len("person_keypoints_"):]: f for f in sorted((folder / "annotations").glob("person_keypoints_*.json"))
            } if folder.is_dir() else {}
    if coco:
        split = split or "train"
        names = [n for n in coco if n == split] or [n for n in coco if n.startswith(split)]
        if len(names) != 1:
            raise PoseDatasetError(f"{folder}: no single keypoints split {split!r} (found: {', '.join(coco)})")
        detection = open_coco_detection(coco[names[0]], folder / names[0], ids=ids, cache=False)
    else:
        detection = open_detection_dataset(path, split=split, ids=ids, cache=False)
    return PoseDataset(detection, input_size, heatmap_size, cache=cache)


def with_sizes(dataset: PoseDataset, input_size: tuple[int, int], heatmap_size: tuple[int, int]) -> PoseDataset:
    """`dataset` at other crop/heatmap sizes (the model's), sharing the annotations; itself when they match."""
    if tuple(input_size) == dataset.input_size and tuple(heatmap_size) == dataset.heatmap_size:
        return dataset
    return PoseDataset(dataset.detection, input_size, heatmap_size, cache=dataset._cache_requested)


__all__ = ["PADDING", "PoseDataset", "PoseDatasetError", "PoseInstance", "crop_box", "crop_image",
           "gaussian_heatmaps", "heatmap_sigma", "open_pose_dataset", "with_sizes"]
