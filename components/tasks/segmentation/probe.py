"""Semantic segmentation as a Lossforge task: a loss graph as a training loss, and the screening probe.

* `GraphSegLoss(graph)`: an `nn.Module(logits (N,C,H,W), target (N,H,W)) -> scalar` computing Eq. 4 with
  y_hat = softmax over channels, y = one-hot target, "1" = ones; ignore-label (255) pixels have y = 0
  and are masked out of Eq. 3.
* `build_screening_problem(dataset, metric, ...)`: the loss-rejection probe of AutoLoss-Zero §3.2:
  B random training samples resized to `size`×`size` and the logits a randomly initialised
  segmentation network (components.tasks.segmentation.models, preset "lite" by default) predicts for them, shaped
  `(B, 1, C, H, W)`; the metric ξ is computed per sample on the argmax labels. The perfect prediction
  (the one-hot target as logits) gives ξ_max for the normalised gain of components.search.screening.
* Boundary targets (AutoLoss-Zero A.1: "for the boundary metrics, we use the pre-computed boundaries of
  y as the training targets"): for BIoU/BF1 (`training_target_for_metric`) the loss input `y` is
  `boundary_target(one-hot)`, the per-class edge maps of the metric's own boundary definition
  (segmentation_metrics.class_boundaries: avgpool by default, width 1, the image border is never an
  edge, ignore pixels belong to no class and stay 0 and masked). y_hat stays the softmax over all
  pixels, and ξ is still measured on the label map. This applies to the probe (`y` of the screening
  problem, whose key records it), to `GraphSegLoss(target="boundary")` and to
  `build_loss({"type": "graph", ..., "target": "boundary"})`.
"""

from __future__ import annotations

import hashlib
import json
import random
from typing import Any, Callable, Mapping

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from components.errors import LossforgeError
from components.search.screening import ScreeningProblem

IGNORE_INDEX = 255
SEG_BRANCH = "seg"
TRAINING_TARGETS = ("label", "boundary")


def training_target_for_metric(metric: str) -> str:
    """What a segmentation loss searched for `metric` trains on: "boundary" for BIoU/BF1, else "label"."""
    from components.tasks.segmentation.metrics import BOUNDARY_METRICS, canonical_metric_name

    return "boundary" if canonical_metric_name(metric) in BOUNDARY_METRICS else "label"


def _check_target(target: str, where: str) -> str:
    if target not in TRAINING_TARGETS:
        raise LossforgeError(f"{where}: target must be one of {', '.join(TRAINING_TARGETS)}, got {target!r}")
    return target


def boundary_target(y: Tensor, valid: Tensor | None = None, *, definition: str = "avgpool",
                    width: int = 1) -> Tensor:
    """Per-class boundary maps `(..., N, C, H, W)` (y.dtype, 0/1) of a one-hot target `y` (0 at ignore pixels).

    `valid` `(..., N, 1, H, W)` (or None) marks the pixels that count; a pixel that is invalid or has no
    class belongs to no class. Edges are `segmentation_metrics.class_boundaries` of the label map with the
    metric's `definition` and `width`, so the targets are the metric's own ground-truth edges.
    """
    from components.tasks.segmentation.metrics import class_boundaries

    if y.dim() < 4:
        raise LossforgeError(f"boundary_target: y must be (..., N, C, H, W), got shape {tuple(y.shape)}")
    c, h, w = y.shape[-3:]
    flat = y.detach().reshape(-1, c, h, w)
    has_class = flat.amax(dim=1) > 0.5
    if valid is not None:
        has_class = has_class & (valid.detach().expand(*y.shape[:-3], 1, h, w).reshape(-1, h, w) > 0.5)
    edges = class_boundaries(flat.argmax(dim=1), has_class, c, width, definition)
    return edges.reshape(y.shape).to(y.dtype)


def segmentation_inputs(logits: Tensor, target: Tensor, num_classes: int | None = None,
                        ignore_index: int | None = IGNORE_INDEX) -> tuple[dict[str, Tensor], Tensor | None]:
    """Loss-tree inputs for logits `(..., N, C, H, W)` and labels `(..., N, H, W)`.

    Returns ({"y_hat": softmax, "y": one-hot (0 at ignore pixels), "1": ones}, valid mask
    `(..., N, 1, H, W)` as float, or None when no pixel is ignored).
    """
    C = logits.shape[-3] if num_classes is None else num_classes
    if logits.shape[-3] != C:
        raise LossforgeError(f"segmentation loss: logits have {logits.shape[-3]} channels, expected {C}")
    y, valid = one_hot_target(target, C, ignore_index, logits.dtype)
    y_hat = torch.softmax(logits, dim=-3)
    return {"y_hat": y_hat, "y": y, "1": torch.ones_like(y)}, valid


def one_hot_target(target: Tensor, num_classes: int, ignore_index: int | None = IGNORE_INDEX,
                   dtype: torch.dtype = torch.float32) -> tuple[Tensor, Tensor | None]:
    """One-hot `(..., N, C, H, W)` of labels `(..., N, H, W)` and the valid mask `(..., N, 1, H, W)` (or None)."""
    target = target.long()
    valid = None
    if ignore_index is not None:
        keep = target != ignore_index
        if not bool(keep.all()):
            valid = keep.unsqueeze(-3).to(dtype)
            target = torch.where(keep, target, torch.zeros_like(target))
    if target.numel() and (int(target.min()) < 0 or int(target.max()) >= num_classes):
        bad = int(target.max()) if int(target.max()) >= num_classes else int(target.min())
        raise LossforgeError(f"segmentation target has label {bad} outside [0, {num_classes}) (and not {ignore_index})")
    y = F.one_hot(target, num_classes).movedim(-1, -3).to(dtype)
    if valid is not None:
        y = y * valid
    return y, valid


class GraphSegLoss(nn.Module):
    """A loss graph used as a segmentation training loss: forward(logits (N,C,H,W), target (N,H,W)) -> scalar.

    `target="boundary"` feeds `boundary_target(one-hot)` (definition `boundary`, width `boundary_width`)
    as `y` instead of the one-hot labels (the training target of BIoU/BF1 searches).
    """

    def __init__(self, graph: Any, ignore_index: int | None = IGNORE_INDEX, branch: str = SEG_BRANCH,
                 target: str = "label", boundary: str = "avgpool", boundary_width: int = 1):
        super().__init__()
        if branch not in graph.branches:
            raise LossforgeError(f"loss graph has no {branch!r} branch (has: {', '.join(graph.branches)})")
        self.graph = graph
        self.ignore_index = ignore_index
        self.branch = branch
        self.target = _check_target(target, "GraphSegLoss")
        if target == "boundary":
            from components.tasks.segmentation.metrics import BoundarySpec

            BoundarySpec(boundary, boundary_width)  # validates the definition and width (one-line error)
        self.boundary = boundary
        self.boundary_width = boundary_width

    def forward(self, logits: Tensor, target: Tensor) -> Tensor:
        if logits.dim() != 4 or target.dim() != 3:
            raise LossforgeError(
                f"GraphSegLoss expects logits (N,C,H,W) and target (N,H,W), got {tuple(logits.shape)} and {tuple(target.shape)}"
            )
        inputs, valid = segmentation_inputs(logits, target, ignore_index=self.ignore_index)
        if self.target == "boundary":
            inputs["y"] = boundary_target(inputs["y"], valid, definition=self.boundary, width=self.boundary_width)
        return self.graph.total({self.branch: inputs}, None if valid is None else valid.squeeze(-3))

    def extra_repr(self) -> str:
        return self.graph.formula() + ("" if self.target == "label" else f"; target={self.target}")


# --------------------------------------------------------------------------------------------------
# The screening probe.


def _resize_pair(image: Tensor, mask: Tensor, size: int) -> tuple[Tensor, Tensor]:
    image = torch.as_tensor(image).float()
    mask = torch.as_tensor(mask).long()
    if image.dim() != 3 or mask.dim() != 2:
        raise LossforgeError(f"probe sample must be image (3,H,W) and mask (H,W), got {tuple(image.shape)} and {tuple(mask.shape)}")
    if tuple(image.shape[-2:]) != (size, size):
        image = F.interpolate(image[None], size=(size, size), mode="bilinear", align_corners=False, antialias=True)[0]
    if tuple(mask.shape) != (size, size):
        mask = F.interpolate(mask[None, None].float(), size=(size, size), mode="nearest")[0, 0].long()
    return image, mask


def _network_logits(images: Tensor, num_classes: int, seed: int, model: str | nn.Module) -> Tensor:
    """Logits `(B, C, H, W)` of a randomly initialised network for `images` (B, 3, H, W)."""
    size = images.shape[-1]
    net_size = max(64, -(-size // 32) * 32)  # the encoders need multiples of 32
    from components.tasks.seeding import seeded_init

    with seeded_init(seed):  # alone on the global RNG (trainings may run in other threads), restored on exit
        if isinstance(model, nn.Module):
            net = model
        else:
            from components.tasks.segmentation.models import build_model, model_preset

            net = build_model(model_preset(model), num_classes)
        net.eval()
        x = images if net_size == size else F.interpolate(images, size=(net_size, net_size), mode="bilinear", align_corners=False)
        with torch.no_grad():
            logits = net(x)
    if logits.shape[1] != num_classes:
        raise LossforgeError(f"probe network predicts {logits.shape[1]} classes, expected {num_classes}")
    if logits.shape[-1] != size or logits.shape[-2] != size:
        logits = F.interpolate(logits, size=(size, size), mode="bilinear", align_corners=False)
    return logits.float().contiguous()


class _SegInputs:
    """build_inputs for the probe: softmax of the predictions, cached one-hot (or boundary) targets and ones."""

    def __init__(self, num_classes: int, ignore_index: int | None, target: str = "label",
                 boundary: str = "avgpool", boundary_width: int = 1):
        self.num_classes = num_classes
        self.ignore_index = ignore_index
        self.target = _check_target(target, "screening probe")
        self.boundary = boundary
        self.boundary_width = boundary_width
        self._cache: dict[tuple, tuple[Tensor, Tensor]] = {}

    def __call__(self, pred: Tensor, targets: Tensor) -> dict[str, dict[str, Tensor]]:
        key = (targets.data_ptr(), tuple(targets.shape), tuple(targets.stride()), pred.dtype)
        cached = self._cache.get(key)
        if cached is None:
            y, valid = one_hot_target(targets, self.num_classes, self.ignore_index, pred.dtype)
            if self.target == "boundary":
                y = boundary_target(y, valid, definition=self.boundary, width=self.boundary_width)
            cached = (y, torch.ones_like(y))
            if len(self._cache) > 16:
                self._cache.clear()
            self._cache[key] = cached
        y, ones = cached
        return {SEG_BRANCH: {"y_hat": torch.softmax(pred, dim=-3), "y": y, "1": ones}}


class _SegMetric:
    """ξ per sample: the named metric of the argmax labels, NaN (undefined) counted as 0."""

    def __init__(self, name: str, num_classes: int, ignore_index: int | None, kwargs: Mapping[str, Any]):
        from components.tasks.segmentation.metrics import canonical_metric_name

        self.name = canonical_metric_name(name)
        self.num_classes = num_classes
        self.ignore_index = ignore_index
        self.kwargs = dict(kwargs)

    def __call__(self, pred: Tensor, targets: Tensor) -> Tensor:
        from components.tasks.segmentation.metrics import per_sample_metric

        labels = pred.argmax(dim=-3)
        values = per_sample_metric(self.name, labels, targets, self.num_classes,
                                   ignore_index=self.ignore_index, **self.kwargs)
        return torch.nan_to_num(values.double(), nan=0.0)


def build_screening_problem(
    dataset: Any,
    metric: str | Callable[[Tensor, Tensor], Tensor],
    num_classes: int | None = None,
    samples: int = 5,
    size: int = 64,
    seed: int = 0,
    *,
    model: str | nn.Module = "lite",
    ignore_index: int | None = IGNORE_INDEX,
    metric_kwargs: Mapping[str, Any] | None = None,
    indices: list[int] | None = None,
    target: str | None = None,
) -> ScreeningProblem:
    """The segmentation probe: `samples` random items of `dataset` (image (3,H,W), mask (H,W)) resized to
    `size`², with logits `(B,1,C,size,size)` of a randomly initialised network (`model`: a
    components.tasks.segmentation.models preset name or a module) seeded by `seed`.

    `metric` is a metric name of components.tasks.segmentation.metrics (mIoU, BF1, ...) or a function
    `(pred logits (B,1,C,H,W), targets (B,1,H,W)) -> (B,)`. `target` is the loss input `y`: "label"
    (one-hot) or "boundary" (`boundary_target`, with the boundary definition and width of
    `metric_kwargs`); None = `training_target_for_metric(metric)` ("label" for a metric function).
    """
    if num_classes is None:
        num_classes = getattr(dataset, "num_classes", None)
        if num_classes is None:
            raise LossforgeError("build_screening_problem: give num_classes (the dataset has no .num_classes)")
    num_classes = int(num_classes)
    if num_classes < 2:
        raise LossforgeError(f"build_screening_problem: num_classes must be >= 2, got {num_classes}")
    if samples < 1:
        raise LossforgeError(f"build_screening_problem: samples must be >= 1, got {samples}")
    if size < 4:
        raise LossforgeError(f"build_screening_problem: size must be >= 4, got {size}")
    n = len(dataset)
    if indices is None:
        if n < samples:
            raise LossforgeError(f"build_screening_problem: the dataset has {n} samples, the probe needs {samples}")
        indices = sorted(random.Random(seed).sample(range(n), samples))
    elif len(indices) != samples:
        raise LossforgeError(f"build_screening_problem: {len(indices)} indices given for {samples} samples")
    images, masks = [], []
    for i in indices:
        image, mask = dataset[i]
        image, mask = _resize_pair(image, mask, size)
        images.append(image)
        masks.append(mask)
    images_t = torch.stack(images)
    targets = torch.stack(masks)[:, None]  # (B, 1, H, W)
    logits = _network_logits(images_t, num_classes, seed, model)[:, None]  # (B, 1, C, H, W)

    if isinstance(metric, str):
        metric_fn = _SegMetric(metric, num_classes, ignore_index, metric_kwargs or {})
        metric_name = metric_fn.name
    elif callable(metric):
        metric_fn = metric
        metric_name = getattr(metric, "__name__", type(metric).__name__)
    else:
        raise LossforgeError(f"build_screening_problem: metric must be a name or a function, got {metric!r}")

    if target is None:
        target = training_target_for_metric(metric_name) if isinstance(metric, str) else "label"
    _check_target(target, "build_screening_problem")
    kwargs = dict(metric_kwargs or {})
    boundary, width = kwargs.get("boundary", "avgpool"), kwargs.get("boundary_width", 1)
    if target == "boundary":
        from components.tasks.segmentation.metrics import BoundarySpec

        BoundarySpec(boundary, width)  # one-line error for a bad definition or width

    perfect, valid = one_hot_target(targets, num_classes, ignore_index)  # the target itself, as logits
    payload = {
        "task": "segmentation", "metric": metric_name, "metric_kwargs": kwargs,
        "num_classes": num_classes, "size": size, "samples": samples, "seed": seed,
        "ignore_index": ignore_index, "model": model if isinstance(model, str) else type(model).__name__,
    }
    if target != "label":  # label-target keys stay as they were before boundary targets existed
        payload["target"] = target
    digest = hashlib.sha256()
    digest.update(json.dumps(payload, sort_keys=True, default=str).encode())
    digest.update(targets.numpy().tobytes())
    digest.update(logits.numpy().tobytes())
    key = f"segmentation/{metric_name}/{digest.hexdigest()[:20]}"
    if target == "boundary":
        # The best prediction the training target determines: the label on the edge pixels (where y is
        # set), the initial prediction elsewhere (y = 0 there carries no class), see the module docstring.
        on_edge = boundary_target(perfect, valid, definition=boundary, width=width).amax(dim=-3, keepdim=True) > 0
        perfect = torch.where(on_edge, perfect, logits)
    return ScreeningProblem(
        init_predictions=logits,
        targets=targets,
        build_inputs=_SegInputs(num_classes, ignore_index, target, boundary, width),
        metric=metric_fn,
        key=key,
        valid=valid,
        task="segmentation",
        metric_name=metric_name,
        perfect_predictions=perfect,
    )


__all__ = ["GraphSegLoss", "build_screening_problem", "segmentation_inputs", "one_hot_target", "boundary_target",
           "training_target_for_metric", "TRAINING_TARGETS", "IGNORE_INDEX"]
