"""AutoLoss-Zero as a search method: `SearchEngine` (evolution + loss rejection + gradient-equivalence
check) behind the ask/tell interface of `components.search.method`.

Candidates are handed out as `{"id", "hash", "loss": {"type": "graph", "graph": <loss JSON>[, "target"]},
"screening_g"}`; `target` is the task's tree input `y` for the metric (segmentation BIoU/BF1: "boundary").
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

from components.params import Params
from components.search.method import SearchMethod, register_method


def seed_graphs(task_name: str, names: tuple[str, ...] | list[str]) -> list[Any]:
    """The loss graphs of `evolution.seed_losses`: names of the task's baselines that are loss graphs (e.g.
    detection's ``ce_giou``) or loss JSON files; anything else is a one-line error naming the entry."""
    from components.errors import LossforgeError
    from components.search.graph import LossGraph
    from components.tasks.base import get_task

    from components.search.graph_json import load_graph

    task = get_task(task_name)
    graphs = []
    for name in names:
        try:
            if name.endswith(".json") or Path(name).is_file():
                graph = load_graph(name)
                if graph.task != task_name:
                    raise LossforgeError(f"a loss for task {graph.task!r}, not {task_name!r}")
            else:
                graph = getattr(task.build_loss(name, None), "graph", None)
        except LossforgeError as exc:
            raise LossforgeError(f"evolution.seed_losses: {name!r}: {exc}") from None
        if not isinstance(graph, LossGraph):
            raise LossforgeError(f"evolution.seed_losses: {name!r} is not a loss graph (give a loss JSON file or one "
                                 f"of the task's graph baselines)")
        graphs.append(graph)
    return graphs


@register_method
class EvolutionMethod(SearchMethod):
    """AutoLoss-Zero: components.search.engine.SearchEngine (evolution + rejection + equivalence)."""

    name = "evolution"
    loss_type = "graph"  # build_loss type of this method's loss files

    def __init__(self, engine: Any, target: str = "label"):
        self.engine = engine
        self.target = target  # the loss input y: "label" or "boundary" (components.tasks.segmentation.probe)

    @classmethod
    def create(cls, params: Params, problem: Any, state_dir: Path) -> "EvolutionMethod":
        """Resume from `state_dir/checkpoint.json` when it exists, else start a new search."""
        from components.search.engine import SearchEngine
        from components.tasks.base import get_task

        target = get_task(params.search.task).training_target(params.search.metric)
        checkpoint = state_dir / "checkpoint.json"
        cache_path = state_dir / "equivalence.json"
        if checkpoint.exists():
            return cls(SearchEngine.load(checkpoint, problem), target)  # the seeds are in the checkpoint
        config = params.config("evolution", budget=params.search.budget)
        engine = SearchEngine(
            problem,
            task=params.search.task,
            config=config,
            screening_config=params.config("screening"),
            seed=params.search.seed,
            cache_path=cache_path,
            seeds=seed_graphs(params.search.task, config.seed_losses),
        )
        return cls(engine, target)

    # --------------------------------------------------------------- the shared interface
    @property
    def on_warning(self):  # the engine's stall warnings ("N candidates rejected in a row, best g ...")
        return self.engine.on_warning

    @on_warning.setter
    def on_warning(self, callback) -> None:
        self.engine.on_warning = callback

    @property
    def done(self) -> bool:
        return self.engine.done

    @property
    def counters(self) -> dict[str, int]:
        return self.engine.funnel()

    @property
    def history(self) -> list[dict[str, Any]]:
        return self.engine.history

    def ask(self, n: int) -> list[dict[str, Any]]:
        """Up to n screened candidates (generation + rejection + equivalence happen here)."""
        from components.search.graph_json import graph_to_dict

        out = []
        for _ in range(n):
            cand = self.engine.next_candidate()
            if cand is None:
                break
            out.append({
                "id": cand.id,
                "hash": cand.graph.hash(),
                "loss": self._spec(graph_to_dict(cand.graph)),
                "screening_g": cand.screening.score,
            })
        return out

    def tell(self, candidate_id: int, result: Any) -> dict[str, Any]:
        return self.engine.report(candidate_id, result)

    def best(self) -> dict[str, Any] | None:
        return self.engine.best()

    def save(self, path: str | Path) -> Path:
        return self.engine.save(path)

    def progress(self) -> list[dict[str, Any]]:
        return self.engine.progress_curve()

    def _spec(self, graph: dict[str, Any]) -> dict[str, Any]:
        spec = {"type": "graph", "graph": graph}
        if self.target != "label":
            spec["target"] = self.target
        return spec

    def loss_spec(self, record: dict[str, Any]) -> dict[str, Any]:
        """A build_loss spec for a history record."""
        return self._spec(record["graph"])

    def write_loss_files(self, record: dict[str, Any], folder: Path, stem: str) -> tuple[Path, Path]:
        """The record's loss as JSON (lossforge.loss/1) and as a standalone nn.Module .py file."""
        from components.search.export import write_module
        from components.search.graph_json import graph_from_dict, save_graph

        graph = graph_from_dict(record["graph"])
        folder.mkdir(parents=True, exist_ok=True)
        json_path, py_path = folder / f"{stem}.json", folder / f"{stem}.py"
        if not json_path.exists():
            save_graph(graph, json_path, name=stem, metadata={"target": self.target} if self.target != "label" else None)
        if not py_path.exists():
            write_module(graph, py_path, target=self.target)
        return json_path, py_path
