"""Proxy training for pose: one SimpleBaseline per candidate loss, side by side, then keypoint AP.

Recipe. ``ProxyConfig()`` is the CPU proxy: the ``"cpu"`` model (ResNet-18, 64x64 crops, 16x16 heatmaps), batch
32, 300 Adam iterations at lr 1e-3 with a linear warm-up (30 iterations) and cosine annealing. ``PAPER_PROXY`` is
A.4's proxy (ResNet-50, 256x192, Adam lr 2.5e-4, cosine, 250 warm-up iterations, batch 256, 4 epochs of the
~150k COCO person crops ≈ 2300 iterations). ``PAPER_RETRAIN`` approximates MMPose's SimpleBaseline recipe, which
the paper re-trains with: 210 epochs (≈ 123k iterations at batch 256), Adam lr 5e-4, 500 warm-up iterations; MMPose
decays the lr ×0.1 at epochs 170 and 200, this trainer has one schedule shape (cosine).

``train_proxy`` guarantees what the detection trainer does: the same initial weights for every loss (one build
under ``seeding.seeded_init(cfg.seed)``, deep-copied), the same batches in the same order (one seeded loader),
a non-finite loss or gradient norm stops only its member (``"nan"``, ``iterations`` = the 1-based iteration),
an exception only its member (``"failed"``, one line); ``on_progress(iteration, total, {name: loss})`` after
every iteration. Evaluation: the heatmaps of every eval crop (batches loaded once for all models), decoded and
scored with ``metrics.keypoint_metrics`` (AP, AP50, AP75).
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Iterator, Mapping

import torch
from torch import nn
from torch.utils.data import DataLoader, Dataset

from components.errors import LossforgeError
from components.tasks.base import ProxyResult
from components.tasks.pose.datasets import PoseDataset, with_sizes
from components.tasks.pose.losses import PoseLoss
from components.tasks.pose.metrics import METRIC_NAMES, KeypointMeter, canonical_metric_name
from components.tasks.pose.models import MODEL_PRESETS, PoseModelConfig, build_pose_model, model_preset
from components.tasks.seeding import eval_loader_generator, seeded_init
from components.tasks.side_by_side import Member, ProgressCallback, make_members, optimisation_step, train_and_evaluate

OPTIMIZERS = ("adam", "adamw", "sgd")


@dataclass(frozen=True)
class ProxyConfig:
    """Schedule and optimiser of a pose proxy training; defaults = the CPU proxy (module doc)."""

    model: PoseModelConfig | str | dict = MODEL_PRESETS["cpu"]  # a config, preset name or dict of its fields
    iterations: int = 300
    batch_size: int = 32
    optimizer: str = "adam"
    lr: float = 1e-3
    momentum: float = 0.9
    weight_decay: float = 0.0
    warmup_iterations: int = 30
    warmup_factor: float = 0.001
    grad_clip: float = 0.0
    eval_batch_size: int = 64
    seed: int = 0
    device: str = "auto"
    num_workers: int = 0

    def __post_init__(self) -> None:
        for name in ("iterations", "batch_size", "eval_batch_size"):
            value = getattr(self, name)
            if not isinstance(value, int) or isinstance(value, bool) or value < 1:
                raise LossforgeError(f"proxy.{name}: must be a positive int, got {value!r}")
        if not isinstance(self.lr, (int, float)) or isinstance(self.lr, bool) or not self.lr > 0:
            raise LossforgeError(f"proxy.lr: must be > 0, got {self.lr!r}")
        for name in ("momentum", "weight_decay", "warmup_factor", "grad_clip"):
            value = getattr(self, name)
            if not isinstance(value, (int, float)) or isinstance(value, bool) or value < 0:
                raise LossforgeError(f"proxy.{name}: must be >= 0, got {value!r}")
        for name in ("warmup_iterations", "num_workers", "seed"):
            value = getattr(self, name)
            if not isinstance(value, int) or isinstance(value, bool) or (value < 0 and name != "seed"):
                raise LossforgeError(f"proxy.{name}: must be an int >= 0, got {value!r}")
        if self.optimizer not in OPTIMIZERS:
            raise LossforgeError(f"proxy.optimizer: must be one of {', '.join(OPTIMIZERS)}, got {self.optimizer!r}")
        if not isinstance(self.device, str):
            raise LossforgeError(f"proxy.device: must be a string, got {self.device!r}")
        object.__setattr__(self, "model", model_preset(self.model))


@dataclass(frozen=True)
class RetrainConfig(ProxyConfig):
    """Final re-training; CPU defaults: the proxy recipe for twice as many iterations."""

    iterations: int = 600


# A.4: 4 epochs of COCO train person crops (~150k) at batch 256 ≈ 2300 iterations, Adam 2.5e-4, cosine, 250 warm-up.
PAPER_PROXY = ProxyConfig(model="paper", iterations=2300, batch_size=256, optimizer="adam", lr=2.5e-4,
                          warmup_iterations=250, eval_batch_size=256, device="cuda", num_workers=8)
# MMPose's SimpleBaseline recipe: 210 epochs (~123k iterations at batch 256), Adam 5e-4, warm-up 500 (cosine here).
PAPER_RETRAIN = RetrainConfig(model="paper", iterations=123000, batch_size=256, optimizer="adam", lr=5e-4,
                              warmup_iterations=500, eval_batch_size=256, device="cuda", num_workers=8)


def lr_at(cfg: ProxyConfig, iteration: int) -> float:
    """Learning rate of the 0-based `iteration`: linear warm-up from lr·warmup_factor, then cosine to 0."""
    if iteration < cfg.warmup_iterations:
        alpha = iteration / cfg.warmup_iterations
        return cfg.lr * (cfg.warmup_factor * (1 - alpha) + alpha)
    span = max(cfg.iterations - cfg.warmup_iterations, 1)
    return 0.5 * cfg.lr * (1 + math.cos(math.pi * (iteration - cfg.warmup_iterations) / span))


def make_optimizer(model: nn.Module, cfg: ProxyConfig) -> torch.optim.Optimizer:
    params = [p for p in model.parameters() if p.requires_grad]
    if cfg.optimizer == "adam":
        return torch.optim.Adam(params, lr=cfg.lr, weight_decay=cfg.weight_decay)
    if cfg.optimizer == "adamw":
        return torch.optim.AdamW(params, lr=cfg.lr, weight_decay=cfg.weight_decay)
    return torch.optim.SGD(params, lr=cfg.lr, momentum=cfg.momentum, weight_decay=cfg.weight_decay)


def sized(dataset: Dataset, cfg: ProxyConfig) -> PoseDataset:
    """`dataset` at the model's crop and heatmap sizes."""
    if not isinstance(dataset, PoseDataset):
        raise LossforgeError(f"pose training: a PoseDataset expected, got {type(dataset).__name__}")
    return with_sizes(dataset, cfg.model.input_size, cfg.model.heatmap_size)


def training_batches(dataset: PoseDataset, cfg: ProxyConfig) -> Iterator[tuple[torch.Tensor, dict]]:
    """Endless (crops, targets) batches: a seeded shuffle per epoch, deterministic for ``cfg.seed``."""
    if len(dataset) < cfg.batch_size:
        raise LossforgeError(f"training set has {len(dataset)} instances with keypoints, fewer than "
                             f"proxy.batch_size={cfg.batch_size}")
    loader = DataLoader(dataset, batch_size=cfg.batch_size, shuffle=True, drop_last=True,
                        generator=torch.Generator().manual_seed(cfg.seed), num_workers=cfg.num_workers,
                        persistent_workers=cfg.num_workers > 0)
    while True:
        yield from loader


def _train_step(member: Member, batch, iteration: int, cfg: ProxyConfig) -> float | None:
    """One optimiser step of one member (the gradient norm is always checked); None after stopping it."""
    images, targets = batch
    return optimisation_step(member, lambda m: m.loss(m.model(images), targets["heatmaps"], targets["weights"]),
                             iteration, lr_at(cfg, iteration - 1), grad_clip=cfg.grad_clip, check_gradient=True,
                             what="pose loss")


@torch.no_grad()
def evaluate_models(models: Mapping[str, nn.Module], dataset: PoseDataset, cfg: ProxyConfig, device: torch.device
                    ) -> dict[str, dict[str, float] | Exception]:
    """{"AP", "AP50", "AP75"} of every model on `dataset` (each batch loaded once for all models); a model whose
    evaluation raises gets the exception instead."""
    meters = {name: KeypointMeter(dataset) for name in models}
    errors: dict[str, Exception] = {}
    loader = DataLoader(dataset, batch_size=cfg.eval_batch_size, shuffle=False, num_workers=cfg.num_workers,
                        generator=eval_loader_generator(cfg.seed))
    for model in models.values():
        model.eval()
    for images, targets in loader:
        images = images.to(device)
        for name, model in models.items():
            if name in errors:
                continue
            try:
                meters[name].update(targets["index"].tolist(), model(images).float().cpu())
            except Exception as exc:
                errors[name] = exc
    out: dict[str, dict[str, float] | Exception] = {}
    for name in models:
        try:
            out[name] = errors[name] if name in errors else meters[name].compute()
        except Exception as exc:
            out[name] = exc
    return out


def train_proxy(losses: Mapping[str, PoseLoss], train_ds: Dataset, eval_ds: Dataset, cfg: ProxyConfig = ProxyConfig(),
                target_metric: str = "AP", *, on_progress: ProgressCallback | None = None) -> dict[str, ProxyResult]:
    """Train one SimpleBaseline per loss (same init, same batches), evaluate on `eval_ds`: name → ProxyResult."""
    from components.tasks.detection.trainer import resolve_device

    if not losses:
        raise LossforgeError("train_proxy: no losses given")
    if not isinstance(cfg, ProxyConfig):
        raise LossforgeError(f"train_proxy: config must be a pose ProxyConfig, got {type(cfg).__name__}")
    target_metric = canonical_metric_name(target_metric)
    train_ds, eval_ds = sized(train_ds, cfg), sized(eval_ds, cfg)
    if len(eval_ds) == 0:
        raise LossforgeError("evaluation set has no instance with keypoints")
    device = resolve_device(cfg.device)
    if device.type == "cpu":
        from components.tasks.segmentation.trainer import cpu_convolutions_without_onednn

        cpu_convolutions_without_onednn()
    with seeded_init(cfg.seed):
        template = build_pose_model(cfg.model, train_ds.num_keypoints)
    members = make_members(losses, template, target_metric, PoseLoss, lambda m: make_optimizer(m, cfg), device)
    del template
    stream = ((images.to(device), {k: v.to(device) for k, v in targets.items()})
              for images, targets in training_batches(train_ds, cfg))
    return train_and_evaluate(members, stream, lambda m, b, i: _train_step(m, b, i, cfg), cfg.iterations, device,
                              target_metric, lambda alive: evaluate_models(alive, eval_ds, cfg, device), on_progress)

__all__ = ["METRIC_NAMES", "PAPER_PROXY", "PAPER_RETRAIN", "ProxyConfig", "RetrainConfig", "evaluate_models", "lr_at",
           "train_proxy", "training_batches"]
