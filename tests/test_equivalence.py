"""Gradient-equivalence check: fingerprints and the persistent, problem-keyed cache."""

from __future__ import annotations

import json

import pytest
import torch

from components.search.equivalence import (
    CACHE_FORMAT,
    EquivalenceCache,
    fingerprint_key,
    gradient_fingerprint,
    parse_fingerprint_key,
)
from components.errors import LossforgeError
from components.search.graph import Node
from components.search.screening import ScreeningConfig, ScreeningResult, round_significant, screen
from components.tasks.segmentation.probe import build_screening_problem
from components.tasks.segmentation.shapes import SHAPES_CLASSES

from screening_support import seg, shapes_items

L, N = Node.leaf, Node.apply


@pytest.fixture(scope="module")
def items():
    return shapes_items(6)


@pytest.fixture(scope="module")
def problem(items):
    return build_screening_problem(items, "mIoU", num_classes=len(SHAPES_CLASSES), samples=3, size=16, seed=0)


@pytest.fixture(scope="module", autouse=True)
def one_thread():
    """One torch thread: on a small shared CPU, more threads only add contention."""
    before = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(before)


CE = seg(N("neg", N("log", N("mul", L("y_hat"), L("y")))))


def test_round_significant_hand_worked():
    assert round_significant(0.012345) == 0.012
    assert round_significant(123456.0) == 120000.0
    assert round_significant(9.96) == 10.0
    assert round_significant(0.0) == 0.0
    assert fingerprint_key((12.3456, 0.0, 1e-5)) == "1.2e+01,0.0e+00,1.0e-05"
    assert parse_fingerprint_key("1.2e+01,0.0e+00") == (12.0, 0.0)


def test_fingerprint_of_cross_entropy_matches_hand_derivation(problem):
    # CE = −Σ y·log(softmax(z)): ∂/∂z = softmax(z) − y at every pixel, so the norm is computed independently.
    z = problem.init_predictions.double()
    y = torch.nn.functional.one_hot(problem.targets, z.shape[-3]).movedim(-1, -3).double()
    grad = (torch.softmax(z, dim=-3) - y).flatten(1)
    direction = torch.randn(grad.shape[1], generator=torch.Generator().manual_seed(0), dtype=torch.float64)
    values = grad.norm(dim=1).tolist() + (grad @ direction).tolist()
    expected = tuple(float(f"{v:.1e}") for v in values)
    assert gradient_fingerprint(CE, problem) == expected


def test_negated_loss_is_not_equivalent_and_does_not_inherit_the_verdict(problem):
    """-CE ascends: same gradient norms as CE, opposite projections, so it is screened on its own."""
    minus_ce = seg(N("log", N("mul", L("y_hat"), L("y"))))  # CE is neg(log(mul(y_hat, y)))
    fp, minus_fp = gradient_fingerprint(CE, problem), gradient_fingerprint(minus_ce, problem)
    half = len(fp) // 2
    assert fp[:half] == minus_fp[:half] and fp[half:] == tuple(-v for v in minus_fp[half:]) and fp != minus_fp
    cache = EquivalenceCache(None, "k")
    config = ScreeningConfig(samples=3, steps=60, lr=0.01)
    first = screen(CE, problem, config, cache=cache)
    second = screen(minus_ce, problem, config, cache=cache)
    assert first.accepted and not second.cached and not second.accepted


@pytest.mark.parametrize("a, b", [
    (N("add", L("y_hat"), N("mul", L("y_hat"), L("y"))), N("add", N("mul", L("y"), L("y_hat")), L("y_hat"))),
    (N("mul", N("log", L("y_hat")), L("y")), N("mul", L("y"), N("log", L("y_hat")))),
    (N("neg", N("neg", N("square", L("y_hat")))), N("square", L("y_hat"))),
    (N("mul", L("y_hat"), L("1")), N("abs", L("y_hat"))),  # softmax outputs are positive
])
def test_equivalent_trees_have_equal_fingerprints(problem, a, b):
    assert seg(a).canonical() != seg(b).canonical()
    assert gradient_fingerprint(seg(a), problem) == gradient_fingerprint(seg(b), problem)


def test_different_losses_have_different_fingerprints(problem):
    square_err = seg(N("square", N("add", L("y_hat"), N("neg", L("y")))))
    assert gradient_fingerprint(CE, problem) != gradient_fingerprint(square_err, problem)


def test_fingerprint_of_nan_loss_is_an_error(problem):
    explode = seg(N("exp", N("exp", N("inv", N("mul", L("y_hat"), L("y"))))))
    with pytest.raises(LossforgeError):
        gradient_fingerprint(explode, problem)


def test_cache_persists_across_instances_and_keys_are_isolated(tmp_path):
    path = tmp_path / "equiv.json"
    fp = (1.2, 3.4, 0.0)
    a = EquivalenceCache(path, "segmentation/mIoU/aaa")
    a.put(fp, {"screening": {"accepted": True, "score": 0.9, "reason": "accepted"}})
    a.update(fp, proxy={"status": "ok", "target": 0.42})
    a.save()
    b = EquivalenceCache(path, "segmentation/BF1/bbb")
    assert b.get(fp) is None and len(b) == 0
    b.put(fp, {"screening": {"accepted": False, "score": 0.1, "reason": "below_threshold"}})
    b.save()  # must keep a's section
    again = EquivalenceCache(path, "segmentation/mIoU/aaa")
    assert again.get(fp)["proxy"] == {"status": "ok", "target": 0.42}
    assert again.get([1.2, 3.4, 0.0])["screening"]["accepted"] is True
    assert EquivalenceCache(path, "segmentation/BF1/bbb").get(fp)["screening"]["reason"] == "below_threshold"
    data = json.loads(path.read_text())
    assert data["format"] == CACHE_FORMAT and set(data["problems"]) == {"segmentation/mIoU/aaa", "segmentation/BF1/bbb"}
    assert [p.name for p in tmp_path.iterdir()] == ["equiv.json"]  # atomic write left no temp file


def test_cache_entries_are_copies():
    cache = EquivalenceCache(None, "k")
    entry = {"proxy": {"target": 1.0}}
    cache.put((1.0,), entry)
    entry["proxy"]["target"] = 2.0
    got = cache.get((1.0,))
    got["proxy"]["target"] = 3.0
    assert cache.get((1.0,))["proxy"]["target"] == 1.0
    assert cache.save() is None  # in-memory cache
    assert dict(cache.entries()) == {(1.0,): {"proxy": {"target": 1.0}}}


def test_cache_bad_files_and_fingerprints(tmp_path):
    bad = tmp_path / "bad.json"
    bad.write_text("{not json")
    with pytest.raises(LossforgeError, match="bad.json"):
        EquivalenceCache(bad, "k")
    other = tmp_path / "other.json"
    other.write_text(json.dumps({"format": "lossforge.search/1"}))
    with pytest.raises(LossforgeError, match="not an equivalence cache"):
        EquivalenceCache(other, "k")
    cache = EquivalenceCache(None, "k")
    with pytest.raises(LossforgeError):
        cache.put((float("nan"),), {})
    with pytest.raises(LossforgeError):
        EquivalenceCache(None, "")


def test_screening_outcome_reused_only_for_same_config_and_proxy_kept(problem, tmp_path):
    path = tmp_path / "c.json"
    cache = EquivalenceCache(path, problem.key)
    cfg = ScreeningConfig(samples=3, steps=40, threshold=0.3)
    first = screen(CE, problem, cfg, cache=cache)
    assert not first.cached and first.fingerprint is not None
    cache.put_proxy(first.fingerprint, {"status": "ok", "target": 0.5})
    cache.save()

    reopened = EquivalenceCache(path, problem.key)
    # an equivalent tree (children swapped) is a gradient-duplicate: the outcome is reused
    swapped = seg(N("neg", N("log", N("mul", L("y"), L("y_hat")))))
    second = screen(swapped, problem, cfg, cache=reopened)
    assert second.cached and second.accepted == first.accepted and second.score == first.score
    assert second.reason == first.reason and second.fingerprint == first.fingerprint
    # another config (fewer steps) must not reuse the verdict, but the proxy score stays
    third = screen(swapped, problem, ScreeningConfig(samples=3, steps=5, threshold=0.3), cache=reopened)
    assert not third.cached
    assert reopened.get_proxy(first.fingerprint) == {"status": "ok", "target": 0.5}
    # a cache for another problem key never sees it
    assert EquivalenceCache(path, problem.key + "-other").get_screening(first.fingerprint) is None


def test_screening_result_round_trip():
    r = ScreeningResult(True, 0.75, "accepted", (1.0, 2.5), 0.1, steps_run=500, cached=False)
    assert ScreeningResult.from_dict(json.loads(json.dumps(r.to_dict()))) == r
