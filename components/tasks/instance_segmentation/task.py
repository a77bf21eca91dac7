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
from typing import Any, Sequence

from components.errors import LossforgeError
from components.tasks.base import register_task
from components.tasks.detection.task import DetectionTask


@register_task
class InstanceSegmentationTask(DetectionTask):
    """Mask R-CNN instance segmentation with five searched loss branches, judged by COCO mask AP."""

    name = "instance_segmentation"
    metrics = ("mAP", "AP50", "AP75", "box_mAP")
    default_metric = "mAP"
    default_baselines = ("ce_smoothl1_bce", "ce_giou_bce", "ce_iou_bce")
    dataset_formats = ("COCO instances with segmentations: a .json file, or a folder with "
                       "annotations/instances_<split>.json + images")

    package = "components.tasks.instance_segmentation"  # trainer, metrics, probe, losses of this package

    # ------------------------------------------------------------------ data
    def open_dataset(self, path: str | Path, *, split: str | None = None, ids: Sequence[str] | None = None) -> Any:
        from components.tasks.instance_segmentation.datasets import open_instance_dataset

        return open_instance_dataset(path, split=split or "train", ids=ids)

    # ------------------------------------------------------------------ losses
    graph_loss = "GraphInstanceLoss"

    def _task_graph(self, graph: Any) -> Any:
        """A detection graph trains here too (its four branches, the mask branch with the default loss)."""
        from components.search.graph import LossGraph

        if graph.task == "detection":  # the same four branches with the same inputs
            return LossGraph("instance_segmentation", dict(graph.branches))
        if graph.task != "instance_segmentation":
            raise LossforgeError(f"loss type 'graph': the graph's task is {graph.task!r}, expected 'instance_segmentation'")
        return graph


__all__ = ["InstanceSegmentationTask"]
