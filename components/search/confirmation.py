"""Choosing the searched loss when one proxy evaluation is noisy: confirm the best few on more seeds.

One proxy training of a loss moves by several points from one seed to the next (measured on the CPU proxy:
CE's mIoU on S_eval 0.60-0.72 over four seeds, std 0.05), so the best of a few hundred single evaluations
is partly the luckiest one. After the search, the `k` best candidates are trained again with the other
proxy seeds (the seeds the proxy baselines use), and the searched loss is the one with the best *mean*:
the same number of seeds as the CE baseline it is compared with. Pure functions; the flow trains.
"""

from __future__ import annotations

import math
import statistics
from collections.abc import Iterable, Mapping, Sequence
from typing import Any


def confirmation_seeds(proxy_seeds: Iterable[int], candidate_seed: int) -> list[int]:
    """The extra seeds a candidate is confirmed with: the proxy seeds other than the one it was searched with."""
    return [int(s) for s in dict.fromkeys(proxy_seeds) if int(s) != int(candidate_seed)]


def _finite(value: Any) -> bool:
    return isinstance(value, (int, float)) and math.isfinite(value)


def confirmed_ranking(ranked: Sequence[Mapping[str, Any]], extra: Mapping[Any, Sequence[Any]]) -> list[dict[str, Any]]:
    """Re-rank candidate records by the mean of their search score and their confirmation scores.

    ``ranked``: evaluated records (with ``id`` and ``target``), best single score first. ``extra``: id ->
    target values of the confirmation trainings (None/NaN for a failed or NaN-stopped one). A record whose
    confirmation has any missing value keeps only what finished, but ranks after every fully confirmed one
    (a loss that diverged with another seed is not a safe answer). Records not in ``extra`` follow in their
    original order. Each returned record gets ``target_single`` (the search score), ``target`` (the mean),
    ``target_std`` and ``proxy_runs`` (number of values in the mean).
    """
    confirmed, partial, rest = [], [], []
    for order, rec in enumerate(ranked):
        if rec["id"] not in extra:
            rest.append(dict(rec))
            continue
        values = [rec["target"], *extra[rec["id"]]]
        good = [float(v) for v in values if _finite(v)]
        mean = statistics.fmean(good) if good else math.nan
        out = dict(rec, target_single=rec["target"], target=mean,
                   target_std=statistics.pstdev(good) if len(good) > 1 else 0.0, proxy_runs=len(good))
        (confirmed if len(good) == len(values) else partial).append((-mean if good else math.inf, order, out))
    return [r for *_, r in sorted(confirmed)] + [r for *_, r in sorted(partial)] + rest


__all__ = ["confirmation_seeds", "confirmed_ranking"]
