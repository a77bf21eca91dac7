"""Screening many candidates, optionally over a process pool (fork, one torch thread per worker).

Kept apart from `screening` so that the protocol does not depend on the gradient-equivalence cache: the
cache uses the protocol's fingerprint helpers, and this module uses both.
"""

from __future__ import annotations

import json
import multiprocessing
import time
from concurrent.futures import ProcessPoolExecutor
from dataclasses import replace
from typing import TYPE_CHECKING, Sequence

import torch

from components.errors import LossforgeError
from components.search.equivalence import EquivalenceCache, gradient_fingerprint_or_none
from components.search.graph_json import graph_from_dict, graph_to_dict
from components.search.screening import ScreeningConfig, ScreeningProblem, ScreeningResult, _one_line, screen

if TYPE_CHECKING:  # pragma: no cover
    from components.search.graph import LossGraph


_WORKER_STATE: dict = {}


def _worker_init(problem: ScreeningProblem, config: ScreeningConfig) -> None:
    torch.set_num_threads(1)
    _WORKER_STATE["problem"] = problem
    _WORKER_STATE["config"] = config


def _worker_screen(graph_json: str) -> dict:
    start = time.perf_counter()
    try:
        graph = graph_from_dict(json.loads(graph_json))
    except (LossforgeError, ValueError, KeyError, TypeError) as exc:
        return ScreeningResult(False, None, _one_line(exc), None, time.perf_counter() - start).to_dict()
    return screen(graph, _WORKER_STATE["problem"], _WORKER_STATE["config"]).to_dict()


def screen_many(
    graphs: Sequence["LossGraph"],
    problem: ScreeningProblem,
    config: ScreeningConfig | None = None,
    cache: "EquivalenceCache | None" = None,
    workers: int = 1,
) -> list[ScreeningResult]:
    """Screen candidates in order; equal to calling `screen` on each in turn with the same cache.

    With workers > 1 the gradient-duplicates are resolved in this process first and the remaining
    candidates are screened by a fork-based process pool (graphs travel as JSON, one torch thread per
    worker). If the pool cannot be used, the candidates are screened here instead.
    """
    config = config or ScreeningConfig()
    if workers <= 1 or len(graphs) < 2:
        return [screen(g, problem, config, cache) for g in graphs]
    local = cache if cache is not None else EquivalenceCache(None, problem.key)
    digest = config.digest()
    fps = [gradient_fingerprint_or_none(g, problem, config.samples) for g in graphs]
    first: set[tuple] = set()
    jobs: list[int] = []  # the first candidate of each unseen fingerprint, and every fingerprint-less one
    for i, fp in enumerate(fps):
        if fp is None:
            jobs.append(i)
        elif fp not in first and local.get_screening(fp, digest) is None:
            first.add(fp)
            jobs.append(i)
    results: list[ScreeningResult | None] = [None] * len(graphs)
    threads = torch.get_num_threads()
    try:
        ctx = multiprocessing.get_context("fork")
        with ProcessPoolExecutor(max_workers=workers, mp_context=ctx, initializer=_worker_init,
                                 initargs=(problem, config)) as pool:
            payloads = [json.dumps(graph_to_dict(graphs[i])) for i in jobs]
            for i, res in zip(jobs, pool.map(_worker_screen, payloads, chunksize=1)):
                results[i] = ScreeningResult.from_dict(res)
    except (OSError, ValueError, RuntimeError) as exc:  # no fork, broken pool, ...: screen here
        for i in jobs:
            results[i] = None
        del exc
    finally:
        torch.set_num_threads(threads)
    for i, graph in enumerate(graphs):
        res = results[i]
        if res is None:
            hit = local.get_screening(fps[i], digest) if fps[i] is not None else None
            if hit is not None:
                results[i] = replace(hit, cached=True, seconds=0.0, fingerprint=fps[i], steps_run=0)
            else:
                results[i] = screen(graph, problem, config, local)
        elif res.fingerprint is not None:
            local.put_screening(res.fingerprint, res, digest, graph)
    return results  # type: ignore[return-value]
