"""Wall-clock accounting of a run: which share of the time went to screening, to training, and the rest
(the orchestration overhead: Prefect task runs, MLflow logging, checkpoints, data loading glue)."""

from __future__ import annotations

import time
from contextlib import contextmanager
from typing import Iterator


class Timeline:
    """Collects busy intervals per kind ("screening", "training", ...) and the run's wall time."""

    def __init__(self) -> None:
        self.start = time.time()
        self.end: float | None = None
        self.intervals: dict[str, list[tuple[float, float]]] = {}

    def add(self, kind: str, start: float, end: float) -> None:
        """Record that `kind` work ran from `start` to `end` (epoch seconds, any thread or process)."""
        if end > start:
            self.intervals.setdefault(kind, []).append((start, end))

    @contextmanager
    def measure(self, kind: str) -> Iterator[None]:
        """Context manager recording the enclosed block as `kind` work."""
        t0 = time.time()
        try:
            yield
        finally:
            self.add(kind, t0, time.time())

    @staticmethod
    def _union(intervals: list[tuple[float, float]]) -> float:
        total, cur_s, cur_e = 0.0, None, None
        for s, e in sorted(intervals):
            if cur_e is None or s > cur_e:
                if cur_e is not None:
                    total += cur_e - cur_s
                cur_s, cur_e = s, e
            else:
                cur_e = max(cur_e, e)
        if cur_e is not None:
            total += cur_e - cur_s
        return total

    def summary(self) -> dict[str, float]:
        """wall_s, busy seconds per kind, busy_s (union of all kinds) and overhead_share = 1 − busy/wall."""
        end = self.end if self.end is not None else time.time()
        wall = max(end - self.start, 1e-9)
        out: dict[str, float] = {"wall_s": round(wall, 3)}
        everything: list[tuple[float, float]] = []
        for kind, spans in self.intervals.items():
            out[f"{kind}_s"] = round(self._union(spans), 3)
            everything.extend(spans)
        busy = min(self._union(everything), wall)
        out["busy_s"] = round(busy, 3)
        out["overhead_s"] = round(wall - busy, 3)
        out["overhead_share"] = round((wall - busy) / wall, 4)
        return out
