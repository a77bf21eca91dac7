"""Parameterised differentiable surrogates of the six Table-1 segmentation metrics (Auto Seg-Loss §4.1).

The one-hot prediction is relaxed to the softmax probabilities x; each logical operation of a metric gets its
own curve g(·; θ) (components.surrogates.bezier): AND(a, b) → g(a)·g(b), OR(a, b) → g(a) + g(b) − g(a)·g(b),
XOR = OR − AND (boundaries). When one operand is binary (the target, its boundary, its dilated boundary)
g is the identity on it (g(0) = 0, g(1) = 1 exactly), so only the soft operand goes through g.

Curves per metric (names ``"<metric>.<op>"``, as in the official code: 1, 1, 2, 2, 2, 4 curves):
gAcc/mAcc ``and``; mIoU/FWIoU/BIoU ``and``, ``or``; BF1 ``xor_and``, ``xor_or`` (soft prediction
boundary), ``prec_and``, ``recall_and``.

Every sum runs over the whole batch (N, H, W) per class; ignore pixels (label 255) belong to no class
(both x and the one-hot target are zeroed there). Class means, boundaries (width, tolerance, "avgpool" /
"minpool" band, background dropping) and the NaN rule follow components.tasks.segmentation.metrics, so at one-hot
x every surrogate equals its exact metric on the batch: the classes averaged are those the exact metric
averages for the argmax prediction (a mean over no class at all is 1). The soft prediction boundary is
clamp(XOR(x, erode(x)), 0) with erode = (2w+1)² min-pool (padding never counted); at binary maps this
equals both boundary definitions. Ratios use `EPS` in the denominators.

loss = Σ_metric weight · (1 − surrogate). The maths lives in torch-only functions (`surrogate_scores` and
helpers) that `export_surrogate_module_source` copies verbatim into a standalone module.
"""

from __future__ import annotations

import hashlib
import inspect
import json
import math
from collections.abc import Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch
import torch.nn.functional as F
from torch import nn

from components.surrogates import bezier
from components.atomic_io import read_json, write_json_atomic
from components.errors import LossforgeError
from components.tasks.segmentation.metrics import BOUNDARY_DEFINITIONS, canonical_metric_name

FORMAT = "lossforge.surrogate/1"
EPS = 1e-8
METRIC_CURVES: dict[str, tuple[str, ...]] = {
    "gAcc": ("and",),
    "mAcc": ("and",),
    "mIoU": ("and", "or"),
    "FWIoU": ("and", "or"),
    "BIoU": ("and", "or"),
    "BF1": ("xor_and", "xor_or", "prec_and", "recall_and"),
}


# ----------------------------------------------------------------------------- spec


@dataclass(frozen=True)
class SurrogateSpec:
    """A (possibly combined) surrogate: metric weights, curve family, θ per curve and boundary options.

    `theta` maps ``"<metric>.<op>"`` to θ ∈ [0,1]^k; curves left out get the identity θ (naive relaxation).
    Boundary options have the meaning of components.tasks.segmentation.metrics (drop_background None = follow
    the definition: True for "avgpool", False for "minpool").
    """

    metrics: dict[str, float]
    family: str = "bezier"
    pieces: int = 2
    theta: dict[str, list[float]] = field(default_factory=dict)
    boundary: str = "avgpool"
    boundary_width: int = 1
    tolerance: int = 5
    drop_background: bool | None = None
    ignore_index: int = 255

    def __post_init__(self) -> None:
        if not isinstance(self.metrics, Mapping) or not self.metrics:
            raise LossforgeError(f"surrogate metrics: expected a non-empty mapping name -> weight, got {self.metrics!r}")
        metrics: dict[str, float] = {}
        for name, weight in self.metrics.items():
            canon = canonical_metric_name(name)
            if canon in metrics:
                raise LossforgeError(f"surrogate metrics: {name!r} given twice")
            if isinstance(weight, bool) or not isinstance(weight, (int, float)) or not math.isfinite(weight) or weight <= 0:
                raise LossforgeError(f"surrogate metrics.{name}: weight must be a positive number, got {weight!r}")
            metrics[canon] = float(weight)
        # family/pieces checked by bezier
        bezier.num_params(self.family, self.pieces)
        if self.boundary not in BOUNDARY_DEFINITIONS:
            raise LossforgeError(f"surrogate boundary: unknown {self.boundary!r} (valid: {', '.join(BOUNDARY_DEFINITIONS)})")
        for fname, lo in (("boundary_width", 1), ("tolerance", 0)):
            v = getattr(self, fname)
            if isinstance(v, bool) or not isinstance(v, int) or v < lo:
                raise LossforgeError(f"surrogate {fname}: must be an integer >= {lo}, got {v!r}")
        if self.drop_background not in (None, True, False):
            raise LossforgeError(f"surrogate drop_background: must be true, false or null, got {self.drop_background!r}")
        if not isinstance(self.theta, Mapping):
            raise LossforgeError(f"surrogate theta: expected a mapping curve -> list, got {type(self.theta).__name__}")
        names = [f"{m}.{op}" for m in metrics for op in METRIC_CURVES[m]]
        unknown = sorted(set(self.theta) - set(names))
        if unknown:
            raise LossforgeError(f"surrogate theta: unknown curve {unknown[0]!r} (curves of this spec: {', '.join(names)})")
        theta = {
            n: bezier.validate_theta(self.theta[n], self.family, self.pieces, name=f"theta[{n}]")
            if n in self.theta else bezier.identity_theta(self.family, self.pieces)
            for n in names
        }
        object.__setattr__(self, "metrics", metrics)
        object.__setattr__(self, "theta", theta)
        if self.drop_background is None:
            object.__setattr__(self, "drop_background", self.boundary == "avgpool")

    def curve_names(self) -> list[str]:
        """Curve names in the fixed order used by flat_theta (metric order as given, then op order)."""
        return list(self.theta)

    @property
    def dim(self) -> int:
        """Total number of parameters (length of flat_theta)."""
        return len(self.theta) * bezier.num_params(self.family, self.pieces)

    def flat_theta(self) -> list[float]:
        """All θ concatenated in curve_names() order (the PPO search space)."""
        return [v for n in self.curve_names() for v in self.theta[n]]

    def with_flat_theta(self, values) -> SurrogateSpec:
        """A copy whose θ comes from a flat vector of length `dim` (e.g. a PPO sample or μ)."""
        values = [float(v) for v in values]
        if len(values) != self.dim:
            raise LossforgeError(f"surrogate theta: flat vector has {len(values)} values, expected {self.dim}")
        k = bezier.num_params(self.family, self.pieces)
        theta = {n: values[i * k:(i + 1) * k] for i, n in enumerate(self.curve_names())}
        return SurrogateSpec(**{**self.to_dict(include_points=False, include_format=False), "theta": theta})

    def identity(self) -> SurrogateSpec:
        """The same spec with identity θ everywhere (the naive relaxation, Eq. 8)."""
        return SurrogateSpec(**{**self.to_dict(include_points=False, include_format=False), "theta": {}})

    def hash(self) -> str:
        """Short content hash (sha256 of the canonical JSON without control points, first 16 hex chars)."""
        text = json.dumps(self.to_dict(include_points=False), sort_keys=True, separators=(",", ":"))
        return hashlib.sha256(text.encode("utf-8")).hexdigest()[:16]

    def control_points(self) -> dict[str, list[list[float]]]:
        """Control points (Bézier) or knots (linear) of every curve, endpoints included."""
        return {n: [list(p) for p in bezier.control_points(t, self.family, self.pieces)] for n, t in self.theta.items()}

    def to_dict(self, include_points: bool = True, include_format: bool = True) -> dict[str, Any]:
        """JSON-able dict (format lossforge.surrogate/1); control points are informative, θ is authoritative."""
        out: dict[str, Any] = {"format": FORMAT} if include_format else {}
        out |= {
            "metrics": dict(self.metrics),
            "family": self.family,
            "pieces": self.pieces,
            "theta": {n: list(t) for n, t in self.theta.items()},
            "boundary": self.boundary,
            "boundary_width": self.boundary_width,
            "tolerance": self.tolerance,
            "drop_background": self.drop_background,
            "ignore_index": self.ignore_index,
        }
        if include_points:
            out["control_points"] = self.control_points()
        return out

    @classmethod
    def from_dict(cls, data: Mapping[str, Any], source: str = "surrogate") -> SurrogateSpec:
        """Rebuild from to_dict() output; errors name `source` and the bad field."""
        if not isinstance(data, Mapping):
            raise LossforgeError(f"{source}: expected a JSON object, got {type(data).__name__}")
        fmt = data.get("format", FORMAT)
        if fmt != FORMAT:
            raise LossforgeError(f"{source}: format {fmt!r} is not {FORMAT!r}")
        known = {"metrics", "family", "pieces", "theta", "boundary", "boundary_width", "tolerance",
                 "drop_background", "ignore_index"}
        extra = set(data) - known - {"format", "control_points", "meta"}
        if extra:
            raise LossforgeError(f"{source}: unknown field {sorted(extra)[0]!r}")
        if "metrics" not in data:
            raise LossforgeError(f"{source}: missing field 'metrics'")
        try:
            spec = cls(**{k: data[k] for k in known if k in data})
        except LossforgeError as exc:
            raise LossforgeError(f"{source}: {exc}") from None
        except TypeError as exc:
            raise LossforgeError(f"{source}: {exc}") from None
        points = data.get("control_points")
        if points is not None:
            expected = spec.control_points()
            ok = isinstance(points, Mapping) and set(points) == set(expected) and all(
                len(points[n]) == len(expected[n])
                and all(abs(float(a) - b) <= 1e-6 for p, q in zip(points[n], expected[n]) for a, b in zip(p, q))
                for n in expected
            )
            if not ok:
                raise LossforgeError(f"{source}: control_points do not match theta (theta is authoritative; drop control_points or fix theta)")
        return spec


def save_surrogate(spec: SurrogateSpec, path, meta: Mapping[str, Any] | None = None) -> Path:
    """Write the spec (θ and control points, optional `meta` such as the search reward) as lossforge.surrogate/1 JSON."""
    data = spec.to_dict()
    if meta:
        data["meta"] = dict(meta)
    return write_json_atomic(path, data)


def load_surrogate(path) -> SurrogateSpec:
    """Read a lossforge.surrogate/1 JSON file; any problem is a LossforgeError naming the file."""
    return SurrogateSpec.from_dict(read_json(path), source=str(path))


# ----------------------------------------------------------------------------- torch-only maths (exported verbatim)


class PairMax(torch.autograd.Function):
    """Element-wise maximum whose backward routes the gradient by one saved bool mask (ties go to `a`):
    cheaper than torch.maximum's backward, which dominates the cost of the soft boundary maps."""

    @staticmethod
    def forward(ctx, a, b):
        ctx.save_for_backward(a >= b)
        return torch.maximum(a, b)

    @staticmethod
    def backward(ctx, grad):
        (take_a,) = ctx.saved_tensors
        grad_a = grad * take_a
        return grad_a, grad - grad_a


def max_filter(x: torch.Tensor, radius: int, dim: int) -> torch.Tensor:
    """Sliding maximum over a window of 2·radius + 1 along `dim` (stride 1, padding never counted).

    Built from log2(window) element-wise maxima of shifted views (on CPU much faster than max_pool2d)."""
    if radius <= 0:
        return x
    n, w = x.shape[dim], 2 * radius + 1
    pad = [0, 0] * (x.dim() - 1 - dim % x.dim()) + [radius, radius]
    pair_max = PairMax.apply if x.requires_grad else torch.maximum
    m, span = F.pad(x, pad, value=float("-inf")), 1
    while span * 2 <= w:
        m = pair_max(m.narrow(dim, 0, m.shape[dim] - span), m.narrow(dim, span, m.shape[dim] - span))
        span *= 2
    return pair_max(m.narrow(dim, 0, n), m.narrow(dim, w - span, n))


def erode(x: torch.Tensor, width: int) -> torch.Tensor:
    """(2w+1)² min-pool of (N,C,H,W) maps, stride 1; the padding is never counted."""
    return -max_filter(max_filter(-x, width, -1), width, -2)


def dilate_soft(x: torch.Tensor, radius: int) -> torch.Tensor:
    """(2r+1)² max-pool of (N,C,H,W) maps, stride 1; the padding is never counted."""
    return max_filter(max_filter(x, radius, -1), radius, -2)


def one_hot_maps(labels: torch.Tensor, num_classes: int, valid: torch.Tensor, dtype: torch.dtype) -> torch.Tensor:
    """(N,H,W) labels in [0, C) -> (N,C,H,W) one-hot maps in `dtype`, zero where valid (N,1,H,W) is 0."""
    shape = (labels.shape[0], num_classes) + tuple(labels.shape[1:])
    out = torch.zeros(shape, dtype=dtype, device=labels.device).scatter_(1, labels.unsqueeze(1), 1.0)
    return out.mul_(valid)


def class_mean(values: torch.Tensor, selected: torch.Tensor) -> torch.Tensor:
    """Mean of per-class values (C,) over the selected classes; 1 when no class is selected."""
    sel = selected.to(values.dtype)
    count = sel.sum()
    mean = (values * sel).sum() / count.clamp_min(1.0)
    return torch.where(count > 0, mean, torch.ones_like(mean))


def surrogate_scores(probs: torch.Tensor, target: torch.Tensor, curves, metrics, ignore_index: int = 255,
                     boundary: str = "avgpool", boundary_width: int = 1, tolerance: int = 5,
                     drop_background: bool = True, eps: float = 1e-8) -> dict:
    """Surrogate score (scalar tensor, 1 = perfect) of each metric in `metrics` on a batch.

    probs (N,C,H,W) class probabilities, target (N,H,W) labels with `ignore_index`; curves maps
    "<metric>.<op>" to a callable g applied element-wise.
    """
    n_cls = probs.shape[1]
    with torch.no_grad():  # everything derived from the target or the argmax is a constant
        invalid = target == ignore_index
        valid = (~invalid).unsqueeze(1).to(probs.dtype)
        y = one_hot_maps(target.masked_fill(invalid, 0), n_cls, valid, probs.dtype)
        # one-hot argmax prediction, only used to pick the classes the exact metric averages over
        # (exactly tied probabilities mark every tied class)
        hard = (probs >= probs.amax(1, keepdim=True)).to(probs.dtype).mul_(valid)
        gt = y.sum((0, 2, 3))
        y_edge = y - erode(y, boundary_width) if ("BIoU" in metrics or "BF1" in metrics) else None
    x = probs * valid
    dims = (0, 2, 3)
    out = {}
    for name in metrics:
        if name in ("gAcc", "mAcc"):
            inter = (curves[name + ".and"](x) * y).sum(dims)
            if name == "gAcc":
                total = gt.sum()
                out[name] = torch.where(total > 0, inter.sum() / total.clamp_min(eps), torch.ones_like(total))
            else:
                out[name] = class_mean(inter / (gt + eps), gt > 0)
        elif name in ("mIoU", "FWIoU", "BIoU"):
            gx_and, gx_or, y_in, hard_in = curves[name + ".and"](x), curves[name + ".or"](x), y, hard
            if name == "BIoU":
                with torch.no_grad():
                    src = y_edge[:, 1:] if (drop_background and n_cls > 1) else y_edge
                    region = src.amax(1, keepdim=True)
                    if boundary == "avgpool":
                        region = dilate_soft(region, tolerance)
                    y_in, hard_in = y * region, hard * region
                gx_and, gx_or = gx_and * region, gx_or * region
            inter = (gx_and * y_in).sum(dims)
            gt_in = y_in.sum(dims)
            union = gx_or.sum(dims) + gt_in - (gx_or * y_in).sum(dims)  # Σ OR(x, y) = Σ g + Σ y − Σ g·y
            iou = inter / (union + eps)
            if name == "FWIoU":
                total = gt.sum()
                fw = (gt / total.clamp_min(eps) * iou).sum()
                out[name] = torch.where(total > 0, fw, torch.ones_like(fw))
            else:
                out[name] = class_mean(iou, (gt_in > 0) | (hard_in.sum(dims) > 0))
        elif name == "BF1":
            ex = erode(x, boundary_width)
            g_or, g_and = curves["BF1.xor_or"], curves["BF1.xor_and"]
            ox, oe = g_or(x), g_or(ex)
            x_edge = (ox + oe - ox * oe - g_and(x) * g_and(ex)).clamp_min(0.0)
            with torch.no_grad():
                hard_edge = hard - erode(hard, boundary_width)
                y_edge_dilated = dilate_soft(y_edge, tolerance)
                n_gt = y_edge.sum(dims)
            prec = (curves["BF1.prec_and"](x_edge) * y_edge_dilated).sum(dims) / (x_edge.sum(dims) + eps)
            rec = (curves["BF1.recall_and"](dilate_soft(x_edge, tolerance)) * y_edge).sum(dims) / (n_gt + eps)
            f1 = 2.0 * prec * rec / (prec + rec + eps)
            has_edges = (n_gt > 0) | (hard_edge.sum(dims) > 0)
            if drop_background and n_cls > 1:
                has_edges = has_edges & (torch.arange(n_cls, device=probs.device) > 0)
            out[name] = class_mean(f1, has_edges)
        else:
            raise ValueError(f"unknown metric {name!r}")
    return out


# the torch-only maths above, copied verbatim by export_surrogate_module_source
SOURCE_OBJECTS = (PairMax, max_filter, erode, dilate_soft, one_hot_maps, class_mean, surrogate_scores)


# ----------------------------------------------------------------------------- nn.Module


class SurrogateLoss(nn.Module):
    """Auto Seg-Loss surrogate loss: forward(logits (N,C,H,W), target (N,H,W)) -> Σ weight·(1 − surrogate).

    Softmax over C gives the relaxed one-hot prediction; target label `ignore_index` (255) is masked out.
    Accepts a SurrogateSpec or its dict form.
    """

    def __init__(self, spec: SurrogateSpec | Mapping[str, Any], num_classes: int):
        super().__init__()
        if not isinstance(spec, SurrogateSpec):
            spec = SurrogateSpec.from_dict(spec)
        if isinstance(num_classes, bool) or not isinstance(num_classes, int) or num_classes < 1:
            raise LossforgeError(f"surrogate loss: num_classes must be a positive integer, got {num_classes!r}")
        self.spec = spec
        self.num_classes = num_classes
        self.curves = nn.ModuleDict(
            {n.replace(".", "__"): bezier.PiecewiseCurve(t, spec.family, spec.pieces) for n, t in spec.theta.items()}
        )

    def curve(self, name: str) -> bezier.PiecewiseCurve:
        """The curve g of one logical operation, e.g. ``curve("mIoU.and")``."""
        return self.curves[name.replace(".", "__")]

    def scores(self, logits: torch.Tensor, target: torch.Tensor) -> dict[str, torch.Tensor]:
        """Surrogate score of each metric (1 = perfect) on the batch."""
        if logits.dim() != 4 or logits.shape[1] != self.num_classes:
            raise LossforgeError(
                f"surrogate loss: logits must be (N, {self.num_classes}, H, W), got shape {tuple(logits.shape)}"
            )
        if target.shape != (logits.shape[0],) + tuple(logits.shape[2:]):
            raise LossforgeError(f"surrogate loss: target shape {tuple(target.shape)} does not match logits {tuple(logits.shape)}")
        target = target.long()
        bad = (target != self.spec.ignore_index) & ((target < 0) | (target >= self.num_classes))
        if bool(bad.any()):
            raise LossforgeError(
                f"surrogate loss: target label {int(target[bad][0])} outside [0, {self.num_classes}) and not {self.spec.ignore_index}"
            )
        probs = torch.softmax(logits.float(), dim=1)
        curves = {n: self.curve(n) for n in self.spec.theta}
        s = self.spec
        return surrogate_scores(probs, target, curves, list(s.metrics), s.ignore_index, s.boundary,
                                s.boundary_width, s.tolerance, bool(s.drop_background), EPS)

    def forward(self, logits: torch.Tensor, target: torch.Tensor) -> torch.Tensor:
        scores = self.scores(logits, target)
        return sum(w * (1.0 - scores[m]) for m, w in self.spec.metrics.items())


# ----------------------------------------------------------------------------- standalone export

_EXPORT_TEMPLATE = '''"""Searched Auto Seg-Loss surrogate loss, exported by Lossforge (standalone: needs only torch).

Metrics and weights: {metrics}. Curve family: {pieces}-piece {family}.
loss = sum(weight * (1 - surrogate)); forward(logits (N,C,H,W), target (N,H,W) with {ignore_index} ignored).
"""

import torch
import torch.nn.functional as F
from torch import nn

EPS = {eps!r}
METRICS = {metrics!r}
FAMILY = {family!r}
BOUNDARY = {boundary!r}
BOUNDARY_WIDTH = {boundary_width!r}
TOLERANCE = {tolerance!r}
DROP_BACKGROUND = {drop_background!r}
IGNORE_INDEX = {ignore_index!r}
THETA = {theta!r}
# per curve: (interior knots, per-piece rows), see Lossforge components/bezier.curve_tables
CURVE_TABLES = {tables!r}


{maths}


class _Curve(nn.Module):
    def __init__(self, knots, rows):
        super().__init__()
        self.knots, self.rows = knots, rows

    def forward(self, y):
        return {kernel_name}(y, self.knots, self.rows)


class {class_name}(nn.Module):
    """Searched surrogate loss for {metrics_names}."""

    def __init__(self):
        super().__init__()
        self.curves = nn.ModuleDict({{n.replace(".", "__"): _Curve(*t) for n, t in CURVE_TABLES.items()}})

    def forward(self, logits, target):
        target = target.long()
        probs = torch.softmax(logits.float(), dim=1)
        curves = {{n: self.curves[n.replace(".", "__")] for n in CURVE_TABLES}}
        scores = surrogate_scores(probs, target, curves, list(METRICS), IGNORE_INDEX, BOUNDARY,
                                  BOUNDARY_WIDTH, TOLERANCE, DROP_BACKGROUND, EPS)
        return sum(w * (1.0 - scores[m]) for m, w in METRICS.items())
'''


def export_surrogate_module_source(spec: SurrogateSpec, class_name: str = "SearchedSurrogateLoss") -> str:
    """Source of a standalone .py (imports only torch) defining `class_name`, an nn.Module equal to SurrogateLoss(spec)."""
    if not class_name.isidentifier():
        raise LossforgeError(f"export: class name {class_name!r} is not a Python identifier")
    kernel = bezier.KERNELS[spec.family]
    tables = {n: bezier.curve_tables(t, spec.family, spec.pieces) for n, t in spec.theta.items()}
    return _EXPORT_TEMPLATE.format(
        eps=EPS, metrics=dict(spec.metrics), family=spec.family, pieces=spec.pieces, boundary=spec.boundary,
        boundary_width=spec.boundary_width, tolerance=spec.tolerance, drop_background=bool(spec.drop_background),
        ignore_index=spec.ignore_index, theta=dict(spec.theta), tables=tables,
        maths="\n\n".join(inspect.getsource(obj) for obj in bezier.KERNEL_SOURCE_OBJECTS + SOURCE_OBJECTS),
        kernel_name=kernel.__name__, class_name=class_name, metrics_names=" + ".join(spec.metrics),
    )


def write_surrogate_module(spec: SurrogateSpec, path, class_name: str = "SearchedSurrogateLoss") -> Path:
    """Write export_surrogate_module_source(spec) to `path`."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(export_surrogate_module_source(spec, class_name), encoding="utf-8")
    return path


def curve_plot_data(spec: SurrogateSpec, points: int = 101) -> dict[str, tuple[list[float], list[float]]]:
    """(ys, g(ys)) of every curve of the spec, for plots of the searched g functions."""
    return {n: bezier.sample_curve(t, spec.family, spec.pieces, points) for n, t in spec.theta.items()}
