"""Progress events from the flows to whoever listens (the CLI's rich progress bars); no-op by default.

Flows call `emit(kind, **data)` from their main thread; `listen(fn)` installs a callback for the
duration of a `with` block. Keeping this out of flow parameters lets deployments run the same flows.
"""

from __future__ import annotations

from contextlib import contextmanager
from typing import Any, Callable, Iterator

Listener = Callable[[str, dict[str, Any]], None]
_listeners: list[Listener] = []


def emit(kind: str, **data: Any) -> None:
    """Send an event (e.g. "search", done=3, total=8) to the installed listeners; errors there are ignored."""
    for fn in list(_listeners):
        try:
            fn(kind, data)
        except Exception:  # a display problem must never break a search
            pass


@contextmanager
def listen(fn: Listener) -> Iterator[None]:
    """Install `fn` as a listener inside the block."""
    _listeners.append(fn)
    try:
        yield
    finally:
        _listeners.remove(fn)
