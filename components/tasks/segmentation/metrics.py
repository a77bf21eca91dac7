"""Semantic-segmentation metrics of Auto Seg-Loss Table 1: gAcc, mAcc, mIoU, FWIoU, BIoU, BF1.

Everything is computed with torch on integer label maps; pixels whose target is `ignore_index`
(255) never count. Two uses:

- `SegmentationMetrics`: accumulate over a whole evaluation set, then `compute()`. The region
  metrics come from one confusion matrix (rows = ground truth, columns = prediction); BIoU from a
  confusion matrix restricted to a band around the ground-truth boundaries; BF1 from per-class
  boundary counts, all summed over the set before any ratio is taken.
- `per_sample_metric`: one metric per sample of a batch, vectorised (used by loss rejection).

Rules (the same in both uses):

- A per-class ratio whose denominator is 0 is NaN and skipped in the class mean (nanmean). For IoU
  this means a class absent from both prediction and target is skipped; a class predicted but absent
  from the target has IoU 0 and counts. mAcc skips classes absent from the target.
  FWIoU weights each class IoU by its ground-truth pixel frequency (absent classes weigh 0).
- Boundaries are computed per class on the one-hot maps, with ignore pixels belonging to no class
  (in both prediction and target, so the void region is the same for both) and with the image border
  not counted as a boundary (pooling padding is never counted).
- Boundary definitions (`boundary=`):
  * ``"avgpool"`` (official Auto Seg-Loss evaluation code): a pixel is an edge of class c if it
    belongs to c and differs from the (2w+1)×(2w+1) average of its class map (w = boundary_width).
    BIoU: IoU per class from the confusion matrix of the band = ground-truth edges dilated by a
    max-pool of radius `tolerance`.
  * ``"minpool"`` (paper Table 1, Eq. 5): BD(y) = y XOR MinPool_(2w+1)(y). BIoU: IoU per class over the
    ground-truth boundary pixels BD(y) themselves (no dilation, as Eq. 5 is written).
  For binary maps both edge maps coincide; the definitions differ in the BIoU region.
  BF1 (both): precision_c = |BD(ŷ)_c ∩ dilate(BD(y)_c)| / |BD(ŷ)_c|, recall_c = |BD(y)_c ∩ dilate(BD(ŷ)_c)| /
  |BD(y)_c|, dilation = max-pool of radius `tolerance`; F1_c = 2PR/(P+R). A class with no edges in
  both maps is NaN (skipped); a class with edges in only one map scores 0.
- `drop_background` (class 0): background edges do not form the BIoU band, and class 0 is left out of
  the BF1 mean (official eval's drop_bg). Default None = follow the definition: True for "avgpool",
  False for "minpool" (Table 1 averages over all C classes).

Evaluators (`evaluator=`): ``"lossforge"`` (default, the rules above) or ``"autoseg"``, which reproduces the
evaluator of the Auto Seg-Loss code (mmseg/core/evaluation/metrics_fast.py + utils.py) number for number,
so published VOC numbers can be compared. They differ in exactly three places:

1. BF1 of a class predicted without ground-truth edges: lossforge scores it 0 (a false boundary costs);
   the official code divides by n_gt = 0 and skips the class as NaN. (A class with ground-truth edges and
   no predicted edges scores 0 in both.) The official F1 also carries its ε: P = m/(n + 1e-8),
   F1 = 2PR/(P + R + 1e-8).
2. Ignored pixels in BF1: lossforge removes them from the prediction as well (the void region is the same
   for both maps, so nothing predicted there counts); the official code only removes them from the
   ground truth, so predicted edges inside void regions count as unmatched (lower precision) and
   predicted pixels next to the void are not edges.
3. FWIoU: lossforge sums freq_c · IoU_c; the official code takes nanmean(freq_c · IoU_c) · C, which is
   larger by C / (classes seen) whenever a class is in neither map (equal on VOC val, where all 21 occur).

With ``"autoseg"`` the boundary must be "avgpool" with width 1 (the only edges the official code has),
`tolerance="auto"` means its fixed 5 px, and `drop_background=None` means False (`evaluate_fast`'s
default drop_bg). mIoU, mAcc, gAcc and BIoU are computed the same way by both.
"""

from __future__ import annotations

import math
import re
from collections.abc import Callable
from dataclasses import dataclass

import torch
import torch.nn.functional as F

from components.errors import LossforgeError

METRIC_NAMES: tuple[str, ...] = ("gAcc", "mAcc", "mIoU", "FWIoU", "BIoU", "BF1")
REGION_METRICS: tuple[str, ...] = ("gAcc", "mAcc", "mIoU", "FWIoU")
BOUNDARY_METRICS: tuple[str, ...] = ("BIoU", "BF1")
BOUNDARY_DEFINITIONS: tuple[str, ...] = ("avgpool", "minpool")
EVALUATORS: tuple[str, ...] = ("lossforge", "autoseg")  # see the module docstring
AUTOSEG_TOLERANCE = 5  # px: the official evaluator's fixed tol (BF1) and radius (BIoU band)
BACKGROUND_CLASS = 0

_EXTRA_ALIASES = {
    "globalaccuracy": "gAcc",
    "pixelaccuracy": "gAcc",
    "meanaccuracy": "mAcc",
    "meaniou": "mIoU",
    "frequencyweightediou": "FWIoU",
    "boundaryiou": "BIoU",
    "boundaryf1": "BF1",
    "bf1score": "BF1",
}


def _alias_key(name: str) -> str:
    return re.sub(r"[^a-z0-9]", "", name.lower())


_ALIASES = {_alias_key(n): n for n in METRIC_NAMES} | _EXTRA_ALIASES


def canonical_metric_name(name: str) -> str:
    """Map a metric name or alias (``miou``, ``m_iou``, ``bf1-score``, ...) to one of METRIC_NAMES."""
    key = _alias_key(name) if isinstance(name, str) else None
    if key not in _ALIASES:
        raise LossforgeError(f"unknown segmentation metric {name!r}; valid names: {', '.join(METRIC_NAMES)}")
    return _ALIASES[key]


AUTO_TOLERANCE = "auto"


def auto_tolerance(height: int, width: int) -> int:
    """0.75 % of the image diagonal, at least 1 px: the usual BF-score tolerance (Csurka et al.), which is
    5 px on VOC-sized images (~500×375) — the fixed value of the official evaluation — and 1 px at 64²,
    where a fixed 5 px would accept almost any boundary (CE scores ~99 % BF1 on the embedded data)."""
    return max(1, round(0.0075 * math.hypot(height, width)))


@dataclass(frozen=True)
class BoundarySpec:
    """How boundaries are defined for BIoU/BF1 (see the module docstring)."""

    definition: str = "avgpool"
    width: int = 1
    tolerance: int | str = 5
    drop_background: bool | None = None
    evaluator: str = "lossforge"

    def __post_init__(self) -> None:
        if self.evaluator not in EVALUATORS:
            raise LossforgeError(f"evaluator must be one of {', '.join(EVALUATORS)}, got {self.evaluator!r}")
        if self.evaluator == "autoseg" and (self.definition != "avgpool" or self.width != 1):
            raise LossforgeError(
                "evaluator 'autoseg' has only the official 3x3-average edges: boundary must be 'avgpool' and "
                f"boundary_width 1 (got {self.definition!r}, {self.width!r})"
            )
        if self.definition not in BOUNDARY_DEFINITIONS:
            raise LossforgeError(
                f"unknown boundary definition {self.definition!r}; valid: {', '.join(BOUNDARY_DEFINITIONS)}"
            )
        if not isinstance(self.width, int) or self.width < 1:
            raise LossforgeError(f"boundary_width must be an integer >= 1, got {self.width!r}")
        if self.tolerance != AUTO_TOLERANCE and (isinstance(self.tolerance, bool) or not isinstance(self.tolerance, int)
                                                 or self.tolerance < 0):
            raise LossforgeError(f"tolerance must be an integer >= 0 or 'auto', got {self.tolerance!r}")
        if self.drop_background not in (None, True, False):
            raise LossforgeError(f"drop_background must be true, false or None, got {self.drop_background!r}")
        if self.drop_background is None:
            drop = self.definition == "avgpool" and self.evaluator != "autoseg"
            object.__setattr__(self, "drop_background", drop)

    def pixels(self, height: int, width: int) -> int:
        """The tolerance in pixels for (height, width) maps (``"auto"``: see ``auto_tolerance``; the autoseg
        evaluator's fixed 5 px)."""
        if self.tolerance != AUTO_TOLERANCE:
            return int(self.tolerance)
        return AUTOSEG_TOLERANCE if self.evaluator == "autoseg" else auto_tolerance(height, width)

    def describe(self) -> str:
        """One line naming the boundary definition, for reports next to BIoU/BF1 numbers."""
        k = 2 * self.width + 1
        if self.definition == "avgpool":
            edge = f"edges = pixels differing from their {k}x{k} class average (official eval code)"
            band = f"BIoU band = GT edges dilated by radius {self.tolerance}"
        else:
            edge = f"BD(y) = y XOR min-pool {k}x{k} (paper Table 1)"
            band = "BIoU region = GT boundary BD(y)"
        bg = "background dropped" if self.drop_background else "background kept"
        if self.tolerance != AUTO_TOLERANCE:
            tol = f"{self.tolerance} px"
        else:
            tol = f"{AUTOSEG_TOLERANCE} px" if self.evaluator == "autoseg" else "0.75% of the diagonal"
        rules = ("; evaluator=autoseg (the Auto Seg-Loss code's BF1/FWIoU rules)" if self.evaluator == "autoseg"
                 else "")
        return f"boundary={self.definition}: {edge}; {band}; BF1 tolerance {tol}; {bg}{rules}"


# ----------------------------------------------------------------------------- input checks


def _as_groups(pred: torch.Tensor, target: torch.Tensor, num_classes: int, ignore_index: int | None,
               per_sample: bool) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Validate label maps; return pred, target as int64 (G, N, H, W) and the valid mask."""
    if not isinstance(num_classes, int) or num_classes < 1:
        raise LossforgeError(f"num_classes must be a positive integer, got {num_classes!r}")
    for what, t in (("pred_labels", pred), ("target", target)):
        if not isinstance(t, torch.Tensor):
            raise LossforgeError(f"{what} must be a torch.Tensor of class labels, got {type(t).__name__}")
        if t.is_floating_point() or t.is_complex() or t.dtype == torch.bool:
            raise LossforgeError(f"{what} must hold integer class labels (argmax of the logits), got dtype {t.dtype}")
    if pred.shape != target.shape:
        raise LossforgeError(f"pred_labels shape {tuple(pred.shape)} != target shape {tuple(target.shape)}")
    if per_sample:
        if pred.dim() == 3:
            pred, target = pred.unsqueeze(1), target.unsqueeze(1)
        elif pred.dim() != 4:
            raise LossforgeError(f"label maps must be (B,H,W) or (B,N,H,W), got shape {tuple(pred.shape)}")
    else:
        if pred.dim() == 2:
            pred, target = pred.unsqueeze(0), target.unsqueeze(0)
        if pred.dim() != 3:
            raise LossforgeError(f"label maps must be (N,H,W), got shape {tuple(pred.shape)}")
        pred, target = pred.unsqueeze(0), target.unsqueeze(0)
    pred, target = pred.long(), target.long()
    valid = target != ignore_index if ignore_index is not None else torch.ones_like(target, dtype=torch.bool)
    if target.numel():
        bad = valid & ((target < 0) | (target >= num_classes))
        if bool(bad.any()):
            raise LossforgeError(
                f"target holds label {int(target[bad][0])} outside [0, {num_classes}) and not ignore_index={ignore_index}"
            )
        badp = (pred < 0) | (pred >= num_classes)
        if bool((badp & valid).any()):
            raise LossforgeError(f"pred_labels holds label {int(pred[badp & valid][0])} outside [0, {num_classes})")
    return pred, target, valid


# ----------------------------------------------------------------------------- statistics


def _confusion(pred: torch.Tensor, target: torch.Tensor, mask: torch.Tensor, num_classes: int) -> torch.Tensor:
    """Per-group confusion matrices (G, C, C), rows = target, columns = prediction, over `mask` pixels."""
    g = pred.shape[0]
    c = num_classes
    offset = torch.arange(g, device=pred.device).view(g, *([1] * (pred.dim() - 1))) * (c * c)
    idx = (offset + target.clamp(0, c - 1) * c + pred.clamp(0, c - 1))[mask]
    return torch.bincount(idx, minlength=g * c * c).view(g, c, c)


def _one_hot(labels: torch.Tensor, valid: torch.Tensor, num_classes: int) -> torch.Tensor:
    """(M, H, W) labels -> (M, C, H, W) float one-hot, zero at invalid pixels."""
    oh = F.one_hot(labels.clamp(0, num_classes - 1), num_classes).permute(0, 3, 1, 2).float()
    return oh * valid.unsqueeze(1)


def class_boundaries(labels: torch.Tensor, valid: torch.Tensor, num_classes: int, width: int = 1,
                     definition: str = "avgpool") -> torch.Tensor:
    """Per-class boundary masks (M, C, H, W) bool of (M, H, W) label maps (invalid pixels belong to no class)."""
    oh = _one_hot(labels, valid, num_classes)
    k = 2 * width + 1
    if definition == "avgpool":
        avg = F.avg_pool2d(oh, k, stride=1, padding=width, count_include_pad=False)
        return (oh > 0.5) & (avg < 1.0 - 0.5 / (k * k))
    if definition == "minpool":
        mn = -F.max_pool2d(-oh, k, stride=1, padding=width)  # padding is -inf for max: never counted
        return (oh > 0.5) ^ (mn > 0.5)
    raise LossforgeError(f"unknown boundary definition {definition!r}; valid: {', '.join(BOUNDARY_DEFINITIONS)}")


def _shift_reduce(x: torch.Tensor, radius: int, op) -> torch.Tensor:
    """Separable (2r+1)² window reduction of (..., H, W) by in-place `op` on shifted views (out-of-image
    positions are simply absent, i.e. never counted)."""
    for dim in (-2, -1):
        n = x.shape[dim]
        out = x.clone()
        for d in range(1, min(radius, n - 1) + 1):
            head, tail = out.narrow(dim, d, n - d), out.narrow(dim, 0, n - d)
            op(head, x.narrow(dim, 0, n - d), out=head)
            op(tail, x.narrow(dim, d, n - d), out=tail)
        x = out
    return x


def dilate(mask: torch.Tensor, radius: int) -> torch.Tensor:
    """Binary dilation of (..., H, W) masks by a (2r+1)² square (= max-pool of radius r, stride 1)."""
    mask = mask.bool()
    return _shift_reduce(mask, radius, torch.logical_or) if radius > 0 else mask


def label_boundaries(labels: torch.Tensor, valid: torch.Tensor, num_classes: int, width: int = 1) -> torch.Tensor:
    """(M, H, W) bool: valid pixels that are a boundary of their own class, i.e. some in-image pixel within
    radius `width` has another label or is invalid. Equal to `class_boundaries(...).any(1)` for both
    definitions, computed on the label map (no one-hot, no float pooling)."""
    lab = torch.where(valid, labels, torch.full_like(labels, num_classes))  # invalid = a label of its own
    hi = _shift_reduce(lab, width, torch.maximum)
    lo = _shift_reduce(lab, width, torch.minimum)
    return valid & ((hi != lab) | (lo != lab))


_BITS = 62  # classes packed per int64 word


def _matched_edges(edge: torch.Tensor, labels: torch.Tensor, other_edge: torch.Tensor, other_labels: torch.Tensor,
                   num_classes: int, tolerance: int) -> torch.Tensor:
    """(M, H, W) bool: edge pixels with an edge of the same class in the other map within `tolerance`.

    The other map's per-class edge masks are packed as bits of int64 words and dilated all at once with
    bitwise OR (a per-class dilation without a (M, C, H, W) tensor)."""
    out = torch.zeros_like(edge)
    for start in range(0, num_classes, _BITS):
        in_chunk = other_edge & (other_labels >= start) & (other_labels < start + _BITS)
        if not bool(in_chunk.any()):
            continue
        shift = (other_labels - start).clamp(0, _BITS - 1)
        bits = torch.where(in_chunk, torch.ones_like(shift) << shift, torch.zeros_like(shift))
        if tolerance > 0:
            bits = _shift_reduce(bits, tolerance, torch.bitwise_or)
        mine = edge & (labels >= start) & (labels < start + _BITS)
        hit = (bits >> (labels - start).clamp(0, _BITS - 1)) & 1
        out |= mine & hit.bool()
    return out


def _boundary_stats(pred: torch.Tensor, target: torch.Tensor, valid: torch.Tensor, num_classes: int,
                    spec: BoundarySpec, need: tuple[str, ...] = BOUNDARY_METRICS
                    ) -> tuple[torch.Tensor | None, torch.Tensor | None]:
    """Per-group BIoU band confusion (G, C, C) and BF1 counts (G, C, 4) = n_pred, n_gt, match_pred, match_gt
    (None for a metric not in `need`)."""
    g, n, h, w = pred.shape
    c = num_classes
    m = g * n
    p, t, v = pred.reshape(m, h, w), target.reshape(m, h, w), valid.reshape(m, h, w)
    gt_edge = label_boundaries(t, v, c, spec.width)
    band_conf = None
    if "BIoU" in need:
        band = gt_edge & (t != BACKGROUND_CLASS) if (spec.drop_background and c > 1) else gt_edge
        if spec.definition == "avgpool":
            band = dilate(band, spec.pixels(h, w))
        band_conf = _confusion(pred, target, valid & band.reshape(g, n, h, w), c)
    if "BF1" not in need:
        return band_conf, None

    # the official code masks ignored pixels in the ground truth only: the prediction keeps its labels there
    pr_valid = ((p >= 0) & (p < c)) if spec.evaluator == "autoseg" else v
    pr_edge = label_boundaries(p, pr_valid, c, spec.width)
    img_c = torch.arange(m, device=p.device).view(m, 1, 1) * c
    tolerance = spec.pixels(h, w)
    matched_pr = _matched_edges(pr_edge, p, gt_edge, t, c, tolerance)
    matched_gt = _matched_edges(gt_edge, t, pr_edge, p, c, tolerance)
    counts = torch.stack(
        [torch.bincount((img_c + lab)[mask], minlength=m * c)
         for lab, mask in ((p, pr_edge), (t, gt_edge), (p, matched_pr), (t, matched_gt))],
        dim=-1,
    ).view(m, c, 4)
    return band_conf, counts.view(g, n, c, 4).sum(dim=1)


# ----------------------------------------------------------------------------- scores


def _nanmean(x: torch.Tensor) -> torch.Tensor:
    return torch.nanmean(x, dim=-1)


def class_iou(conf: torch.Tensor) -> torch.Tensor:
    """Per-class IoU (..., C) from confusion matrices (..., C, C); NaN where the union is empty."""
    conf = conf.double()
    tp = conf.diagonal(dim1=-2, dim2=-1)
    union = conf.sum(-1) + conf.sum(-2) - tp
    return tp / union  # 0/0 -> NaN


def region_scores(conf: torch.Tensor, evaluator: str = "lossforge") -> dict[str, torch.Tensor]:
    """gAcc, mAcc, mIoU, FWIoU from confusion matrices (..., C, C) -> tensors of shape (...)."""
    conf = conf.double()
    tp = conf.diagonal(dim1=-2, dim2=-1)
    gt = conf.sum(-1)
    total = gt.sum(-1)
    iou = class_iou(conf)
    weighted = gt / total.unsqueeze(-1) * iou
    if evaluator == "autoseg":  # nanmean(freq · IoU) · C, as the official code
        fw = _nanmean(weighted) * conf.shape[-1]
    else:
        fw = torch.nansum(weighted, dim=-1)
    return {
        "gAcc": tp.sum(-1) / total,
        "mAcc": _nanmean(tp / gt),
        "mIoU": _nanmean(iou),
        "FWIoU": torch.where(total > 0, fw, torch.full_like(fw, float("nan"))),
    }


def class_bf1(counts: torch.Tensor, evaluator: str = "lossforge") -> torch.Tensor:
    """Per-class boundary F1 (..., C) from counts (..., C, 4); NaN when neither map has edges of the class
    (autoseg: NaN when the ground truth has no edges of the class, with the official code's ε)."""
    counts = counts.double()
    n_pr, n_gt, m_pr, m_gt = counts.unbind(-1)
    if evaluator == "autoseg":
        prec = m_pr / (n_pr + 1e-8)
        rec = m_gt / n_gt  # 0/0 -> NaN: the class is skipped
        return 2 * prec * rec / (prec + rec + 1e-8)
    prec = m_pr / n_pr.clamp_min(1)
    rec = m_gt / n_gt.clamp_min(1)
    f1 = torch.where(prec + rec > 0, 2 * prec * rec / (prec + rec).clamp_min(1e-300), torch.zeros_like(prec))
    return torch.where((n_pr == 0) & (n_gt == 0), torch.full_like(f1, float("nan")), f1)


def boundary_scores(band_conf: torch.Tensor, counts: torch.Tensor, drop_background: bool,
                    evaluator: str = "lossforge") -> dict[str, torch.Tensor]:
    """BIoU (IoU per class over the band, class mean) and BF1 (class mean, bg dropped if asked)."""
    return {"BIoU": _nanmean(class_iou(band_conf)),
            "BF1": _nanmean(_bf1_classes(class_bf1(counts, evaluator), drop_background))}


def _bf1_classes(f1: torch.Tensor, drop_background: bool) -> torch.Tensor:
    return f1[..., 1:] if (drop_background and f1.shape[-1] > 1) else f1


# ----------------------------------------------------------------------------- public API


class SegmentationMetrics:
    """Accumulates the six Table-1 metrics over a dataset; `compute()` returns fractions in [0, 1].

    `update` takes integer label maps (N,H,W) (prediction = argmax of the logits) and targets with
    `ignore_index`. See the module docstring for the boundary definitions and the NaN rule; a metric
    with nothing to measure at all (e.g. no valid pixel seen) is NaN.
    """

    def __init__(self, num_classes: int, ignore_index: int | None = 255, *, boundary: str = "avgpool",
                 boundary_width: int = 1, tolerance: int | str = AUTO_TOLERANCE, drop_background: bool | None = None,
                 evaluator: str = "lossforge") -> None:
        if not isinstance(num_classes, int) or num_classes < 1:
            raise LossforgeError(f"num_classes must be a positive integer, got {num_classes!r}")
        self.num_classes = num_classes
        self.ignore_index = ignore_index
        self.spec = BoundarySpec(boundary, boundary_width, tolerance, drop_background, evaluator)
        self.reset()

    def reset(self) -> None:
        """Forget everything accumulated."""
        c = self.num_classes
        self.confusion = torch.zeros(c, c, dtype=torch.int64)
        self.band_confusion = torch.zeros(c, c, dtype=torch.int64)
        self.boundary_counts = torch.zeros(c, 4, dtype=torch.int64)
        self.images = 0

    @torch.no_grad()
    def update(self, pred_labels: torch.Tensor, target: torch.Tensor) -> None:
        """Add a batch of predicted label maps and targets, both (N,H,W) integer (or one (H,W) map)."""
        pred, target, valid = _as_groups(pred_labels, target, self.num_classes, self.ignore_index, per_sample=False)
        self.confusion += _confusion(pred, target, valid, self.num_classes)[0].cpu()
        band_conf, counts = _boundary_stats(pred, target, valid, self.num_classes, self.spec)
        self.band_confusion += band_conf[0].cpu()
        self.boundary_counts += counts[0].cpu()
        self.images += pred.shape[1]

    def compute(self) -> dict[str, float]:
        """The six metrics over everything seen since the last reset, keys = METRIC_NAMES."""
        scores = region_scores(self.confusion, self.spec.evaluator) | boundary_scores(
            self.band_confusion, self.boundary_counts, self.spec.drop_background, self.spec.evaluator
        )
        return {name: float(scores[name]) for name in METRIC_NAMES}

    def per_class(self) -> dict[str, list[float]]:
        """Per-class IoU, accuracy, boundary IoU and boundary F1 (NaN where undefined)."""
        conf = self.confusion.double()
        return {
            "IoU": class_iou(self.confusion).tolist(),
            "Acc": (conf.diagonal() / conf.sum(-1)).tolist(),
            "BIoU": class_iou(self.band_confusion).tolist(),
            "BF1": class_bf1(self.boundary_counts, self.spec.evaluator).tolist(),
        }

    def describe(self) -> str:
        """Which boundary definition / width / tolerance the BIoU and BF1 numbers use."""
        return f"ignore_index={self.ignore_index}; {self.spec.describe()}"


def per_sample_metric(name: str, pred_labels: torch.Tensor, target: torch.Tensor, num_classes: int, *,
                      ignore_index: int | None = 255, boundary: str = "avgpool", boundary_width: int = 1,
                      tolerance: int | str = AUTO_TOLERANCE, drop_background: bool | None = None,
                      evaluator: str = "lossforge") -> torch.Tensor:
    """Metric `name` of each sample on its own -> float64 tensor (B,), vectorised over the batch.

    pred_labels/target: (B,H,W), or (B,N,H,W) where each sample is N images accumulated together.
    """
    name = canonical_metric_name(name)
    spec = BoundarySpec(boundary, boundary_width, tolerance, drop_background, evaluator)
    pred, target, valid = _as_groups(pred_labels, target, num_classes, ignore_index, per_sample=True)
    if name in REGION_METRICS:
        return region_scores(_confusion(pred, target, valid, num_classes), spec.evaluator)[name]
    band_conf, counts = _boundary_stats(pred, target, valid, num_classes, spec, need=(name,))
    if name == "BIoU":
        return _nanmean(class_iou(band_conf))
    return _nanmean(_bf1_classes(class_bf1(counts, spec.evaluator), spec.drop_background))


def metric_function(name: str, num_classes: int, **kw) -> Callable[[torch.Tensor, torch.Tensor], torch.Tensor]:
    """A `(pred_labels, target) -> Tensor (B,)` closure for `per_sample_metric` (checks the name now)."""
    name = canonical_metric_name(name)

    def metric(pred_labels: torch.Tensor, target: torch.Tensor) -> torch.Tensor:
        return per_sample_metric(name, pred_labels, target, num_classes, **kw)

    metric.__name__ = name
    return metric


def compute_metric(name: str, pred_labels: torch.Tensor, target: torch.Tensor, num_classes: int, **kw) -> float:
    """One metric accumulated over all images of (N,H,W) label maps (same rules as SegmentationMetrics)."""
    name = canonical_metric_name(name)
    return float(per_sample_metric(name, pred_labels.unsqueeze(0), target.unsqueeze(0), num_classes, **kw)[0])
