"""The loss-rejection probe of the pose task (AutoLoss-Zero §3.2 on heatmaps).

B crops of the training set (seeded choice among the instances), the raw heatmaps a randomly initialised
SimpleBaseline predicts for them at the probe's crop size (``size`` x ``size``, heatmaps ``size / 4``), shaped
``(B, 1, K, h, w)`` (one crop per probe sample: N = 1, C = K). The screening optimises these heatmaps directly.
The random network is the ``cpu`` preset's architecture whatever the proxy trains (as the detection probe): its
output is only the starting point of the optimisation, and a ResNet-18 keeps building the probe cheap.

* ``build_inputs``: ``y_hat`` = the heatmaps themselves (raw, as in training), ``y`` = the Gaussian targets.
* ``valid``: the joint weights expanded to the heatmaps, so masked joints add nothing to the objective.
* ξ per sample: the crop's AP for the metric (``metrics.instance_ap`` of the OKS of the decoded heatmaps against
  the target keypoints, in heatmap coordinates with the area scaled to them: OKS is scale-free).
* ``perfect_predictions`` = the targets (decode to the keypoints up to the quarter-pixel rounding: ξ_max ≈ 1,
  computed, not assumed), so the normalised gain works; ``reference`` = (ŷ − y)² for the gradient-scale check.
"""

from __future__ import annotations

import hashlib
import json
import random

import numpy as np
import torch
from torch import Tensor

from components.errors import LossforgeError
from components.search.screening import ScreeningProblem
from components.tasks.pose.datasets import crop_box
from components.tasks.pose.losses import BRANCH, heatmap_inputs, mse_graph
from components.tasks.pose.metrics import canonical_metric_name, category_sigmas, decode_heatmaps, instance_ap, oks

TASK = "pose"


class PoseProbeMetric:
    """ξ (B,) of probe heatmaps (B, 1, K, h, w): per-crop AP from the OKS against the target keypoints."""

    def __init__(self, name: str, points: Tensor, weights: Tensor, areas: Tensor, sigmas: Tensor):
        self.name, self.points, self.weights, self.areas, self.sigmas = name, points, weights, areas, sigmas

    def __call__(self, pred: Tensor, targets: Tensor) -> Tensor:
        idx = targets.long().reshape(-1)
        coords, _ = decode_heatmaps(pred.detach().reshape(len(idx), *pred.shape[-3:]))
        out = []
        for row, k in enumerate(idx.tolist()):
            vis = self.weights[k].numpy() > 0
            value = oks(coords[row].double().numpy(), self.points[k].double().numpy(), vis, float(self.areas[k]),
                        self.sigmas[k].double().numpy())
            out.append(instance_ap(value, self.name))
        return torch.tensor(out, dtype=torch.float64)


def build_screening_problem(dataset, metric: str = "AP", samples: int = 5, size: int = 64, seed: int = 0, *,
                            model: str = "cpu") -> ScreeningProblem:
    """The pose probe (module doc) on `samples` crops of `dataset` at `size` x `size` (a multiple of 32)."""
    import dataclasses

    from components.tasks.pose.models import build_pose_model, model_preset
    from components.tasks.seeding import seeded_init

    name = canonical_metric_name(metric)
    if samples < 1:
        raise LossforgeError(f"pose probe: samples must be >= 1, got {samples}")
    if size < 32 or size % 32:
        raise LossforgeError(f"screening.size: the pose probe needs a multiple of 32, got {size}")
    if len(dataset) < samples:
        raise LossforgeError(f"pose probe: the dataset has {len(dataset)} instances with keypoints, the probe needs {samples}")
    cfg = dataclasses.replace(model_preset(model), input_size=(size, size))
    heatmap_size = cfg.heatmap_size
    indices = sorted(random.Random(seed).sample(range(len(dataset)), samples))
    crops, maps, weights, points, areas, sigmas = [], [], [], [], [], []
    ratio = heatmap_size[1] / size
    for i in indices:
        crop, target = dataset.item(i, (size, size), heatmap_size)
        inst = dataset.instances[i]
        crops.append(crop)
        maps.append(target["heatmaps"])
        weights.append(target["weights"])
        slots = dataset.category_slots(inst.category_id)
        kps = torch.tensor(inst.annotation["keypoints"], dtype=torch.float64).reshape(-1, 3)
        p = torch.zeros(dataset.num_keypoints, 2, dtype=torch.float64)
        x0, y0, scale = crop_box(inst.annotation["bbox"], (size, size))
        p[slots] = (kps[:, :2] - torch.tensor([x0, y0], dtype=torch.float64)) / scale * ratio
        points.append(p)
        areas.append(inst.area * (ratio / scale) ** 2)
        s = torch.zeros(dataset.num_keypoints, dtype=torch.float64)
        cat = next(c for c in dataset.categories if c["id"] == inst.category_id)
        s[slots] = torch.from_numpy(category_sigmas(cat))
        sigmas.append(s)
    with seeded_init(seed):
        net = build_pose_model(cfg, dataset.num_keypoints)
    net.eval()
    with torch.no_grad():
        init = net(torch.stack(crops)).float()
    targets_maps = torch.stack(maps).unsqueeze(1).contiguous()           # (B, 1, K, h, w)
    w = torch.stack(weights)                                              # (B, K)
    valid = w[:, None, :, None, None].expand_as(targets_maps).contiguous()
    metric_fn = PoseProbeMetric(name, torch.stack(points), w, torch.tensor(areas), torch.stack(sigmas))

    def build_inputs(pred: Tensor, targets: Tensor) -> dict:
        idx = targets.long().reshape(-1)
        y = targets_maps[idx].to(pred.dtype).reshape(pred.shape)
        return {BRANCH: heatmap_inputs(pred, y)}

    payload = {"task": TASK, "metric": name, "samples": samples, "size": size, "seed": seed, "model": str(cfg),
               "dataset": dataset.name, "indices": indices}
    digest = hashlib.sha256(json.dumps(payload, sort_keys=True).encode())
    for t in (init, targets_maps, w):
        digest.update(np.ascontiguousarray(t.numpy()).tobytes())
    return ScreeningProblem(
        init_predictions=init.unsqueeze(1).contiguous(),
        targets=torch.arange(samples),
        build_inputs=build_inputs,
        metric=metric_fn,
        key=f"{TASK}/{name}/{digest.hexdigest()[:20]}",
        valid=valid,
        task=TASK,
        metric_name=name,
        perfect_predictions=targets_maps.clone(),
        reference=mse_graph(),
    )


__all__ = ["PoseProbeMetric", "build_screening_problem"]
