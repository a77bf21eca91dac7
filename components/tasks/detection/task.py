"""Object detection as a Lossforge task (AutoLoss-Zero A.2): Faster R-CNN R50-FPN (a ResNet-18-FPN proxy on
CPU), four loss branches, box mAP.

Decisions:
- Data: any COCO instances JSON + images (``datasets.open_detection_dataset``); the embedded data is the
  segmentation task's shapes set, whose generator writes ``annotations/instances_{train,val}.json`` too.
- Losses (`build_loss`): a baseline name (``ce_smoothl1``, ``ce_giou``, ``ce_iou``), ``{"type": <baseline>}``,
  ``{"type": "graph", "graph": <loss JSON dict> | LossGraph}``, ``{"type": "graph", "path": <file>}``, or a
  path to a loss JSON; a graph must be of task "detection" and its missing branches use torchvision's
  losses (``losses.GraphDetectionLoss``).
- Screening (`screening_problem`): ``probe.build_screening_problem`` with the CPU detector; `size` is the
  probe's image size. ``branches=`` (an extension of the Task signature) screens a subset of branches with
  the others at their targets; without it, the problem carries one such probe per branch
  (``branch_problems``), which the search engine uses to breed and screen each branch separately until it
  passes, as the paper does (A.2): four random trees that all pass together are too rare to find.
- `retrain` is the Task default (``components.tasks.retrain.retrain_over_seeds`` over `train_proxy`).
"""

from __future__ import annotations

from pathlib import Path
from typing import Any, Mapping, Sequence

from components.errors import LossforgeError
from components.tasks.base import ProgressCallback, ProxyResult, Task, register_task

GRAPH_KEYS = ("type", "graph", "path")


@register_task
class DetectionTask(Task):
    """Faster R-CNN object detection with four searched loss branches, judged by COCO box AP."""

    name = "detection"
    metrics = ("mAP", "AP50", "AP75")
    default_metric = "mAP"
    default_baselines = ("ce_smoothl1", "ce_giou")
    dataset_formats = ("COCO instances: a .json file, or a folder with annotations/instances_<split>.json or "
                       "train.json + val.json, + images")

    # the modules this task's pieces come from; instance segmentation (a subclass) points them at its own package
    package = "components.tasks.detection"

    def _module(self, name: str) -> Any:
        import importlib

        return importlib.import_module(f"{self.package}.{name}")

    @property
    def proxy_config_class(self) -> type:
        return self._module("trainer").ProxyConfig

    @property
    def retrain_config_class(self) -> type:
        return self._module("trainer").RetrainConfig

    def canonical_metric(self, name: str) -> str:
        try:
            return self._module("metrics").canonical_metric_name(name)
        except LossforgeError:
            raise LossforgeError(f"search.metric: {name!r} is not a {self.name} metric "
                                 f"(known: {', '.join(self.metrics)})") from None

    # ------------------------------------------------------------------ data
    def ensure_embedded_data(self, path: str | Path, *, num_train: int, num_test: int, image_size: int,
                             seed: int) -> None:
        from components.tasks.segmentation.shapes import ensure_shapes

        ensure_shapes(path, num_train=num_train, num_test=num_test, image_size=image_size, seed=seed)

    def open_dataset(self, path: str | Path, *, split: str | None = None, ids: Sequence[str] | None = None) -> Any:
        from components.tasks.detection.datasets import open_detection_dataset

        return open_detection_dataset(path, split=split or "train", ids=ids)

    # ------------------------------------------------------------------ losses
    graph_loss = "GraphDetectionLoss"  # the `losses` module's class that trains a searched graph

    def known_baselines(self) -> list[str]:
        """Every named loss of the `losses` module (`retrain.baselines`, `lossforge compare`)."""
        return list(self._module("losses").BASELINES)

    def build_loss(self, spec: str | Mapping[str, Any], dataset: Any = None):
        from components.search.graph import LossGraph

        losses = self._module("losses")
        graph_loss = getattr(losses, self.graph_loss)
        what = f"{self.name.replace('_', ' ')} loss"
        if isinstance(spec, LossGraph):
            return self._graph_loss(spec, graph_loss)
        if isinstance(spec, (str, Path)):
            text = str(spec)
            if text in losses.BASELINES:
                return losses.baseline_loss(text)
            if text.endswith(".json") or Path(text).is_file():
                spec = {"type": "graph", "path": text}
            else:
                raise LossforgeError(f"{what} {text!r} unknown; known: {', '.join(losses.BASELINES)}, "
                                     "a loss JSON path, or {type: graph, ...}")
        if not isinstance(spec, Mapping) or not isinstance(spec.get("type"), str):
            raise LossforgeError(f"{what} spec must be a name or a dict with a 'type', got {spec!r}")
        kind = spec["type"]
        if kind != "graph":
            extra = [k for k in spec if k != "type"]
            if extra:
                raise LossforgeError(f"{what} {kind!r} takes no arguments, got {', '.join(map(str, extra))}")
            return losses.baseline_loss(kind)
        unknown = [k for k in spec if k not in GRAPH_KEYS]
        if unknown:
            raise LossforgeError(f"loss type 'graph': unknown key(s) {', '.join(map(str, unknown))} (accepted: graph, path)")
        return self._graph_loss(self._graph(spec), graph_loss)

    def trains_graph_task(self, graph_task: str) -> bool:
        return graph_task == self.name or graph_task in getattr(self._module("losses"), "GRAPH_TASK_LOSSES", {})

    def _graph_loss(self, graph: Any, graph_loss: type) -> Any:
        """The training loss of a graph: another task's graph through the `losses` module's GRAPH_TASK_LOSSES
        (detection: CSE-AutoLoss's `detection_cse` trees on the R-CNN head), else `graph_loss` of this task's."""
        if graph.task != self.name and self.trains_graph_task(graph.task):
            return self._module("losses").graph_task_module(graph.task).graph_loss(graph)
        return graph_loss(self._task_graph(graph))

    def _task_graph(self, graph: Any) -> Any:
        """`graph` if it is a loss of this task (else a one-line error)."""
        if graph.task != self.name:
            raise LossforgeError(f"loss type 'graph': the graph's task is {graph.task!r}, expected {self.name!r}")
        return graph

    @staticmethod
    def _graph(spec: Mapping[str, Any]):
        from components.search import graph_json
        from components.search.graph import LossGraph

        if "graph" in spec:
            data = spec["graph"]
            if isinstance(data, LossGraph):
                return data
            if not isinstance(data, Mapping):
                raise LossforgeError(f"loss type 'graph': 'graph' must be a loss JSON object, got {type(data).__name__}")
            return graph_json.graph_from_dict(data)
        if "path" in spec:
            return graph_json.load_graph(spec["path"])
        raise LossforgeError("loss type 'graph': give 'path' (a lossforge.loss/1 JSON file) or 'graph'")

    # ------------------------------------------------------------------ search
    def screening_problem(self, dataset: Any, metric: str, *, samples: int, size: int, seed: int,
                          branches: Sequence[str] | None = None):
        import dataclasses

        build = self._module("probe").build_screening_problem
        metric = self.canonical_metric(metric)
        problem = build(dataset, metric, samples=samples, size=size, seed=seed, branches=branches)
        if branches is not None:
            return problem
        # the search screens each branch on its own probe, the others at their targets (paper A.2, A.3); each
        # probe carries the CE + GIoU baseline's tree of that branch (weight 1, as the screened trees) as the
        # yardstick of the gradient-scale check (screening.max_gradient_ratio)
        from components.search.graph import LossGraph

        reference = self.reference_graph()
        per_branch = {b: dataclasses.replace(build(dataset, metric, samples=samples, size=size, seed=seed, branches=(b,)),
                                             reference=LossGraph(reference.task, {b: reference.branches[b]}))
                      for b in self._module("losses").BRANCHES}
        return dataclasses.replace(problem, branch_problems=per_branch, reference=reference)

    def reference_graph(self) -> Any:
        """The reference loss as a graph with every branch at weight 1: CE (classification, masks) + GIoU (boxes)."""
        from components.search.graph import Branch, LossGraph

        losses = self._module("losses")
        graph = losses.baseline_graph(losses.GIOU_TREE)
        return LossGraph(graph.task, {b: Branch(branch.tree, 1.0) for b, branch in graph.branches.items()})

    # ------------------------------------------------------------------ training
    def train_proxy(self, losses: Mapping[str, Any], train_ds: Any, eval_ds: Any, config: Any, metric: str,
                    *, on_progress: ProgressCallback | None = None) -> dict[str, ProxyResult]:
        trainer = self._module("trainer")
        return trainer.train_proxy(losses, train_ds, eval_ds, config if config is not None else trainer.ProxyConfig(),
                                   self.canonical_metric(metric), on_progress=on_progress)


__all__ = ["DetectionTask"]
