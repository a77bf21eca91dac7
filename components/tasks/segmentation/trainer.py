"""Proxy training: train one segmentation model per candidate loss, side by side, and evaluate all six metrics.

Recipe (AutoLoss-Zero appendix A.1, Auto Seg-Loss proxy; ``PAPER_PROXY``): DeepLabV3+ R50, images
down-sampled to 128², batch 32, SGD momentum 0.9, weight decay 5e-4, lr 0.02 with ×10 on the head,
poly decay (power 0.9) to 1e-4, a short schedule (3 epochs ≈ 1000 iterations on VOC). ``ProxyConfig()``
defaults are the CPU proxy: the small grouped UNet (16-32-64 channels, ``components.tasks.segmentation.wave_unet``) at 32²,
batch 4, 300 AdamW steps at lr 0.01 with poly decay — a few seconds per loss on one core. Measured on the
embedded data (400 train / 100 test images, seed 0): CE reaches ~73 % mIoU (all-background: ~11 %),
while soft IoU, weighted CE, Dice and Lovász land between 55 % and 75 %, so the proxy tells losses apart.
The DeepLabV3+ "lite" model trained from scratch with SGD stayed at 14-16 % after 1000 steps: too few
steps for it to leave the all-background solution. With the ``"unet"`` model a call trains a *wave*: the
M losses are the members of one grouped network (see ``_train_wave``).

``train_proxy`` trains M models together: one batch is loaded, resized and flipped once and fed to
every model (Auto Seg-Loss trains 4 models per GPU that share each batch). All models start from the
same initial weights (one build under ``components.tasks.seeding.seeded_init``, deep-copied) and see the same
batches in the same order. A model with dropout keeps its own RNG state, swapped into torch's global generator
for its forward pass under ``seeding.INIT_LOCK`` (dropout takes no generator; the lock keeps trainings in other
threads from drawing in between), so a model's result depends neither on which other losses it was trained
with (training {a, b} together gives exactly the same numbers for ``a`` as training {a} alone) nor on
trainings running in other threads; a model without dropout draws nothing at all.
A non-finite loss stops that model at once (status ``"nan"``, ``iterations`` = the 1-based iteration at
which it happened); an exception raised by one loss marks that model ``"failed"``; the others go on.
"""

from __future__ import annotations

import copy
import dataclasses
import math
import time
from collections.abc import Callable, Iterator, Mapping
from dataclasses import dataclass, field

import torch
import torch.nn.functional as F
from torch import nn
from torch.utils.data import DataLoader, Dataset

from components.errors import LossforgeError
from components.tasks.base import ProxyResult
from components.tasks.seeding import INIT_LOCK, eval_loader_generator, seeded_init
from components.tasks.segmentation.models import MODEL_PRESETS, ModelConfig, build_model, param_groups, resolve_device
from components.tasks.segmentation.metrics import (EVALUATORS, METRIC_NAMES, BoundarySpec, SegmentationMetrics,
                                                   canonical_metric_name)

STATUSES = ("ok", "nan", "failed")
OPTIMIZERS = ("sgd", "adamw")  # adamw: the CPU proxy (from scratch, few hundred steps); sgd: the papers
ProgressCallback = Callable[[int, int, dict[str, float]], None]


@dataclass(frozen=True)
class ProxyConfig:
    """Training schedule and optimiser for a proxy (or final) training; defaults = small CPU proxy.

    The paper's values are in ``PAPER_PROXY``. ``model.input_size`` is the training resolution.
    """

    model: ModelConfig = MODEL_PRESETS["cpu_unet"]
    iterations: int = 300
    batch_size: int = 4
    lr: float = 0.01
    head_lr_mult: float = 1.0
    momentum: float = 0.9
    weight_decay: float = 1e-4
    optimizer: str = "adamw"
    poly_power: float = 0.9
    min_lr: float = 1e-4
    hflip: bool = True
    eval_batch_size: int = 16
    seed: int = 0
    device: str = "auto"
    num_workers: int = 0
    ignore_index: int = 255
    boundary: str = "avgpool"
    boundary_width: int = 1
    tolerance: int | str = "auto"  # BIoU band / BF1 match radius: 0.75 % of the diagonal (5 px on VOC)
    evaluator: str = "lossforge"  # or "autoseg": the Auto Seg-Loss code's BF1/FWIoU rules (metrics.py docstring)

    def __post_init__(self) -> None:
        positive = {"iterations": self.iterations, "batch_size": self.batch_size, "eval_batch_size": self.eval_batch_size}
        for name, value in positive.items():
            if not isinstance(value, int) or value < 1:
                raise LossforgeError(f"proxy.{name}: must be a positive int, got {value!r}")
        for name in ("lr", "head_lr_mult", "poly_power"):
            value = getattr(self, name)
            if not isinstance(value, (int, float)) or not value > 0:
                raise LossforgeError(f"proxy.{name}: must be > 0, got {value!r}")
        for name in ("momentum", "weight_decay", "min_lr"):
            value = getattr(self, name)
            if not isinstance(value, (int, float)) or value < 0:
                raise LossforgeError(f"proxy.{name}: must be >= 0, got {value!r}")
        if self.min_lr > self.lr:
            raise LossforgeError(f"proxy.min_lr: must be <= lr ({self.lr}), got {self.min_lr}")
        if self.num_workers < 0:
            raise LossforgeError(f"proxy.num_workers: must be >= 0, got {self.num_workers}")
        if self.optimizer not in OPTIMIZERS:
            raise LossforgeError(f"proxy.optimizer: must be one of {', '.join(OPTIMIZERS)}, got {self.optimizer!r}")
        if self.evaluator not in EVALUATORS:
            raise LossforgeError(f"proxy.evaluator: must be one of {', '.join(EVALUATORS)}, got {self.evaluator!r}")
        BoundarySpec(self.boundary, self.boundary_width, self.tolerance, evaluator=self.evaluator)  # before training
        if not isinstance(self.model, ModelConfig):
            raise LossforgeError(f"proxy.model: must be a ModelConfig, got {type(self.model).__name__}")


# AutoLoss-Zero appendix A.1 / Auto Seg-Loss proxy (1000 iterations ≈ 3 epochs of VOC aug at batch 32).
PAPER_PROXY = ProxyConfig(
    model=MODEL_PRESETS["paper_proxy"], iterations=1000, batch_size=32, lr=0.02, head_lr_mult=10.0,
    momentum=0.9, weight_decay=5e-4, optimizer="sgd", poly_power=0.9, min_lr=1e-4, eval_batch_size=32, device="cuda",
    num_workers=4,
)


@dataclass
class _Member:
    """One model under training with its loss, optimiser and private RNG state (used only with dropout)."""

    name: str
    loss: nn.Module
    model: nn.Module | None
    optimizer: torch.optim.Optimizer | None
    rng: torch.Tensor
    cuda_rng: torch.Tensor | None
    result: ProxyResult

    @property
    def active(self) -> bool:
        return self.result.status == "ok" and self.model is not None

    def stop(self, status: str, message: str) -> None:
        self.result.status = status
        self.result.message = message
        self.model = None
        self.optimizer = None


def _resize_pair(image: torch.Tensor, mask: torch.Tensor, size: int) -> tuple[torch.Tensor, torch.Tensor]:
    if image.shape[-2:] != (size, size):
        image = F.interpolate(image[None].float(), size=(size, size), mode="bilinear", align_corners=False)[0]
    if mask.shape[-2:] != (size, size):
        mask = F.interpolate(mask[None, None].float(), size=(size, size), mode="nearest")[0, 0].long()
    return image.float(), mask.long()


class _TrainCollate:
    """Resize every (image, mask) pair to the training resolution and stack (runs in DataLoader workers)."""

    def __init__(self, size: int):
        self.size = size

    def __call__(self, samples):
        pairs = [_resize_pair(img, msk, self.size) for img, msk in samples]
        return torch.stack([p[0] for p in pairs]), torch.stack([p[1] for p in pairs])


class _EvalCollate:
    """Resize images to the model resolution; keep masks at their own size (logits are upsampled to them)."""

    def __init__(self, size: int):
        self.size = size

    def __call__(self, samples):
        images = torch.stack([_resize_pair(img, img.new_zeros(img.shape[-2:]), self.size)[0] for img, _ in samples])
        return images, [msk.long() for _, msk in samples]


def make_optimizer(model: nn.Module, cfg: ProxyConfig) -> torch.optim.Optimizer:
    """SGD (momentum, the papers) or AdamW over the backbone/head parameter groups of ``model``."""
    groups = param_groups(model, cfg.lr, cfg.head_lr_mult)
    if cfg.optimizer == "adamw":
        return torch.optim.AdamW(groups, lr=cfg.lr, weight_decay=cfg.weight_decay)
    return torch.optim.SGD(groups, lr=cfg.lr, momentum=cfg.momentum, weight_decay=cfg.weight_decay)


def poly_lr(base_lr: float, iteration: int, total: int, power: float, min_lr: float) -> float:
    """mmseg poly schedule: (base − min)·(1 − it/total)^power + min, for the 0-based ``iteration``."""
    coeff = (1.0 - iteration / total) ** power
    return (base_lr - min_lr) * coeff + min_lr


def training_batches(dataset: Dataset, cfg: ProxyConfig, device: torch.device) -> Iterator[tuple[torch.Tensor, torch.Tensor]]:
    """Endless stream of (images (B,3,S,S), masks (B,S,S)) on ``device``: seeded shuffle per epoch,
    resize to ``cfg.model.input_size``, random horizontal flip; deterministic for a given ``cfg.seed``."""
    if len(dataset) < cfg.batch_size:
        raise LossforgeError(f"training set has {len(dataset)} images, fewer than proxy.batch_size={cfg.batch_size}")
    shuffle = torch.Generator().manual_seed(cfg.seed)
    flips = torch.Generator().manual_seed(cfg.seed + 1)
    loader = DataLoader(
        dataset, batch_size=cfg.batch_size, shuffle=True, drop_last=True, generator=shuffle,
        num_workers=cfg.num_workers, collate_fn=_TrainCollate(cfg.model.input_size),
        pin_memory=device.type == "cuda", persistent_workers=cfg.num_workers > 0,
    )
    while True:
        for images, masks in loader:
            if cfg.hflip:
                flip = torch.rand(images.shape[0], generator=flips) < 0.5
                images = torch.where(flip[:, None, None, None], images.flip(-1), images)
                masks = torch.where(flip[:, None, None], masks.flip(-1), masks)
            yield images.to(device, non_blocking=True), masks.to(device, non_blocking=True)


def _num_classes(dataset: Dataset, num_classes: int | None) -> int:
    if num_classes is not None:
        return int(num_classes)
    n = getattr(dataset, "num_classes", None)
    if n is None:
        raise LossforgeError("num_classes: the training set has no 'num_classes'; pass num_classes=")
    return int(n)


def _make_members(losses: Mapping[str, nn.Module], template: nn.Module, cfg: ProxyConfig, device: torch.device,
                  target_metric: str) -> list[_Member]:
    # every member's dropout stream starts from seed + 2 (private generators: the global RNG is not touched)
    rng = torch.Generator().manual_seed(cfg.seed + 2).get_state()
    cuda_rng = torch.Generator(device=device).manual_seed(cfg.seed + 2).get_state() if device.type == "cuda" else None
    members = []
    for name, loss in losses.items():
        result = ProxyResult(name=name, status="ok", target_metric=target_metric)
        member = _Member(name, loss, None, None, rng.clone(), None if cuda_rng is None else cuda_rng.clone(), result)
        try:
            if not isinstance(loss, nn.Module) and not callable(loss):
                raise TypeError(f"loss must be an nn.Module or callable, got {type(loss).__name__}")
            if isinstance(loss, nn.Module):
                loss.to(device)
            model = copy.deepcopy(template).to(device)
            member.model = model
            member.optimizer = make_optimizer(model, cfg)
        except Exception as exc:  # a bad candidate never crashes the others
            member.stop("failed", f"{type(exc).__name__}: {exc}")
        members.append(member)
    return members


def _draws_random(model: nn.Module) -> bool:
    """Whether the model's forward pass draws from torch's global RNG in training mode (dropout)."""
    return any(isinstance(m, (nn.modules.dropout._DropoutNd, nn.RReLU)) for m in model.modules())


class _MemberRNG:
    """Context manager that swaps a member's private RNG state in and out of torch's global generator, holding
    ``seeding.INIT_LOCK`` (so no other thread draws in between) and restoring the global state on exit."""

    def __init__(self, member: _Member, device: torch.device):
        self.member, self.device = member, device

    def __enter__(self):
        INIT_LOCK.acquire()
        self.saved = torch.get_rng_state()
        self.saved_cuda = torch.cuda.get_rng_state(self.device) if self.member.cuda_rng is not None else None
        torch.set_rng_state(self.member.rng)
        if self.member.cuda_rng is not None:
            torch.cuda.set_rng_state(self.member.cuda_rng, self.device)

    def __exit__(self, *exc):
        try:
            self.member.rng = torch.get_rng_state()
            torch.set_rng_state(self.saved)
            if self.member.cuda_rng is not None:
                self.member.cuda_rng = torch.cuda.get_rng_state(self.device)
                torch.cuda.set_rng_state(self.saved_cuda, self.device)
        finally:
            INIT_LOCK.release()
        return False


def _train_step(member: _Member, images: torch.Tensor, masks: torch.Tensor, iteration: int, cfg: ProxyConfig,
                device: torch.device) -> float | None:
    """One SGD step of one member; returns the loss value, or None after stopping the member."""
    model, opt = member.model, member.optimizer
    for group in opt.param_groups:
        group["lr"] = poly_lr(group["initial_lr"], iteration - 1, cfg.iterations, cfg.poly_power, cfg.min_lr)
    try:
        model.train()
        if _draws_random(model):  # dropout: the member's own RNG stream, one thread at a time
            with _MemberRNG(member, device):
                logits = model(images)
        else:
            logits = model(images)
        loss = member.loss(logits, masks)
        if not isinstance(loss, torch.Tensor) or loss.numel() != 1:
            shape = tuple(loss.shape) if isinstance(loss, torch.Tensor) else type(loss).__name__
            raise ValueError(f"loss must return a scalar tensor, got {shape}")
        value = float(loss.detach())
        if not math.isfinite(value):
            member.result.iterations = iteration
            member.stop("nan", f"loss was {value} at iteration {iteration}")
            return None
        opt.zero_grad(set_to_none=True)
        loss.reshape(()).backward()
        opt.step()
    except Exception as exc:  # isolate one bad loss from the others
        member.result.iterations = iteration
        member.stop("failed", f"{type(exc).__name__}: {exc}"[:500])
        return None
    member.result.iterations = iteration
    member.result.final_loss = value
    return value


def _update_meter(meter: SegmentationMetrics, logits: torch.Tensor, masks: list[torch.Tensor],
                  device: torch.device) -> None:
    """Add a batch: logits (N,K,h,w) are upsampled to each mask's own size, then argmax."""
    if all(m.shape == masks[0].shape for m in masks):
        if logits.shape[-2:] != masks[0].shape:
            logits = F.interpolate(logits, size=tuple(masks[0].shape), mode="bilinear", align_corners=False)
        meter.update(logits.argmax(1), torch.stack(masks).to(device))
        return
    for k, mask in enumerate(masks):
        one = F.interpolate(logits[k:k + 1], size=tuple(mask.shape), mode="bilinear", align_corners=False)
        meter.update(one.argmax(1), mask[None].to(device))


@torch.no_grad()
def evaluate_models(models: Mapping[str, nn.Module], dataset: Dataset, cfg: ProxyConfig, num_classes: int,
                    device: torch.device) -> dict[str, dict[str, float] | Exception]:
    """Six metrics of every model on ``dataset`` (each batch loaded once for all models).

    Images are resized to the model resolution; logits are upsampled to each mask's own size before argmax.
    A model whose evaluation raises gets the exception instead of a metrics dict.
    """
    meters = {
        name: SegmentationMetrics(num_classes, cfg.ignore_index, boundary=cfg.boundary,
                                  boundary_width=cfg.boundary_width, tolerance=cfg.tolerance, evaluator=cfg.evaluator)
        for name in models
    }
    errors: dict[str, Exception] = {}
    loader = DataLoader(dataset, batch_size=cfg.eval_batch_size, shuffle=False, num_workers=cfg.num_workers,
                        collate_fn=_EvalCollate(cfg.model.input_size), generator=eval_loader_generator(cfg.seed))
    for model in models.values():
        model.eval()
    for images, masks in loader:
        images = images.to(device, non_blocking=True)
        for name, model in models.items():
            if name in errors:
                continue
            try:
                _update_meter(meters[name], model(images), masks, device)
            except Exception as exc:
                errors[name] = exc
    return {name: errors[name] if name in errors else meters[name].compute() for name in models}


def train_proxy(
    losses: Mapping[str, nn.Module],
    train_ds: Dataset,
    eval_ds: Dataset,
    cfg: ProxyConfig = ProxyConfig(),
    target_metric: str = "mIoU",
    *,
    num_classes: int | None = None,
    on_progress: ProgressCallback | None = None,
) -> dict[str, ProxyResult]:
    """Train one model per loss on the same batches, evaluate on ``eval_ds``; returns name → ProxyResult.

    ``losses``: name → loss module ``(logits (N,C,H,W), target (N,H,W)) -> scalar``. ``num_classes``
    defaults to ``train_ds.num_classes``. ``on_progress(iteration, total, {name: loss value})`` is called
    after every iteration with the losses of the models still training.
    """
    if not losses:
        raise LossforgeError("train_proxy: no losses given")
    target_metric = canonical_metric_name(target_metric)
    if target_metric not in METRIC_NAMES:
        raise LossforgeError(f"target metric {target_metric!r} unknown; known: {', '.join(METRIC_NAMES)}")
    n_classes = _num_classes(train_ds, num_classes)
    device = resolve_device(cfg.device)
    if len(eval_ds) == 0:
        raise LossforgeError("evaluation set is empty")

    if cfg.model.name == "unet":
        return _train_wave(losses, train_ds, eval_ds, cfg, target_metric, n_classes, device, on_progress)
    with seeded_init(cfg.seed):  # the initial weights depend on cfg.seed only, whatever runs in other threads
        template = build_model(cfg.model, n_classes)
    members = _make_members(losses, template, cfg, device, target_metric)
    del template
    clock = {m.name: 0.0 for m in members}

    batches = training_batches(train_ds, cfg, device)
    for iteration in range(1, cfg.iterations + 1):
        if not any(m.active for m in members):
            break
        images, masks = next(batches)
        values: dict[str, float] = {}
        for member in members:
            if not member.active:
                continue
            start = time.perf_counter()
            value = _train_step(member, images, masks, iteration, cfg, device)
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
        evaluated = evaluate_models(alive, eval_ds, cfg, n_classes, device)
        share = (time.perf_counter() - start) / len(alive)
        for member in members:
            if member.name not in evaluated:
                continue
            outcome = evaluated[member.name]
            clock[member.name] += share
            if isinstance(outcome, Exception):
                member.stop("failed", f"evaluation: {type(outcome).__name__}: {outcome}"[:500])
            else:
                member.result.metrics = outcome
                member.result.target = outcome[target_metric]
                member.model = None
                member.optimizer = None
    for member in members:
        member.result.seconds = clock[member.name]
    return {m.name: m.result for m in members}


# --------------------------------------------------------------------------------------------------
# Waves: M losses trained as one grouped network (components.tasks.segmentation.wave_unet).


def cpu_convolutions_without_onednn() -> None:
    """Turn oneDNN (mkldnn) off for CPU convolutions, process-wide, and leave it off.

    Measured on this project's CPU: with oneDNN, two wave trainings running in concurrent threads of one
    process (Prefect's ``threads`` runner) gave other and worse results than the same trainings run one
    after the other (CE proxy mIoU 0.65/0.60 instead of 0.72/0.71), i.e. oneDNN's convolution is not
    safe to run from two threads here. Without it the results do not depend on concurrency (tested), and
    the small grouped convolutions of the wave are faster too (38 vs 50 ms per member-iteration).
    It stays off (a flag restored on exit would switch it back under a thread still training).
    """
    torch.backends.mkldnn.enabled = False


def _check_scalar(loss: object) -> torch.Tensor:
    if not isinstance(loss, torch.Tensor) or loss.numel() != 1:
        shape = tuple(loss.shape) if isinstance(loss, torch.Tensor) else type(loss).__name__
        raise ValueError(f"loss must return a scalar tensor, got {shape}")
    return loss.reshape(())


def _train_wave(losses: Mapping[str, nn.Module], train_ds: Dataset, eval_ds: Dataset, cfg: ProxyConfig,
                target_metric: str, n_classes: int, device: torch.device,
                on_progress: ProgressCallback | None) -> dict[str, ProxyResult]:
    """Train all losses as the members of one grouped network (one forward/backward per iteration).

    Member m's parameters receive only ∇L_m (the members share no weights), so each result equals training
    that loss alone from the same seed (tested). The backward pass sums only the finite losses of the
    members still training: a NaN/Inf loss or an exception stops that member, whose weights then get zero
    gradients and are never evaluated. Time is shared equally between the members that were training.
    """
    from components.tasks.segmentation.models import build_wave_model

    if device.type == "cpu":
        cpu_convolutions_without_onednn()
    names = list(losses)
    results = {n: ProxyResult(name=n, status="ok", target_metric=target_metric) for n in names}

    def stop(name: str, status: str, message: str, iteration: int) -> None:
        results[name].status, results[name].message, results[name].iterations = status, message[:500], iteration

    for name, loss in losses.items():
        if isinstance(loss, nn.Module):
            try:
                loss.to(device)
            except Exception as exc:  # pragma: no cover - a loss module that cannot move
                stop(name, "failed", f"{type(exc).__name__}: {exc}", 0)
        elif not callable(loss):
            stop(name, "failed", f"TypeError: loss must be an nn.Module or callable, got {type(loss).__name__}", 0)
    with seeded_init(cfg.seed):  # the initial weights depend on cfg.seed only, whatever runs in other threads
        net = build_wave_model(cfg.model, n_classes, len(names))
    net = net.to(device)
    optimizer = make_optimizer(net, cfg)
    active = [i for i, n in enumerate(names) if results[n].status == "ok"]
    busy = {n: 0.0 for n in names}
    batches = training_batches(train_ds, cfg, device)
    net.train()
    for iteration in range(1, cfg.iterations + 1):
        if not active:
            break
        images, masks = next(batches)
        start = time.perf_counter()
        for group in optimizer.param_groups:
            group["lr"] = poly_lr(group["initial_lr"], iteration - 1, cfg.iterations, cfg.poly_power, cfg.min_lr)
        logits = net(images)
        total, values = None, {}
        for i in list(active):
            name = names[i]
            try:
                loss = _check_scalar(losses[name](logits[:, i], masks))
                value = float(loss.detach())
            except Exception as exc:  # isolate one bad loss from the others
                stop(name, "failed", f"{type(exc).__name__}: {exc}", iteration)
                active.remove(i)
                continue
            if not math.isfinite(value):
                stop(name, "nan", f"loss was {value} at iteration {iteration}", iteration)
                active.remove(i)
                continue
            values[name] = value
            results[name].iterations, results[name].final_loss = iteration, value
            total = loss if total is None else total + loss
        if total is not None:
            optimizer.zero_grad(set_to_none=True)
            total.backward()
            optimizer.step()
        if device.type == "cuda":
            torch.cuda.synchronize(device)
        share = (time.perf_counter() - start) / max(1, len(values))
        for name in values:
            busy[name] += share
        if on_progress is not None:
            on_progress(iteration, cfg.iterations, values)
    if active:
        start = time.perf_counter()
        evaluated = evaluate_wave(net, {names[i]: i for i in active}, eval_ds, cfg, n_classes, device)
        share = (time.perf_counter() - start) / len(active)
        for name, outcome in evaluated.items():
            busy[name] += share
            if isinstance(outcome, Exception):
                stop(name, "failed", f"evaluation: {type(outcome).__name__}: {outcome}", results[name].iterations)
            else:
                results[name].metrics = outcome
                results[name].target = outcome[target_metric]
    for name in names:
        results[name].seconds = busy[name]
    return results


@torch.no_grad()
def evaluate_wave(net: nn.Module, members: Mapping[str, int], dataset: Dataset, cfg: ProxyConfig,
                  num_classes: int, device: torch.device) -> dict[str, dict[str, float] | Exception]:
    """Six metrics of some members (name → member index) of a grouped network, one forward per batch."""
    index = dict(members)
    meters = {
        name: SegmentationMetrics(num_classes, cfg.ignore_index, boundary=cfg.boundary,
                                  boundary_width=cfg.boundary_width, tolerance=cfg.tolerance, evaluator=cfg.evaluator)
        for name in index
    }
    loader = DataLoader(dataset, batch_size=cfg.eval_batch_size, shuffle=False, num_workers=cfg.num_workers,
                        collate_fn=_EvalCollate(cfg.model.input_size), generator=eval_loader_generator(cfg.seed))
    net.eval()
    errors: dict[str, Exception] = {}
    for images, masks in loader:
        logits_all = net(images.to(device, non_blocking=True))
        for name, i in index.items():
            if name in errors:
                continue
            try:
                _update_meter(meters[name], logits_all[:, i], masks, device)
            except Exception as exc:
                errors[name] = exc
    return {name: errors[name] if name in errors else meters[name].compute() for name in index}
