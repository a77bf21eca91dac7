"""Semantic segmentation as a `Task` plug-in (AutoLoss-Zero A.1, Auto Seg-Loss): the registry entry that ties
this package's readers, probe, losses, trainer and re-training together for the flows.

Metric names accept the aliases of `metrics.canonical_metric_name` (miou, bf1-score, ...). For BIoU/BF1 the
tree input `y` is the boundary map of the one-hot target (`probe.training_target_for_metric`).
"""

from __future__ import annotations

from pathlib import Path
from typing import Any, Mapping, Sequence

from components.errors import LossforgeError
from components.tasks.base import ProgressCallback, ProxyResult, Task, register_task


@register_task
class SegmentationTask(Task):
    """Semantic segmentation: softmax + one-hot tree inputs, the six segmentation metrics."""

    name = "segmentation"
    metrics = ("gAcc", "mAcc", "mIoU", "FWIoU", "BIoU", "BF1")
    default_metric = "mIoU"
    default_baselines = ("ce", "weighted_ce", "dice", "lovasz", "focal", "soft_iou")
    dataset_formats = ("VOC layout (JPEGImages/ + SegmentationClass/ + ImageSets/), COCO instances JSON, "
                       "or images/ + masks/ folders with classes.txt")

    @property
    def proxy_config_class(self) -> type:
        from components.tasks.segmentation.trainer import ProxyConfig

        return ProxyConfig

    @property
    def retrain_config_class(self) -> type:
        from components.tasks.segmentation.retrain import RetrainConfig

        return RetrainConfig

    def canonical_metric(self, name: str) -> str:
        from components.tasks.segmentation.metrics import canonical_metric_name

        try:
            return canonical_metric_name(name)
        except LossforgeError:
            raise LossforgeError(f"search.metric: {name!r} is not a segmentation metric "
                                 f"(known: {', '.join(self.metrics)})") from None

    def ensure_embedded_data(self, path: str | Path, *, num_train: int, num_test: int, image_size: int,
                             seed: int) -> None:
        from components.tasks.segmentation.shapes import ensure_shapes

        ensure_shapes(path, num_train=num_train, num_test=num_test, image_size=image_size, seed=seed)

    def open_dataset(self, path: str | Path, *, split: str | None = None, ids: Sequence[str] | None = None) -> Any:
        from components.tasks.segmentation.datasets import open_segmentation_dataset

        if ids is not None:
            return open_segmentation_dataset(path, ids=list(ids))
        return open_segmentation_dataset(path, split=split or "train")

    def training_target(self, metric: str) -> str:
        from components.tasks.segmentation.probe import training_target_for_metric

        return training_target_for_metric(self.canonical_metric(metric))

    def known_baselines(self) -> list[str]:
        from components.tasks.loss_registry import LOSSES, SPECIAL_TYPES

        return [n for n in LOSSES.names() if n not in SPECIAL_TYPES]

    def build_loss(self, spec: str | Mapping[str, Any], dataset: Any) -> Any:
        from components.tasks.loss_registry import build_loss

        return build_loss(spec, num_classes=getattr(dataset, "num_classes", None))

    def screening_problem(self, dataset: Any, metric: str, *, samples: int, size: int, seed: int) -> Any:
        from components.tasks.segmentation.probe import build_screening_problem

        return build_screening_problem(dataset, self.canonical_metric(metric), dataset.num_classes, samples=samples,
                                       size=size, seed=seed)

    def train_proxy(self, losses: Mapping[str, Any], train_ds: Any, eval_ds: Any, config: Any, metric: str,
                    *, on_progress: ProgressCallback | None = None) -> dict[str, ProxyResult]:
        """Native models, or ``model.backend: openmmlab`` (an mmseg config; the re-training goes through here too)."""
        from components.tasks.segmentation.models import backend_module

        train_proxy = backend_module(getattr(config.model, "backend", "native")).train_proxy
        return train_proxy(losses, train_ds, eval_ds, config, self.canonical_metric(metric), on_progress=on_progress)
