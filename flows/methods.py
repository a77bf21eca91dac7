"""Search methods as the search flow sees them: one small adapter per method, one shared interface.

The flow drives any method through `SearchMethod`: `next_candidates(n)` (screened candidates to train,
possibly fewer, [] when every remaining evaluation is in flight), `report(id, result)`, `done`,
`counters`, `history` (JSON records, one per candidate with a result), `best()`, `save(path)` and
`progress()` (the Fig. 4 curve). Each candidate is handed to the training task as
`{"id", "hash", "loss": <build_loss spec>}`, so the proxy-training task is method-agnostic.
A new method (e.g. Auto Seg-Loss PPO) registers a factory in `METHODS`; the flows do not change.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any, Callable, Protocol

from components.params import Params


class SearchMethod(Protocol):
    """What the search flow needs from a search method (see module docstring)."""

    loss_type: str
    done: bool
    counters: dict[str, int]
    history: list[dict[str, Any]]

    def next_candidates(self, n: int) -> list[dict[str, Any]]: ...
    def report(self, candidate_id: int, result: Any) -> dict[str, Any]: ...
    def best(self) -> dict[str, Any] | None: ...
    def save(self, path: str | Path) -> Path: ...
    def progress(self) -> list[dict[str, Any]]: ...
    def write_loss_files(self, record: dict[str, Any], folder: Path, stem: str) -> tuple[Path, Path]: ...
    def loss_spec(self, record: dict[str, Any]) -> dict[str, Any]: ...


class EvolutionMethod:
    """AutoLoss-Zero: components.search.engine.SearchEngine (evolution + rejection + equivalence)."""

    loss_type = "graph"  # build_loss type of this method's loss files

    def __init__(self, engine: Any, target: str = "label"):
        self.engine = engine
        self.target = target  # the loss input y: "label" or "boundary" (components.tasks.segmentation.task)

    @classmethod
    def create(cls, params: Params, problem: Any, state_dir: Path) -> "EvolutionMethod":
        """Resume from `state_dir/checkpoint.json` when it exists, else start a new search."""
        from components.search.engine import SearchEngine
        from components.tasks.segmentation.task import training_target_for_metric

        target = training_target_for_metric(params.search.metric)
        checkpoint = state_dir / "checkpoint.json"
        cache_path = state_dir / "equivalence.json"
        if checkpoint.exists():
            return cls(SearchEngine.load(checkpoint, problem), target)
        engine = SearchEngine(
            problem,
            task=params.search.task,
            config=params.config("evolution", budget=params.search.budget),
            screening_config=params.config("screening"),
            seed=params.search.seed,
            cache_path=cache_path,
        )
        return cls(engine, target)

    # --------------------------------------------------------------- the shared interface
    @property
    def done(self) -> bool:
        return self.engine.done

    @property
    def counters(self) -> dict[str, int]:
        return self.engine.funnel()

    @property
    def history(self) -> list[dict[str, Any]]:
        return self.engine.history

    def next_candidates(self, n: int) -> list[dict[str, Any]]:
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

    def report(self, candidate_id: int, result: Any) -> dict[str, Any]:
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


MethodFactory = Callable[[Params, Any, Path], SearchMethod]
def _ppo(params: Params, problem: Any, state_dir: Path) -> SearchMethod:
    """Auto Seg-Loss PPO (flows/ppo_method.py, imported on first use; it does not import this module back)."""
    from flows.ppo_method import PPOMethod

    return PPOMethod.create(params, problem, state_dir)


METHODS: dict[str, MethodFactory] = {"evolution": EvolutionMethod.create, "ppo": _ppo}


def make_method(params: Params, problem: Any, state_dir: Path) -> SearchMethod:
    """The search method named by `search.method`, resumed from `state_dir` when a checkpoint exists."""
    from components.errors import LossforgeError

    factory = METHODS.get(params.search.method)
    if factory is None:
        raise LossforgeError(
            f"search.method: {params.search.method!r} is not available (known: {', '.join(sorted(METHODS))})"
        )
    return factory(params, problem, state_dir)
