"""COCO-format instance segmentation data: the detection reader plus the instance masks.

Items are ``(image, target)`` as ``components.tasks.detection.datasets`` (``boxes``, ``labels``, ``image_id``) plus
``masks`` (G, H, W) uint8, one per training box, in the same order.

Decisions:
- Every layout the detection reader opens is read (``open_detection_dataset``, which keeps its checks and its
  folder conventions); :class:`InstanceSegmentationDataset` wraps its samples.
- Masks: COCO ``segmentation`` as polygons, uncompressed RLE (list counts) or compressed RLE (str counts),
  decoded with pycocotools at the image size. The training masks are those of the training boxes (crowds and
  empty boxes left out by the detection rule, which is applied to each annotation in turn, so boxes and masks
  always line up). The evaluation ground truth keeps every annotation with its segmentation (crowds included).
- A non-crowd annotation without a usable ``segmentation`` is an error when the dataset is opened (one line:
  file, annotation id, field); an RLE whose ``size`` is not the image's is an error when the image is loaded.
"""

from __future__ import annotations

import dataclasses
import os
from typing import Any, Sequence

import numpy as np
import torch

from components.tasks.detection.datasets import (DetectionDataset, DetectionDatasetError, DetectionSample, _number,
                                                 detection_collate, open_detection_dataset)


class InstanceDatasetError(DetectionDatasetError):
    """Unreadable, missing or inconsistent instance segmentation files (masks included)."""


def _check_segmentation(sample: DetectionSample, ann: dict) -> None:
    where = f"{sample.source}: annotations[id={ann.get('id')}].segmentation"
    seg = ann.get("segmentation")
    if isinstance(seg, list):
        if not seg or not all(isinstance(p, list) and len(p) >= 6 and len(p) % 2 == 0 and all(map(_number, p))
                              for p in seg):
            raise InstanceDatasetError(f"{where}: polygons must be lists of >= 3 x, y number pairs")
        return
    if isinstance(seg, dict):
        size, counts = seg.get("size"), seg.get("counts")
        if not (isinstance(size, list) and len(size) == 2 and isinstance(counts, (str, list))):
            raise InstanceDatasetError(f"{where}: RLE needs 'size' [h, w] and 'counts'")
        return
    raise InstanceDatasetError(f"{where}: missing (polygons or RLE expected, got {type(seg).__name__})")


def decode_segmentation(seg: Any, height: int, width: int, where: str = "segmentation") -> np.ndarray:
    """(H, W) uint8 mask of a COCO segmentation (polygons, uncompressed or compressed RLE)."""
    from pycocotools import mask as mask_utils

    if isinstance(seg, list):
        rle = mask_utils.merge(mask_utils.frPyObjects(seg, height, width))
    else:
        if [int(v) for v in seg["size"]] != [height, width]:
            raise InstanceDatasetError(f"{where}: RLE size {seg['size']} is not the image size [{height}, {width}]")
        rle = mask_utils.frPyObjects(seg, height, width) if isinstance(seg["counts"], list) else seg
        if isinstance(rle.get("counts"), str):
            rle = {"size": rle["size"], "counts": rle["counts"].encode("ascii")}
    return np.ascontiguousarray(mask_utils.decode(rle), dtype=np.uint8)


class InstanceSegmentationDataset(DetectionDataset):
    """COCO-format instance samples; items ``(image, {"boxes", "labels", "masks", "image_id"})``."""

    def __init__(self, samples: Sequence[DetectionSample], categories: Sequence[dict], *, name: str = "dataset",
                 cache: bool = True):
        super().__init__(samples, categories, name=name, cache=cache)
        for sample in self.samples:
            for ann in sample.annotations:
                if not ann.get("iscrowd"):
                    _check_segmentation(sample, ann)

    @classmethod
    def from_detection(cls, dataset: DetectionDataset) -> "InstanceSegmentationDataset":
        """The same samples as a detection dataset, with masks."""
        return cls(dataset.samples, dataset.categories, name=dataset.name, cache=dataset._cache is not None)

    def _load(self, sample: DetectionSample) -> tuple[torch.Tensor, dict]:
        image, target = super()._load(sample)
        h, w = image.shape[-2:]
        masks = []
        for ann in sample.annotations:
            if self.target_boxes(dataclasses.replace(sample, annotations=(ann,)), w, h)[0].shape[0] == 0:
                continue  # the detection rule dropped it (crowd or empty box)
            where = f"{sample.source}: annotations[id={ann.get('id')}].segmentation"
            masks.append(decode_segmentation(ann["segmentation"], h, w, where))
        target["masks"] = torch.from_numpy(np.stack(masks)) if masks else torch.zeros((0, h, w), dtype=torch.uint8)
        if target["masks"].shape[0] != target["boxes"].shape[0]:  # pragma: no cover - same rule, same order
            raise InstanceDatasetError(f"{sample.source}: {sample.record.get('file_name')}: masks and boxes differ in number")
        return image, target

    def check_sample(self, sample: DetectionSample) -> tuple[int, int]:
        """The detection checks plus every non-crowd mask decoded at the image size (an RLE of another size, a
        polygon pycocotools cannot read)."""
        w, h = super().check_sample(sample)
        for ann in sample.annotations:
            if not ann.get("iscrowd"):
                where = f"{sample.source}: annotations[id={ann.get('id')}].segmentation"
                try:
                    decode_segmentation(ann["segmentation"], h, w, where)
                except (ValueError, TypeError, IndexError, OverflowError, UnicodeError) as exc:
                    raise InstanceDatasetError(f"{where}: cannot decode ({type(exc).__name__}: {exc})") from None
        return w, h

    def subset(self, ids: Sequence[str]) -> "InstanceSegmentationDataset":
        return self.from_detection(super().subset(ids))

    def coco_ground_truth(self) -> dict:
        """The detection ground truth with each annotation's ``segmentation`` (same order, crowds included)."""
        gt = super().coco_ground_truth()
        raw = [ann for sample in self.samples for ann in sample.annotations]
        if len(raw) != len(gt["annotations"]):  # pragma: no cover - the detection order is one per annotation
            raise InstanceDatasetError(f"{self.name}: ground truth and annotations differ in number")
        for out, ann in zip(gt["annotations"], raw):
            seg = ann.get("segmentation")
            if seg is not None:
                out["segmentation"] = seg
        return gt


def open_instance_dataset(path: str | os.PathLike, *, split: str | None = "train", ids: Sequence[str] | None = None,
                          **kwargs) -> InstanceSegmentationDataset:
    """Open an instance segmentation dataset: every layout of ``open_detection_dataset`` (a COCO ``.json`` file,
    a folder with ``annotations/instances_<split>.json``, ...), with masks."""
    return InstanceSegmentationDataset.from_detection(open_detection_dataset(path, split=split, ids=ids, **kwargs))


instance_collate = detection_collate

__all__ = ["InstanceDatasetError", "InstanceSegmentationDataset", "decode_segmentation", "instance_collate",
           "open_instance_dataset"]
