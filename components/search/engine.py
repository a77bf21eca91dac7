"""The AutoLoss-Zero search loop: generation → loss rejection → gradient-equivalence check → proxy hand-out.

`SearchEngine` is what the flows drive (plain Python, no Prefect/MLflow):

    engine = SearchEngine(problem, task="segmentation", config=EvolutionConfig(budget=500), seed=0)
    while not engine.done:
        cand = engine.next_candidate()          # None: every remaining proxy evaluation is in flight
        result = train_proxy(...cand.graph...)  # ProxyResult, possibly in parallel, in any order
        engine.report(cand.id, result)
        engine.save("state.json")               # a killed search resumes from here

Decisions (tested in tests/test_search_engine.py):
- Screening and equivalence: every generated graph goes through `screening.screen(..., cache=...)`,
  which computes the gradient fingerprint first and reuses a cached verdict for a known fingerprint
  (counted in `screening_reused`). An accepted child whose fingerprint already has a proxy result
  ("ok" or "nan", under the same `proxy_key`) is a gradient-duplicate: it joins the population with
  the reused score, is recorded in `history` with status "duplicate-reused" (and `reused_from`) and
  counted in `counters["duplicates"]`; it does NOT consume the proxy budget (the paper skips its
  re-evaluation). Failed proxy runs ("failed": an exception, maybe transient) are not cached, so an
  equivalent loss is trained again. A fingerprint matching a candidate still in flight is not a
  duplicate yet: it is handed out for training too.
- The budget counts proxy results reported (evaluated + nan_stopped + failed). `next_candidate()`
  returns None once reported + in-flight reaches the budget; `done` is True once reported ≥ budget.
- Generation/mutation is repeated for the same parent until a child passes the protocol; after
  `config.max_attempts` rejected children `next_candidate()` raises `SearchStalledError` (a
  LossforgeError) with the best g of the streak, the threshold and the rejection counts, rather than
  returning None (None means "budget used").
- A search that accepts nothing says so: every `config.stall_warning_every` (500) rejected candidates
  in a row, a one-line warning (count, best g seen vs the threshold and gain rule, what to change) goes
  to `on_warning(message)` when given, else to the `logging` logger "lossforge.search". The streak (count
  and best g) is part of the saved state.
- Funnel counters: generated = accepted + Σ rejected_<reason>; accepted = duplicates + handed out.
- Multi-branch tasks (the problem has `branch_problems`, e.g. detection): each branch's tree is bred and
  screened on its own probe until it passes (paper A.2, `RegularizedEvolution.breed_by_branch`); then
  `generated` and `rejected_*` count branch trees, `accepted_branches` the trees that passed, and `accepted`
  the whole candidates (its g is the lowest branch g; its fingerprint is taken on the whole probe). The
  per-branch verdict caches live in memory only (a resumed search rebuilds them).
- State (`save` / `SearchEngine.load`) is one JSON file: evolution window and in-flight individuals,
  rng state, id counter, history, counters, progress curve, configs, problem key and the cache (inline,
  or the path of its own file which is saved alongside). In-flight candidates at save time are handed
  out again by `next_candidate()` after a restore, with the same id, before anything new is generated.
  All randomness is the one `random.Random(seed)` shared by generator and evolution (screening and
  the probe are deterministic; no torch generator is involved). What is bred next depends on the results
  reported so far, so the caller reports them in hand-out order, not as they finish (flows/search_flow.py):
  then, with any number of workers, two runs and a resumed run (a stored result is reported in its turn,
  after the reissued candidates before it) take exactly the same path (tests/test_reproducibility.py).
- `history` holds one JSON record per candidate with a result (trained or reused): id, hash,
  canonical, formula, graph (loss_json), parent_id, mutation, screening_score (g), fingerprint,
  status (evaluated | nan-stopped | failed | duplicate-reused), target, metrics, iterations, seconds.
"""

from __future__ import annotations

import dataclasses
import logging
import random
import re
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Callable, Mapping

from components.atomic_io import read_json, write_json_atomic
from components.errors import LossforgeError
from components.search.evolution import EvolutionConfig, Individual, RegularizedEvolution, SearchStalledError
from components.search.proxy_outcome import COUNTER, RECORD_STATUS, field, finite, proxy_outcome

STATE_FORMAT = "lossforge.search/1"
LOGGER_NAME = "lossforge.search"
logger = logging.getLogger(LOGGER_NAME)

__all__ = ["Candidate", "SearchEngine", "SearchStalledError", "STATE_FORMAT"]

_STATUS_OF, _COUNTER_OF, _field, _finite = RECORD_STATUS, COUNTER, field, finite


@dataclass(frozen=True)
class Candidate:
    """A screened, accepted, non-duplicate loss graph to be trained on the proxy task."""

    id: int
    graph: Any  # LossGraph
    parent_id: int | None
    mutation: str
    screening: Any  # ScreeningResult


def _slug(reason: str) -> str:
    slug = re.sub(r"[^0-9a-zA-Z]+", "_", str(reason) or "unknown").strip("_").lower()
    return slug or "unknown"


def _json_metrics(metrics: Mapping[str, Any] | None) -> dict[str, float | None]:
    return {str(k): _finite(v) for k, v in (metrics or {}).items()}


def _screening_to_dict(result: Any) -> dict[str, Any]:
    data = result.to_dict()
    data["score"] = _finite(data.get("score"))
    return data


def _screening_from_dict(data: Mapping[str, Any]) -> Any:
    from components.search.screening import ScreeningResult

    return ScreeningResult.from_dict(data)


def _config_to_dict(config: Any) -> dict[str, Any]:
    out = {}
    for f in dataclasses.fields(config):
        value = getattr(config, f.name)
        out[f.name] = list(value) if isinstance(value, tuple) else value
    return out


def _config_from_dict(cls: type, data: Mapping[str, Any]) -> Any:
    kwargs = {}
    for f in dataclasses.fields(cls):
        if f.name in data:
            value = data[f.name]
            kwargs[f.name] = tuple(value) if isinstance(value, list) else value
    unknown = set(data) - {f.name for f in dataclasses.fields(cls)}
    if unknown:
        raise LossforgeError(f"{cls.__name__}: unknown field(s) {sorted(unknown)}")
    return cls(**kwargs)


class SearchEngine:
    """Regularised evolution + loss rejection + gradient-equivalence cache, steady-state, resumable.

    `problem` is a components.search.screening.ScreeningProblem (its `key` names task + metric + probe data);
    `cache` an EquivalenceCache for that key (a fresh in-memory one by default, or give `cache_path`).
    `proxy_key` names the proxy-training settings: cached proxy scores are reused only under the
    same key (e.g. a digest of ProxyConfig + target metric), so a changed proxy never reuses stale scores.
    `on_warning(message)` receives the one-line stall warnings (without it they are logged, see the module docstring).
    Not thread-safe: call it from the one thread that orchestrates the parallel proxy trainings.
    """

    def __init__(
        self,
        problem: Any,
        task: str = "segmentation",
        config: EvolutionConfig | None = None,
        screening_config: Any = None,
        seed: int = 0,
        cache: Any = None,
        cache_path: str | Path | None = None,
        proxy_key: str = "",
        on_warning: Callable[[str], None] | None = None,
        seeds: Any = (),
    ):
        from components.search.equivalence import EquivalenceCache
        from components.search.generation import TreeGenerator
        from components.search.screening import ScreeningConfig

        self.problem = problem
        self.task = task
        self.config = config or EvolutionConfig()
        self.screening_config = screening_config or ScreeningConfig()
        self.seed = int(seed)
        self.proxy_key = str(proxy_key)
        probe_samples = getattr(problem, "samples", None)
        if probe_samples is not None and self.screening_config.samples > probe_samples:
            raise LossforgeError(
                f"search: screening.samples={self.screening_config.samples} but the probe has only "
                f"{probe_samples} samples (build the screening problem with at least that many)"
            )
        problem_task = getattr(problem, "task", task)
        if problem_task != task:
            raise LossforgeError(f"search: the screening problem is for task {problem_task!r}, not {task!r}")
        if cache is None:
            cache = EquivalenceCache(None if cache_path is None else Path(cache_path), problem.key)
        elif getattr(cache, "key", problem.key) != problem.key:
            raise LossforgeError(
                f"search: the equivalence cache is for problem {cache.key!r}, not {problem.key!r}"
            )
        self.cache = cache
        self._branch_caches: dict[str, Any] = {}  # per-branch screening verdicts (in memory; multi-branch tasks)
        self._branch_scores: dict[str, Any] = {}
        self.rng = random.Random(self.seed)
        self.generator = TreeGenerator(self.config.operator_set, depth=self.config.depth, rng=self.rng)
        # warm start: graphs (of this task) handed out first (evolution.seed_losses, resolved by the method)
        self.seeds = list(seeds)
        for graph in self.seeds:
            if getattr(graph, "task", None) != task:
                raise LossforgeError(f"evolution.seed_losses: a seed loss is for task {getattr(graph, 'task', None)!r}, "
                                     f"not {task!r}")
        self.evolution = RegularizedEvolution(self.config, self.generator, task, self.rng, seeds=self.seeds)
        self.counters: dict[str, int] = {
            "generated": 0,
            "accepted": 0,
            "screening_reused": 0,
            "duplicates": 0,
            "evaluated": 0,
            "nan_stopped": 0,
            "failed": 0,
        }
        self.history: list[dict[str, Any]] = []
        self.progress: list[dict[str, Any]] = []
        self._pending: dict[int, Candidate] = {}
        self._reissue: list[int] = []
        self._last_screening: Any = None
        self.on_warning = on_warning
        self.rejected_in_row = 0  # rejected candidates since the last accepted one
        self.best_rejected_g: float | None = None  # best finite g among them

    # ----------------------------------------------------------------- funnel
    @property
    def reported(self) -> int:
        """Proxy results received so far (what the budget counts)."""
        return self.counters["evaluated"] + self.counters["nan_stopped"] + self.counters["failed"]

    @property
    def in_flight(self) -> int:
        """Candidates handed out and not reported yet."""
        return len(self._pending)

    @property
    def done(self) -> bool:
        """True once the proxy budget is used up."""
        return self.reported >= self.config.budget

    def funnel(self) -> dict[str, int]:
        """The counters plus `in_flight` (a copy, for logging)."""
        out = dict(self.counters)
        out["in_flight"] = self.in_flight
        return out

    # ----------------------------------------------------------------- screening
    def _screen(self, graph: Any) -> bool:
        """Acceptance test handed to the evolution: the loss-rejection protocol with the cache."""
        from components.search.screening import screen

        result = screen(graph, self.problem, self.screening_config, cache=self.cache)
        if not self._count_screening(result):
            return False
        self.counters["accepted"] += 1
        self.rejected_in_row, self.best_rejected_g = 0, None
        self._last_screening = result
        return True

    def _count_screening(self, result: Any) -> bool:
        """Count one screening verdict in the funnel (generated, reused, rejected_<reason>); True if accepted."""
        self.counters["generated"] += 1
        if _field(result, "cached", False):
            self.counters["screening_reused"] += 1
        if result.accepted:
            return True
        name = f"rejected_{_slug(result.reason.split(':', 1)[0])}"
        self.counters[name] = self.counters.get(name, 0) + 1
        self._note_rejection(result.score)
        return False

    @property
    def problem_branches(self) -> Mapping[str, Any] | None:
        """branch -> probe of that branch alone, for multi-branch tasks (None: screen whole graphs)."""
        return getattr(self.problem, "branch_problems", None) or None

    def _screen_branch(self, name: str, graph: Any) -> bool:
        """Acceptance test of one branch's tree on the branch's own probe (other branches at their targets)."""
        from components.search.equivalence import EquivalenceCache
        from components.search.screening import screen

        problem = self.problem_branches[name]
        cache = self._branch_caches.get(name)
        if cache is None:
            cache = self._branch_caches[name] = EquivalenceCache(None, problem.key)
        result = screen(graph, problem, self.screening_config, cache=cache)
        if not self._count_screening(result):
            return False
        self.counters["accepted_branches"] = self.counters.get("accepted_branches", 0) + 1
        self.rejected_in_row, self.best_rejected_g = 0, None  # the streak is per branch tree
        self._branch_scores[name] = result.score
        return True

    def _accept_joint(self, graph: Any) -> bool:
        """A graph whose branches each passed their own probe is accepted (paper A.2); its screening result
        carries, for the equivalence check, the per-branch gradient fingerprints (each branch's tree at weight 1
        on its own probe, concatenated in branch order) and, as g, the lowest branch g.

        Per branch, not on the whole probe: there the classification branches' gradients dominate the norm, and
        measured on the detection demo, offspring that changed a regression (or even a classification) tree kept
        the parent's 2-digit norms and were reused as its duplicates without being trained."""
        import time

        from components.search.equivalence import gradient_fingerprint_or_none
        from components.search.graph import Branch, LossGraph
        from components.search.screening import ACCEPTED, ScreeningResult

        start = time.perf_counter()
        parts = []
        for name, branch in graph.branches.items():
            problem = (self.problem_branches or {}).get(name, self.problem)
            single = LossGraph(graph.task, {name: Branch(branch.tree, 1.0)})
            parts.append(gradient_fingerprint_or_none(single, problem, self.screening_config.samples))
        fingerprint = None if any(p is None for p in parts) else tuple(v for p in parts for v in p)
        scores = [s for s in (_finite(self._branch_scores.get(b)) for b in graph.branches) if s is not None]
        self._branch_scores = {}  # a seed (handed out without branch screening) must not show the last graph's g
        self._last_screening = ScreeningResult(True, min(scores) if scores else None, ACCEPTED, fingerprint,
                                               time.perf_counter() - start, 0)
        self.counters["accepted"] += 1
        self.rejected_in_row, self.best_rejected_g = 0, None
        return True

    def _note_rejection(self, score: Any) -> None:
        self.rejected_in_row += 1
        g = _finite(score)
        if g is not None and (self.best_rejected_g is None or g > self.best_rejected_g):
            self.best_rejected_g = g
        every = self.config.stall_warning_every
        if every and self.rejected_in_row % every == 0:
            message = self.stall_message()
            if self.on_warning is not None:  # the caller shows it (the flows: run log + console), once
                self.on_warning(message)
            else:
                logger.warning(message)

    def _best_g_text(self) -> str:
        cfg = self.screening_config
        thr, gain = getattr(cfg, "threshold", None), getattr(cfg, "gain", "absolute")
        best = "none finite" if self.best_rejected_g is None else f"{self.best_rejected_g:.3f}"
        return f"best g {best} vs threshold {thr:g} (gain {gain})"

    def stall_message(self) -> str:
        """One line on the current streak of rejections: how many, best g vs threshold, what to change."""
        gain = getattr(self.screening_config, "gain", "absolute")
        advice = ("lower screening.threshold or use screening.gain: normalized" if gain == "absolute"
                  else "lower screening.threshold or give screening more steps or a larger lr")
        return (f"search: {self.rejected_in_row} candidates rejected in a row, {self._best_g_text()}; "
                f"{advice}")

    def rejections(self) -> dict[str, int]:
        """Rejected candidates by reason (the `rejected_<reason>` counters)."""
        return {k[len("rejected_"):]: v for k, v in self.counters.items() if k.startswith("rejected_")}

    # ----------------------------------------------------------------- hand-out / report
    def next_candidate(self) -> Candidate | None:
        """The next loss graph to train on the proxy task, or None when the budget is all handed out.

        Gradient-duplicates of already evaluated losses are resolved here from the cache (no budget used).
        Raises SearchStalledError when `config.max_attempts` children in a row fail screening.
        """
        while self._reissue:
            cid = self._reissue.pop(0)
            if cid in self._pending:
                return self._pending[cid]
        if self.reported + self.in_flight >= self.config.budget:
            return None
        for _ in range(self.config.max_attempts):
            self._last_screening = None
            try:
                if self.problem_branches:  # multi-branch task: each branch screened on its own probe (A.2)
                    ind = self.evolution.ask(accept=self._accept_joint, accept_branch=self._screen_branch)
                else:
                    ind = self.evolution.ask(accept=self._screen)
            except SearchStalledError as exc:
                counts = ", ".join(f"{k}={v}" for k, v in sorted(self.rejections().items()))
                raise SearchStalledError(
                    f"search stalled: {exc}; {self.rejected_in_row} rejected in a row, {self._best_g_text()} "
                    f"(rejections so far: {counts})"
                ) from None
            screening = self._last_screening
            proxy = self._cached_proxy(screening.fingerprint)
            if proxy is not None:
                self._reuse(ind, screening, proxy)
                continue
            cand = Candidate(ind.id, ind.graph, ind.parent_id, ind.mutation, screening)
            self._pending[cand.id] = cand
            return cand
        raise SearchStalledError(
            f"search stalled: {self.config.max_attempts} accepted candidates in a row were gradient-duplicates "
            "of evaluated losses (the search space looks exhausted)"
        )

    def _cached_proxy(self, fingerprint: Any) -> dict[str, Any] | None:
        if fingerprint is None:
            return None
        proxy = self.cache.get_proxy(tuple(fingerprint))
        if not proxy or proxy.get("status") not in ("ok", "nan") or proxy.get("proxy_key", "") != self.proxy_key:
            return None
        return proxy

    def _reuse(self, ind: Individual, screening: Any, proxy: Mapping[str, Any]) -> None:
        target = _finite(proxy.get("target")) if proxy.get("status") == "ok" else None
        self.evolution.tell(ind.id, target, status="duplicate")
        self.counters["duplicates"] += 1
        record = self._record(ind.id, ind.graph, ind.parent_id, ind.mutation, screening)
        record.update(
            status="duplicate-reused",
            proxy_status=proxy.get("status"),
            reused_from=proxy.get("candidate_id"),
            target=target,
            metrics=dict(proxy.get("metrics") or {}),
        )
        self.history.append(record)
        self._log_progress()

    def report(self, candidate_id: int, result: Any) -> dict[str, Any]:
        """Record a proxy result (ProxyResult-like: status "ok"|"nan"|"failed", metrics, target, ...).

        Updates the equivalence cache and the evolution; returns the history record.
        """
        cand = self._pending.get(candidate_id)
        if cand is None:
            raise LossforgeError(f"search: candidate {candidate_id!r} is not in flight (unknown or already reported)")
        status, score = proxy_outcome(result)
        del self._pending[candidate_id]
        self.evolution.tell(cand.id, score, status=status)
        self.counters[_COUNTER_OF[status]] += 1
        metrics = _json_metrics(_field(result, "metrics", None))
        record = self._record(cand.id, cand.graph, cand.parent_id, cand.mutation, cand.screening)
        record.update(
            status=_STATUS_OF[status],
            target=score,
            metrics=metrics,
            iterations=_field(result, "iterations", None),
            seconds=_finite(_field(result, "seconds", None)),
            message=str(_field(result, "message", "") or ""),
        )
        self.history.append(record)
        fp = cand.screening.fingerprint
        if status in ("ok", "nan") and fp is not None and self._cached_proxy(fp) is None:
            # the first evaluation of an equivalence class is the one reused later
            self.cache.put_proxy(tuple(fp), {
                "status": status, "target": score, "metrics": metrics, "candidate_id": cand.id,
                "hash": record["hash"], "proxy_key": self.proxy_key,
            })
        self._log_progress()
        return record

    def _record(self, cid: int, graph: Any, parent_id: int | None, mutation: str, screening: Any) -> dict[str, Any]:
        from components.search.graph_json import graph_to_dict

        return {
            "id": cid,
            "hash": graph.hash(),
            "canonical": graph.canonical(),
            "formula": graph.formula(),
            "graph": graph_to_dict(graph),
            "parent_id": parent_id,
            "mutation": mutation,
            "screening_score": _finite(screening.score),
            "screening_seconds": float(screening.seconds),
            "fingerprint": None if screening.fingerprint is None else [float(v) for v in screening.fingerprint],
            "status": None,
            "target": None,
            "metrics": {},
            "iterations": None,
            "seconds": None,
            "message": "",
            "reused_from": None,
        }

    def _log_progress(self) -> None:
        self.progress.append({
            "evaluations": self.reported,
            "generated": self.counters["generated"],
            "top5_mean": self.evolution.top_mean(5),
        })

    def best(self) -> dict[str, Any] | None:
        """The history record of the best evaluated (trained, status "evaluated") candidate, or None."""
        evaluated = [r for r in self.history if r["status"] == "evaluated" and r["target"] is not None]
        if not evaluated:
            return None
        return max(evaluated, key=lambda r: (r["target"], -r["id"]))

    def progress_curve(self) -> list[dict[str, Any]]:
        """Fig. 4 data: after each result, mean target of the top-5 of the population vs evaluations."""
        return list(self.progress)

    # ----------------------------------------------------------------- persistence
    def state_dict(self) -> dict[str, Any]:
        """The whole search state as JSON-able data (graphs through loss_json, no pickle)."""
        from components.search.graph_json import graph_to_dict

        cache_path = getattr(self.cache, "path", None)
        state = {
            "format": STATE_FORMAT,
            "task": self.task,
            "problem_key": self.problem.key,
            "seed": self.seed,
            "proxy_key": self.proxy_key,
            "config": self.config.to_dict(),
            "seeds": [graph_to_dict(g) for g in self.seeds],
            "screening_config": _config_to_dict(self.screening_config),
            "evolution": self.evolution.state_dict(),
            "pending": [
                {"id": c.id, "screening": _screening_to_dict(c.screening)} for c in self._pending.values()
            ],
            "counters": dict(self.counters),
            "stall": {"rejected_in_row": self.rejected_in_row, "best_rejected_g": self.best_rejected_g},
            "history": self.history,
            "progress": self.progress,
            "cache": {"path": str(cache_path)} if cache_path else {"entries": _cache_entries(self.cache)},
        }
        return state

    def save(self, path: str | Path) -> Path:
        """Write the state atomically as JSON (and the cache's own file, if it has one)."""
        if getattr(self.cache, "path", None):
            self.cache.save()
        return write_json_atomic(path, self.state_dict())

    @classmethod
    def load(cls, path: str | Path, problem: Any, cache: Any = None, budget: int | None = None) -> "SearchEngine":
        """Restore a saved search for `problem` (whose key must match the saved one).

        In-flight candidates at save time are handed out again by `next_candidate()`; `budget`
        (optional) replaces the saved budget, e.g. to extend a finished search.
        """
        state = read_json(path)
        try:
            return cls.from_state_dict(state, problem, cache=cache, budget=budget)
        except LossforgeError as exc:
            raise LossforgeError(f"{path}: {exc}") from None

    @classmethod
    def from_state_dict(cls, state: Any, problem: Any, cache: Any = None, budget: int | None = None) -> "SearchEngine":
        """Rebuild a SearchEngine from `state_dict()` output (validated)."""
        from components.search.equivalence import EquivalenceCache
        from components.search.graph_json import graph_from_dict
        from components.search.screening import ScreeningConfig

        if not isinstance(state, dict) or state.get("format") != STATE_FORMAT:
            got = state.get("format") if isinstance(state, dict) else type(state).__name__
            raise LossforgeError(f"not a search state: format must be {STATE_FORMAT!r}, got {got!r}")
        if state.get("problem_key") != problem.key:
            raise LossforgeError(
                f"search state belongs to problem {state.get('problem_key')!r} (task/metric/probe data), "
                f"not to {problem.key!r}"
            )
        try:
            config = EvolutionConfig.from_dict(state["config"])
            if budget is not None:
                config = dataclasses.replace(config, budget=int(budget))
            saved_screening = dict(state["screening_config"])
            saved_screening.setdefault("gain", "absolute")  # states from before the gain rule were absolute
            screening_config = _config_from_dict(ScreeningConfig, saved_screening)
            cache_state = state["cache"]
            if cache is None:
                if cache_state.get("path"):
                    cache_file = Path(cache_state["path"])
                    if not cache_file.exists():
                        raise LossforgeError(
                            f"the search state refers to the equivalence cache {cache_file}, which is missing "
                            "(restore it, or pass cache=EquivalenceCache(...) explicitly)"
                        )
                    cache = EquivalenceCache(cache_file, problem.key)
                else:
                    cache = EquivalenceCache(None, problem.key)
                    for item in cache_state["entries"]:
                        cache.put(tuple(float(v) for v in item["fingerprint"]), item["entry"])
            seeds = [graph_from_dict(g) for g in state.get("seeds", [])]
            engine = cls(problem, task=state["task"], config=config, screening_config=screening_config,
                         seed=int(state["seed"]), cache=cache, proxy_key=str(state.get("proxy_key", "")), seeds=seeds)
            engine.evolution.load_state_dict(state["evolution"])
            engine.evolution.config = config
            in_flight = engine.evolution.in_flight
            pending = {}
            for item in state["pending"]:
                ind = in_flight.get(int(item["id"]))
                if ind is None:
                    raise LossforgeError(f"pending candidate {item['id']} is not in flight in the evolution state")
                pending[ind.id] = Candidate(ind.id, ind.graph, ind.parent_id, ind.mutation,
                                            _screening_from_dict(item["screening"]))
            if set(pending) != set(in_flight):
                raise LossforgeError("pending candidates and in-flight individuals disagree")
            counters = {str(k): int(v) for k, v in dict(state["counters"]).items()}
            stall = dict(state.get("stall") or {})
            in_row, best_g = int(stall.get("rejected_in_row", 0)), _finite(stall.get("best_rejected_g"))
            history = list(state["history"])
            progress = list(state["progress"])
        except LossforgeError:
            raise
        except (KeyError, TypeError, ValueError, AttributeError) as exc:
            raise LossforgeError(f"search state: missing or invalid field ({exc!r})") from None
        engine.counters.update(counters)
        engine.rejected_in_row, engine.best_rejected_g = in_row, best_g
        engine.history, engine.progress = history, progress
        engine._pending = pending
        # everything in flight at save time is handed out again (pending order = hand-out order)
        engine._reissue = list(pending)
        return engine


def _cache_entries(cache: Any) -> list[dict[str, Any]]:
    """In-memory cache contents as a JSON list (fingerprint → entry)."""
    entries = getattr(cache, "entries", None)
    if callable(entries):
        entries = entries()
    if entries is None:
        raise LossforgeError("search: this equivalence cache can be saved only through its own file (give cache_path)")
    return [{"fingerprint": [float(v) for v in fp], "entry": entry} for fp, entry in dict(entries).items()]
