"""Regularised steady-state evolution: tournament, aging window, async ask/tell, failures, state round-trip."""

from __future__ import annotations

import json
import math
import random
from collections import Counter

import pytest
import torch

from components.errors import LossforgeError
from components.search.evolution import (
    EvolutionConfig,
    Individual,
    RegularizedEvolution,
    SearchStalledError,
    tournament_winner,
)
from components.search.generation import TreeGenerator
from components.search.graph import TASK_BRANCHES

TASK = "segmentation"


@pytest.fixture(scope="module", autouse=True)
def one_torch_thread():
    """Tiny tensors: intra-op threads only add contention on a shared CPU (≈20x slower here)."""
    before = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(before)


def make_evolution(seed: int = 0, **overrides) -> RegularizedEvolution:
    cfg = EvolutionConfig(**{"initial_population": 4, "max_population": 10, **overrides})
    rng = random.Random(seed)
    inputs = next(iter(TASK_BRANCHES[TASK].values()))
    gen = TreeGenerator(cfg.operator_set, inputs, depth=cfg.depth, rng=rng)
    return RegularizedEvolution(cfg, gen, TASK, rng)


def _probe():
    g = torch.Generator().manual_seed(123)
    logits = torch.randn(2, 3, 6, 6, generator=g)
    target = torch.randint(0, 3, (2, 6, 6), generator=g)
    y = torch.nn.functional.one_hot(target, 3).permute(0, 3, 1, 2).float()
    good = torch.softmax(logits + 4 * y, dim=1)  # predictions close to the target
    bad = torch.softmax(logits - 4 * y, dim=1)  # predictions far from it
    return y, good, bad


_Y, _GOOD, _BAD = _probe()


def proxy_score(graph) -> float | None:
    """A real, deterministic, cheap proxy: how much lower the loss is on good than on bad predictions."""
    branch = next(iter(TASK_BRANCHES[TASK]))
    with torch.no_grad():
        lg = graph.total({branch: {"y_hat": _GOOD, "y": _Y}})
        lb = graph.total({branch: {"y_hat": _BAD, "y": _Y}})
    value = float(torch.tanh(lb - lg))
    return value if math.isfinite(value) else None


# ----------------------------------------------------------------------------- config


def test_config_validation_names_the_field():
    with pytest.raises(LossforgeError, match="tournament_fraction"):
        EvolutionConfig(tournament_fraction=0.0)
    with pytest.raises(LossforgeError, match="max_population"):
        EvolutionConfig(max_population=0)
    with pytest.raises(LossforgeError, match="bogus"):
        EvolutionConfig.from_dict({"bogus": 1})
    assert EvolutionConfig.from_dict(EvolutionConfig().to_dict()) == EvolutionConfig()
    cfg = EvolutionConfig()
    assert (cfg.initial_population, cfg.tournament_fraction, cfg.max_population, cfg.budget) == (20, 0.05, 2500, 500)


@pytest.mark.parametrize(
    "n, expected",
    [(0, 0), (1, 1), (2, 2), (20, 2), (40, 2), (41, 3), (100, 5), (2500, 125)],
)
def test_tournament_size_is_five_percent_with_a_minimum_of_two(n, expected):
    # hand-worked: ceil(0.05 n), at least min(2, n), at most n
    assert make_evolution().tournament_size(n) == expected


# ----------------------------------------------------------------------------- tournament


def _ind(i: int, score: float | None) -> Individual:
    return Individual(id=i, graph=None, parent_id=None, mutation="init", score=score, status="ok")


def test_tournament_winner_is_best_scored_member_of_the_sample():
    sample = [_ind(0, 0.2), _ind(1, None), _ind(2, 0.7), _ind(3, 0.7), _ind(4, -1.0)]
    assert tournament_winner(sample).id == 2  # highest, first on ties
    assert tournament_winner([_ind(0, None), _ind(1, None)]) is None
    assert tournament_winner([]) is None


def _seed_population(evo: RegularizedEvolution, scores: list[float | None]) -> list[Individual]:
    """Hand out len(scores) individuals and tell them their scores in order."""
    inds = [evo.ask() for _ in scores]
    for ind, s in zip(inds, scores):
        evo.tell(ind.id, s, status="ok" if s is not None else "failed")
    return inds


def test_full_tournament_always_selects_the_global_best():
    evo = make_evolution(tournament_fraction=1.0, initial_population=3)
    scores = [0.3, 0.9, 0.1, 0.5, 0.8, 0.2]
    inds = _seed_population(evo, scores)
    for _ in range(20):
        assert evo.select_parent().id == inds[1].id


def test_pairwise_tournament_matches_the_theoretical_win_distribution():
    # 20 individuals, T = 5% -> size 2 (min), sampled without replacement: the individual of rank r
    # (0 = worst) wins with probability 2r / (n (n - 1)); the worst never wins.
    n, draws = 20, 4000
    evo = make_evolution(seed=7, initial_population=n, max_population=100)
    scores = [float(s) for s in random.Random(1).sample(range(1000), n)]
    inds = _seed_population(evo, scores)
    rank = {ind.id: sorted(scores).index(s) for ind, s in zip(inds, scores)}
    wins = Counter(rank[evo.select_parent().id] for _ in range(draws))
    assert wins[0] == 0
    for r in range(1, n):
        p = 2 * r / (n * (n - 1))
        sd = math.sqrt(draws * p * (1 - p))
        assert abs(wins[r] - draws * p) < 4.5 * sd + 1, (r, wins[r], draws * p)


# ----------------------------------------------------------------------------- aging window


def test_window_keeps_the_p_most_recent_in_tell_order():
    evo = make_evolution(initial_population=3, max_population=5)
    told = []
    for step in range(12):
        ind = evo.ask()
        evo.tell(ind.id, float(step % 4))
        told.append(ind.id)
    assert [i.id for i in evo.population] == told[-5:]
    assert evo.told == 12 and evo.next_id == 12
    # the best-ever individual ages out like any other
    assert max(i.id for i in evo.population) == told[-1]


def test_initial_population_is_random_then_offspring_of_scored_individuals():
    evo = make_evolution(initial_population=4)
    first = [evo.ask() for _ in range(4)]
    assert all(i.mutation == "init" and i.parent_id is None for i in first)
    for i in first:
        evo.tell(i.id, proxy_score(i.graph))
    scored_ids = {i.id for i in first if i.score is not None}
    child = evo.ask()
    if scored_ids:
        assert child.parent_id in scored_ids and child.mutation != "init"


# ----------------------------------------------------------------------------- steady state


def test_steady_state_out_of_order_tells():
    evo = make_evolution(initial_population=3, max_population=50)
    batch = [evo.ask() for _ in range(5)]
    # nobody scored yet: the extra asks beyond K are random too (no blocking)
    assert all(i.parent_id is None for i in batch)
    assert set(evo.in_flight) == {i.id for i in batch}
    order = [batch[3], batch[0], batch[4], batch[2], batch[1]]
    for k, ind in enumerate(order):
        evo.tell(ind.id, 0.1 * (k + 1))
    assert [i.id for i in evo.population] == [i.id for i in order]
    assert not evo.in_flight
    # keep 4 in flight at all times and tell in shuffled order; every child has a scored parent
    shuffle = random.Random(3)
    flight = [evo.ask() for _ in range(4)]
    for _ in range(30):
        done = flight.pop(shuffle.randrange(len(flight)))
        evo.tell(done.id, proxy_score(done.graph))
        new = evo.ask()
        parents = {i.id: i for i in evo.population}
        assert new.parent_id in parents and parents[new.parent_id].score is not None
        flight.append(new)
    assert len(evo.in_flight) == 4
    ids = [i.id for i in evo.population] + list(evo.in_flight)
    assert len(ids) == len(set(ids))


def test_tell_unknown_or_twice_is_a_clear_error():
    evo = make_evolution()
    ind = evo.ask()
    evo.tell(ind.id, 0.5)
    with pytest.raises(LossforgeError, match="not in flight"):
        evo.tell(ind.id, 0.5)
    with pytest.raises(LossforgeError, match="not in flight"):
        evo.tell(999, 0.5)
    other = evo.ask()
    with pytest.raises(LossforgeError, match="score"):
        evo.tell(other.id, "high")


def test_failed_and_nan_individuals_never_become_parents():
    evo = make_evolution(initial_population=6, max_population=30, tournament_fraction=1.0)
    scores = [None, float("nan"), 0.2, float("inf"), None, 0.1]
    inds = _seed_population(evo, scores)
    assert [i.score for i in inds] == [None, None, 0.2, None, None, 0.1]
    good = {inds[2].id, inds[5].id}
    for _ in range(25):
        child = evo.ask()
        assert child.parent_id in good
        evo.tell(child.id, None, status="nan")  # children all fail: parents stay the two scored
    # everybody failed -> random initialisation again, never a failed parent
    evo2 = make_evolution(initial_population=2)
    _seed_population(evo2, [None, None])
    assert evo2.select_parent() is None
    assert evo2.ask().mutation == "init"


def test_ask_retries_the_same_parent_until_accepted_and_has_a_guard():
    evo = make_evolution(initial_population=2, tournament_fraction=1.0, max_attempts=50)
    inds = _seed_population(evo, [0.1, 0.9])
    seen = []

    def accept(graph):
        seen.append(graph)
        return len(seen) == 3

    child = evo.ask(accept=accept)
    assert len(seen) == 3 and child.graph is seen[-1] and child.parent_id == inds[1].id
    with pytest.raises(SearchStalledError, match="50 attempts"):
        evo.ask(accept=lambda g: False)


# ----------------------------------------------------------------------------- persistence


def _run(evo: RegularizedEvolution, steps: int) -> None:
    for _ in range(steps):
        ind = evo.ask()
        evo.tell(ind.id, proxy_score(ind.graph), status="ok")


def _snapshot(evo: RegularizedEvolution):
    return [(i.id, i.graph.canonical(), i.parent_id, i.mutation, i.score) for i in evo.population]


def test_state_round_trip_continues_exactly_like_an_uninterrupted_run():
    full = make_evolution(seed=11, initial_population=4, max_population=8)
    _run(full, 30)

    part = make_evolution(seed=11, initial_population=4, max_population=8)
    _run(part, 13)
    in_flight = part.ask()  # in flight at save time
    state = json.loads(json.dumps(part.state_dict()))  # must be plain JSON
    fresh = make_evolution(seed=999, initial_population=4, max_population=8)
    fresh.load_state_dict(state)
    assert list(fresh.in_flight) == [in_flight.id]
    restored = fresh.in_flight[in_flight.id]
    assert restored.graph.canonical() == in_flight.graph.canonical()
    fresh.tell(restored.id, proxy_score(restored.graph))
    _run(fresh, 30 - 14)
    assert _snapshot(fresh) == _snapshot(full)
    assert fresh.next_id == full.next_id and fresh.rng.getstate() == full.rng.getstate()


def test_load_state_rejects_wrong_format_task_and_corruption():
    evo = make_evolution()
    _run(evo, 5)
    state = json.loads(json.dumps(evo.state_dict()))
    with pytest.raises(LossforgeError, match="format"):
        make_evolution().load_state_dict({**state, "format": "lossforge.other/1"})
    with pytest.raises(LossforgeError, match="task"):
        make_evolution().load_state_dict({**state, "task": "detection"})
    broken = json.loads(json.dumps(state))
    del broken["population"][0]["graph"]
    with pytest.raises(LossforgeError):
        make_evolution().load_state_dict(broken)
    dup = json.loads(json.dumps(state))
    dup["population"].append(dup["population"][0])
    with pytest.raises(LossforgeError, match="duplicated"):
        make_evolution().load_state_dict(dup)
    with pytest.raises(LossforgeError, match="rng"):
        make_evolution().load_state_dict({**state, "rng": [3, "abc", None]})
