"""Handcrafted segmentation baselines: CE, weighted CE, Dice, Lovász-softmax, focal, soft IoU.

Every loss is an `nn.Module` with `forward(logits (N,C,H,W), target (N,H,W) long) -> scalar`; pixels whose
target is `ignore_index` (255) never count. A batch without any valid pixel gives 0 (still differentiable).
Region losses (Dice, Lovász, soft IoU) sum over all valid pixels of the batch, as in the references, and by
default average over the classes present in the batch target (`classes="present"`, Berman et al.'s default;
`"all"` averages over every class). `BASELINE_LOSSES` maps the registry names to the classes.
"""

from __future__ import annotations

from collections.abc import Iterable, Sequence

import torch
import torch.nn.functional as F
from torch import nn

from components.errors import LossforgeError

IGNORE_INDEX = 255
WEIGHT_SCHEMES = ("inverse_frequency", "median_frequency")
CLASS_SELECTIONS = ("present", "all")


def _check(logits: torch.Tensor, target: torch.Tensor, ignore_index: int | None, loss: str,
           num_labels: int | None = None) -> torch.Tensor:
    """Validate shapes/labels (in [0, num_labels), default C); return the (N,H,W) bool mask of valid pixels."""
    if logits.dim() != 4:
        raise LossforgeError(f"{loss}: logits must be (N,C,H,W), got shape {tuple(logits.shape)}")
    if target.dim() != 3 or target.shape[0] != logits.shape[0] or target.shape[1:] != logits.shape[2:]:
        raise LossforgeError(
            f"{loss}: target shape {tuple(target.shape)} does not match logits {tuple(logits.shape)} (want (N,H,W))"
        )
    if target.is_floating_point() or target.dtype == torch.bool:
        raise LossforgeError(f"{loss}: target must hold integer class labels, got dtype {target.dtype}")
    c = logits.shape[1] if num_labels is None else num_labels
    valid = target != ignore_index if ignore_index is not None else torch.ones_like(target, dtype=torch.bool)
    bad = valid & ((target < 0) | (target >= c))
    if bool(bad.any()):
        raise LossforgeError(
            f"{loss}: target label {int(target[bad][0])} outside [0, {c}) and not ignore_index={ignore_index}"
        )
    return valid


def _zero(logits: torch.Tensor) -> torch.Tensor:
    """A differentiable 0 for batches without valid pixels."""
    return logits.sum() * 0.0


def _flat_probs(logits: torch.Tensor, target: torch.Tensor, valid: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """Softmax probabilities (C, P) and one-hot targets (C, P) of the P valid pixels."""
    c = logits.shape[1]
    probs = logits.softmax(dim=1).permute(1, 0, 2, 3).reshape(c, -1)[:, valid.reshape(-1)]
    onehot = F.one_hot(target[valid].long(), c).T.to(probs.dtype)
    return probs, onehot


def _class_mask(onehot: torch.Tensor, classes: str) -> torch.Tensor:
    if classes == "all":
        return torch.ones(onehot.shape[0], dtype=torch.bool, device=onehot.device)
    return onehot.sum(dim=1) > 0


def _check_classes(classes: str, loss: str) -> str:
    if classes not in CLASS_SELECTIONS:
        raise LossforgeError(f"{loss}: classes must be one of {CLASS_SELECTIONS}, got {classes!r}")
    return classes


class CrossEntropyLoss(nn.Module):
    """Pixel-wise softmax cross-entropy averaged over valid pixels (`ce`)."""

    name = "ce"

    def __init__(self, ignore_index: int | None = IGNORE_INDEX) -> None:
        super().__init__()
        self.ignore_index = ignore_index

    def forward(self, logits: torch.Tensor, target: torch.Tensor) -> torch.Tensor:
        valid = _check(logits, target, self.ignore_index, self.name)
        if not bool(valid.any()):
            return _zero(logits)
        return F.cross_entropy(logits, target.long(), ignore_index=-100 if self.ignore_index is None else self.ignore_index)

    def describe(self) -> str:
        """One line for reports."""
        return "cross-entropy"


def class_histogram(masks: Iterable[torch.Tensor], num_classes: int, ignore_index: int | None = IGNORE_INDEX) -> torch.Tensor:
    """Pixel count per class (C,) float64 over an iterable of label maps (ignore label skipped)."""
    hist = torch.zeros(num_classes, dtype=torch.float64)
    for m in masks:
        m = torch.as_tensor(m).reshape(-1).long()
        if ignore_index is not None:
            m = m[m != ignore_index]
        if m.numel() and (int(m.min()) < 0 or int(m.max()) >= num_classes):
            raise LossforgeError(f"class_histogram: label outside [0, {num_classes}) in a mask")
        hist += torch.bincount(m, minlength=num_classes).double().cpu()
    return hist


def class_weights_from_histogram(histogram: Sequence[float] | torch.Tensor, scheme: str = "median_frequency") -> torch.Tensor:
    """Class weights (C,) from pixel counts: inverse frequency w_c = total / (C·n_c) (mean weight 1 on a
    balanced set) or median-frequency balancing w_c = median(f) / f_c (Eigen & Fergus), f_c = n_c / total
    and the median over classes that occur. Classes that never occur get weight 0."""
    hist = torch.as_tensor(histogram, dtype=torch.float64).reshape(-1)
    if scheme not in WEIGHT_SCHEMES:
        raise LossforgeError(f"weighted_ce: scheme must be one of {WEIGHT_SCHEMES}, got {scheme!r}")
    if hist.numel() == 0 or bool((hist < 0).any()) or not bool(torch.isfinite(hist).all()) or hist.sum() <= 0:
        raise LossforgeError(f"weighted_ce: histogram must be finite, non-negative and not all zero, got {hist.tolist()}")
    present = hist > 0
    freq = hist / hist.sum()
    if scheme == "inverse_frequency":
        w = 1.0 / (hist.numel() * freq.clamp_min(1e-300))
    else:
        w = freq[present].median() / freq.clamp_min(1e-300)
    return torch.where(present, w, torch.zeros_like(w))


class WeightedCrossEntropyLoss(nn.Module):
    """Class-weighted cross-entropy (`weighted_ce`): weights given, or from a class histogram
    (`scheme` = "median_frequency" or "inverse_frequency"), or, with neither, from each batch's target."""

    name = "weighted_ce"

    def __init__(self, weights: Sequence[float] | None = None, histogram: Sequence[float] | None = None,
                 scheme: str = "median_frequency", ignore_index: int | None = IGNORE_INDEX) -> None:
        super().__init__()
        if scheme not in WEIGHT_SCHEMES:
            raise LossforgeError(f"weighted_ce: scheme must be one of {WEIGHT_SCHEMES}, got {scheme!r}")
        if weights is not None and histogram is not None:
            raise LossforgeError("weighted_ce: give either weights or histogram, not both")
        self.scheme = scheme
        self.ignore_index = ignore_index
        if histogram is not None:
            weights = class_weights_from_histogram(histogram, scheme)
        if weights is not None:
            w = torch.as_tensor(weights, dtype=torch.float32).reshape(-1)
            if w.numel() == 0 or not bool(torch.isfinite(w).all()) or bool((w < 0).any()):
                raise LossforgeError(f"weighted_ce: weights must be finite and non-negative, got {w.tolist()}")
            self.register_buffer("weights", w)
        else:
            self.weights = None

    def forward(self, logits: torch.Tensor, target: torch.Tensor) -> torch.Tensor:
        valid = _check(logits, target, self.ignore_index, self.name)
        if not bool(valid.any()):
            return _zero(logits)
        c = logits.shape[1]
        if self.weights is None:
            w = class_weights_from_histogram(torch.bincount(target[valid].long(), minlength=c).cpu(), self.scheme)
            w = w.to(device=logits.device, dtype=logits.dtype)
        else:
            if self.weights.numel() != c:
                raise LossforgeError(f"weighted_ce: {self.weights.numel()} class weights for {c} classes")
            w = self.weights.to(dtype=logits.dtype)
        if float(w[target[valid].long()].sum()) <= 0:
            return _zero(logits)
        ign = -100 if self.ignore_index is None else self.ignore_index
        return F.cross_entropy(logits, target.long(), weight=w, ignore_index=ign)

    def describe(self) -> str:
        """One line for reports."""
        src = "given weights" if self.weights is not None else "per-batch weights"
        return f"weighted cross-entropy ({src}, {self.scheme})"


class DiceLoss(nn.Module):
    """Multi-class soft Dice on softmax probabilities (`dice`): 1 − mean_c (2Σp·y + s) / (Σp + Σy + s)."""

    name = "dice"

    def __init__(self, smooth: float = 0.0, eps: float = 1e-7, classes: str = "present",
                 ignore_index: int | None = IGNORE_INDEX) -> None:
        super().__init__()
        self.smooth, self.eps = float(smooth), float(eps)
        self.classes = _check_classes(classes, self.name)
        self.ignore_index = ignore_index

    def forward(self, logits: torch.Tensor, target: torch.Tensor) -> torch.Tensor:
        valid = _check(logits, target, self.ignore_index, self.name)
        if not bool(valid.any()):
            return _zero(logits)
        p, y = _flat_probs(logits, target, valid)
        inter = (p * y).sum(1)
        denom = p.sum(1) + y.sum(1)
        dice = (2 * inter + self.smooth) / (denom + self.smooth).clamp_min(self.eps)
        return 1.0 - dice[_class_mask(y, self.classes)].mean()

    def describe(self) -> str:
        """One line for reports."""
        return f"soft Dice (softmax, smooth={self.smooth}, classes={self.classes})"


def lovasz_grad(gt_sorted: torch.Tensor) -> torch.Tensor:
    """Gradient of the Lovász extension of the Jaccard loss at errors sorted in decreasing order.

    gt_sorted (..., P): ground-truth indicator in the sorted order. With g = Σ gt, the Jaccard loss of the
    first i sorted pixels being wrong is J_i = 1 − (g − cumsum(gt)_i) / (g + cumsum(1−gt)_i); the
    gradient is the sequence of increments J_i − J_{i−1} (J_0 = 0)."""
    g = gt_sorted.sum(dim=-1, keepdim=True)
    inter = g - gt_sorted.cumsum(dim=-1)
    union = g + (1.0 - gt_sorted).cumsum(dim=-1)
    jac = 1.0 - inter / union  # union >= 1 from the first pixel on
    return torch.cat([jac[..., :1], jac[..., 1:] - jac[..., :-1]], dim=-1)


class LovaszSoftmaxLoss(nn.Module):
    """Lovász-softmax (Berman et al. 2018, `lovasz`): per class c, the Lovász extension of the Jaccard loss
    evaluated at the errors m_i = |y_ic − p_ic| = <sort(m, desc), lovasz_grad(y sorted the same way)>,
    averaged over classes; over the whole batch, or per image then averaged (`per_image=True`)."""

    name = "lovasz"

    def __init__(self, classes: str = "present", per_image: bool = False,
                 ignore_index: int | None = IGNORE_INDEX) -> None:
        super().__init__()
        self.classes = _check_classes(classes, self.name)
        self.per_image = bool(per_image)
        self.ignore_index = ignore_index

    def _flat(self, logits: torch.Tensor, target: torch.Tensor, valid: torch.Tensor) -> torch.Tensor | None:
        if not bool(valid.any()):
            return None
        p, y = _flat_probs(logits, target, valid)
        errors = (y - p).abs()
        errors_sorted, order = errors.sort(dim=1, descending=True)
        grad = lovasz_grad(y.gather(1, order))
        per_class = (errors_sorted * grad).sum(dim=1)
        return per_class[_class_mask(y, self.classes)].mean()

    def forward(self, logits: torch.Tensor, target: torch.Tensor) -> torch.Tensor:
        valid = _check(logits, target, self.ignore_index, self.name)
        if self.per_image:
            losses = [self._flat(logits[i : i + 1], target[i : i + 1], valid[i : i + 1]) for i in range(len(logits))]
            losses = [v for v in losses if v is not None]
            return torch.stack(losses).mean() if losses else _zero(logits)
        out = self._flat(logits, target, valid)
        return _zero(logits) if out is None else out

    def describe(self) -> str:
        """One line for reports."""
        return f"Lovász-softmax (classes={self.classes}, per_image={self.per_image})"


class FocalLoss(nn.Module):
    """Softmax focal loss (Lin et al. 2017, `focal`): −α_t (1 − p_t)^γ log p_t averaged over valid pixels;
    `alpha` None (no weighting), a float (uniform scale) or one weight per class."""

    name = "focal"

    def __init__(self, gamma: float = 2.0, alpha: float | Sequence[float] | None = None,
                 ignore_index: int | None = IGNORE_INDEX) -> None:
        super().__init__()
        if not (isinstance(gamma, (int, float)) and gamma >= 0):
            raise LossforgeError(f"focal: gamma must be a number >= 0, got {gamma!r}")
        self.gamma = float(gamma)
        self.ignore_index = ignore_index
        if alpha is None:
            self.alpha = None
        else:
            a = torch.as_tensor(alpha, dtype=torch.float32).reshape(-1)
            if a.numel() == 0 or not bool(torch.isfinite(a).all()) or bool((a < 0).any()):
                raise LossforgeError(f"focal: alpha must be finite and non-negative, got {alpha!r}")
            self.register_buffer("alpha", a)

    def forward(self, logits: torch.Tensor, target: torch.Tensor) -> torch.Tensor:
        valid = _check(logits, target, self.ignore_index, self.name)
        if not bool(valid.any()):
            return _zero(logits)
        c = logits.shape[1]
        logp = logits.log_softmax(dim=1).permute(0, 2, 3, 1)[valid]  # (P, C)
        t = target[valid].long()
        logpt = logp.gather(1, t[:, None])[:, 0]
        focal = (1.0 - logpt.exp()).clamp_min(0.0)
        mod = focal.clamp_min(1e-12) ** self.gamma if self.gamma > 0 else torch.ones_like(focal)
        loss = -mod * logpt
        if self.alpha is not None:
            if self.alpha.numel() not in (1, c):
                raise LossforgeError(f"focal: {self.alpha.numel()} alpha values for {c} classes")
            a = self.alpha.to(loss.dtype)
            loss = loss * (a if a.numel() == 1 else a[t])
        return loss.mean()

    def describe(self) -> str:
        """One line for reports."""
        a = None if self.alpha is None else [round(v, 4) for v in self.alpha.tolist()]
        return f"focal (gamma={self.gamma}, alpha={a})"


class SoftIoULoss(nn.Module):
    """Multi-class soft IoU (`soft_iou`, the blog's loss per class): mean over classes of 1 − I_c/U_c,
    I_c = Σ p_c·y_c, U_c = Σ (p_c + y_c − p_c·y_c), sums over all valid pixels of the batch, p = softmax."""

    name = "soft_iou"

    def __init__(self, classes: str = "present", eps: float = 1e-7, ignore_index: int | None = IGNORE_INDEX) -> None:
        super().__init__()
        self.classes = _check_classes(classes, self.name)
        self.eps = float(eps)
        self.ignore_index = ignore_index

    def forward(self, logits: torch.Tensor, target: torch.Tensor) -> torch.Tensor:
        valid = _check(logits, target, self.ignore_index, self.name)
        if not bool(valid.any()):
            return _zero(logits)
        p, y = _flat_probs(logits, target, valid)
        inter = (p * y).sum(1)
        union = (p + y - p * y).sum(1)
        loss = 1.0 - inter / union.clamp_min(self.eps)
        return loss[_class_mask(y, self.classes)].mean()

    def describe(self) -> str:
        """One line for reports."""
        return f"soft IoU, multi-class (classes={self.classes})"


class BinarySoftIoULoss(nn.Module):
    """Binary soft IoU of the blog (`soft_iou_binary`): 1 − I/U on the foreground probability p,
    I = Σ p·y, U = Σ (p + y − p·y) over all valid pixels of the batch. Foreground: with one logit channel
    p = sigmoid(logit) and targets in {0, 1}; with C ≥ 2, p = softmax of `foreground_class`, or, when that
    is None, p = 1 − softmax of background class 0 and y = (target != 0)."""

    name = "soft_iou_binary"

    def __init__(self, foreground_class: int | None = None, eps: float = 1e-7,
                 ignore_index: int | None = IGNORE_INDEX) -> None:
        super().__init__()
        if foreground_class is not None and (not isinstance(foreground_class, int) or foreground_class < 0):
            raise LossforgeError(f"soft_iou_binary: foreground_class must be a class index, got {foreground_class!r}")
        self.foreground_class = foreground_class
        self.eps = float(eps)
        self.ignore_index = ignore_index

    def forward(self, logits: torch.Tensor, target: torch.Tensor) -> torch.Tensor:
        valid = _check(logits, target, self.ignore_index, self.name, num_labels=max(logits.shape[1], 2))
        if not bool(valid.any()):
            return _zero(logits)
        c = logits.shape[1]
        t = target[valid].long()
        if c == 1:
            p = logits[:, 0].sigmoid()[valid]
            y = (t == 1).to(p.dtype)
        else:
            probs = logits.softmax(dim=1)
            k = self.foreground_class
            if k is None:
                p = (1.0 - probs[:, 0])[valid]
                y = (t != 0).to(p.dtype)
            else:
                if k >= c:
                    raise LossforgeError(f"soft_iou_binary: foreground_class {k} >= number of classes {c}")
                p = probs[:, k][valid]
                y = (t == k).to(p.dtype)
        inter = (p * y).sum()
        union = (p + y - p * y).sum()
        return 1.0 - inter / union.clamp_min(self.eps)

    def describe(self) -> str:
        """One line for reports."""
        fg = "not background" if self.foreground_class is None else f"class {self.foreground_class}"
        return f"soft IoU, binary (foreground = {fg})"


BASELINE_LOSSES: dict[str, type[nn.Module]] = {
    cls.name: cls
    for cls in (
        CrossEntropyLoss,
        WeightedCrossEntropyLoss,
        DiceLoss,
        LovaszSoftmaxLoss,
        FocalLoss,
        SoftIoULoss,
        BinarySoftIoULoss,
    )
}


def build_baseline(name: str, **kwargs) -> nn.Module:
    """Instantiate a baseline by registry name; unknown names or options give a clear LossforgeError."""
    if name not in BASELINE_LOSSES:
        raise LossforgeError(f"unknown baseline loss {name!r}; valid: {', '.join(BASELINE_LOSSES)}")
    try:
        return BASELINE_LOSSES[name](**kwargs)
    except TypeError as exc:
        raise LossforgeError(f"baseline loss {name!r}: bad options {sorted(kwargs)} ({exc})") from None
