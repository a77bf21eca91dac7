"""Segmentation re-training: the full schedule (``RetrainConfig``), the handcrafted baselines, and
``retrain_and_compare`` (``components.tasks.retrain.retrain_over_seeds`` with the segmentation trainer and
its six metrics)."""

from __future__ import annotations

import dataclasses
from collections.abc import Iterable, Mapping
from dataclasses import dataclass
from typing import Any

from torch import nn
from torch.utils.data import Dataset

from components.tasks.retrain import ComparisonTable, retrain_over_seeds
from components.tasks.segmentation.metrics import METRIC_NAMES, canonical_metric_name
from components.tasks.segmentation.models import MODEL_PRESETS, ModelConfig
from components.tasks.segmentation.trainer import ProgressCallback, ProxyConfig, train_proxy

DEFAULT_BASELINES = ("ce", "weighted_ce", "dice", "lovasz", "focal", "soft_iou")


@dataclass(frozen=True)
class RetrainConfig(ProxyConfig):
    """Full training schedule; CPU defaults: the proxy recipe (the small UNet, AdamW lr 0.01) at 64² for 600
    iterations, twice the proxy's schedule at 4× the pixels.

    The papers' setting is ``PAPER_RETRAIN``. Any ``ProxyConfig`` is accepted by ``retrain_and_compare`` too.
    """

    model: ModelConfig = dataclasses.replace(MODEL_PRESETS["cpu_unet"], input_size=64)
    iterations: int = 600


# DeepLabV3+ R101 at 512² (AutoLoss-Zero: "30 epochs, same setting as DeepLabV3+ [8]"): batch 16, lr 0.007
# (DeepLabV3+ paper, no head multiplier), poly 0.9, ~20k iterations = 30 epochs of VOC aug (10582 images).
PAPER_RETRAIN = RetrainConfig(
    model=MODEL_PRESETS["paper_retrain"], iterations=20000, batch_size=16, lr=0.007, head_lr_mult=1.0,
    momentum=0.9, weight_decay=5e-4, optimizer="sgd", poly_power=0.9, min_lr=1e-4, eval_batch_size=8, device="cuda",
    num_workers=8,
)


def retrain_and_compare(
    losses: Mapping[str, nn.Module],
    train_ds: Dataset,
    test_ds: Dataset,
    cfg: ProxyConfig = RetrainConfig(),
    target_metric: str = "mIoU",
    *,
    seeds: Iterable[int] | None = None,
    num_classes: int | None = None,
    on_progress: ProgressCallback | None = None,
) -> ComparisonTable:
    """Train every loss on ``train_ds`` with ``cfg`` (side by side, per seed) and compare them on ``test_ds``.

    ``seeds`` defaults to ``(cfg.seed,)``; with several, the table holds the mean and std per metric.
    ``on_progress(iteration, total, losses)`` counts iterations over all seeds.
    """

    def train(losses_, train_, test_, cfg_, metric_, *, on_progress=None):
        return train_proxy(losses_, train_, test_, cfg_, metric_, num_classes=num_classes, on_progress=on_progress)

    return retrain_over_seeds(train, losses, train_ds, test_ds, cfg, canonical_metric_name(target_metric),
                              METRIC_NAMES, seeds=seeds, on_progress=on_progress)


def baseline_losses(names: Iterable[str | Mapping[str, Any]] = DEFAULT_BASELINES,
                    num_classes: int | None = None) -> dict[str, nn.Module]:
    """Build the handcrafted baselines to compare against (names or specs for ``build_loss``)."""
    from components.tasks.loss_registry import build_loss, loss_name

    return {loss_name(spec): build_loss(spec, num_classes=num_classes) for spec in names}
