"""CSE-AutoLoss as search method `cse` (`lossforge search --task detection --method cse`): evolution over the
classification and regression branches of a `detection_cse` loss, each bred tree verified for its convergence
properties, each verified loss checked by a model-optimisation simulation, the survivors trained on the proxy.

Funnel (the `counters` the flows log to MLflow as `funnel_<name>`):
    generated_branches = verified_branches + Σ rejected_<convergence reason>   (one per bred branch tree)
    verified = graphs whose two trees passed;  simulated = verified graphs that ran the simulation
    simulated = accepted + rejected_simulation_no_gain + rejected_simulation_below_reference
                + rejected_simulation_diverged
    accepted = duplicates + handed out;  evaluated + nan_stopped + failed = proxy results (the budget)

Decisions:
- Breeding reuses components/search/evolution.py (regularised evolution, `breed_by_branch`: each branch is
  bred until its own check passes, paper A.2's scheme) and components/search/generation.py's mutations, on
  task `detection_cse` with the `cse` operator set. The convergence probe and the simulation images are drawn
  from `search.seed`; all breeding randomness is the evolution's `random.Random(seed)`, whose state is saved.
- Simulation verdicts are stored by graph hash (in the state): a copied or resumed loss is not simulated again
  (`simulation_reused`). An accepted loss whose hash already has a proxy result is a duplicate: it joins the
  population with that score without using the budget (as the AutoLoss-Zero engine's duplicates).
- Seed losses (`cse.seed_losses`) go through both stages like bred ones.
- The simulation trains on images of S_train (the split manifest `<split.dir>/train.txt` the split stage wrote).
- State: one JSON file (`lossforge.cse-search/1`); in-flight candidates are handed out again after a resume.
"""

from __future__ import annotations

import logging
import random
from pathlib import Path
from typing import Any, Callable

from components.atomic_io import read_json, write_json_atomic
from components.errors import LossforgeError
from components.search.method import SearchMethod, register_method
from components.search.proxy_outcome import COUNTER, RECORD_STATUS, finite, proxy_outcome

STATE_FORMAT = "lossforge.cse-search/1"
TASK = "detection_cse"
logger = logging.getLogger("lossforge.search")

_STATUS_OF, _COUNTER_OF, _finite = RECORD_STATUS, COUNTER, finite


def seed_graphs(names: tuple[str, ...] | list[str]) -> list[Any]:
    """The graphs of `cse.seed_losses`: names of components/cse/published.py or `detection_cse` loss JSON files."""
    from components.cse.published import PUBLISHED, published_graph
    from components.search.graph_json import load_graph

    graphs = []
    for name in names:
        if name in PUBLISHED:
            graphs.append(published_graph(name))
            continue
        if not (name.endswith(".json") or Path(name).is_file()):
            raise LossforgeError(f"cse.seed_losses: {name!r} is neither a loss JSON file nor one of "
                                 f"{', '.join(PUBLISHED)}")
        try:
            graph = load_graph(name)
        except LossforgeError as exc:
            raise LossforgeError(f"cse.seed_losses: {name!r}: {exc}") from None
        if graph.task != TASK:
            raise LossforgeError(f"cse.seed_losses: {name!r} is a loss for task {graph.task!r}, not {TASK!r}")
        graphs.append(graph)
    return graphs


def _training_set(params: Any) -> Any:
    from components.tasks.base import get_task
    from components.tasks.splits import read_manifest

    manifest = Path(params.split.dir) / "train.txt"
    if not manifest.exists():
        raise LossforgeError(f"{manifest}: split manifest not found (the cse simulation trains on S_train; run the "
                             "split stage first)")
    return get_task(params.search.task).open_dataset(params.data.path, ids=read_manifest(manifest))


@register_method
class CSEMethod(SearchMethod):
    """CSE-AutoLoss: evolution + convergence-property verification + model-optimisation simulation."""

    name = "cse"
    loss_type = "graph"
    uses_screening_problem = False  # the convergence checks and the simulation bring their own inputs

    def __init__(self, config: Any, *, budget: int, seed: int = 0, probe: Any = None, simulator: Any = None,
                 seeds: Any = None, on_warning: Callable[[str], None] | None = None):
        from components.cse.convergence import build_probe
        from components.search.evolution import EvolutionConfig, RegularizedEvolution
        from components.search.generation import TreeGenerator

        self.config = config
        self.budget = int(budget)
        self.seed = int(seed)
        self.probe = probe if probe is not None else build_probe(
            self.seed, logit_samples=config.logit_samples, box_samples=config.box_samples,
            min_gradient=config.min_gradient, gradient_tolerance=config.gradient_tolerance)
        self.simulator = simulator  # None: the simulation stage is off
        self.seeds = list(seed_graphs(config.seed_losses) if seeds is None else seeds)
        self.evolution_config = EvolutionConfig(
            initial_population=config.initial_population, tournament_fraction=config.tournament_fraction,
            min_tournament_size=config.min_tournament_size, max_population=config.max_population,
            budget=self.budget, max_attempts=config.max_attempts, stall_warning_every=config.stall_warning_every,
            depth=config.depth, operator_set="cse")
        self.rng = random.Random(self.seed)
        generator = TreeGenerator("cse", depth=config.depth, rng=self.rng)
        self.evolution = RegularizedEvolution(self.evolution_config, generator, TASK, self.rng, seeds=self.seeds)
        self._counters: dict[str, int] = {
            "generated_branches": 0, "verified_branches": 0, "verified": 0, "simulated": 0, "simulation_reused": 0,
            "accepted": 0, "duplicates": 0, "evaluated": 0, "nan_stopped": 0, "failed": 0,
        }
        self._history: list[dict[str, Any]] = []
        self._progress: list[dict[str, Any]] = []
        self.simulations: dict[str, dict[str, Any]] = {}  # graph hash -> SimulationResult.to_dict()
        self._verified_trees: set[str] = set()  # canonical forms of trees that passed (in memory)
        self._pending: dict[int, dict[str, Any]] = {}  # id -> {"graph", "parent_id", "mutation", "simulation"}
        self._reissue: list[int] = []
        self._last_simulation: dict[str, Any] | None = None
        self.rejected_in_row = 0
        self.on_warning = on_warning

    # ------------------------------------------------------------------ creation
    @classmethod
    def create(cls, params: Any, problem: Any, state_dir: Path) -> "CSEMethod":
        """Resume from `state_dir/checkpoint.json` when it exists, else start a new search. `problem` (the
        task's AutoLoss-Zero probe) is not used: the cse stages bring their own inputs."""
        from components.cse.simulation import OptimizationSimulator

        if params.search.task != "detection":
            raise LossforgeError(f"search.method: 'cse' searches detection losses (search.task is "
                                 f"{params.search.task!r})")
        config = params.config("cse")
        simulator = None
        if config.simulation:
            simulator = OptimizationSimulator(
                _training_set(params), params.config("proxy"), images_per_class=config.images_per_class,
                iterations=config.simulation_iterations, batch_size=config.simulation_batch_size,
                lr=config.simulation_lr, min_gain=config.min_ap_gain, min_ratio=config.min_ap_ratio,
                seed=params.search.seed, metric=params.search.metric)
        method = cls(config, budget=params.search.budget, seed=params.search.seed, simulator=simulator)
        checkpoint = Path(state_dir) / "checkpoint.json"
        if checkpoint.exists():
            method.load_state(read_json(checkpoint), str(checkpoint))
        return method

    # ------------------------------------------------------------------ stages
    def _count_rejection(self, reason: str) -> None:
        key = f"rejected_{reason}"
        self._counters[key] = self._counters.get(key, 0) + 1
        self.rejected_in_row += 1
        every = self.config.stall_warning_every
        if every and self.rejected_in_row % every == 0:
            message = (f"search: {self.rejected_in_row} candidates rejected in a row (cse funnel: "
                       f"{', '.join(f'{k}={v}' for k, v in sorted(self.rejections().items()))}); lower "
                       "cse.min_ap_ratio / cse.min_ap_gain, raise cse.simulation_iterations or seed the search "
                       "(cse.seed_losses)")
            if self.on_warning is not None:  # the caller shows it (the flows: run log + console), once
                self.on_warning(message)
            else:
                logger.warning(message)

    def _verify_tree(self, branch: str, tree: Any) -> bool:
        """Convergence-property verification of one branch tree (counted in the funnel)."""
        from components.cse.convergence import check_branch

        self._counters["generated_branches"] += 1
        verdict = check_branch(branch, tree, self.probe)
        if not verdict.accepted:
            self._count_rejection(verdict.reason)
            return False
        self._counters["verified_branches"] += 1
        self._verified_trees.add(f"{branch}:{tree.canonical()}")
        self.rejected_in_row = 0  # the streak counts rejections in a row at either stage (as the evolution engine's)
        return True

    def _accept_branch(self, branch: str, graph: Any) -> bool:
        return self._verify_tree(branch, graph.branches[branch].tree)

    def _accept(self, graph: Any) -> bool:
        """A whole graph: its trees verified (seeds are checked here; bred trees already were), then simulated."""
        for branch, b in graph.branches.items():
            if f"{branch}:{b.tree.canonical()}" not in self._verified_trees and not self._verify_tree(branch, b.tree):
                return False
        self._counters["verified"] += 1
        self._last_simulation = None
        if self.simulator is not None:
            key = graph.hash()
            result = self.simulations.get(key)
            if result is None:
                self._counters["simulated"] += 1
                result = self.simulator.simulate(graph).to_dict()
                self.simulations[key] = result
                if not result["accepted"]:
                    self._count_rejection(result["reason"])
                    return False
            else:
                self._counters["simulation_reused"] += 1
                if not result["accepted"]:
                    self.rejected_in_row += 1
                    return False
            self._last_simulation = result
        self._counters["accepted"] += 1
        self.rejected_in_row = 0
        return True

    # ------------------------------------------------------------------ ask / tell
    @property
    def reported(self) -> int:
        return self._counters["evaluated"] + self._counters["nan_stopped"] + self._counters["failed"]

    @property
    def done(self) -> bool:
        return self.reported >= self.budget

    def ask(self, n: int) -> list[dict[str, Any]]:
        """Up to n verified and simulated candidates (in-flight ones from before a resume first)."""
        from components.search.evolution import SearchStalledError

        out = []
        while self._reissue and len(out) < n:
            cid = self._reissue.pop(0)
            if cid in self._pending:
                out.append(self._handout(cid))
        while len(out) < n and self.reported + len(self._pending) < self.budget:
            try:
                ind = self.evolution.ask(accept=self._accept, accept_branch=self._accept_branch)
            except SearchStalledError as exc:
                counts = ", ".join(f"{k}={v}" for k, v in sorted(self.rejections().items()))
                raise SearchStalledError(f"cse search stalled: {exc} (rejections so far: {counts})") from None
            previous = self._evaluated_record(ind.graph.hash())
            if previous is not None:  # the same loss was trained already: reuse its score, no budget used
                self._reuse(ind, previous)
                continue
            self._pending[ind.id] = {"graph": ind.graph, "parent_id": ind.parent_id, "mutation": ind.mutation,
                                     "simulation": self._last_simulation}
            out.append(self._handout(ind.id))
        return out

    def _handout(self, cid: int) -> dict[str, Any]:
        from components.search.graph_json import graph_to_dict

        item = self._pending[cid]
        sim = item.get("simulation") or {}
        graph = item["graph"]
        return {"id": cid, "hash": graph.hash(), "loss": {"type": "graph", "graph": graph_to_dict(graph)},
                "screening_g": sim.get("ap")}

    def _evaluated_record(self, graph_hash: str) -> dict[str, Any] | None:
        for rec in self._history:
            if rec["hash"] == graph_hash and rec["status"] in ("evaluated", "nan-stopped"):
                return rec
        return None

    def _reuse(self, ind: Any, previous: dict[str, Any]) -> None:
        target = previous.get("target") if previous["status"] == "evaluated" else None
        self.evolution.tell(ind.id, target, status="duplicate")
        self._counters["duplicates"] += 1
        record = self._record(ind.id, ind.graph, ind.parent_id, ind.mutation, self._last_simulation)
        record.update(status="duplicate-reused", target=target, metrics=dict(previous.get("metrics") or {}),
                      reused_from=previous["id"])
        self._history.append(record)
        self._log_progress()

    def tell(self, candidate_id: Any, result: Any) -> dict[str, Any]:
        cid = int(candidate_id)
        item = self._pending.get(cid)
        if item is None:
            raise LossforgeError(f"search: candidate {candidate_id!r} is not in flight (unknown or already reported)")
        status, score = proxy_outcome(result)
        del self._pending[cid]
        self.evolution.tell(cid, score, status=status)
        self._counters[_COUNTER_OF[status]] += 1
        record = self._record(cid, item["graph"], item["parent_id"], item["mutation"], item.get("simulation"))
        record.update(status=_STATUS_OF[status], target=score,
                      metrics={str(k): _finite(v) for k, v in (getattr(result, "metrics", None) or {}).items()},
                      iterations=getattr(result, "iterations", None), seconds=_finite(getattr(result, "seconds", None)),
                      message=str(getattr(result, "message", "") or ""))
        self._history.append(record)
        self._log_progress()
        return record

    def _record(self, cid: int, graph: Any, parent_id: Any, mutation: str, simulation: Any) -> dict[str, Any]:
        from components.search.graph_json import graph_to_dict

        simulation = simulation or {}
        return {"id": cid, "hash": graph.hash(), "canonical": graph.canonical(), "formula": graph.formula(),
                "graph": graph_to_dict(graph), "parent_id": parent_id, "mutation": mutation,
                "screening_score": simulation.get("ap"), "simulation": dict(simulation), "status": None,
                "target": None, "metrics": {}, "iterations": None, "seconds": None, "message": "", "reused_from": None}

    def _log_progress(self) -> None:
        self._progress.append({"evaluations": self.reported, "generated": self._counters["generated_branches"],
                               "top5_mean": self.evolution.top_mean(5)})

    # ------------------------------------------------------------------ results
    @property
    def counters(self) -> dict[str, int]:
        """The funnel (module docstring) plus `in_flight`: a copy, what the flows log."""
        out = dict(self._counters)
        out["in_flight"] = len(self._pending)
        return out

    def rejections(self) -> dict[str, int]:
        """Rejected trees / graphs by reason."""
        return {k[len("rejected_"):]: v for k, v in self._counters.items() if k.startswith("rejected_")}

    @property
    def history(self) -> list[dict[str, Any]]:
        return self._history

    def best(self) -> dict[str, Any] | None:
        evaluated = [r for r in self._history if r["status"] == "evaluated" and r["target"] is not None]
        return max(evaluated, key=lambda r: (r["target"], -r["id"])) if evaluated else None

    def progress(self) -> list[dict[str, Any]]:
        return list(self._progress)

    # ------------------------------------------------------------------ state
    def state_dict(self) -> dict[str, Any]:
        from components.search.graph_json import graph_to_dict

        return {
            "format": STATE_FORMAT, "task": TASK, "seed": self.seed, "budget": self.budget,
            "config": self.config.to_dict(), "seeds": [graph_to_dict(g) for g in self.seeds],
            "evolution": self.evolution.state_dict(),
            "pending": [{"id": cid, "simulation": item.get("simulation")} for cid, item in self._pending.items()],
            "counters": dict(self._counters), "rejected_in_row": self.rejected_in_row,
            "simulations": self.simulations, "history": self._history, "progress": self._progress,
        }

    def save(self, path: str | Path) -> Path:
        return write_json_atomic(path, self.state_dict())

    def load_state(self, state: Any, where: str = "search state") -> None:
        """Restore `state_dict()` output saved by a search with the same settings."""
        if not isinstance(state, dict) or state.get("format") != STATE_FORMAT:
            got = state.get("format") if isinstance(state, dict) else type(state).__name__
            raise LossforgeError(f"{where}: not a cse search state (format {got!r}, expected {STATE_FORMAT!r})")
        if state.get("config") != self.config.to_dict() or int(state.get("seed", -1)) != self.seed:
            raise LossforgeError(f"{where}: saved with other cse settings or seed (a new search needs a new state "
                                 "folder)")
        try:
            self.evolution.load_state_dict(state["evolution"])
            self.evolution.config = self.evolution_config
            in_flight = self.evolution.in_flight
            pending = {}
            for item in state["pending"]:
                ind = in_flight[int(item["id"])]
                pending[ind.id] = {"graph": ind.graph, "parent_id": ind.parent_id, "mutation": ind.mutation,
                                   "simulation": item.get("simulation")}
            if set(pending) != set(in_flight):
                raise LossforgeError("pending candidates and in-flight individuals disagree")
            self._counters.update({str(k): int(v) for k, v in dict(state["counters"]).items()})
            self.rejected_in_row = int(state.get("rejected_in_row", 0))
            self.simulations = dict(state["simulations"])
            self._history, self._progress = list(state["history"]), list(state["progress"])
        except LossforgeError as exc:
            raise LossforgeError(f"{where}: {exc}") from None
        except (KeyError, TypeError, ValueError, AttributeError) as exc:
            raise LossforgeError(f"{where}: missing or invalid field ({exc!r})") from None
        self._pending = pending
        self._reissue = list(pending)

    # ------------------------------------------------------------------ export
    def loss_spec(self, record: dict[str, Any]) -> dict[str, Any]:
        return {"type": "graph", "graph": record["graph"]}

    def write_loss_files(self, record: dict[str, Any], folder: Path, stem: str) -> tuple[Path, Path]:
        """The record's loss as JSON (lossforge.loss/1, task detection_cse) and as a standalone nn.Module file."""
        from components.search.export import write_module
        from components.search.graph_json import graph_from_dict, save_graph

        graph = graph_from_dict(record["graph"])
        folder.mkdir(parents=True, exist_ok=True)
        json_path, py_path = folder / f"{stem}.json", folder / f"{stem}.py"
        if not json_path.exists():
            save_graph(graph, json_path, name=stem, metadata={"method": "cse", "simulation": record.get("simulation")})
        if not py_path.exists():
            write_module(graph, py_path)
        return json_path, py_path


__all__ = ["CSEMethod", "STATE_FORMAT", "seed_graphs"]
