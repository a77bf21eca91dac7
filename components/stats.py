"""Small statistics for the report: mean ± spread over seeds and Spearman's rank correlation.

Decisions:
- ``mean_std`` gives the population standard deviation (``statistics.pstdev``), as the re-training
  comparison table does (``components.tasks.retrain``), so the spreads of the proxy baselines and of the
  re-training table are the same figure. One value has spread 0.
- ``spearman`` ranks ties by their average rank (the textbook and ``scipy.stats.spearmanr`` convention)
  and returns the Pearson correlation of the ranks. Pairs where either value is missing (None) or not
  finite are left out. With fewer than 3 pairs, or when one side is constant (its ranks have no
  variance), the correlation is undefined and the function returns None.
"""

from __future__ import annotations

import math
import statistics
from collections.abc import Iterable, Sequence

import numpy as np

from components.errors import LossforgeError

MIN_PAIRS = 3


def _finite(value: object) -> bool:
    return isinstance(value, (int, float)) and not isinstance(value, bool) and math.isfinite(value)


def mean_std(values: Iterable[float | None]) -> tuple[float | None, float | None]:
    """Mean and population std of the finite values; (None, None) when there is none."""
    kept = [float(v) for v in values if _finite(v)]
    if not kept:
        return None, None
    return statistics.fmean(kept), (statistics.pstdev(kept) if len(kept) > 1 else 0.0)


def average_ranks(values: Sequence[float]) -> np.ndarray:
    """1-based ranks of `values`; tied values share the mean of the ranks they span."""
    arr = np.asarray(values, dtype=float)
    order = np.argsort(arr, kind="mergesort")
    ranks = np.empty(len(arr), dtype=float)
    sorted_vals = arr[order]
    start = 0
    while start < len(arr):
        end = start
        while end + 1 < len(arr) and sorted_vals[end + 1] == sorted_vals[start]:
            end += 1
        ranks[order[start:end + 1]] = (start + end) / 2.0 + 1.0
        start = end + 1
    return ranks


def spearman(x: Sequence[float | None], y: Sequence[float | None]) -> float | None:
    """Spearman's rank correlation of paired values (see module docstring); None when undefined."""
    if len(x) != len(y):
        raise LossforgeError(f"spearman: x and y differ in length ({len(x)} vs {len(y)})")
    pairs = [(float(a), float(b)) for a, b in zip(x, y) if _finite(a) and _finite(b)]
    if len(pairs) < MIN_PAIRS:
        return None
    rx = average_ranks([a for a, _ in pairs])
    ry = average_ranks([b for _, b in pairs])
    dx, dy = rx - rx.mean(), ry - ry.mean()
    denom = math.sqrt(float((dx * dx).sum()) * float((dy * dy).sum()))
    if denom == 0.0:
        return None
    return max(-1.0, min(1.0, float((dx * dy).sum()) / denom))
