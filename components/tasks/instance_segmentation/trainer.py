"""Proxy training for instance segmentation: one Mask R-CNN per candidate loss, side by side, then mask AP.

Recipe (``ProxyConfig()``, the CPU proxy): the detection CPU recipe (``components.tasks.detection.trainer``:
batch 4, 300 SGD iterations, lr 0.02, warm-up, two ×0.1 steps, horizontal flips) with the ``"cpu"`` Mask R-CNN
(``models.MODEL_PRESETS``). ``PAPER_PROXY`` / ``PAPER_RETRAIN``: the detection ones with Mask R-CNN R50-FPN
(A.3: "the proxy task is the same as for object detection"; re-training: MMDetection's 1x schedule).

The guarantees are the detection trainer's, and so is the code: ``train_proxy`` is ``det.train_proxy`` (member
bookkeeping, training loop and step, optimiser, schedule, batch stream, evaluation) called with this task's hooks:
same initial weights and same batches for every loss, private sampler generators per member, a non-finite loss
stops only its member (``"nan"``), an exception only its member (``"failed"``). What differs: the model
(``build_instance_segmenter``), the loss type (``InstanceSegmentationLoss``, installed by ``set_instance_loss``),
the flips (the masks are flipped with the boxes, from the same flip generator as detection's) and the metrics
(``MaskMetrics``: mask mAP / AP50 / AP75 and box mAP).
"""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass
from typing import Iterator, Mapping

import torch
from torch import nn
from torch.utils.data import Dataset

from components.errors import LossforgeError
from components.tasks.base import ProxyResult
from components.tasks.detection import trainer as det
from components.tasks.detection.models import DetectorConfig
from components.tasks.instance_segmentation.losses import InstanceSegmentationLoss
from components.tasks.instance_segmentation.metrics import METRIC_NAMES, MaskMetrics, canonical_metric_name
from components.tasks.instance_segmentation.models import (MODEL_PRESETS, MaskRCNNConfig, build_instance_segmenter,
                                                           model_preset, set_instance_loss)

ProgressCallback = det.ProgressCallback
lr_at = det.lr_at


@dataclass(frozen=True)
class ProxyConfig(det.ProxyConfig):
    """Schedule and optimiser of an instance segmentation proxy training; defaults = the CPU proxy (module doc).
    ``model``: a MaskRCNNConfig, a preset name of ``models.MODEL_PRESETS``, or a detection config (CPU mask head)."""

    model: MaskRCNNConfig | str = MODEL_PRESETS["cpu"]

    def __post_init__(self) -> None:
        if isinstance(self.model, (str, DetectorConfig)):
            object.__setattr__(self, "model", model_preset(self.model))
        if not isinstance(self.model, MaskRCNNConfig):
            raise LossforgeError(f"proxy.model: must be a MaskRCNNConfig or preset name, got {type(self.model).__name__}")
        super().__post_init__()


@dataclass(frozen=True)
class RetrainConfig(ProxyConfig):
    """Final re-training; CPU defaults: the proxy recipe for twice as many iterations."""

    iterations: int = 600


def _paper(base: det.ProxyConfig, cls: type, preset: str):
    fields = {f.name: getattr(base, f.name) for f in dataclasses.fields(det.ProxyConfig)}
    return cls(**{**fields, "model": MODEL_PRESETS[preset]})


PAPER_PROXY = _paper(det.PAPER_PROXY, ProxyConfig, "paper_proxy")
PAPER_RETRAIN = _paper(det.PAPER_RETRAIN, RetrainConfig, "paper")


def _hflip(image: torch.Tensor, target: dict) -> tuple[torch.Tensor, dict]:
    flipped, out = det._hflip(image, target)
    if "masks" in target:
        out["masks"] = target["masks"].flip(-1)
    return flipped, out


def training_batches(dataset: Dataset, cfg: ProxyConfig) -> Iterator[tuple[list[torch.Tensor], list[dict]]]:
    """The detection batch stream (seeded shuffle, same flip draws) with flips that move the masks too."""
    return det.training_batches(dataset, cfg, flip_fn=_hflip)


def evaluate_models(models: Mapping[str, nn.Module], dataset, cfg: ProxyConfig, device: torch.device
                    ) -> dict[str, dict[str, float] | Exception]:
    """{"mAP", "AP50", "AP75", "box_mAP"} of every model on `dataset` (each batch loaded once for all models);
    a model whose evaluation raises gets the exception instead (detection's evaluation with ``MaskMetrics``)."""
    return det.evaluate_models(models, dataset, cfg, device, make_meter=MaskMetrics)


def train_proxy(
    losses: Mapping[str, InstanceSegmentationLoss],
    train_ds: Dataset,
    eval_ds: Dataset,
    cfg: ProxyConfig = ProxyConfig(),
    target_metric: str = "mAP",
    *,
    on_progress: ProgressCallback | None = None,
) -> dict[str, ProxyResult]:
    """Train one Mask R-CNN per loss (same init, same batches), evaluate on `eval_ds`: name → ProxyResult.

    The detection loop (``det.train_proxy``) with this task's model, loss type, metric names, batch stream and
    evaluation. ``on_progress(iteration, total, {name: loss value})`` is called after every iteration with the
    losses of the members still training.
    """
    if losses and not isinstance(cfg, ProxyConfig):
        raise LossforgeError("train_proxy: config must be an instance segmentation ProxyConfig, "
                             f"got {type(cfg).__name__}")
    return det.train_proxy(losses, train_ds, eval_ds, cfg, target_metric, on_progress=on_progress,
                           build_model=build_instance_segmenter, loss_type=InstanceSegmentationLoss,
                           set_loss=set_instance_loss, metric_name=canonical_metric_name, batches=training_batches,
                           evaluate=evaluate_models)


__all__ = ["METRIC_NAMES", "PAPER_PROXY", "PAPER_RETRAIN", "ProxyConfig", "RetrainConfig", "evaluate_models", "lr_at",
           "train_proxy", "training_batches"]
