"""Heatmap losses of the pose task: ``loss(pred (N, K, h, w), target (N, K, h, w), weights (N, K)) -> scalar``.

* ``mse`` (``MSEHeatmapLoss``): the standard, MMPose's JointsMSELoss as AutoLoss-Zero's "MSE" ([58]): the mean
  over N, K, h, w of (w · (ŷ − y))², so a masked joint counts as zero in the mean.
* a searched loss (``GraphPoseLoss``): the graph's ``heatmap`` tree on ``y_hat`` = the raw predicted heatmap (the
  network's output, no sigmoid; see ``models``), ``y`` = the target heatmap, ``1``; shape (N, C=K, h, w).
  Reduction as the other tasks' graph losses (Eq. 3: the sum over N, C, h, w divided by N·h·w) with the masked
  joints' outputs set to 0 (A.4: "loss function is applied only on visible joints"; ``torch.where``, so an
  infinite value at a masked joint does not leak in as 0·inf). Eq. 3 sums over the K slots where MSE averages
  them: a constant factor K, which the paper's Adam is invariant to.
The Table-8 pose loss ``(ŷ − 16y⁴)² + ŷ⁴`` is ``examples/losses/autolosszero_pose.json`` (a graph spec).
"""

from __future__ import annotations

from typing import Any

import torch
from torch import Tensor, nn

from components.errors import LossforgeError

BRANCH = "heatmap"
BASELINES = ("mse",)


def heatmap_inputs(pred: Tensor, target: Tensor) -> dict[str, Tensor]:
    """Tree inputs: ``y_hat`` raw heatmaps, ``y`` targets, ``1``; shape (..., N, K, h, w)."""
    return {"y_hat": pred, "y": target, "1": torch.ones_like(target)}


class PoseLoss(nn.Module):
    """A heatmap loss; subclasses implement ``forward(pred, target, weights)``."""

    def forward(self, pred: Tensor, target: Tensor, weights: Tensor) -> Tensor:  # pragma: no cover - abstract
        raise NotImplementedError


class MSEHeatmapLoss(PoseLoss):
    """MMPose's JointsMSELoss (use_target_weight): mean((w·(ŷ − y))²)."""

    def forward(self, pred: Tensor, target: Tensor, weights: Tensor) -> Tensor:
        w = weights[..., None, None].to(pred.dtype)
        return ((pred * w - target * w) ** 2).mean()


class GraphPoseLoss(PoseLoss):
    """A loss graph (task "pose") on heatmaps, masked by the joint weights (module doc)."""

    def __init__(self, graph: Any):
        super().__init__()
        if getattr(graph, "task", None) != "pose" or BRANCH not in graph.branches:
            raise LossforgeError(f"loss graph: a 'pose' graph with a '{BRANCH}' branch expected, "
                                 f"got task {getattr(graph, 'task', None)!r}")
        self.graph = graph

    def forward(self, pred: Tensor, target: Tensor, weights: Tensor) -> Tensor:
        from components.search.graph import reduce_eq3

        branch = self.graph.branches[BRANCH]
        o = branch.tree.evaluate(heatmap_inputs(pred, target.to(pred.dtype)))
        keep = (weights > 0)[..., None, None].expand_as(o)
        o = torch.where(keep, o, torch.zeros((), dtype=o.dtype, device=o.device))
        return branch.weight * reduce_eq3(o)


def baseline_loss(name: str) -> PoseLoss:
    """The handcrafted loss `name` (``BASELINES``)."""
    if name == "mse":
        return MSEHeatmapLoss()
    raise LossforgeError(f"pose loss {name!r} unknown; known: {', '.join(BASELINES)}, a loss JSON path, "
                         "or {type: graph, ...}")


def mse_graph():
    """(ŷ − y)² as a pose loss graph: the reference of the probe's gradient-scale check."""
    from components.search.graph import LossGraph, Node

    root = Node.apply("square", Node.apply("add", Node.leaf("y_hat"), Node.apply("neg", Node.leaf("y"))))
    return LossGraph.single("pose", BRANCH, root)


__all__ = ["BASELINES", "BRANCH", "GraphPoseLoss", "MSEHeatmapLoss", "PoseLoss", "baseline_loss", "heatmap_inputs",
           "mse_graph"]
