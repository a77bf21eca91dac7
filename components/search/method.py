"""The typed ask/tell interface of a search method, and the registry the flows find methods in by name.

A search method (AutoLoss-Zero evolution, Auto Seg-Loss PPO, ...) subclasses `SearchMethod` and registers
with `@register_method`; `params.yaml`'s `search.method` names it. The flows drive every method the same
way, so adding one touches no flow:

    method = make_method(params, problem, state_dir)    # resumes from state_dir/checkpoint.json if there
    while not method.done:
        for cand in method.ask(n):                     # screened candidates: {"id", "hash", "loss", ...}
            result = <train cand["loss"] on the proxy>  # a components.tasks.base.ProxyResult
            record = method.tell(cand["id"], result)   # the history record of that candidate
        method.save(state_dir / "checkpoint.json")

Decisions:
- Candidates travel as JSON-able dicts (`id`, `hash`, `loss`: a `build_loss` spec; method-specific
  extras such as the screening g or PPO's θ), so the trainers and every task runner (threads, processes,
  Ray, Dask) handle them without knowing the method.
- `tell` takes the typed `ProxyResult` of the task's trainer (status ok / nan / failed, metrics, target).
- State is one JSON file per method (`save`; `create` resumes from it): no pickle, crash-safe (atomic).
- `write_loss_files` exports a history record as loss JSON + a standalone `nn.Module` file; the file
  format is the method's (`loss_type`: "graph" or "surrogate").
- Built-in methods are imported on first use (`_BUILTIN`): PPO's modules load only when PPO runs.
"""

from __future__ import annotations

import importlib
import importlib.util
from abc import ABC, abstractmethod
from pathlib import Path
from typing import TYPE_CHECKING, Any, Callable, ClassVar

from components.errors import LossforgeError

if TYPE_CHECKING:  # pragma: no cover
    from components.tasks.base import ProxyResult

Params = Any  # components.params.Params (not imported: params validates `search.method` against this registry)

Candidate = dict[str, Any]  # {"id", "hash", "loss": build_loss spec, ...method extras}
Record = dict[str, Any]  # one history record: id, hash, status, target, metrics, formula, ...


class SearchMethod(ABC):
    """What the search flow needs from a search method (see module docstring)."""

    name: ClassVar[str]
    loss_type: ClassVar[str]  # build_loss type of the method's loss files ("graph" | "surrogate")
    on_warning: Callable[[str], None] | None = None  # where "nothing accepted for a while" messages go
    uses_screening_problem: ClassVar[bool] = True  # False: `create` gets problem=None (the flow skips building the
                                                   # task's AutoLoss-Zero probe, e.g. cse brings its own checks)

    @classmethod
    @abstractmethod
    def create(cls, params: Params, problem: Any, state_dir: Path) -> "SearchMethod":
        """A new search from `params` (`problem`: the task's screening probe), or the one saved in
        `state_dir/checkpoint.json`."""

    # ------------------------------------------------------------------ ask / tell
    @abstractmethod
    def ask(self, n: int) -> list[Candidate]:
        """Up to n candidates to train; [] while every remaining evaluation is in flight."""

    @abstractmethod
    def tell(self, candidate_id: Any, result: "ProxyResult") -> Record:
        """Record the proxy result of a candidate handed out by `ask`; returns its history record."""

    # ------------------------------------------------------------------ state and results
    @property
    @abstractmethod
    def done(self) -> bool:
        """True once the budget of proxy evaluations is used."""

    @property
    @abstractmethod
    def counters(self) -> dict[str, int]:
        """The search funnel (generated, accepted, rejected_<reason>, evaluated, ...)."""

    @property
    @abstractmethod
    def history(self) -> list[Record]:
        """One JSON record per candidate with a result, in the order they were told."""

    @abstractmethod
    def best(self) -> Record | None:
        """The method's answer so far (a history-like record), None before any valid result."""

    @abstractmethod
    def progress(self) -> list[dict[str, Any]]:
        """The progress curve (one point per reported evaluation; `top5_mean`, `best_so_far`, ...)."""

    @abstractmethod
    def save(self, path: str | Path) -> Path:
        """Write the whole state as JSON (atomically); `create` resumes from it."""

    # ------------------------------------------------------------------ export
    @abstractmethod
    def loss_spec(self, record: Record) -> dict[str, Any]:
        """A `build_loss` spec of a history record."""

    @abstractmethod
    def write_loss_files(self, record: Record, folder: Path, stem: str) -> tuple[Path, Path]:
        """The record's loss as JSON and as a standalone nn.Module .py file: (json path, py path)."""


# ---------------------------------------------------------------------------------------------- registry
_REGISTRY: dict[str, type[SearchMethod]] = {}
_BUILTIN: dict[str, str] = {
    "evolution": "components.search.evolution_method",
    "ppo": "components.surrogates.ppo_method",
    "cse": "components.cse.method",
}


def register_method(cls: type[SearchMethod]) -> type[SearchMethod]:
    """Class decorator: make `cls` available as `search.method: <cls.name>`."""
    _REGISTRY[cls.name] = cls
    return cls


def method_names() -> list[str]:
    """Every search method that can be used (registered, or built in and importable)."""
    names = set(_REGISTRY)
    for name, module in _BUILTIN.items():
        try:
            if importlib.util.find_spec(module) is not None:
                names.add(name)
        except ModuleNotFoundError:
            pass
    return sorted(names)


def get_method_class(name: str) -> type[SearchMethod]:
    """The method class registered under `name` (built-in methods are imported on first use)."""
    if name not in _REGISTRY and name in _BUILTIN:
        importlib.import_module(_BUILTIN[name])
    cls = _REGISTRY.get(name)
    if cls is None:
        raise LossforgeError(f"search.method: {name!r} is not available (known: {', '.join(method_names())})")
    return cls


def make_method(params: Params, problem: Any, state_dir: Path) -> SearchMethod:
    """The search method named by `search.method`, resumed from `state_dir` when a checkpoint exists."""
    return get_method_class(params.search.method).create(params, problem, Path(state_dir))


__all__ = ["Candidate", "Record", "SearchMethod", "get_method_class", "make_method", "method_names",
           "register_method"]
