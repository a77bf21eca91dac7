"""Regularised (aging) evolution over loss graphs, steady-state (AutoLoss-Zero §3.2, appendix A).

The population is a sliding window of the P most recently *evaluated* individuals (in the order their
results came back); the oldest one falls out when a new one arrives, whatever its score (aging).
Several individuals may be in flight at once: `ask()` hands out a new one, `tell()` feeds its score back,
in any order.

Choices the paper leaves open (documented here, tested in tests/test_evolution.py):
- The first K individuals handed out are random graphs ("init"). After that a parent is chosen by
  tournament; while no evaluated individual has a valid score yet (all in flight, or all failed) `ask()`
  keeps handing out random graphs instead of blocking.
- Only individuals with a valid (finite) score take part in tournaments: failed / NaN evaluations are
  told with `score=None`; they still occupy a window slot until they age out, but never become parents.
- Tournament size = ceil(T · n) over the n scored members of the window, at least
  `min_tournament_size` (2 by default, so that selection pressure exists for small populations; the
  paper's 5% of 20 would otherwise be a single random pick), at most n. Sampling is without replacement;
  the highest score wins, a tie goes to the earliest member of the sample.
- `ask(accept=...)` repeats the offspring step *for the same parent* until `accept(graph)` is true
  (the paper repeats initialisation / mutation until the loss passes the rejection protocol); after
  `max_attempts` failures it raises `SearchStalledError`.
"""

from __future__ import annotations

import math
import random
from collections import deque
from dataclasses import asdict, dataclass, fields
from typing import Any, Callable, Iterable, Sequence

from components.errors import LossforgeError

STATE_FORMAT = "lossforge.evolution/1"


class SearchStalledError(LossforgeError):
    """No candidate passed the acceptance test within the allowed number of attempts."""


@dataclass(frozen=True)
class EvolutionConfig:
    """Hyper-parameters of the regularised evolution (paper defaults)."""

    initial_population: int = 20  # K
    tournament_fraction: float = 0.05  # T
    min_tournament_size: int = 2
    max_population: int = 2500  # P
    budget: int = 500  # proxy evaluations (duplicates reused from the cache do not count)
    max_attempts: int = 100_000  # generation/mutation attempts per handed-out candidate
    stall_warning_every: int = 500  # warn after every this many rejected candidates in a row (0 = never)
    depth: int = 3  # D, initial depth of random trees
    operator_set: str = "autoloss_zero"  # named operator set (components.search.operators)
    # warm start, not in the paper: losses (names of the task's graph baselines, or loss JSON files) handed out first
    # as members of the initial population, so that a small budget breeds from them instead of from random trees
    seed_losses: tuple[str, ...] = ()

    def __post_init__(self) -> None:
        if isinstance(self.seed_losses, list):
            object.__setattr__(self, "seed_losses", tuple(self.seed_losses))
        checks = [
            ("initial_population", self.initial_population >= 1),
            ("tournament_fraction", 0.0 < self.tournament_fraction <= 1.0),
            ("min_tournament_size", self.min_tournament_size >= 1),
            ("max_population", self.max_population >= 1),
            ("budget", self.budget >= 0),
            ("max_attempts", self.max_attempts >= 1),
            ("stall_warning_every", isinstance(self.stall_warning_every, int) and self.stall_warning_every >= 0),
            ("depth", self.depth >= 1),
            ("operator_set", isinstance(self.operator_set, str) and bool(self.operator_set)),
            ("seed_losses", isinstance(self.seed_losses, (tuple, list))
             and all(isinstance(v, str) and v for v in self.seed_losses)
             and len(self.seed_losses) <= self.initial_population),
        ]
        for name, ok in checks:
            if not ok:
                raise LossforgeError(f"EvolutionConfig.{name}: invalid value {getattr(self, name)!r}")

    def to_dict(self) -> dict[str, Any]:
        """JSON-able form."""
        return asdict(self)

    @classmethod
    def from_dict(cls, data: dict[str, Any]) -> "EvolutionConfig":
        """Rebuild from `to_dict()` output; unknown fields are an error."""
        known = {f.name for f in fields(cls)}
        unknown = set(data) - known
        if unknown:
            raise LossforgeError(f"EvolutionConfig: unknown field(s) {sorted(unknown)}")
        data = dict(data)
        if isinstance(data.get("seed_losses"), list):
            data["seed_losses"] = tuple(data["seed_losses"])
        return cls(**data)


@dataclass
class Individual:
    """One loss graph of the search: `score` is None while in flight or when its evaluation failed."""

    id: int
    graph: Any  # LossGraph
    parent_id: int | None
    mutation: str
    score: float | None = None
    status: str = "in_flight"

    @property
    def scored(self) -> bool:
        """True when the individual has a valid score (may be a parent)."""
        return self.score is not None


def _clean_score(score: float | None) -> float | None:
    if score is None:
        return None
    try:
        value = float(score)
    except (TypeError, ValueError):
        raise LossforgeError(f"tell: score must be a number or None, got {score!r}") from None
    return value if math.isfinite(value) else None


def rng_state_to_json(rng: random.Random) -> list:
    """`random.Random.getstate()` as JSON-able lists."""
    version, internal, gauss = rng.getstate()
    return [version, list(internal), gauss]


def rng_state_from_json(data: Any) -> tuple:
    """Inverse of `rng_state_to_json` (validated)."""
    try:
        version, internal, gauss = data
        state = (int(version), tuple(int(v) for v in internal), gauss)
        random.Random().setstate(state)
    except (TypeError, ValueError) as exc:
        raise LossforgeError(f"evolution state: invalid rng state ({exc})") from None
    return state


class RegularizedEvolution:
    """Steady-state regularised evolution.

    `generator` provides `random_graph(task) -> LossGraph` and `offspring(graph) -> (LossGraph, str)`
    (components.search.generation.TreeGenerator); it must draw from the same `rng` so that saving the rng
    state captures all randomness.
    """

    def __init__(self, config: EvolutionConfig, generator: Any, task: str, rng: random.Random,
                 seeds: Sequence[Any] = ()):
        self.config = config
        self.generator = generator
        self.task = task
        self.rng = rng
        # warm start (`evolution.seed_losses`): these graphs are handed out first, as part of the initial population
        self.seeds = list(seeds)
        self.population: deque[Individual] = deque(maxlen=config.max_population)
        self.in_flight: dict[int, Individual] = {}
        self.next_id = 0
        self.told = 0

    # ----------------------------------------------------------------- selection / breeding
    def tournament_size(self, n_scored: int) -> int:
        """Number of scored individuals sampled per tournament."""
        if n_scored <= 0:
            return 0
        k = math.ceil(self.config.tournament_fraction * n_scored - 1e-9)
        return max(min(self.config.min_tournament_size, n_scored), min(k, n_scored))

    def select_parent(self) -> Individual | None:
        """Tournament winner, or None while the initial population is being handed out / nobody is scored."""
        if self.next_id < self.config.initial_population:
            return None
        scored = [ind for ind in self.population if ind.scored]
        if not scored:
            return None
        sample = self.rng.sample(scored, self.tournament_size(len(scored)))
        return tournament_winner(sample)

    def breed(self, parent: Individual | None) -> tuple[Any, str]:
        """A random graph (parent None) or an offspring of `parent`: (graph, description)."""
        if parent is None:
            return self.generator.random_graph(self.task), "init"
        return self.generator.offspring(parent.graph)

    def breed_by_branch(self, parent: Individual | None, accept_branch: Callable[[str, Any], bool]) -> tuple[Any, str]:
        """Paper A.2: "the initialization / mutation process is repeated for each loss branch separately until
        it passes the loss-rejection protocol". `accept_branch(name, single-branch graph)` screens one branch;
        returns the graph of the accepted branches and a description ("<branch>=<what>,...")."""
        from components.search.graph import Branch, LossGraph

        template = self.generator.random_graph(self.task) if parent is None else parent.graph
        branches, described = {}, []
        for name, branch in template.branches.items():
            for _ in range(self.config.max_attempts):
                if parent is None:
                    tree, what = self.generator.random_tree(branch.tree.inputs, branch.tree.operator_set), "init"
                else:
                    tree, what = self.generator.offspring_tree(branch.tree)
                # screened with weight 1: the protocol's lr and η are for the tree itself (a branch weight of 10
                # would multiply the step size; measured: GIoU on reg_rpn fails at lr 0.01 with it, passes without)
                if accept_branch(name, LossGraph(self.task, {name: Branch(tree, 1.0)})):
                    break
            else:
                who = "random initialisation" if parent is None else f"offspring of individual {parent.id}"
                raise SearchStalledError(f"no {who} of branch {name!r} was accepted in {self.config.max_attempts} "
                                         "attempts (raise max_attempts or relax the screening threshold)")
            branches[name] = Branch(tree, branch.weight)
            described.append(f"{name}={what}")
        return LossGraph(self.task, branches), ",".join(described)

    def ask(self, accept: Callable[[Any], bool] | None = None,
            accept_branch: Callable[[str, Any], bool] | None = None) -> Individual:
        """Hand out a new individual (now in flight).

        `accept(graph)` (e.g. the loss-rejection protocol) is retried on fresh offspring of the same
        parent until it returns True; raises SearchStalledError after `config.max_attempts` tries. With
        `accept_branch`, each branch is bred until it passes on its own first (`breed_by_branch`).
        """
        parent = self.select_parent()
        while parent is None and self.next_id < len(self.seeds):
            # a seed is handed out as given (`accept` still runs: it records the screening, and a seed that fails
            # the protocol is skipped like any rejected graph, so it never costs a proxy evaluation)
            graph = self.seeds[self.next_id]
            if accept is None or accept(graph):
                return self._register(graph, None, "seed")
            self.seeds.pop(self.next_id)
        for _ in range(self.config.max_attempts):
            if accept_branch is not None:
                graph, mutation = self.breed_by_branch(parent, accept_branch)
            else:
                graph, mutation = self.breed(parent)
            if accept is None or accept(graph):
                return self._register(graph, parent, mutation)
        who = "random initialisation" if parent is None else f"offspring of individual {parent.id}"
        raise SearchStalledError(
            f"no {who} was accepted in {self.config.max_attempts} attempts (raise max_attempts "
            "or relax the screening threshold)"
        )

    def _register(self, graph: Any, parent: Individual | None, mutation: str) -> Individual:
        ind = Individual(self.next_id, graph, None if parent is None else parent.id, mutation)
        self.next_id += 1
        self.in_flight[ind.id] = ind
        return ind

    def tell(self, individual_id: int, score: float | None, status: str = "ok") -> Individual:
        """Feed back the result of an in-flight individual (None / non-finite score = never a parent)."""
        ind = self.in_flight.pop(individual_id, None)
        if ind is None:
            raise LossforgeError(f"tell: individual {individual_id!r} is not in flight")
        ind.score = _clean_score(score)
        ind.status = status
        self.population.append(ind)  # deque(maxlen=P) drops the oldest: aging
        self.told += 1
        return ind

    # ----------------------------------------------------------------- queries
    def top(self, k: int) -> list[Individual]:
        """The k best scored individuals of the current window (best first)."""
        scored = [ind for ind in self.population if ind.scored]
        scored.sort(key=lambda ind: (-ind.score, ind.id))
        return scored[:k]

    def top_mean(self, k: int = 5) -> float | None:
        """Mean score of the top-k of the window (the Fig. 4 curve), None if nobody is scored."""
        best = self.top(k)
        return sum(ind.score for ind in best) / len(best) if best else None

    # ----------------------------------------------------------------- persistence
    def state_dict(self) -> dict[str, Any]:
        """JSON-able state: config, window, in-flight individuals, counters, rng state."""
        from components.search.graph_json import graph_to_dict

        def ind_dict(ind: Individual) -> dict[str, Any]:
            return {
                "id": ind.id,
                "graph": graph_to_dict(ind.graph),
                "parent_id": ind.parent_id,
                "mutation": ind.mutation,
                "score": ind.score,
                "status": ind.status,
            }

        return {
            "format": STATE_FORMAT,
            "task": self.task,
            "config": self.config.to_dict(),
            "next_id": self.next_id,
            "told": self.told,
            "population": [ind_dict(i) for i in self.population],
            "in_flight": [ind_dict(i) for i in self.in_flight.values()],
            "rng": rng_state_to_json(self.rng),
        }

    def load_state_dict(self, state: dict[str, Any]) -> None:
        """Restore `state_dict()` output (validated; the rng is restored in place)."""
        from components.search.graph_json import graph_from_dict

        if not isinstance(state, dict) or state.get("format") != STATE_FORMAT:
            got = state.get("format") if isinstance(state, dict) else type(state).__name__
            raise LossforgeError(f"evolution state: format must be {STATE_FORMAT!r}, got {got!r}")
        if state.get("task") != self.task:
            raise LossforgeError(
                f"evolution state: task is {state.get('task')!r}, this search is for {self.task!r}"
            )
        try:
            config = EvolutionConfig.from_dict(state["config"])

            def ind(d: dict[str, Any]) -> Individual:
                return Individual(
                    id=int(d["id"]),
                    graph=graph_from_dict(d["graph"]),
                    parent_id=None if d["parent_id"] is None else int(d["parent_id"]),
                    mutation=str(d["mutation"]),
                    score=_clean_score(d["score"]),
                    status=str(d["status"]),
                )

            population = [ind(d) for d in state["population"]]
            in_flight = [ind(d) for d in state["in_flight"]]
            next_id, told = int(state["next_id"]), int(state["told"])
            rng_state = rng_state_from_json(state["rng"])
        except LossforgeError:
            raise
        except (KeyError, TypeError, ValueError, AttributeError) as exc:
            raise LossforgeError(f"evolution state: missing or invalid field ({exc!r})") from None
        ids = [i.id for i in population] + [i.id for i in in_flight]
        if len(set(ids)) != len(ids) or any(i >= next_id or i < 0 for i in ids):
            raise LossforgeError("evolution state: individual ids are duplicated or out of range")
        if len(population) > config.max_population:
            raise LossforgeError("evolution state: population is larger than max_population")
        self.config = config
        self.population = deque(population, maxlen=config.max_population)
        self.in_flight = {i.id: i for i in in_flight}
        self.next_id, self.told = next_id, told
        self.rng.setstate(rng_state)


def tournament_winner(sample: Iterable[Individual]) -> Individual | None:
    """Highest-scored member of `sample` (first one on ties); unscored members never win."""
    best: Individual | None = None
    for ind in sample:
        if ind.scored and (best is None or ind.score > best.score):
            best = ind
    return best
