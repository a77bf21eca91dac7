"""SearchEngine: generation → loss rejection → equivalence → proxy hand-out, funnel, duplicates, resume."""

from __future__ import annotations

import json
import math

import pytest
import torch

from components.errors import LossforgeError
from components.search.evolution import EvolutionConfig, SearchStalledError
from components.search.equivalence import EquivalenceCache
from components.tasks.segmentation.trainer import ProxyResult
from components.search.screening import ScreeningConfig
from components.search.engine import Candidate, SearchEngine
from components.tasks.segmentation.probe import build_screening_problem

NUM_CLASSES = 3
SCREENING = ScreeningConfig(samples=2, steps=5, lr=0.5, threshold=0.0)  # tiny, permissive protocol (fast tests)
# tiny but selective: g must be > 0, so zero-gradient and non-improving losses are rejected
STRICT = ScreeningConfig(samples=2, steps=10, lr=0.5, threshold=1e-9)


def shapes_items(n: int, size: int = 16, seed: int = 0):
    """A tiny real segmentation set: a square (class 1) and a disc (class 2) on background, noisy colours."""
    g = torch.Generator().manual_seed(seed)
    yy, xx = torch.meshgrid(torch.arange(size), torch.arange(size), indexing="ij")
    palette = torch.tensor([[0.1, 0.1, 0.1], [0.9, 0.2, 0.2], [0.2, 0.2, 0.9]])
    items = []
    for _ in range(n):
        mask = torch.zeros(size, size, dtype=torch.long)
        x0, y0 = torch.randint(0, size // 2, (2,), generator=g).tolist()
        mask[y0:y0 + size // 2, x0:x0 + size // 2] = 1
        cy, cx = torch.randint(size // 4, 3 * size // 4, (2,), generator=g).tolist()
        mask[(yy - cy) ** 2 + (xx - cx) ** 2 <= (size // 5) ** 2] = 2
        image = palette[mask].permute(2, 0, 1) + 0.05 * torch.randn(3, size, size, generator=g)
        items.append((image.float(), mask))
    return items


def make_problem(seed: int = 0):
    torch.manual_seed(seed)
    net = torch.nn.Conv2d(3, NUM_CLASSES, 1)  # a randomly initialised network gives the probe predictions
    return build_screening_problem(shapes_items(4), "mIoU", num_classes=NUM_CLASSES, samples=2, size=8,
                                   seed=seed, model=net)


@pytest.fixture(scope="module", autouse=True)
def one_torch_thread():
    """Tiny tensors: intra-op threads only add contention on a shared CPU (≈20x slower here)."""
    before = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(before)


@pytest.fixture(scope="module")
def problem():
    return make_problem(0)


def _proxy_tensors(problem):
    pred = problem.init_predictions[:, 0]
    target = problem.targets[:, 0]
    y = torch.nn.functional.one_hot(target, NUM_CLASSES).permute(0, 3, 1, 2).float()
    return y, torch.softmax(pred + 4 * y, dim=1), torch.softmax(pred - 4 * y, dim=1)


def proxy(problem, cand: Candidate, fail_ids=frozenset(), nan_ids=frozenset()) -> ProxyResult:
    """A real, deterministic, cheap proxy: tanh of (loss on bad predictions − loss on good ones).

    Candidates in `fail_ids` / `nan_ids` report a crashed / NaN-stopped training instead.
    """
    if cand.id in fail_ids:
        return ProxyResult(str(cand.id), "failed", message="worker lost")
    if cand.id in nan_ids:
        return ProxyResult(str(cand.id), "nan", iterations=2, message="loss became NaN")
    y, good, bad = _proxy_tensors(problem)
    with torch.no_grad():
        value = float(torch.tanh(cand.graph.total({"seg": {"y_hat": bad, "y": y}})
                                 - cand.graph.total({"seg": {"y_hat": good, "y": y}})))
    if not math.isfinite(value):
        return ProxyResult(str(cand.id), "nan", iterations=1, message="loss not finite")
    return ProxyResult(str(cand.id), "ok", metrics={"mIoU": value}, target=value, iterations=3, seconds=0.01)


def make_engine(problem, seed=0, budget=8, **kw) -> SearchEngine:
    cfg = EvolutionConfig(initial_population=3, max_population=50, budget=budget, max_attempts=3000)
    return SearchEngine(problem, config=kw.pop("config", cfg), screening_config=kw.pop("screening", SCREENING),
                        seed=seed, **kw)


def run_sequential(engine: SearchEngine, problem, steps: int | None = None, fail_ids=frozenset(),
                   nan_ids=frozenset()) -> None:
    """One worker: ask → evaluate → tell until done (or `steps` evaluations)."""
    n = 0
    while not engine.done and (steps is None or n < steps):
        cand = engine.next_candidate()
        engine.report(cand.id, proxy(problem, cand, fail_ids, nan_ids))
        n += 1


def _comparable(history):
    drop = {"seconds", "screening_seconds"}
    return [{k: v for k, v in r.items() if k not in drop} for r in history]


def _population(engine: SearchEngine):
    return [(i.id, i.graph.canonical(), i.parent_id, i.mutation, i.score, i.status)
            for i in engine.evolution.population]


@pytest.fixture(scope="module")
def finished(problem):
    """One sequential search with a selective protocol and some failed / NaN trainings, shared by tests."""
    engine = make_engine(problem, seed=1, budget=16, screening=STRICT)
    run_sequential(engine, problem, fail_ids=frozenset({2}), nan_ids=frozenset({6}))
    return engine


# ----------------------------------------------------------------------------- funnel and records


def test_funnel_counters_add_up(finished):
    c = finished.funnel()
    rejected = sum(v for k, v in c.items() if k.startswith("rejected_"))
    assert c["rejected_zero_gradient"] > 0 and c["rejected_below_threshold"] > 0
    assert c["generated"] == c["accepted"] + rejected
    reported = c["evaluated"] + c["nan_stopped"] + c["failed"]
    assert finished.done and reported == 16 and c["in_flight"] == 0
    assert c["accepted"] == c["duplicates"] + reported + c["in_flight"]
    assert len(finished.history) == reported + c["duplicates"]
    statuses = [r["status"] for r in finished.history]
    assert statuses.count("failed") == c["failed"] >= 1
    assert statuses.count("nan-stopped") == c["nan_stopped"] >= 1
    assert statuses.count("duplicate-reused") == c["duplicates"]
    assert finished.next_candidate() is None  # budget used


def test_history_records_are_complete_and_screened(finished):
    for r in finished.history:
        for key in ("id", "hash", "canonical", "formula", "parent_id", "mutation", "screening_score",
                    "fingerprint", "metrics", "status", "seconds", "target", "graph"):
            assert key in r
        assert r["screening_score"] >= STRICT.threshold > 0  # only accepted losses get here
        assert len(r["fingerprint"]) == 2 * SCREENING.samples  # norms and signed projections
    json.dumps(finished.state_dict(), allow_nan=False)  # strict JSON for MLflow / state files
    first = finished.history[0]
    assert first["mutation"] == "init" and first["parent_id"] is None


def test_failed_and_nan_never_become_parents(finished):
    by_id = {r["id"]: r for r in finished.history}
    parents = [r["parent_id"] for r in finished.history if r["parent_id"] is not None]
    assert parents, "the search never got past the initial population"
    for pid in parents:
        assert by_id[pid]["target"] is not None and by_id[pid]["status"] in ("evaluated", "duplicate-reused")


def test_best_is_the_highest_evaluated_record(finished):
    best = finished.best()
    evaluated = [r for r in finished.history if r["status"] == "evaluated"]
    assert best["status"] == "evaluated"
    assert best["target"] == max(r["target"] for r in evaluated)


def test_progress_curve_is_top5_mean_of_population(finished):
    # independent recomputation: the window (50) holds every individual told so far
    curve = finished.progress_curve()
    assert len(curve) == len(finished.history)
    scores = []
    evaluations = 0
    for point, rec in zip(curve, finished.history):
        if rec["target"] is not None:
            scores.append(rec["target"])
        evaluations += rec["status"] != "duplicate-reused"
        top = sorted(scores, reverse=True)[:5]
        expected = sum(top) / len(top) if top else None
        assert point["evaluations"] == evaluations
        assert (point["top5_mean"] is None and expected is None) or point["top5_mean"] == pytest.approx(expected)


# ----------------------------------------------------------------------------- duplicates


def test_duplicates_reuse_scores_without_budget(finished):
    dups = [r for r in finished.history if r["status"] == "duplicate-reused"]
    assert dups, "seed 0 is expected to produce gradient-duplicates (copies happen with p = 0.1)"
    by_id = {r["id"]: r for r in finished.history}
    for d in dups:
        source = by_id[d["reused_from"]]
        assert source["status"] in ("evaluated", "nan-stopped")
        assert source["fingerprint"] == d["fingerprint"] and source["target"] == d["target"]
        assert source["id"] < d["id"]
    # budget counts proxy trainings only
    trained = [r for r in finished.history if r["status"] in ("evaluated", "nan-stopped", "failed")]
    assert len(trained) == 16 and len(finished.history) > 16


def test_failed_results_are_not_cached_but_evaluated_ones_are(finished):
    for r in finished.history:
        proxy_entry = finished.cache.get_proxy(tuple(r["fingerprint"]))
        if r["status"] == "evaluated":
            assert proxy_entry is not None and proxy_entry["status"] == "ok"
        if r["status"] == "nan-stopped":
            assert proxy_entry is not None and proxy_entry["status"] in ("ok", "nan")
            assert proxy_entry["status"] == "ok" or proxy_entry["target"] is None
        if r["status"] == "failed" and proxy_entry is not None:
            assert proxy_entry["candidate_id"] != r["id"]


def test_cache_file_persists_across_runs_and_is_keyed_by_proxy(problem, tmp_path):
    cache_file = tmp_path / "equivalence.json"
    first = make_engine(problem, seed=5, budget=4, cache_path=cache_file)
    run_sequential(first, problem)
    first.save(tmp_path / "first.json")
    assert cache_file.exists()
    # same seed, same cache file: the first candidates are equivalent to evaluated ones -> reused, no training
    second = make_engine(problem, seed=5, budget=4, cache_path=cache_file)
    cand = second.next_candidate()
    assert second.history[0]["status"] == "duplicate-reused"
    assert second.history[0]["reused_from"] == first.history[0]["id"]
    assert second.history[0]["target"] == first.history[0]["target"]
    assert second.counters["screening_reused"] >= 1 and second.reported == 0 and cand is not None
    # a different proxy setting never reuses stale proxy scores (screening verdicts still are)
    third = make_engine(problem, seed=5, budget=4, cache_path=cache_file, proxy_key="epochs=9")
    cand3 = third.next_candidate()
    assert third.counters["duplicates"] == 0 and third.counters["screening_reused"] >= 1
    assert cand3.graph.canonical() == first.history[0]["canonical"]


# ----------------------------------------------------------------------------- steady state


def test_several_in_flight_and_out_of_order_reports(problem):
    engine = make_engine(problem, seed=1, budget=5)
    cands = [engine.next_candidate() for _ in range(3)]
    assert len({c.id for c in cands}) == 3 and engine.in_flight == 3
    for c in (cands[2], cands[0]):
        engine.report(c.id, proxy(problem, c))
    assert engine.in_flight == 1 and engine.reported == 2
    more = [engine.next_candidate() for _ in range(2)]
    assert all(m is not None for m in more) and engine.in_flight == 3
    assert engine.next_candidate() is None  # 2 reported + 3 in flight = budget
    with pytest.raises(LossforgeError, match="not in flight"):
        engine.report(cands[0].id, proxy(problem, cands[0]))
    with pytest.raises(LossforgeError, match="not in flight"):
        engine.report(12345, proxy(problem, cands[0]))
    with pytest.raises(LossforgeError, match="status"):
        engine.report(cands[1].id, ProxyResult("x", "exploded"))
    assert engine.in_flight == 3  # a rejected report leaves the candidate in flight
    for c in (more[1], cands[1], more[0]):
        engine.report(c.id, proxy(problem, c))
    assert engine.done and engine.in_flight == 0
    told = [i.id for i in engine.evolution.population]
    trained = [r["id"] for r in engine.history if r["status"] != "duplicate-reused"]
    assert trained == [cands[2].id, cands[0].id, more[1].id, cands[1].id, more[0].id]
    assert set(trained) <= set(told)


def test_max_attempts_guard_raises_a_clear_error(problem):
    impossible = ScreeningConfig(samples=2, steps=2, lr=0.5, threshold=10.0)
    cfg = EvolutionConfig(initial_population=3, budget=3, max_attempts=6)
    engine = SearchEngine(problem, config=cfg, screening_config=impossible, seed=0)
    with pytest.raises(SearchStalledError, match="6 attempts"):
        engine.next_candidate()
    c = engine.funnel()
    assert c["generated"] == 6 == sum(v for k, v in c.items() if k.startswith("rejected_"))
    assert c["accepted"] == 0 and c["in_flight"] == 0


def test_a_search_that_accepts_nothing_warns_every_n_rejections(problem, caplog):
    impossible = ScreeningConfig(samples=2, steps=2, lr=0.5, threshold=10.0, gain="absolute")
    cfg = EvolutionConfig(initial_population=3, budget=3, max_attempts=7, stall_warning_every=3)
    messages = []
    engine = SearchEngine(problem, config=cfg, screening_config=impossible, seed=0, on_warning=messages.append)
    with caplog.at_level("WARNING", logger="lossforge.search"):
        with pytest.raises(SearchStalledError) as err:
            engine.next_candidate()
    assert len(messages) == 2 and not caplog.records  # the caller shows them (once), the engine does not log them too
    logged = SearchEngine(problem, config=cfg, screening_config=impossible, seed=0)  # no caller: logged
    with caplog.at_level("WARNING", logger="lossforge.search"):
        with pytest.raises(SearchStalledError):
            logged.next_candidate()
    assert [r.getMessage() for r in caplog.records] == messages
    assert messages[0].startswith("search: 3 candidates rejected in a row") and "6 candidates" in messages[1]
    for msg in messages:
        assert "\n" not in msg and "best g" in msg and "threshold 10" in msg and "screening.gain: normalized" in msg
    best = engine.best_rejected_g
    assert best is not None and best < 10.0 and f"best g {best:.3f}" in messages[-1]
    stalled = str(err.value)
    assert "7 attempts" in stalled and f"best g {best:.3f}" in stalled and "7 rejected in a row" in stalled
    # the streak is part of the saved state
    restored = SearchEngine.from_state_dict(json.loads(json.dumps(engine.state_dict())), problem)
    assert (restored.rejected_in_row, restored.best_rejected_g) == (7, best)


def test_rejection_streak_resets_on_acceptance_and_advice_follows_the_rule(problem):
    cfg = EvolutionConfig(initial_population=3, budget=2, max_attempts=3000, stall_warning_every=1)
    messages = []
    engine = SearchEngine(problem, config=cfg, screening_config=STRICT, seed=0, on_warning=messages.append)
    engine.next_candidate()
    assert engine.rejected_in_row == 0 and engine.best_rejected_g is None
    rejected = sum(engine.rejections().values())
    assert rejected > 0 and len(messages) == rejected  # warned after each rejection (every = 1)
    assert messages[-1].startswith(f"search: {rejected} candidates rejected in a row")
    assert "lower screening.threshold" in messages[0] and "gain normalized" in messages[0]
    with pytest.raises(LossforgeError, match="stall_warning_every"):
        EvolutionConfig(stall_warning_every=-1)


def test_states_saved_before_the_gain_rule_restore_as_absolute(problem):
    engine = make_engine(problem, seed=1, budget=1)
    state = json.loads(json.dumps(engine.state_dict()))
    del state["screening_config"]["gain"], state["stall"]
    restored = SearchEngine.from_state_dict(state, problem)
    assert restored.screening_config.gain == "absolute" and restored.rejected_in_row == 0


def test_accepts_mapping_results(problem):
    engine = make_engine(problem, seed=2, budget=1)
    cand = engine.next_candidate()
    record = engine.report(cand.id, {"status": "ok", "target": 0.25, "metrics": {"mIoU": 0.25}})
    assert record["status"] == "evaluated" and record["target"] == 0.25
    assert engine.best()["id"] == cand.id


# ----------------------------------------------------------------------------- save / restore


def test_resume_matches_an_uninterrupted_run(problem, tmp_path):
    # small window (P = 8) so that aging happens before and after the interruption
    cfg = EvolutionConfig(initial_population=3, max_population=8, budget=30, max_attempts=3000)
    full = make_engine(problem, seed=3, config=cfg, cache_path=tmp_path / "full-cache.json")
    run_sequential(full, problem, fail_ids=frozenset({5}))
    assert len(full.history) > 8 and full.evolution.population[0].id > 0

    part = make_engine(problem, seed=3, config=cfg, cache_path=tmp_path / "part-cache.json")
    run_sequential(part, problem, steps=11, fail_ids=frozenset({5}))
    part.save(tmp_path / "state.json")
    del part
    resumed = SearchEngine.load(tmp_path / "state.json", problem)
    assert resumed.reported == 11
    run_sequential(resumed, problem, fail_ids=frozenset({5}))

    assert _population(resumed) == _population(full)
    assert _comparable(resumed.history) == _comparable(full.history)
    assert resumed.funnel() == full.funnel()
    assert resumed.rng.getstate() == full.rng.getstate()
    assert resumed.progress_curve() == full.progress_curve()


def test_in_flight_candidates_are_reissued_after_restore(problem, tmp_path):
    full = make_engine(problem, seed=4, budget=16)
    run_sequential(full, problem)

    part = make_engine(problem, seed=4, budget=16)
    run_sequential(part, problem, steps=5)
    pending = part.next_candidate()  # handed out, then the process "dies" before reporting
    part.save(tmp_path / "state.json")
    state = json.loads((tmp_path / "state.json").read_text())
    assert "entries" in state["cache"]  # an in-memory cache is saved inline

    resumed = SearchEngine.load(tmp_path / "state.json", problem)
    assert resumed.in_flight == 1
    again = resumed.next_candidate()
    assert again.id == pending.id and again.graph.canonical() == pending.graph.canonical()
    assert again.screening.fingerprint == pending.screening.fingerprint
    generated = resumed.counters["generated"]
    resumed.report(again.id, proxy(problem, again))
    assert resumed.counters["generated"] == generated  # re-issuing generates nothing
    run_sequential(resumed, problem)
    assert _population(resumed) == _population(full)
    assert _comparable(resumed.history) == _comparable(full.history)
    ids = [r["id"] for r in resumed.history]
    assert len(ids) == len(set(ids))  # nothing lost, nothing duplicated


def test_load_rejects_mismatched_and_corrupted_states(problem, tmp_path):
    engine = make_engine(problem, seed=6, budget=2)
    run_sequential(engine, problem, steps=1)
    path = engine.save(tmp_path / "state.json")

    other = make_problem(seed=1)  # another probe -> another key
    assert other.key != problem.key
    with pytest.raises(LossforgeError, match="problem"):
        SearchEngine.load(path, other)

    truncated = tmp_path / "truncated.json"
    truncated.write_text(path.read_text()[:200])
    with pytest.raises(LossforgeError, match="truncated.json"):
        SearchEngine.load(truncated, problem)

    state = json.loads(path.read_text())
    for mutate, match in [
        (lambda s: s.update(format="lossforge.other/1"), "format"),
        (lambda s: s.pop("evolution"), "evolution"),
        (lambda s: s["evolution"]["population"][0]["graph"]["branches"]["seg"]["tree"].update(op="evil"), "."),
        (lambda s: s["evolution"].update(task="detection"), "task"),
        (lambda s: s["config"].update(tournament_fraction=5), "tournament_fraction"),
    ]:
        bad = json.loads(json.dumps(state))
        mutate(bad)
        bad_path = tmp_path / "bad.json"
        bad_path.write_text(json.dumps(bad))
        with pytest.raises(LossforgeError, match=match):
            SearchEngine.load(bad_path, problem)
    with pytest.raises(LossforgeError, match="not found"):
        SearchEngine.load(tmp_path / "missing.json", problem)


def test_missing_cache_file_is_a_clear_error_and_budget_can_be_extended(problem, finished, tmp_path):
    engine = make_engine(problem, seed=6, budget=1, cache_path=tmp_path / "cache.json")
    run_sequential(engine, problem)
    path = engine.save(tmp_path / "state.json")
    (tmp_path / "cache.json").unlink()
    with pytest.raises(LossforgeError, match="cache.json.*missing"):
        SearchEngine.load(path, problem)

    finished.save(tmp_path / "finished.json")
    extended = SearchEngine.load(tmp_path / "finished.json", problem, budget=18)
    assert not extended.done and extended.reported == 16
    run_sequential(extended, problem)
    assert extended.done and extended.reported == 18
    assert extended.history[: len(finished.history)] == finished.history


def test_constructor_rejects_mismatched_cache_and_probe(problem):
    with pytest.raises(LossforgeError, match="cache"):
        SearchEngine(problem, screening_config=SCREENING, cache=EquivalenceCache(None, "segmentation/BF1/other"))
    # a probe with fewer samples than the protocol asks for is a set-up error, not 100k rejected candidates
    with pytest.raises(LossforgeError, match="samples"):
        SearchEngine(problem, screening_config=ScreeningConfig(samples=5))


def test_seed_losses_are_handed_out_first_and_survive_a_restore(problem, tmp_path):
    from components.search.graph import Branch, LossGraph, parse_prefix

    def graph(text):
        return LossGraph("segmentation", {"seg": Branch(parse_prefix(text), 1.0)})

    ce, twice = graph("neg(mul(y,log(y_hat)))"), graph("mul(add(1,1),neg(mul(y,log(y_hat))))")
    part = make_engine(problem, seed=5, budget=6, seeds=[ce, twice])
    first = part.next_candidate()
    assert (first.graph.canonical(), first.mutation, first.parent_id) == (ce.canonical(), "seed", None)
    part.report(first.id, proxy(problem, first))
    part.save(tmp_path / "state.json")
    resumed = SearchEngine.load(tmp_path / "state.json", problem)  # the seeds come back from the state file
    second = resumed.next_candidate()
    assert (second.graph.canonical(), second.mutation) == (twice.canonical(), "seed")
    assert resumed.next_candidate().mutation == "init"
