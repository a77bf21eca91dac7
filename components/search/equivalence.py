"""Gradient-equivalence check (AutoLoss-Zero §3.2).

The fingerprint of a loss is the tuple of the B per-sample gradient norms ‖∂L/∂ŷ_b‖₂ at the initial
probe predictions, followed by the B signed projections ⟨∂L/∂ŷ_b, r⟩ on one fixed random direction r (the
paper's norms alone would make -L, which ascends, "equivalent" to L and let it inherit L's verdict and score) (the variable the rejection protocol optimises: the logits), each rounded to two
significant digits, with the paper's un-normalised objective. Two losses with equal fingerprints are
treated as equivalent: the later one reuses the earlier outcome (screening verdict and, once it is
known, its proxy score) instead of being screened / trained again.

`EquivalenceCache` maps fingerprints to JSON entries, conventionally
`{"screening": {...ScreeningResult fields..., "config": <ScreeningConfig digest>}, "proxy": {...} | None}`.
It is stored in one JSON file (`lossforge.equivalence/1`, atomic writes) holding a section per problem
key (task + metric + probe data): a cache opened for one key never sees another key's entries, and
saving keeps the other sections intact.
"""

from __future__ import annotations

import math
from pathlib import Path
from typing import TYPE_CHECKING, Any, Mapping

from components.atomic_io import read_json, write_json_atomic
from components.errors import LossforgeError
from components.search.screening import ScreeningProblem, ScreeningResult, fingerprint_from_grad, initial_gradient

if TYPE_CHECKING:  # pragma: no cover
    from components.search.graph import LossGraph

CACHE_FORMAT = "lossforge.equivalence/1"

Fingerprint = tuple[float, ...]


def gradient_fingerprint(graph: "LossGraph", problem: "ScreeningProblem", samples: int | None = None) -> Fingerprint:
    """The B gradient norms and B signed projections at the initial predictions, 2 significant digits.

    Raises LossforgeError when the loss or a gradient is NaN/Inf (such a loss has no fingerprint).
    """
    _, _, losses, grad = initial_gradient(graph, problem, samples)
    if not bool(losses.isfinite().all()):
        raise LossforgeError("gradient fingerprint: the loss is NaN/Inf at the initial predictions")
    fp = fingerprint_from_grad(grad)
    if fp is None:
        raise LossforgeError("gradient fingerprint: a gradient norm is NaN/Inf at the initial predictions")
    return fp


def gradient_fingerprint_or_none(graph: "LossGraph", problem: "ScreeningProblem", samples: int | None = None) -> Fingerprint | None:
    """Like gradient_fingerprint, but None for any candidate that has no finite fingerprint or fails."""
    try:
        return gradient_fingerprint(graph, problem, samples)
    except Exception:  # noqa: BLE001 - a bad candidate has no fingerprint
        return None


def fingerprint_key(fp: Fingerprint) -> str:
    """The string a fingerprint is stored under, e.g. `"1.2e+01,3.4e-02"`."""
    return ",".join(f"{float(v):.1e}" for v in fp)


def parse_fingerprint_key(key: str) -> Fingerprint:
    """Inverse of fingerprint_key."""
    return tuple(float(v) for v in key.split(","))


def _normalise(fp: Any) -> Fingerprint:
    try:
        values = tuple(float(v) for v in fp)
    except (TypeError, ValueError):
        raise LossforgeError(f"equivalence cache: a fingerprint must be a sequence of numbers, got {fp!r}") from None
    if not values or not all(math.isfinite(v) for v in values):
        raise LossforgeError(f"equivalence cache: a fingerprint must be non-empty and finite, got {values!r}")
    return values


class EquivalenceCache:
    """Fingerprint → outcome entries for one problem key; persisted to `path` (or in memory if None)."""

    def __init__(self, path: str | Path | None, key: str):
        if not isinstance(key, str) or not key:
            raise LossforgeError("equivalence cache: the problem key must be a non-empty string")
        self.path = Path(path) if path is not None else None
        self.key = key
        self._entries: dict[str, dict] = {}
        if self.path is not None and self.path.exists():
            section = self._read_file().get("problems", {}).get(key, {})
            if not isinstance(section, dict):
                raise LossforgeError(f"{self.path}: problems[{key!r}] must be an object")
            for fp_key, entry in section.items():
                try:
                    parse_fingerprint_key(fp_key)
                except ValueError:
                    raise LossforgeError(f"{self.path}: bad fingerprint key {fp_key!r}") from None
                if not isinstance(entry, dict):
                    raise LossforgeError(f"{self.path}: entry {fp_key!r} must be an object")
                self._entries[fp_key] = entry

    def _read_file(self) -> dict:
        data = read_json(self.path)
        if not isinstance(data, dict) or data.get("format") != CACHE_FORMAT:
            got = data.get("format") if isinstance(data, dict) else type(data).__name__
            raise LossforgeError(f"{self.path}: not an equivalence cache (format {got!r}, expected {CACHE_FORMAT!r})")
        if not isinstance(data.get("problems", {}), dict):
            raise LossforgeError(f"{self.path}: 'problems' must be an object")
        return data

    # ------------------------------------------------------------------ generic entries
    def __len__(self) -> int:
        return len(self._entries)

    def __contains__(self, fp: Any) -> bool:
        try:
            return fingerprint_key(_normalise(fp)) in self._entries
        except LossforgeError:
            return False

    def get(self, fp: Fingerprint | None) -> dict | None:
        """The entry stored for `fp` (a copy), or None."""
        if fp is None:
            return None
        entry = self._entries.get(fingerprint_key(_normalise(fp)))
        return None if entry is None else _copy(entry)

    def put(self, fp: Fingerprint, entry: Mapping[str, Any]) -> None:
        """Store (replace) the entry for `fp`; it must be JSON-able."""
        if not isinstance(entry, Mapping):
            raise LossforgeError(f"equivalence cache: an entry must be a mapping, got {type(entry).__name__}")
        self._entries[fingerprint_key(_normalise(fp))] = _copy(dict(entry))

    def update(self, fp: Fingerprint, **fields: Any) -> dict:
        """Merge `fields` into the entry for `fp` (creating it); returns the new entry."""
        key = fingerprint_key(_normalise(fp))
        entry = dict(self._entries.get(key, {}))
        entry.update(_copy(fields))
        self._entries[key] = entry
        return _copy(entry)

    def entries(self) -> dict[Fingerprint, dict]:
        """All entries as {fingerprint tuple: entry}."""
        return {parse_fingerprint_key(k): _copy(v) for k, v in self._entries.items()}

    # ------------------------------------------------------------------ screening / proxy helpers
    def get_screening(self, fp: Fingerprint | None, config_digest: str | None = None) -> "ScreeningResult | None":
        """The stored screening outcome for `fp`, if any and (when given) screened under `config_digest`."""
        entry = self.get(fp) if fp is not None else None
        data = (entry or {}).get("screening")
        if not isinstance(data, dict):
            return None
        if config_digest is not None and data.get("config") != config_digest:
            return None
        try:
            return ScreeningResult.from_dict({**data, "fingerprint": list(fp)})
        except (KeyError, TypeError, ValueError):
            return None

    def put_screening(self, fp: Fingerprint, result: "ScreeningResult", config_digest: str, graph: "LossGraph | None" = None) -> None:
        """Store a screening outcome (keeps any proxy score already stored for `fp`)."""
        data = result.to_dict()
        data.pop("fingerprint", None)
        data.pop("cached", None)
        data["config"] = config_digest
        if data.get("score") is not None and not math.isfinite(data["score"]):
            data["score"] = None
        fields: dict[str, Any] = {"screening": data}
        if graph is not None and "canonical" not in (self.get(fp) or {}):
            fields["canonical"] = graph.canonical()
        self.update(fp, **fields)

    def get_proxy(self, fp: Fingerprint | None) -> dict | None:
        """The stored proxy outcome for `fp` (whatever the search engine put there), or None."""
        entry = self.get(fp) if fp is not None else None
        proxy = (entry or {}).get("proxy")
        return proxy if isinstance(proxy, dict) else None

    def put_proxy(self, fp: Fingerprint, proxy: Mapping[str, Any]) -> None:
        """Store the proxy outcome (e.g. status, target score, metrics) for `fp`."""
        self.update(fp, proxy=dict(proxy))

    # ------------------------------------------------------------------ persistence
    def save(self) -> Path | None:
        """Write this key's entries to the file atomically, keeping other keys' sections."""
        if self.path is None:
            return None
        data = self._read_file() if self.path.exists() else {"format": CACHE_FORMAT, "problems": {}}
        problems = dict(data.get("problems", {}))
        problems[self.key] = self._entries
        return write_json_atomic(self.path, {"format": CACHE_FORMAT, "problems": problems}, indent=1)


def _copy(obj: Any) -> Any:
    if isinstance(obj, dict):
        return {str(k): _copy(v) for k, v in obj.items()}
    if isinstance(obj, (list, tuple)):
        return [_copy(v) for v in obj]
    return obj


__all__ = [
    "CACHE_FORMAT",
    "EquivalenceCache",
    "gradient_fingerprint",
    "gradient_fingerprint_or_none",
    "fingerprint_key",
    "parse_fingerprint_key",
]
