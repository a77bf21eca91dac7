"""How a search method reads the result of a proxy training: one rule for every method.

A result is a `ProxyResult`-like object or a mapping with `status` ("ok" | "nan" | "failed"), `target`, `metrics`,
... An "ok" run without a finite target score counts as NaN-stopped: a metric that could not be computed is not
a score (not even 0), and the evolution must not breed from it.
"""

from __future__ import annotations

import math
from typing import Any, Mapping

from components.errors import LossforgeError

RECORD_STATUS = {"ok": "evaluated", "nan": "nan-stopped", "failed": "failed"}
"""Proxy status -> the status of the candidate's history record."""
COUNTER = {"ok": "evaluated", "nan": "nan_stopped", "failed": "failed"}
"""Proxy status -> the funnel counter it increments."""


def field(result: Any, name: str, default: Any = None) -> Any:
    """Attribute of a ProxyResult-like object, or key of a mapping."""
    if isinstance(result, Mapping):
        return result.get(name, default)
    return getattr(result, name, default)


def finite(value: Any) -> float | None:
    """`value` as a float, or None when it is not a finite number."""
    try:
        value = float(value)
    except (TypeError, ValueError):
        return None
    return value if math.isfinite(value) else None


def proxy_outcome(result: Any) -> tuple[str, float | None]:
    """(status, score) of a proxy result: the score is the finite target of an "ok" run, else None (and an "ok"
    run without one becomes "nan"). An unknown status is a one-line LossforgeError."""
    status = str(field(result, "status", None))
    if status not in RECORD_STATUS:
        raise LossforgeError(f"search: proxy result status must be one of {sorted(RECORD_STATUS)}, got {status!r}")
    target = finite(field(result, "target", None))
    if status == "ok" and target is None:
        status = "nan"
    return status, (target if status == "ok" else None)


__all__ = ["COUNTER", "RECORD_STATUS", "field", "finite", "proxy_outcome"]
