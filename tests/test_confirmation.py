"""Choosing the searched loss by its mean over proxy seeds (components/search/confirmation.py)."""

import math

from components.search.confirmation import confirmation_seeds, confirmed_ranking


def test_confirmation_seeds_are_the_other_proxy_seeds():
    assert confirmation_seeds([0, 1, 2], 0) == [1, 2]
    assert confirmation_seeds([3, 1, 3], 1) == [3]
    assert confirmation_seeds([0], 0) == []


def test_a_lucky_single_score_loses_to_a_better_mean():
    ranked = [{"id": 7, "target": 0.80}, {"id": 3, "target": 0.75}, {"id": 9, "target": 0.70}]
    out = confirmed_ranking(ranked, {7: [0.60, 0.62], 3: [0.74, 0.76]})
    assert [r["id"] for r in out] == [3, 7, 9]
    assert out[0]["target"] == 0.75 and out[0]["target_single"] == 0.75 and out[0]["proxy_runs"] == 3
    assert math.isclose(out[1]["target"], (0.80 + 0.60 + 0.62) / 3)
    assert out[1]["target_std"] > 0
    assert "target_single" not in out[2] and out[2]["target"] == 0.70  # not confirmed: original order after


def test_a_loss_that_diverged_with_another_seed_ranks_after_confirmed_ones():
    ranked = [{"id": 1, "target": 0.9}, {"id": 2, "target": 0.5}]
    out = confirmed_ranking(ranked, {1: [None, 0.9], 2: [0.5, float("nan")], })
    assert [r["id"] for r in out] == [1, 2]
    out = confirmed_ranking(ranked, {1: [None, 0.9], 2: [0.5, 0.5]})
    assert [r["id"] for r in out] == [2, 1]
    assert out[1]["proxy_runs"] == 2


def test_without_confirmations_the_order_is_kept():
    ranked = [{"id": 1, "target": 0.9}, {"id": 2, "target": 0.5}]
    assert confirmed_ranking(ranked, {}) == ranked
