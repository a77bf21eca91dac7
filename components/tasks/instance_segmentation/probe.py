"""The loss-rejection probe for instance segmentation (AutoLoss-Zero §3.2, A.3): the detection probe plus the
mask branch on fixed positive RoIs.

What is fixed: everything the detection probe fixes (``components.tasks.detection.probe``: B images at `size`,
sampled anchors and proposals, seeded) and, for the mask branch, its positive RCNN proposals (ground-truth boxes
jittered to IoU ≥ 0.5, every object has at least one) with their binary mask targets at the model's mask
resolution M (the ground-truth mask projected onto the RoI and binarised, ``losses.mask_targets``, as in training).

What is optimised: the detection probe's flat vector, followed by the RoIs' mask logits of their target class
``(B, P2·M·M)``, initialised with a random Mask R-CNN's outputs (``build_instance_segmenter`` with the probe seed:
the same backbone as the detection probe's random network). ``build_inputs`` gives the detection probe's four
branches and ``mask`` = ``losses.mask_inputs`` (softmax [bg, fg], one-hot target), exactly the training inputs.

ξ per image: the mean of the detection probe's ξ (proposal and detection AP at the target metric's IoU
thresholds; ``box_mAP`` uses mAP's) and the mean mask IoU of the fixed RoIs (predicted mask = logit > 0 at the
RoI resolution). Reason for IoU rather than a mask AP: the RoIs are given and each covers its object, so an AP
would only threshold these IoUs; the mean IoU also moves smoothly with the logits. The perfect predictions
(±20 logits) have mask IoU 1.

Branch subsets (``branches=``): the branches not screened start at their perfect values (paper A.2, "the
predictions of the other branches set as the ground-truth targets"), so ξ moves only through the branch under test.
"""

from __future__ import annotations

import dataclasses
import hashlib
import json
import random
from typing import Any, Sequence

import torch
from torch import Tensor

from components.errors import LossforgeError
from components.search.screening import ScreeningProblem
from components.tasks.detection.losses import BRANCHES as DETECTION_BRANCHES
from components.tasks.detection.probe import PERFECT_LOGIT, _num_boxes, build_screening_problem as detection_problem
from components.tasks.instance_segmentation.losses import BRANCHES, TASK, mask_inputs, mask_targets
from components.tasks.instance_segmentation.metrics import canonical_metric_name, mask_iou


class InstanceProbeInputs:
    """build_inputs of the probe: the detection probe's four branches plus ``mask`` (module doc)."""

    def __init__(self, detection: Any, split: int, positives: int, size: int, targets: Tensor):
        self.detection, self.split, self.positives, self.size, self.targets = detection, split, positives, size, targets
        self.data = detection.data  # the detection probe's fixed samples

    def logits(self, pred: Tensor) -> Tensor:
        """The mask logits (B, P2, M, M) of the flat predictions."""
        return pred[:, self.split:].reshape(pred.shape[0], self.positives, self.size, self.size)

    def __call__(self, pred: Tensor, targets: Tensor) -> dict[str, dict[str, Tensor]]:
        idx = targets.long().reshape(-1)
        out = dict(self.detection(pred[:, : self.split], targets))
        out["mask"] = mask_inputs(self.logits(pred), self.targets[idx])
        return out


class InstanceProbeMetric:
    """ξ per sample: mean of the detection probe's ξ and the fixed RoIs' mean mask IoU."""

    def __init__(self, detection_metric: Any, inputs: InstanceProbeInputs, name: str):
        self.detection_metric, self.inputs, self.name = detection_metric, inputs, name

    def mask_score(self, pred: Tensor, targets: Tensor) -> Tensor:
        idx = targets.long().reshape(-1)
        logits = self.inputs.logits(pred.detach().float())
        return mask_iou(logits > 0, self.inputs.targets[idx] > 0).mean(dim=-1)

    def __call__(self, pred: Tensor, targets: Tensor) -> Tensor:
        det = self.detection_metric(pred[:, : self.inputs.split].detach(), targets).double()
        return 0.5 * (det + self.mask_score(pred, targets))


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
    """The instance segmentation probe (module doc) on `samples` images of `dataset` (items with ``masks``) resized
    to `size`; `model` is a preset name or MaskRCNNConfig (``components.tasks.instance_segmentation.models``);
    `branches`: screen only these (the others start at their targets)."""
    from components.tasks.instance_segmentation.models import INIT_LOCK, build_instance_segmenter, model_preset

    name = canonical_metric_name(metric)
    chosen = tuple(BRANCHES if branches is None else branches)
    unknown = [b for b in chosen if b not in BRANCHES]
    if unknown or not chosen:
        raise LossforgeError(f"instance segmentation probe: branches must be a non-empty subset of {', '.join(BRANCHES)}, "
                             f"got {branches}")
    if samples < 1:
        raise LossforgeError(f"instance segmentation probe: samples must be >= 1, got {samples}")
    cfg = dataclasses.replace(model_preset(model), min_size=size, max_size=size)
    if indices is None:  # the detection probe's rule, drawn here so the masks come from the same images
        with_boxes = [i for i in range(len(dataset)) if _num_boxes(dataset, i) > 0]
        if len(with_boxes) < samples:
            raise LossforgeError(f"instance segmentation probe: the dataset has {len(with_boxes)} images with objects, "
                                 f"the probe needs {samples}")
        indices = sorted(random.Random(seed).sample(with_boxes, samples))
    det_branches = tuple(b for b in chosen if b in DETECTION_BRANCHES)
    det = detection_problem(dataset, "mAP" if name == "box_mAP" else name, samples=samples, size=size, seed=seed,
                            model=cfg, branches=det_branches or None, rpn_samples=rpn_samples,
                            rpn_positives=rpn_positives, rcnn_samples=rcnn_samples, rcnn_positives=rcnn_positives,
                            indices=indices)
    data = det.build_inputs.data
    det_init = det.init_predictions if det_branches else det.perfect_predictions.clone()
    num_classes = int(dataset.num_classes)
    with INIT_LOCK, torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed)
        net = build_instance_segmenter(cfg, num_classes)
    net.eval()
    items = [dataset[i] for i in indices]
    if any("masks" not in t for _, t in items):
        raise LossforgeError("instance segmentation probe: the dataset's targets have no 'masks'")
    m = cfg.mask_size
    p2 = rcnn_positives
    with torch.no_grad():
        image_list, resized = net.transform([img.float() for img, _ in items],
                                            [{"boxes": t["boxes"].float(), "labels": t["labels"].long(), "masks": t["masks"]}
                                             for _, t in items])
        features = net.backbone(image_list.tensors)
        rois = [data.rcnn_proposals[k, :p2] for k in range(samples)]
        owners = [(data.gt_boxes[k][None] == data.rcnn_gt[k][:, None]).all(-1).float().argmax(1) for k in range(samples)]
        heads = net.roi_heads
        logits = heads.mask_predictor(heads.mask_head(heads.mask_roi_pool(features, rois, image_list.image_sizes)))
        labels = data.rcnn_labels[:, :p2].reshape(-1)
        logits = logits[torch.arange(labels.numel()), labels].reshape(samples, p2, m, m).float()
        targets = mask_targets([t["masks"] for t in resized], rois, owners, m).reshape(samples, p2, m, m)
    perfect_mask = torch.where(targets > 0, PERFECT_LOGIT, -PERFECT_LOGIT).float()
    mask_init = logits if "mask" in chosen else perfect_mask.clone()
    split = det_init.shape[1]
    init = torch.cat([det_init, mask_init.reshape(samples, -1)], dim=1).contiguous()
    perfect = torch.cat([det.perfect_predictions, perfect_mask.reshape(samples, -1)], dim=1).contiguous()
    inputs = InstanceProbeInputs(det.build_inputs, split, p2, m, targets)
    payload = {"task": TASK, "metric": name, "detection": det.key, "branches": list(chosen), "mask_size": m,
               "mask_head": [cfg.mask_pool_size, list(cfg.mask_head_layers), cfg.mask_dilation]}
    digest = hashlib.sha256(json.dumps(payload, sort_keys=True).encode())
    for t in (init, perfect, targets):
        digest.update(t.numpy().tobytes())
    suffix = "" if branches is None else "+" + ",".join(chosen)
    return ScreeningProblem(
        init_predictions=init,
        targets=torch.arange(samples),
        build_inputs=inputs,
        metric=InstanceProbeMetric(det.metric, inputs, name),
        key=f"{TASK}/{name}{suffix}/{digest.hexdigest()[:20]}",
        task=TASK,
        metric_name=name,
        perfect_predictions=perfect,
    )


__all__ = ["InstanceProbeInputs", "InstanceProbeMetric", "build_screening_problem"]
