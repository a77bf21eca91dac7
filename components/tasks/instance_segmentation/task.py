"""Instance segmentation as a Lossforge task (AutoLoss-Zero A.3): Mask R-CNN R50-FPN (a ResNet-18-FPN proxy on
CPU), five loss branches (the detection four + mask), mask mAP.

Decisions:
- A subclass of ``DetectionTask``: the data generation (the shapes set writes COCO instances with RLE masks)
  and the loss-spec parsing helpers are the detection ones; everything that sees masks is this package's.
- Data: any COCO instances JSON with segmentations (polygons or RLE) + images (``datasets.open_instance_dataset``).
- Losses (`build_loss`): a baseline name (``ce_smoothl1_bce``, ``ce_giou_bce``, ``ce_iou_bce``),
  ``{"type": <baseline>}``, ``{"type": "graph", "graph": <loss JSON dict> | LossGraph}``, ``{"type": "graph",
  "path": <file>}`` or a path to a loss JSON. A graph of task "instance_segmentation" may hold any branches (the
  missing ones use torchvision's losses); a "detection" graph is accepted as the four box branches (torchvision's
  mask BCE).
- Metrics: ``mAP``, ``AP50``, ``AP75`` on masks (COCO segm) and ``box_mAP``; the default target is the mask mAP.
- Screening: ``probe.build_screening_problem``; without ``branches=`` the problem carries one probe per branch
  (``branch_problems``, five), which the search engine uses to breed and screen each branch separately (A.2/A.3).
"""

from __future__ import annotations

from pathlib import Path
from typing import Any, Mapping, Sequence

from components.errors import LossforgeError
from components.tasks.base import ProgressCallback, ProxyResult, register_task
from components.tasks.detection.task import GRAPH_KEYS, DetectionTask


@register_task
class InstanceSegmentationTask(DetectionTask):
    """Mask R-CNN instance segmentation with five searched loss branches, judged by COCO mask AP."""

    name = "instance_segmentation"
    metrics = ("mAP", "AP50", "AP75", "box_mAP")
    default_metric = "mAP"
    default_baselines = ("ce_smoothl1_bce", "ce_giou_bce", "ce_iou_bce")
    dataset_formats = ("COCO instances with segmentations: a .json file, or a folder with "
                       "annotations/instances_<split>.json + images")

    @property
    def proxy_config_class(self) -> type:
        from components.tasks.instance_segmentation.trainer import ProxyConfig

        return ProxyConfig

    @property
    def retrain_config_class(self) -> type:
        from components.tasks.instance_segmentation.trainer import RetrainConfig

        return RetrainConfig

    def canonical_metric(self, name: str) -> str:
        from components.tasks.instance_segmentation.metrics import canonical_metric_name

        try:
            return canonical_metric_name(name)
        except LossforgeError:
            raise LossforgeError(f"search.metric: {name!r} is not an instance_segmentation metric "
                                 f"(known: {', '.join(self.metrics)})") from None

    # ------------------------------------------------------------------ data
    def open_dataset(self, path: str | Path, *, split: str | None = None, ids: Sequence[str] | None = None) -> Any:
        from components.tasks.instance_segmentation.datasets import open_instance_dataset

        return open_instance_dataset(path, split=split or "train", ids=ids)

    # ------------------------------------------------------------------ losses
    def build_loss(self, spec: str | Mapping[str, Any], dataset: Any = None):
        from components.search.graph import LossGraph
        from components.tasks.instance_segmentation.losses import BASELINES, GraphInstanceLoss, baseline_loss

        if isinstance(spec, LossGraph):
            return GraphInstanceLoss(self._as_instance_graph(spec))
        if isinstance(spec, (str, Path)):
            text = str(spec)
            if text in BASELINES:
                return baseline_loss(text)
            if text.endswith(".json") or Path(text).is_file():
                spec = {"type": "graph", "path": text}
            else:
                raise LossforgeError(f"instance segmentation loss {text!r} unknown; known: {', '.join(BASELINES)}, "
                                     "a loss JSON path, or {type: graph, ...}")
        if not isinstance(spec, Mapping) or not isinstance(spec.get("type"), str):
            raise LossforgeError(f"instance segmentation loss spec must be a name or a dict with a 'type', got {spec!r}")
        kind = spec["type"]
        if kind != "graph":
            extra = [k for k in spec if k != "type"]
            if extra:
                raise LossforgeError(f"instance segmentation loss {kind!r} takes no arguments, got {', '.join(map(str, extra))}")
            return baseline_loss(kind)
        unknown = [k for k in spec if k not in GRAPH_KEYS]
        if unknown:
            raise LossforgeError(f"loss type 'graph': unknown key(s) {', '.join(map(str, unknown))} (accepted: graph, path)")
        return GraphInstanceLoss(self._as_instance_graph(self._graph(spec)))

    @staticmethod
    def _as_instance_graph(graph):
        from components.search.graph import LossGraph

        if graph.task == "detection":  # the same four branches with the same inputs
            return LossGraph("instance_segmentation", dict(graph.branches))
        if graph.task != "instance_segmentation":
            raise LossforgeError(f"loss type 'graph': the graph's task is {graph.task!r}, expected 'instance_segmentation'")
        return graph

    # ------------------------------------------------------------------ search
    def screening_problem(self, dataset: Any, metric: str, *, samples: int, size: int, seed: int,
                          branches: Sequence[str] | None = None):
        import dataclasses

        from components.tasks.instance_segmentation.losses import BRANCHES
        from components.tasks.instance_segmentation.probe import build_screening_problem

        metric = self.canonical_metric(metric)
        problem = build_screening_problem(dataset, metric, samples=samples, size=size, seed=seed, branches=branches)
        if branches is not None:
            return problem
        # the search screens each branch on its own probe, the others at their targets (paper A.2, A.3)
        per_branch = {b: build_screening_problem(dataset, metric, samples=samples, size=size, seed=seed, branches=(b,))
                      for b in BRANCHES}
        return dataclasses.replace(problem, branch_problems=per_branch)

    # ------------------------------------------------------------------ training
    def train_proxy(self, losses: Mapping[str, Any], train_ds: Any, eval_ds: Any, config: Any, metric: str,
                    *, on_progress: ProgressCallback | None = None) -> dict[str, ProxyResult]:
        from components.tasks.instance_segmentation.trainer import ProxyConfig, train_proxy

        return train_proxy(losses, train_ds, eval_ds, config if config is not None else ProxyConfig(),
                           self.canonical_metric(metric), on_progress=on_progress)


__all__ = ["InstanceSegmentationTask"]
