"""The typed `Task` interface and its registry: everything the flows need to know about a task.

A task (semantic segmentation, detection, ...) is a package under `components/tasks/` whose `task.py`
defines a `Task` subclass and registers it with `@register_task`. The flows only ever call
`get_task(params.search.task)` and the methods below, so adding a task touches no flow.

Decisions:
- A candidate loss is one loss graph with one tree per *branch* (`Task.branches`, from
  `components.search.graph.TASK_BRANCHES`: segmentation has one, Faster R-CNN four). `Task.build_loss`
  turns a `build_loss` spec (a baseline name, a graph, a surrogate, ...) into the module the task's trainer
  calls, so the search core never needs to know what the task's predictions look like.
- The screening probe (`Task.screening_problem`) returns a `components.search.screening.ScreeningProblem`:
  the protocol, the equivalence check and the NaN stop are task-agnostic and run on it.
- Trainers return `ProxyResult`s (one per loss) and the re-training returns a
  `components.tasks.retrain.ComparisonTable`, the same shapes for every task; the metric names a task
  reports are `Task.metrics` (fractions in [0, 1], higher is better).
- Config sections `proxy:` and `retrain:` of params.yaml are checked against the task's own frozen
  dataclasses (`proxy_config_class`, `retrain_config_class`), so an unknown key is an error per task.
- Task modules are imported on first use (`_BUILTIN`), so importing the registry stays cheap and a
  task's heavy dependencies (torchvision detection models, pycocotools) load only when it runs.
"""

from __future__ import annotations

import importlib
import importlib.util
import math
from abc import ABC, abstractmethod
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Any, Callable, ClassVar, Iterable, Mapping, Sequence

from components.errors import LossforgeError

if TYPE_CHECKING:  # pragma: no cover
    from torch import nn

    from components.search.screening import ScreeningProblem
    from components.tasks.retrain import ComparisonTable

# on_progress(iteration, total, {loss name: current loss value}) of trainers
ProgressCallback = Callable[[int, int, dict], None]


@dataclass
class ProxyResult:
    """Outcome of one loss's training: ``status`` ok / nan / failed, the task's metrics and the target value.

    ``iterations``: iterations run (for ``"nan"``: the 1-based iteration whose loss was not finite).
    ``seconds``: this loss's own compute time. ``metrics`` and ``target`` are empty/None unless "ok".
    """

    name: str
    status: str
    metrics: dict[str, float] = field(default_factory=dict)
    target: float | None = None
    iterations: int = 0
    seconds: float = 0.0
    message: str = ""
    target_metric: str = ""
    final_loss: float | None = None

    def to_dict(self) -> dict:
        """JSON-able form (NaN metric values become None)."""
        clean = {k: (v if v is not None and math.isfinite(v) else None) for k, v in self.metrics.items()}
        target = self.target if self.target is not None and math.isfinite(self.target) else None
        return {
            "name": self.name, "status": self.status, "metrics": clean, "target_metric": self.target_metric,
            "target": target, "iterations": self.iterations, "seconds": round(self.seconds, 3),
            "message": self.message, "final_loss": self.final_loss,
        }

    @classmethod
    def from_dict(cls, data: Mapping[str, Any]) -> "ProxyResult":
        """Rebuild from `to_dict` (or a stored proxy-result record: extra keys are ignored)."""
        return cls(
            name=str(data.get("name", data.get("id", ""))),
            status=str(data["status"]),
            metrics={k: (math.nan if v is None else float(v)) for k, v in dict(data.get("metrics") or {}).items()},
            target=None if data.get("target") is None else float(data["target"]),
            iterations=int(data.get("iterations") or 0),
            seconds=float(data.get("seconds") or 0.0),
            message=str(data.get("message") or ""),
            target_metric=str(data.get("target_metric") or ""),
            final_loss=data.get("final_loss"),
        )


class Task(ABC):
    """What a task provides to the search and the flows (see module docstring)."""

    name: ClassVar[str]
    metrics: ClassVar[tuple[str, ...]]  # the names `search.metric` accepts; all are reported after training
    default_metric: ClassVar[str]
    default_baselines: ClassVar[tuple[str, ...]] = ()
    dataset_formats: ClassVar[str] = ""  # one line for errors and `--help`: which layouts `open_dataset` reads

    @property
    def branches(self) -> dict[str, tuple[str, ...]]:
        """Loss branch -> the tree inputs it feeds (`components.search.graph.TASK_BRANCHES`)."""
        from components.search.graph import TASK_BRANCHES

        return dict(TASK_BRANCHES[self.name])

    def trains_graph_task(self, graph_task: str) -> bool:
        """Whether `build_loss` trains a loss graph written for `graph_task` (a loss file's `task`): this task's
        own, and any other a task declares (detection also trains CSE-AutoLoss's `detection_cse` graphs)."""
        return graph_task == self.name

    # ------------------------------------------------------------------ configuration
    @property
    @abstractmethod
    def proxy_config_class(self) -> type:
        """Frozen dataclass of the `proxy:` section (the CPU profile are its defaults)."""

    @property
    @abstractmethod
    def retrain_config_class(self) -> type:
        """Frozen dataclass of the `retrain:` section."""

    def canonical_metric(self, name: str) -> str:
        """`name` as one of `metrics` (aliases allowed by the task); LossforgeError otherwise."""
        if name in self.metrics:
            return name
        raise LossforgeError(f"search.metric: {name!r} is not a {self.name} metric (known: {', '.join(self.metrics)})")

    # ------------------------------------------------------------------ data
    @abstractmethod
    def ensure_embedded_data(self, path: str | Path, *, num_train: int, num_test: int, image_size: int,
                             seed: int) -> None:
        """Generate the embedded dataset at `path` (no-op when it is there with the same settings)."""

    @abstractmethod
    def open_dataset(self, path: str | Path, *, split: str | None = None, ids: Sequence[str] | None = None) -> Any:
        """The dataset at `path` (split "train"/"val", or exactly `ids` in that order); has `.ids` and
        `.num_classes`. Errors name the bad file."""

    def validate_data(self, path: str | Path, *, split: str | None = None, ids: Sequence[str] | None = None) -> Any:
        """Check every file of the dataset at `path` (a split, or exactly `ids`) before a run writes anything: each
        image decodes, its labels fit it (mask size and classes, boxes inside the image, known categories, ...). The
        first bad file is a one-line LossforgeError naming it; returns the opened dataset. Default: `open_dataset`,
        then the dataset's own `validate()` when it has one (the built-in readers do; keep it to header reads and
        cheap decodes: it runs on every image before each search)."""
        dataset = self.open_dataset(path, split=split, ids=ids)
        check = getattr(dataset, "validate", None)
        if callable(check):
            check()
        return dataset

    # ------------------------------------------------------------------ losses
    def training_target(self, metric: str) -> str:
        """What the tree input `y` is when searching for `metric` ("label" unless the task says otherwise)."""
        return "label"

    @abstractmethod
    def build_loss(self, spec: str | Mapping[str, Any], dataset: Any) -> "nn.Module":
        """The training loss of a `build_loss` spec (baseline name, loss graph(s), ...) for this task."""

    @property
    def reference_baseline(self) -> str:
        """The handcrafted loss every search is measured against (segmentation: CE): the first default baseline."""
        return self.default_baselines[0]

    def known_baselines(self) -> list[str]:
        """Loss type names `retrain.baselines` may use for this task."""
        return list(self.default_baselines)

    def loss_name(self, spec: str | Mapping[str, Any]) -> str:
        """A short display name of a spec."""
        from components.tasks.loss_registry import loss_name

        return loss_name(spec)

    # ------------------------------------------------------------------ search
    @abstractmethod
    def screening_problem(self, dataset: Any, metric: str, *, samples: int, size: int, seed: int) -> "ScreeningProblem":
        """The loss-rejection probe: `samples` items of `dataset` at `size`, a random network's predictions."""

    # ------------------------------------------------------------------ training
    @abstractmethod
    def train_proxy(self, losses: Mapping[str, "nn.Module"], train_ds: Any, eval_ds: Any, config: Any, metric: str,
                    *, on_progress: ProgressCallback | None = None) -> dict[str, ProxyResult]:
        """Train one model per loss (same init, same batches), evaluate on `eval_ds`: name -> ProxyResult."""

    def retrain(self, losses: Mapping[str, "nn.Module"], train_ds: Any, test_ds: Any, config: Any, metric: str,
                *, seeds: Iterable[int] | None = None, on_progress: ProgressCallback | None = None) -> "ComparisonTable":
        """Train every loss with the re-training `config` over `seeds` and compare them on `test_ds`."""
        from components.tasks.retrain import retrain_over_seeds

        return retrain_over_seeds(self.train_proxy, losses, train_ds, test_ds, config, self.canonical_metric(metric),
                                  self.metrics, seeds=seeds, on_progress=on_progress)


# ---------------------------------------------------------------------------------------------- registry
_REGISTRY: dict[str, type[Task]] = {}
_BUILTIN: dict[str, str] = {
    "segmentation": "components.tasks.segmentation.task",
    "detection": "components.tasks.detection.task",
    "instance_segmentation": "components.tasks.instance_segmentation.task",
    "pose": "components.tasks.pose.task",
}


def register_task(cls: type[Task]) -> type[Task]:
    """Class decorator: make `cls` available to `get_task(cls.name)`."""
    _REGISTRY[cls.name] = cls
    return cls


def task_names() -> list[str]:
    """Every task that can be used (registered, or built in and importable)."""
    names = set(_REGISTRY)
    for name, module in _BUILTIN.items():
        try:
            if importlib.util.find_spec(module) is not None:
                names.add(name)
        except ModuleNotFoundError:  # the task's package is not there
            pass
    return sorted(names)


def all_metric_names() -> list[str]:
    """Every metric name of every available task, in task order without repeats (for forms such as the Prefect UI)."""
    out: list[str] = []
    for name in task_names():
        out.extend(m for m in get_task(name).metrics if m not in out)
    return out


def get_task(name: str) -> Task:
    """The task registered under `name` (built-in tasks are imported on first use)."""
    if name not in _REGISTRY and name in _BUILTIN:
        try:
            importlib.import_module(_BUILTIN[name])
        except ModuleNotFoundError as exc:
            if exc.name != _BUILTIN[name]:
                raise
    cls = _REGISTRY.get(name)
    if cls is None:
        raise LossforgeError(f"search.task: {name!r} is not available (known: {', '.join(task_names())})")
    return cls()


__all__ = ["ProgressCallback", "ProxyResult", "Task", "all_metric_names", "get_task", "register_task", "task_names"]
