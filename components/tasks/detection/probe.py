"""The loss-rejection probe for detection (AutoLoss-Zero §3.2, A.2): fixed anchors and proposals with the
raw predictions of a randomly initialised Faster R-CNN, optimised directly by the protocol.

What is fixed (drawn once per probe, seeded): B images resized to `size`; per image ``rpn_samples``
anchors (``rpn_positives`` positives by torchvision's RPN matcher, IoU ≥ 0.7 or the best anchor of a box,
the rest negatives, IoU < 0.3) and ``rcnn_samples`` proposals (``rcnn_positives`` positives: ground-truth
boxes jittered to IoU ≥ 0.5 with their box, like the proposals of a half-trained RPN; negatives: the random
network's own RPN proposals with IoU < 0.5, topped up with random boxes). Positives are drawn so that
every ground-truth box has at least one (then uniformly, with replacement when there are too few), so a
perfect prediction detects every object. Fixed counts per image mean no padding: every tree input is real.

What is optimised (the predictions, one flat vector per image, ``(B, D)``): the RPN objectness logits of
the sampled anchors, the RPN deltas of its positives, the RCNN class logits (K + 1) of the sampled
proposals and the RCNN deltas (of the target class) of its positives — the network outputs each branch's
loss sees in training. ``build_inputs`` turns them into the four branches' tree inputs exactly as the
training hooks do (``components.tasks.detection.losses``: y_hat = softmax, RPN as [0, x]; i, u, e of the
decoded box and its target), so a candidate is screened on the inputs it will be trained on.

ξ per image (higher is better, no gradient needed): the mean of two APs on the fixed samples, with the IoU
thresholds of the target metric (mAP: .5:.95, AP50, AP75) — RPN: class-agnostic AP of the proposals (each
sampled anchor, positives moved by their deltas, scored by σ(objectness), NMS 0.7 as the RPN); RCNN: AP of
the detections (each proposal, positives moved by their deltas, one detection per foreground class scored
by its softmax probability, per-class NMS 0.5 as torchvision's post-processing). ``perfect_predictions``
(logit ±20 / 20 on the right class, exact deltas) give ξ_max (≈ 1) for the normalised gain.

Branch subsets (``branches=``): the paper screens each branch "with the predictions of the other branches
set as the ground-truth targets"; with ``branches=("reg_rpn",)`` the other branches' entries of the initial
predictions are their perfect values, so ξ moves only through the branch under test.
"""

from __future__ import annotations

import hashlib
import json
import random
from dataclasses import dataclass
from typing import Any, Sequence

import torch
import torch.nn.functional as F
from torch import Tensor
from torchvision.models.detection import _utils as det_utils
from torchvision.ops import batched_nms, box_iou, nms

from components.errors import LossforgeError
from components.search.screening import ScreeningProblem
from components.tasks.detection.losses import BRANCHES, regression_inputs, rpn_logits
from components.tasks.detection.metrics import IOU_THRESHOLDS, canonical_metric_name, image_average_precision

PERFECT_LOGIT = 20.0
RPN_WEIGHTS = (1.0, 1.0, 1.0, 1.0)
RCNN_WEIGHTS = (10.0, 10.0, 5.0, 5.0)


@dataclass(frozen=True)
class ProbeLayout:
    """Where each branch's predictions sit in a probe sample's flat vector."""

    rpn_samples: int
    rpn_positives: int
    rcnn_samples: int
    rcnn_positives: int
    num_classes: int

    @property
    def slices(self) -> dict[str, slice]:
        """Branch -> slice of the flat vector (cls_rpn, reg_rpn, cls_rcnn, reg_rcnn in this order)."""
        sizes = {"cls_rpn": self.rpn_samples, "reg_rpn": 4 * self.rpn_positives,
                 "cls_rcnn": self.rcnn_samples * self.num_classes, "reg_rcnn": 4 * self.rcnn_positives}
        out, start = {}, 0
        for name in BRANCHES:
            out[name] = slice(start, start + sizes[name])
            start += sizes[name]
        return out

    @property
    def size(self) -> int:
        return self.slices["reg_rcnn"].stop

    def split(self, pred: Tensor) -> dict[str, Tensor]:
        """The four prediction tensors of `pred` (B, D): objectness (B, N1), deltas (B, P1, 4),
        class logits (B, N2, K+1), deltas (B, P2, 4)."""
        s = self.slices
        b = pred.shape[0]
        return {"cls_rpn": pred[:, s["cls_rpn"]],
                "reg_rpn": pred[:, s["reg_rpn"]].reshape(b, self.rpn_positives, 4),
                "cls_rcnn": pred[:, s["cls_rcnn"]].reshape(b, self.rcnn_samples, self.num_classes),
                "reg_rcnn": pred[:, s["reg_rcnn"]].reshape(b, self.rcnn_positives, 4)}


class ProbeData:
    """The fixed part of the probe (stacked per image; positives first in every sample list)."""

    def __init__(self, layout: ProbeLayout, rpn_anchors: Tensor, rpn_gt: Tensor, rpn_labels: Tensor,
                 rcnn_proposals: Tensor, rcnn_gt: Tensor, rcnn_labels: Tensor, gt_boxes: list[Tensor],
                 gt_labels: list[Tensor]):
        self.layout = layout
        self.rpn_anchors, self.rpn_gt, self.rpn_labels = rpn_anchors, rpn_gt, rpn_labels  # (B,N1,4) (B,P1,4) (B,N1)
        self.rcnn_proposals, self.rcnn_gt, self.rcnn_labels = rcnn_proposals, rcnn_gt, rcnn_labels  # (B,N2,4) (B,P2,4) (B,N2)
        self.gt_boxes, self.gt_labels = gt_boxes, gt_labels
        self.rpn_coder = det_utils.BoxCoder(RPN_WEIGHTS)
        self.rcnn_coder = det_utils.BoxCoder(RCNN_WEIGHTS)

    def decode(self, parts: dict[str, Tensor], idx: Tensor) -> tuple[Tensor, Tensor]:
        """Decoded positive boxes (B, P1, 4) of the RPN and (B, P2, 4) of the RCNN for samples `idx`."""
        p1, p2 = self.layout.rpn_positives, self.layout.rcnn_positives
        anchors = self.rpn_anchors[idx][:, :p1]
        props = self.rcnn_proposals[idx][:, :p2]
        rpn = self.rpn_coder.decode_single(parts["reg_rpn"].reshape(-1, 4), anchors.reshape(-1, 4))
        rcnn = self.rcnn_coder.decode_single(parts["reg_rcnn"].reshape(-1, 4), props.reshape(-1, 4))
        return rpn.reshape(anchors.shape), rcnn.reshape(props.shape)

    def perfect(self) -> Tensor:
        """The predictions that reproduce the targets: (B, D)."""
        lay = self.layout
        b = self.rpn_labels.shape[0]
        obj = torch.where(self.rpn_labels > 0, PERFECT_LOGIT, -PERFECT_LOGIT).float()
        rpn_d = self.rpn_coder.encode_single(self.rpn_gt.reshape(-1, 4), self.rpn_anchors[:, :lay.rpn_positives].reshape(-1, 4))
        logits = F.one_hot(self.rcnn_labels, lay.num_classes).float() * PERFECT_LOGIT
        rcnn_d = self.rcnn_coder.encode_single(self.rcnn_gt.reshape(-1, 4),
                                               self.rcnn_proposals[:, :lay.rcnn_positives].reshape(-1, 4))
        return torch.cat([obj, rpn_d.reshape(b, -1), logits.reshape(b, -1), rcnn_d.reshape(b, -1)], dim=1).contiguous()


class DetectionProbeInputs:
    """build_inputs of the probe: {branch: tree inputs} from the flat predictions, as the training hooks build them."""

    def __init__(self, data: ProbeData):
        self.data = data
        self._cache: dict[tuple, tuple[dict, dict]] = {}

    def _targets(self, idx: Tensor, dtype: torch.dtype) -> tuple[dict, dict]:
        key = (tuple(idx.tolist()), dtype)
        if key not in self._cache:
            lay = self.data.layout
            y_rpn = F.one_hot(self.data.rpn_labels[idx], 2).to(dtype)[..., None, None]
            y_rcnn = F.one_hot(self.data.rcnn_labels[idx], lay.num_classes).to(dtype)[..., None, None]
            if len(self._cache) > 16:
                self._cache.clear()
            self._cache[key] = ({"y": y_rpn, "1": torch.ones_like(y_rpn)}, {"y": y_rcnn, "1": torch.ones_like(y_rcnn)})
        return self._cache[key]

    def __call__(self, pred: Tensor, targets: Tensor) -> dict[str, dict[str, Tensor]]:
        idx = targets.long().reshape(-1)
        parts = self.data.layout.split(pred)
        rpn_y, rcnn_y = self._targets(idx, pred.dtype)
        rpn_boxes, rcnn_boxes = self.data.decode(parts, idx)
        return {
            "cls_rpn": {"y_hat": torch.softmax(rpn_logits(parts["cls_rpn"]), dim=-1)[..., None, None], **rpn_y},
            "reg_rpn": regression_inputs(rpn_boxes, self.data.rpn_gt[idx]),
            "cls_rcnn": {"y_hat": torch.softmax(parts["cls_rcnn"], dim=-1)[..., None, None], **rcnn_y},
            "reg_rcnn": regression_inputs(rcnn_boxes, self.data.rcnn_gt[idx]),
        }


class DetectionProbeMetric:
    """ξ per sample: mean of the RPN proposals' class-agnostic AP and the RCNN detections' AP (module doc)."""

    def __init__(self, data: ProbeData, metric: str):
        self.data = data
        self.name = canonical_metric_name(metric)
        self.thresholds = IOU_THRESHOLDS[self.name]

    def __call__(self, pred: Tensor, targets: Tensor) -> Tensor:
        idx = targets.long().reshape(-1)
        pred = pred.detach().float()
        parts = self.data.layout.split(pred)
        rpn_pos, rcnn_pos = self.data.decode(parts, idx)
        out = []
        for row, i in enumerate(idx.tolist()):
            out.append(0.5 * (self._rpn_ap(parts, rpn_pos, row, i) + self._rcnn_ap(parts, rcnn_pos, row, i)))
        return torch.tensor(out, dtype=torch.float64)

    def _rpn_ap(self, parts, rpn_pos, row: int, i: int) -> float:
        boxes = self.data.rpn_anchors[i].clone()
        boxes[: rpn_pos.shape[1]] = rpn_pos[row]
        scores = torch.sigmoid(parts["cls_rpn"][row])
        keep = _finite(boxes, scores)
        boxes, scores = boxes[keep], scores[keep]
        keep = nms(boxes, scores, 0.7)
        gt = self.data.gt_boxes[i]
        return _ap(boxes[keep], scores[keep], torch.ones(len(keep)), gt, torch.ones(len(gt)), self.thresholds)

    def _rcnn_ap(self, parts, rcnn_pos, row: int, i: int) -> float:
        boxes = self.data.rcnn_proposals[i].clone()
        boxes[: rcnn_pos.shape[1]] = rcnn_pos[row]
        probs = torch.softmax(parts["cls_rcnn"][row], dim=-1)[:, 1:]  # (N2, K)
        n, k = probs.shape
        det_boxes = boxes[:, None, :].expand(n, k, 4).reshape(-1, 4)
        det_scores = probs.reshape(-1)
        det_labels = torch.arange(1, k + 1).repeat(n)
        keep = _finite(det_boxes, det_scores)
        det_boxes, det_scores, det_labels = det_boxes[keep], det_scores[keep], det_labels[keep]
        keep = batched_nms(det_boxes, det_scores, det_labels, 0.5)
        return _ap(det_boxes[keep], det_scores[keep], det_labels[keep], self.data.gt_boxes[i], self.data.gt_labels[i],
                   self.thresholds)


def _finite(boxes: Tensor, scores: Tensor) -> Tensor:
    return torch.isfinite(boxes).all(dim=1) & torch.isfinite(scores)


def _ap(boxes, scores, labels, gt_boxes, gt_labels, thresholds) -> float:
    value = image_average_precision(boxes, scores, labels, gt_boxes, gt_labels, thresholds)
    return 0.0 if value != value else value  # NaN (no ground truth) counts as 0


# ---------------------------------------------------------------------------------------------- building
def _pick(candidates_by_gt: list[Tensor], count: int, rng: torch.Generator) -> Tensor:
    """`count` indices: one random candidate per ground-truth box first (in random order), then uniform
    draws from all candidates (with replacement only when there are too few)."""
    chosen: list[int] = []
    order = torch.randperm(len(candidates_by_gt), generator=rng).tolist()
    for g in order:
        c = candidates_by_gt[g]
        if len(c) and len(chosen) < count:
            chosen.append(int(c[torch.randint(len(c), (1,), generator=rng)]))
    pool = torch.cat([c for c in candidates_by_gt if len(c)]) if any(len(c) for c in candidates_by_gt) else None
    if pool is None:
        raise LossforgeError("detection probe: an image has no positive sample")
    rest = [int(v) for v in pool[torch.randperm(len(pool), generator=rng)] if int(v) not in chosen]
    while len(chosen) < count:
        if rest:
            chosen.append(rest.pop(0))
        else:
            chosen.append(int(pool[torch.randint(len(pool), (1,), generator=rng)]))
    return torch.tensor(chosen[:count], dtype=torch.long)


def _jitter(gt: Tensor, rng: torch.Generator, tries: int = 20) -> Tensor:
    """A box near `gt` (4,) with IoU ≥ 0.5 to it (centre shift ≤ 20 %, size ×0.7–1.4; `gt` itself if none found)."""
    w, h = gt[2] - gt[0], gt[3] - gt[1]
    cx, cy = gt[0] + w / 2, gt[1] + h / 2
    for _ in range(tries):
        r = torch.rand(4, generator=rng)
        ncx, ncy = cx + (r[0] - 0.5) * 0.4 * w, cy + (r[1] - 0.5) * 0.4 * h
        nw, nh = w * torch.exp((r[2] - 0.5) * 0.7), h * torch.exp((r[3] - 0.5) * 0.7)
        box = torch.stack([ncx - nw / 2, ncy - nh / 2, ncx + nw / 2, ncy + nh / 2])
        if float(box_iou(box[None], gt[None])[0, 0]) >= 0.55:
            return box
    return gt.clone()


def _random_boxes(count: int, size: int, rng: torch.Generator) -> Tensor:
    xy = torch.rand(count, 2, generator=rng) * size * 0.8
    wh = (0.1 + 0.4 * torch.rand(count, 2, generator=rng)) * size
    return torch.cat([xy, (xy + wh).clamp(max=size)], dim=1)


def build_screening_problem(
    dataset: Any,
    metric: str = "mAP",
    samples: int = 5,
    size: int = 64,
    seed: int = 0,
    *,
    model: Any = "cpu",
    branches: Sequence[str] | None = None,
    rpn_samples: int = 32,
    rpn_positives: int = 8,
    rcnn_samples: int = 32,
    rcnn_positives: int = 8,
    indices: Sequence[int] | None = None,
) -> ScreeningProblem:
    """The detection probe (module doc) on `samples` images of `dataset` (items ``(image, {"boxes", "labels"})``)
    resized to `size` (the model's min/max size), predictions of a random `model` (preset name or
    DetectorConfig of components.tasks.detection.models) seeded by `seed`; `branches`: screen only these
    (the others start at their targets)."""
    import dataclasses

    from components.tasks.detection.models import INIT_LOCK, build_detector, model_preset

    name = canonical_metric_name(metric)
    chosen_branches = tuple(BRANCHES if branches is None else branches)
    unknown = [b for b in chosen_branches if b not in BRANCHES]
    if unknown or not chosen_branches:
        raise LossforgeError(f"detection probe: branches must be a non-empty subset of {', '.join(BRANCHES)}, got {branches}")
    if samples < 1 or size < 16:
        raise LossforgeError(f"detection probe: samples must be >= 1 and size >= 16, got {samples} and {size}")
    if not (0 < rpn_positives < rpn_samples and 0 < rcnn_positives < rcnn_samples):
        raise LossforgeError("detection probe: need 0 < positives < samples for the RPN and the RCNN")
    num_classes = int(dataset.num_classes)
    n = len(dataset)
    if indices is None:
        with_boxes = [i for i in range(n) if _num_boxes(dataset, i) > 0]
        if len(with_boxes) < samples:
            raise LossforgeError(f"detection probe: the dataset has {len(with_boxes)} images with boxes, the probe needs {samples}")
        indices = sorted(random.Random(seed).sample(with_boxes, samples))
    elif len(indices) != samples:
        raise LossforgeError(f"detection probe: {len(indices)} indices given for {samples} samples")
    layout = ProbeLayout(rpn_samples, rpn_positives, rcnn_samples, rcnn_positives, num_classes)
    items = [dataset[i] for i in indices]
    images = [img.float() for img, _ in items]
    targets = [{"boxes": t["boxes"].float(), "labels": t["labels"].long()} for _, t in items]
    if any(len(t["boxes"]) == 0 for t in targets):
        raise LossforgeError("detection probe: every probe image needs at least one box")
    cfg = dataclasses.replace(model_preset(model), min_size=size, max_size=size)
    with INIT_LOCK, torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed)
        net = build_detector(cfg, num_classes)
    net.eval()
    rng = torch.Generator().manual_seed(seed + 1)  # the sample draws (no global RNG is used from here on)
    with torch.no_grad():
        pred, data = _sample(net, images, targets, layout, rng, size)
    perfect = data.perfect()
    init = pred.clone()
    for b in BRANCHES:
        if b not in chosen_branches:
            init[:, layout.slices[b]] = perfect[:, layout.slices[b]]
    payload = {"task": "detection", "metric": name, "samples": samples, "size": size, "seed": seed,
               "model": dataclasses.asdict(cfg), "branches": list(chosen_branches), "layout": dataclasses.asdict(layout),
               "indices": list(indices)}
    digest = hashlib.sha256(json.dumps(payload, sort_keys=True, default=str).encode())
    for t in (init, perfect, data.rpn_anchors, data.rcnn_proposals):
        digest.update(t.numpy().tobytes())
    suffix = "" if branches is None else "+" + ",".join(chosen_branches)
    return ScreeningProblem(
        init_predictions=init.contiguous(),
        targets=torch.arange(samples),
        build_inputs=DetectionProbeInputs(data),
        metric=DetectionProbeMetric(data, name),
        key=f"detection/{name}{suffix}/{digest.hexdigest()[:20]}",
        task="detection",
        metric_name=name,
        perfect_predictions=perfect,
    )


def _num_boxes(dataset: Any, index: int) -> int:
    samples = getattr(dataset, "samples", None)
    if samples is not None and hasattr(dataset, "target_boxes"):  # DetectionDataset: no image read
        return int(dataset.target_boxes(samples[index])[0].shape[0])
    return int(dataset[index][1]["boxes"].shape[0])


def _sample(net, images: list[Tensor], targets: list[dict], layout: ProbeLayout, rng: torch.Generator, size: int
            ) -> tuple[Tensor, ProbeData]:
    """Run the random network once: the fixed samples and their raw predictions (module doc)."""
    from torchvision.models.detection.rpn import concat_box_prediction_layers

    image_list, targets = net.transform(images, targets)
    features = net.backbone(image_list.tensors)
    feats = list(features.values())
    objectness, deltas = net.rpn.head(feats)
    anchors = net.rpn.anchor_generator(image_list, feats)
    objectness, deltas = concat_box_prediction_layers(objectness, deltas)
    b = len(images)
    objectness = objectness.reshape(b, -1)
    deltas = deltas.reshape(b, -1, 4)
    labels, _ = net.rpn.assign_targets_to_anchors(anchors, targets)
    proposals, _ = net.rpn(image_list, features)  # eval mode: the random RPN's proposals
    p1, n1, p2, n2 = layout.rpn_positives, layout.rpn_samples, layout.rcnn_positives, layout.rcnn_samples
    preds, rpn_a, rpn_g, rpn_l, rc_p, rc_g, rc_l, gts, gls = [], [], [], [], [], [], [], [], []
    for k in range(b):
        gt, gl = targets[k]["boxes"], targets[k]["labels"]
        # RPN: positives by torchvision's matcher (label 1), each matched to its best box
        iou = box_iou(gt, anchors[k])
        best_gt = iou.argmax(dim=0)
        pos = torch.where(labels[k] == 1)[0]
        neg = torch.where(labels[k] == 0)[0]
        by_gt = [pos[best_gt[pos] == g] for g in range(len(gt))]
        rpn_pos = _pick(by_gt, p1, rng)
        neg_idx = neg[torch.randperm(len(neg), generator=rng)[: n1 - p1]]
        if len(neg_idx) < n1 - p1:
            raise LossforgeError("detection probe: too few negative anchors; use a larger probe size")
        sel = torch.cat([rpn_pos, neg_idx])
        rpn_a.append(anchors[k][sel])
        rpn_g.append(gt[best_gt[rpn_pos]])
        rpn_l.append((torch.arange(n1) < p1).long())
        # RCNN: jittered ground-truth boxes as positives, the random RPN's proposals as negatives
        jittered = torch.stack([_jitter(gt[g], rng) for g in range(len(gt)) for _ in range(4)])
        owner = box_iou(jittered, gt).argmax(dim=1)
        by_gt = [torch.where(owner == g)[0] for g in range(len(gt))]
        pos_idx = _pick(by_gt, p2, rng)
        cand = proposals[k]
        cand = cand[box_iou(cand, gt).amax(dim=1) < 0.5] if len(cand) else cand
        if len(cand) < n2 - p2:
            extra = _random_boxes(4 * n2, size, rng)
            extra = extra[box_iou(extra, gt).amax(dim=1) < 0.5]
            cand = torch.cat([cand, extra])
        neg_boxes = cand[torch.randperm(len(cand), generator=rng)[: n2 - p2]]
        if len(neg_boxes) < n2 - p2:
            raise LossforgeError("detection probe: too few negative proposals; use a larger probe size")
        props = torch.cat([jittered[pos_idx], neg_boxes])
        rc_p.append(props)
        rc_g.append(gt[owner[pos_idx]])
        rc_l.append(torch.cat([gl[owner[pos_idx]], torch.zeros(n2 - p2, dtype=torch.long)]))
        gts.append(gt)
        gls.append(gl)
        # the random network's raw predictions for these samples
        box_features = net.roi_heads.box_head(net.roi_heads.box_roi_pool(features, [props if j == k else props[:0] for j in range(b)],
                                                                           image_list.image_sizes))
        logits, box_reg = net.roi_heads.box_predictor(box_features)
        rcnn_d = box_reg.reshape(n2, -1, 4)[torch.arange(p2), rc_l[-1][:p2]]
        preds.append(torch.cat([objectness[k][sel], deltas[k][rpn_pos].reshape(-1), logits.reshape(-1), rcnn_d.reshape(-1)]))
    data = ProbeData(layout, torch.stack(rpn_a), torch.stack(rpn_g), torch.stack(rpn_l), torch.stack(rc_p),
                     torch.stack(rc_g), torch.stack(rc_l), gts, gls)
    return torch.stack(preds).float(), data


__all__ = ["DetectionProbeInputs", "DetectionProbeMetric", "ProbeData", "ProbeLayout", "build_screening_problem",
           "PERFECT_LOGIT"]
