"""Proxy training for instance segmentation: one Mask R-CNN per candidate loss, side by side, then mask AP.

Recipe (``ProxyConfig()``, the CPU proxy): the detection CPU recipe (``components.tasks.detection.trainer``:
batch 4, 300 SGD iterations, lr 0.02, warm-up, two ×0.1 steps, horizontal flips) with the ``"cpu"`` Mask R-CNN
(``models.MODEL_PRESETS``). ``PAPER_PROXY`` / ``PAPER_RETRAIN``: the detection ones with Mask R-CNN R50-FPN
(A.3: "the proxy task is the same as for object detection"; re-training: MMDetection's 1x schedule).

The guarantees are the detection trainer's, and so is the code wherever it is not detection-specific (the
member bookkeeping, the training step, the optimiser, the schedule, the batch stream): same initial weights and
same batches for every loss, private sampler generators per member, a non-finite loss stops only its member
(``"nan"``), an exception only its member (``"failed"``). What differs: the model (``build_instance_segmenter``),
the flips (the masks are flipped with the boxes, from the same flip generator as detection's) and the metrics
(``MaskMetrics``: mask mAP / AP50 / AP75 and box mAP).
"""

from __future__ import annotations

import copy
import dataclasses
import time
from dataclasses import dataclass
from typing import Iterator, Mapping

import torch
from torch import nn
from torch.utils.data import DataLoader, Dataset

from components.errors import LossforgeError
from components.tasks.base import ProxyResult
from components.tasks.detection import trainer as det
from components.tasks.detection.datasets import detection_collate
from components.tasks.detection.models import DetectorConfig
from components.tasks.instance_segmentation.losses import InstanceSegmentationLoss
from components.tasks.instance_segmentation.metrics import METRIC_NAMES, MaskMetrics, canonical_metric_name
from components.tasks.instance_segmentation.models import (INIT_LOCK, MODEL_PRESETS, MaskRCNNConfig,
                                                           build_instance_segmenter, model_preset, seed_samplers,
                                                           set_instance_loss)

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
    """The detection batch stream (seeded shuffle) with flips that move the masks too (same flip draws)."""
    stream = det.training_batches(dataset, dataclasses.replace(cfg, hflip=False))
    flips = torch.Generator().manual_seed(cfg.seed + 1)
    for images, targets in stream:
        if cfg.hflip:
            flip = (torch.rand(len(images), generator=flips) < 0.5).tolist()
            pairs = [_hflip(i, t) if f else (i, t) for i, t, f in zip(images, targets, flip)]
            images, targets = [p[0] for p in pairs], [p[1] for p in pairs]
        yield list(images), list(targets)


@torch.no_grad()
def evaluate_models(models: Mapping[str, nn.Module], dataset, cfg: ProxyConfig, device: torch.device
                    ) -> dict[str, dict[str, float] | Exception]:
    """{"mAP", "AP50", "AP75", "box_mAP"} of every model on `dataset` (each batch loaded once for all models);
    a model whose evaluation raises gets the exception instead."""
    meters = {name: MaskMetrics(dataset) for name in models}
    errors: dict[str, Exception] = {}
    loader = DataLoader(dataset, batch_size=cfg.eval_batch_size, shuffle=False, num_workers=cfg.num_workers,
                        collate_fn=detection_collate)
    for model in models.values():
        model.eval()
    for images, targets in loader:
        images = [i.to(device) for i in images]
        ids = [int(t["image_id"]) for t in targets]
        for name, model in models.items():
            if name in errors:
                continue
            try:
                outputs = model(images)
                meters[name].update(ids, [{k: v.cpu() for k, v in o.items()} for o in outputs])
            except Exception as exc:
                errors[name] = exc
    out: dict[str, dict[str, float] | Exception] = {}
    for name in models:
        try:
            out[name] = errors[name] if name in errors else meters[name].compute()
        except Exception as exc:
            out[name] = exc
    return out


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

    ``on_progress(iteration, total, {name: loss value})`` is called after every iteration with the losses of
    the members still training.
    """
    if not losses:
        raise LossforgeError("train_proxy: no losses given")
    if not isinstance(cfg, ProxyConfig):
        raise LossforgeError(f"train_proxy: config must be an instance segmentation ProxyConfig, got {type(cfg).__name__}")
    target_metric = canonical_metric_name(target_metric)
    if len(eval_ds) == 0:
        raise LossforgeError("evaluation set is empty")
    num_classes = int(getattr(train_ds, "num_classes", 0) or 0)
    if num_classes < 2:
        raise LossforgeError("train_proxy: the training set has no num_classes >= 2")
    device = det.resolve_device(cfg.device)
    if device.type == "cpu":
        from components.tasks.segmentation.trainer import cpu_convolutions_without_onednn

        cpu_convolutions_without_onednn()  # oneDNN convolutions are not safe in concurrent threads
    with INIT_LOCK:  # seeding + drawing the initial weights from torch's global RNG: one thread at a time
        torch.manual_seed(cfg.seed)
        template = build_instance_segmenter(cfg.model, num_classes)
    members: list[det._Member] = []
    for name, loss in losses.items():
        member = det._Member(name, loss, None, None, ProxyResult(name=name, status="ok", target_metric=target_metric))
        try:
            if not isinstance(loss, InstanceSegmentationLoss):
                raise TypeError(f"loss must be an InstanceSegmentationLoss, got {type(loss).__name__}")
            model = copy.deepcopy(template)
            set_instance_loss(model, loss)
            seed_samplers(model, cfg.seed + 2)
            member.model = model.to(device)
            loss.to(device)
            member.optimizer = det.make_optimizer(member.model, cfg)
        except Exception as exc:
            member.stop("failed", det._one_line(exc), 0)
        members.append(member)
    del template
    clock = {m.name: 0.0 for m in members}
    batches = training_batches(train_ds, cfg)
    for iteration in range(1, cfg.iterations + 1):
        if not any(m.active for m in members):
            break
        images, targets = det._to(*next(batches), device)
        values: dict[str, float] = {}
        for member in members:
            if not member.active:
                continue
            start = time.perf_counter()
            value = det._train_step(member, images, targets, iteration, cfg)
            if device.type == "cuda":
                torch.cuda.synchronize(device)
            clock[member.name] += time.perf_counter() - start
            if value is not None:
                values[member.name] = value
        if on_progress is not None:
            on_progress(iteration, cfg.iterations, values)
    alive = {m.name: m.model for m in members if m.active}
    if alive:
        start = time.perf_counter()
        evaluated = evaluate_models(alive, eval_ds, cfg, device)
        share = (time.perf_counter() - start) / len(alive)
        for member in members:
            if member.name not in evaluated:
                continue
            clock[member.name] += share
            outcome = evaluated[member.name]
            if isinstance(outcome, Exception):
                member.stop("failed", "evaluation: " + det._one_line(outcome), member.result.iterations)
            else:
                member.result.metrics = dict(outcome)
                member.result.target = outcome[target_metric]
                member.model, member.optimizer = None, None
    for member in members:
        member.result.seconds = clock[member.name]
    return {m.name: m.result for m in members}


__all__ = ["METRIC_NAMES", "PAPER_PROXY", "PAPER_RETRAIN", "ProxyConfig", "RetrainConfig", "evaluate_models", "lr_at",
           "train_proxy", "training_batches"]
