"""Spearman's rank correlation (ties, undefined cases) and mean ± std over seeds."""

import math
import random

import pytest

from components.errors import LossforgeError
from components.stats import average_ranks, mean_std, spearman


def test_average_ranks_share_ties():
    assert list(average_ranks([0.3, 0.1, 0.3, 0.2])) == [3.5, 1.0, 3.5, 2.0]
    assert list(average_ranks([5.0, 5.0, 5.0])) == [2.0, 2.0, 2.0]


def test_spearman_monotone_and_reversed():
    x = [0.1, 0.4, 0.2, 0.9]
    assert spearman(x, [v ** 3 for v in x]) == pytest.approx(1.0)  # any increasing map: rank order kept
    assert spearman(x, [-v for v in x]) == pytest.approx(-1.0)
    # hand-worked: ranks x = 1,2,3,4, y = 2,1,4,3 -> 1 - 6*4 / (4*15) = 0.6
    assert spearman([1, 2, 3, 4], [20, 10, 40, 30]) == pytest.approx(0.6)


def test_spearman_with_ties_matches_the_textbook_value():
    # ranks x = 1, 2.5, 2.5, 4; y = 1, 2, 3, 4 -> Pearson of the ranks
    rx, ry = [1, 2.5, 2.5, 4], [1, 2, 3, 4]
    mx, my = sum(rx) / 4, sum(ry) / 4
    num = sum((a - mx) * (b - my) for a, b in zip(rx, ry))
    den = math.sqrt(sum((a - mx) ** 2 for a in rx) * sum((b - my) ** 2 for b in ry))
    assert spearman([0.1, 0.5, 0.5, 0.9], [1, 2, 3, 4]) == pytest.approx(num / den)
    scipy_stats = pytest.importorskip("scipy.stats")
    rng = random.Random(3)
    for _ in range(20):
        n = rng.randint(3, 12)
        x = [rng.choice([0.1, 0.2, 0.3, 0.4]) for _ in range(n)]  # many ties
        y = [rng.random() for _ in range(n)]
        if len(set(x)) == 1:
            continue
        assert spearman(x, y) == pytest.approx(scipy_stats.spearmanr(x, y).statistic)


def test_spearman_undefined_cases_return_none():
    assert spearman([], []) is None
    assert spearman([0.1, 0.2], [0.3, 0.4]) is None  # n < 3
    assert spearman([0.5, 0.5, 0.5], [0.1, 0.2, 0.3]) is None  # constant side: no rank variance
    # pairs with a missing or non-finite value are left out: 2 pairs left -> None, 3 left -> defined
    assert spearman([0.1, None, 0.3, math.nan], [1, 2, 3, 4]) is None
    assert spearman([0.1, None, 0.3, 0.2], [1, 2, 3, 4]) == pytest.approx(0.5)
    with pytest.raises(LossforgeError, match="differ in length"):
        spearman([1, 2, 3], [1, 2])


def test_mean_std_is_population_std_over_finite_values():
    assert mean_std([0.2, 0.4]) == (pytest.approx(0.3), pytest.approx(0.1))
    assert mean_std([0.7]) == (0.7, 0.0)
    assert mean_std([None, math.nan]) == (None, None)
    assert mean_std([0.2, None, 0.4]) == (pytest.approx(0.3), pytest.approx(0.1))
