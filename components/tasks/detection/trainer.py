"""Proxy training for detection: one Faster R-CNN per candidate loss, side by side, then box AP.

Recipe. ``ProxyConfig()`` is the CPU proxy: the ``"cpu"`` detector (ResNet-18-FPN, 128 px, see
``components.tasks.detection.models``), batch 4, 300 SGD iterations (lr 0.02, momentum 0.9, weight decay 1e-4)
with a linear warm-up and two ×0.1 steps at 75 % / 92 % of the schedule (mmdetection's 1x shape), random
horizontal flips. ``PAPER_PROXY`` is AutoLoss-Zero A.2's proxy (R50-FPN with three FPN levels and a halved
head, batch 32, lr 0.04, 250 warm-up iterations, one epoch of 1/4 COCO ≈ 900 iterations); ``PAPER_RETRAIN``
the MMDetection 1x schedule (12 COCO epochs at batch 16, lr 0.02, steps at epochs 8 and 11).

``train_proxy`` guarantees, like the segmentation trainer:
* the same initial weights for every loss (one build under ``components.tasks.seeding.seeded_init``, deep-copied) and the same
  batches in the same order (loaded and flipped once per iteration, from generators seeded by ``cfg.seed``);
* per-member randomness: the only random draws inside the model are the anchor/proposal samplers, which get
  private generators seeded identically for every member (``models.seed_samplers``), so a member's result
  does not depend on which other losses share the run, nor on trainings in other threads;
* a non-finite loss stops only that member (``"nan"``, ``iterations`` = the 1-based iteration), an exception
  in one member's loss or evaluation marks it ``"failed"`` with a one-line message; the others go on.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Callable, Iterator, Mapping

import torch
from torch import nn
from torch.utils.data import DataLoader, Dataset

from components.errors import LossforgeError
from components.tasks.base import ProxyResult
from components.tasks.seeding import eval_loader_generator, seeded_init
from components.tasks.side_by_side import (Member, ProgressCallback, make_members, optimisation_step,
                                           train_and_evaluate)
from components.tasks.detection.datasets import detection_collate
from components.tasks.detection.losses import DetectionLoss
from components.tasks.detection.metrics import METRIC_NAMES, BoxMetrics, canonical_metric_name
from components.tasks.detection.models import (MODEL_PRESETS, DetectorConfig, build_detector, seed_samplers,
                                               set_detection_loss)

OPTIMIZERS = ("sgd", "adamw")


@dataclass(frozen=True)
class ProxyConfig:
    """Schedule and optimiser of a detection proxy training; defaults = the CPU proxy (module doc)."""

    model: DetectorConfig | str = MODEL_PRESETS["cpu"]  # a DetectorConfig or a preset name of models.MODEL_PRESETS
    iterations: int = 300
    batch_size: int = 4
    optimizer: str = "sgd"
    lr: float = 0.02
    momentum: float = 0.9
    weight_decay: float = 1e-4
    warmup_iterations: int = 50
    warmup_factor: float = 0.001
    lr_steps: tuple[float, ...] = (0.75, 0.92)  # fractions of `iterations` at which the lr is multiplied by 0.1
    grad_clip: float = 10.0  # max gradient norm (0 = off): from-scratch training with reg weight 10 can spike
    hflip: bool = True
    eval_batch_size: int = 8
    seed: int = 0
    device: str = "auto"
    num_workers: int = 0

    def __post_init__(self) -> None:
        for name in ("iterations", "batch_size", "eval_batch_size"):
            value = getattr(self, name)
            if not isinstance(value, int) or isinstance(value, bool) or value < 1:
                raise LossforgeError(f"proxy.{name}: must be a positive int, got {value!r}")
        if not isinstance(self.lr, (int, float)) or not self.lr > 0:
            raise LossforgeError(f"proxy.lr: must be > 0, got {self.lr!r}")
        for name in ("momentum", "weight_decay", "warmup_factor", "grad_clip"):
            value = getattr(self, name)
            if not isinstance(value, (int, float)) or value < 0:
                raise LossforgeError(f"proxy.{name}: must be >= 0, got {value!r}")
        if not isinstance(self.warmup_iterations, int) or self.warmup_iterations < 0:
            raise LossforgeError(f"proxy.warmup_iterations: must be an int >= 0, got {self.warmup_iterations!r}")
        steps = tuple(self.lr_steps)
        if any(not 0 < s < 1 for s in steps) or list(steps) != sorted(steps):
            raise LossforgeError(f"proxy.lr_steps: increasing fractions in (0, 1) expected, got {steps}")
        object.__setattr__(self, "lr_steps", steps)
        if self.optimizer not in OPTIMIZERS:
            raise LossforgeError(f"proxy.optimizer: must be one of {', '.join(OPTIMIZERS)}, got {self.optimizer!r}")
        if self.num_workers < 0:
            raise LossforgeError(f"proxy.num_workers: must be >= 0, got {self.num_workers}")
        if isinstance(self.model, str):
            from components.tasks.detection.models import model_preset

            object.__setattr__(self, "model", model_preset(self.model))
        if not isinstance(self.model, DetectorConfig):
            raise LossforgeError(f"proxy.model: must be a DetectorConfig or preset name, got {type(self.model).__name__}")


@dataclass(frozen=True)
class RetrainConfig(ProxyConfig):
    """Final re-training; CPU defaults: the proxy recipe for twice as many iterations."""

    iterations: int = 600


# AutoLoss-Zero A.2 proxy: 1/4 of COCO train (~29k images) for one epoch at batch 32 ≈ 900 iterations.
PAPER_PROXY = ProxyConfig(model=MODEL_PRESETS["paper_proxy"], iterations=900, batch_size=32, optimizer="sgd", lr=0.04,
                          momentum=0.9, weight_decay=1e-4, warmup_iterations=250, lr_steps=(0.67, 0.92), grad_clip=0.0,
                          eval_batch_size=16, device="cuda", num_workers=8)
# MMDetection 1x: 12 epochs of COCO train2017 (117k images) at batch 16 ≈ 88k iterations, steps at epochs 8 and 11.
PAPER_RETRAIN = RetrainConfig(model=MODEL_PRESETS["paper"], iterations=88000, batch_size=16, optimizer="sgd", lr=0.02,
                              momentum=0.9, weight_decay=1e-4, warmup_iterations=500, lr_steps=(8 / 12, 11 / 12),
                              grad_clip=0.0, eval_batch_size=16, device="cuda", num_workers=8)


def lr_at(cfg: ProxyConfig, iteration: int) -> float:
    """Learning rate of the 0-based `iteration`: linear warm-up from lr·warmup_factor, then ×0.1 per passed step."""
    lr = cfg.lr * 0.1 ** sum(iteration >= int(s * cfg.iterations) for s in cfg.lr_steps)
    if iteration < cfg.warmup_iterations:
        alpha = iteration / cfg.warmup_iterations
        lr *= cfg.warmup_factor * (1 - alpha) + alpha
    return lr


def resolve_device(device: str) -> torch.device:
    """``"cpu"``, ``"cuda[:N]"`` or ``"auto"`` → torch.device (as the segmentation trainer)."""
    from components.tasks.segmentation.models import resolve_device as _resolve

    return _resolve(device)


def _hflip(image: torch.Tensor, target: dict) -> tuple[torch.Tensor, dict]:
    w = image.shape[-1]
    boxes = target["boxes"].clone()
    boxes[:, [0, 2]] = w - target["boxes"][:, [2, 0]]
    return image.flip(-1), {**target, "boxes": boxes}


FlipFn = Callable[[torch.Tensor, dict], tuple[torch.Tensor, dict]]


def training_batches(dataset: Dataset, cfg: ProxyConfig, *, flip_fn: FlipFn = _hflip
                     ) -> Iterator[tuple[list[torch.Tensor], list[dict]]]:
    """Endless stream of (images, targets) lists: seeded shuffle per epoch, random horizontal flips;
    deterministic for a given ``cfg.seed``. ``flip_fn(image, target)`` flips one pair (default: image + boxes;
    instance segmentation also flips the masks); the flip draws do not depend on it."""
    if len(dataset) < cfg.batch_size:
        raise LossforgeError(f"training set has {len(dataset)} images, fewer than proxy.batch_size={cfg.batch_size}")
    shuffle = torch.Generator().manual_seed(cfg.seed)
    flips = torch.Generator().manual_seed(cfg.seed + 1)
    loader = DataLoader(dataset, batch_size=cfg.batch_size, shuffle=True, drop_last=True, generator=shuffle,
                        num_workers=cfg.num_workers, collate_fn=detection_collate,
                        persistent_workers=cfg.num_workers > 0)
    while True:
        for images, targets in loader:
            if cfg.hflip:
                flip = (torch.rand(len(images), generator=flips) < 0.5).tolist()
                pairs = [flip_fn(i, t) if f else (i, t) for i, t, f in zip(images, targets, flip)]
                images, targets = [p[0] for p in pairs], [p[1] for p in pairs]
            yield list(images), list(targets)


def make_optimizer(model: nn.Module, cfg: ProxyConfig) -> torch.optim.Optimizer:
    """SGD (momentum; the papers) or AdamW over the trainable parameters."""
    params = [p for p in model.parameters() if p.requires_grad]
    if cfg.optimizer == "adamw":
        return torch.optim.AdamW(params, lr=cfg.lr, weight_decay=cfg.weight_decay)
    return torch.optim.SGD(params, lr=cfg.lr, momentum=cfg.momentum, weight_decay=cfg.weight_decay)


def _to(images, targets, device):
    return [i.to(device, non_blocking=True) for i in images], [{k: v.to(device) for k, v in t.items()} for t in targets]


def _train_step(member: Member, batch, iteration: int, cfg: ProxyConfig) -> float | None:
    """One optimiser step of one member; the loss value, or None after stopping the member."""
    images, targets = batch
    return optimisation_step(member, lambda m: sum(m.model(images, [dict(t) for t in targets]).values()), iteration,
                             lr_at(cfg, iteration - 1), grad_clip=cfg.grad_clip, what="detection loss")


@torch.no_grad()
def evaluate_models(models: Mapping[str, nn.Module], dataset, cfg: ProxyConfig, device: torch.device, *,
                    make_meter: Callable[[Dataset], object] = BoxMetrics) -> dict[str, dict[str, float] | Exception]:
    """{"mAP", "AP50", "AP75"} of every model on `dataset` (each batch loaded once for all models); a model
    whose evaluation raises gets the exception instead. ``make_meter(dataset)`` builds one metric meter per
    model (``update(ids, outputs)`` / ``compute()``; default ``BoxMetrics``, instance segmentation: ``MaskMetrics``)."""
    meters = {name: make_meter(dataset) for name in models}
    errors: dict[str, Exception] = {}
    loader = DataLoader(dataset, batch_size=cfg.eval_batch_size, shuffle=False, num_workers=cfg.num_workers,
                        collate_fn=detection_collate, generator=eval_loader_generator(cfg.seed))
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
        if name in errors:
            out[name] = errors[name]
            continue
        try:
            out[name] = meters[name].compute()
        except Exception as exc:
            out[name] = exc
    return out


def train_proxy(
    losses: Mapping[str, DetectionLoss],
    train_ds: Dataset,
    eval_ds: Dataset,
    cfg: ProxyConfig = ProxyConfig(),
    target_metric: str = "mAP",
    *,
    on_progress: ProgressCallback | None = None,
    build_model: Callable[[object, int], nn.Module] = build_detector,
    loss_type: type = DetectionLoss,
    set_loss: Callable[[nn.Module, object], nn.Module] = set_detection_loss,
    metric_name: Callable[[str], str] = canonical_metric_name,
    batches: Callable[[Dataset, ProxyConfig], Iterator] = training_batches,
    evaluate: Callable[..., Mapping[str, dict[str, float] | Exception]] = evaluate_models,
) -> dict[str, ProxyResult]:
    """Train one detector per loss (same init, same batches), evaluate on `eval_ds`: name → ProxyResult.

    ``on_progress(iteration, total, {name: loss value})`` is called after every iteration with the losses of
    the members still training.

    The keyword hooks let a sibling task (instance segmentation) reuse this loop; the defaults are detection's:
    ``build_model(cfg.model, num_classes)`` builds the template (under ``seeding.seeded_init(cfg.seed)``),
    ``loss_type`` is the accepted loss class, ``set_loss(model, loss)`` installs a loss into a member's copy,
    ``metric_name`` canonicalises `target_metric`, ``batches(train_ds, cfg)`` is the training stream and
    ``evaluate(models, eval_ds, cfg, device)`` the shared evaluation (name → metrics dict or exception).
    """
    if not losses:
        raise LossforgeError("train_proxy: no losses given")
    target_metric = metric_name(target_metric)
    if len(eval_ds) == 0:
        raise LossforgeError("evaluation set is empty")
    num_classes = int(getattr(train_ds, "num_classes", 0) or 0)
    if num_classes < 2:
        raise LossforgeError("train_proxy: the training set has no num_classes >= 2")
    device = resolve_device(cfg.device)
    if device.type == "cpu":
        from components.tasks.segmentation.trainer import cpu_convolutions_without_onednn

        cpu_convolutions_without_onednn()  # oneDNN convolutions are not safe in concurrent threads (see there)
    with seeded_init(cfg.seed):  # the initial weights depend on cfg.seed only, whatever runs in other threads
        template = build_model(cfg.model, num_classes)

    def install(model: nn.Module, loss) -> None:
        set_loss(model, loss)
        seed_samplers(model, cfg.seed + 2)

    members = make_members(losses, template, target_metric, loss_type, lambda m: make_optimizer(m, cfg), device,
                           prepare=install)
    del template
    stream = (_to(*batch, device) for batch in batches(train_ds, cfg))
    return train_and_evaluate(members, stream, lambda m, b, i: _train_step(m, b, i, cfg), cfg.iterations, device,
                              target_metric, lambda alive: evaluate(alive, eval_ds, cfg, device), on_progress)

__all__ = ["PAPER_PROXY", "PAPER_RETRAIN", "ProxyConfig", "RetrainConfig", "evaluate_models", "lr_at",
           "train_proxy", "training_batches", "METRIC_NAMES"]
