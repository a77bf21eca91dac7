"""Pose estimation as a Lossforge task (AutoLoss-Zero A.4): top-down SimpleBaseline heatmaps, one searched
branch (``heatmap``: ŷ raw heatmap, y target heatmap, 1), OKS keypoint AP.

Decisions:
- Data: any COCO keypoints JSON + images (``datasets.open_pose_dataset``, the detection reader's layouts); the
  embedded data is the shapes set (``ensure_shapes`` writes keypoints and skeletons per category), whose
  categories have 3-6 keypoints: the heatmap channels are the union of the categories' slots (``datasets``).
- Losses (`build_loss`): ``mse`` (the standard), ``{"type": "mse"}``, ``{"type": "graph", "graph": <loss JSON
  dict> | LossGraph}``, ``{"type": "graph", "path": <file>}`` or a path to a loss JSON of task "pose" (e.g. the
  Table-8 loss, ``examples/losses/autolosszero_pose.json``). The parsing is the detection task's.
- Metrics: ``AP`` (OKS .50:.95), ``AP50``, ``AP75``; the reference baseline is ``mse``.
- Screening: ``probe.build_screening_problem`` (one branch, so no per-branch probes).
"""

from __future__ import annotations

from pathlib import Path
from typing import Any, Mapping, Sequence

from components.errors import LossforgeError
from components.tasks.base import ProgressCallback, ProxyResult, register_task
from components.tasks.detection.task import DetectionTask


@register_task
class PoseTask(DetectionTask):
    """Top-down pose estimation with a searched heatmap loss, judged by COCO keypoint AP."""

    name = "pose"
    metrics = ("AP", "AP50", "AP75")
    default_metric = "AP"
    default_baselines = ("mse",)
    dataset_formats = ("COCO keypoints (categories with 'keypoints', annotations with 'keypoints'): a .json file, "
                       "or a folder with annotations/instances_<split>.json (+ images) or annotations/person_keypoints_<split>.json "
                       "+ <split>/ images")

    package = "components.tasks.pose"
    graph_loss = "GraphPoseLoss"

    # ------------------------------------------------------------------ data
    def open_dataset(self, path: str | Path, *, split: str | None = None, ids: Sequence[str] | None = None) -> Any:
        from components.tasks.pose.datasets import open_pose_dataset

        return open_pose_dataset(path, split=split or "train", ids=ids)

    # ------------------------------------------------------------------ search
    def screening_problem(self, dataset: Any, metric: str, *, samples: int, size: int, seed: int,
                          branches: Sequence[str] | None = None):
        from components.tasks.pose.probe import build_screening_problem

        if branches is not None and tuple(branches) != ("heatmap",):
            raise LossforgeError(f"pose probe: the only branch is 'heatmap', got {list(branches)}")
        return build_screening_problem(dataset, self.canonical_metric(metric), samples=samples, size=size, seed=seed)

    def reference_graph(self) -> Any:
        from components.tasks.pose.losses import mse_graph

        return mse_graph()

    # ------------------------------------------------------------------ training
    def train_proxy(self, losses: Mapping[str, Any], train_ds: Any, eval_ds: Any, config: Any, metric: str,
                    *, on_progress: ProgressCallback | None = None) -> dict[str, ProxyResult]:
        from components.tasks.pose import trainer

        return trainer.train_proxy(losses, train_ds, eval_ds, config if config is not None else trainer.ProxyConfig(),
                                   self.canonical_metric(metric), on_progress=on_progress)


__all__ = ["PoseTask"]
