"""A cooperative stop of a running search (Ctrl-C, SIGTERM): trainings end at their next iteration.

The CLI's signal handler calls `request_stop`; trainings run in the task runner's threads or worker
processes, where the signal is not delivered (threads) or not sent (a SIGTERM to the CLI alone), so they
check between iterations, through the trainers' `on_progress` hook (`stop_check`), and raise
`SearchStopped`. In-process threads see a flag; worker processes see a file `<state>/stop-requested`
(its path in their environment, `LOSSFORGE_STOP_FILE`). A stopped training writes no result, so a re-run
trains it again; everything reported before is kept (see flows/search_flow.py).

`SearchStopped` is a KeyboardInterrupt: Prefect records the runs as crashed instead of retrying them, and
`except Exception` blocks (the search loop's "record as failed") let it through.
"""

from __future__ import annotations

import os
import signal as _signal
import threading
from pathlib import Path
from typing import Any, Callable, Optional

STOP_FILE = "stop-requested"
STOP_FILE_ENV = "LOSSFORGE_STOP_FILE"  # inherited by the worker processes the task runner starts

_requested = threading.Event()
_reason = {"signal": ""}


class SearchStopped(KeyboardInterrupt):
    """The search was asked to stop (its `signal_name`: SIGINT, SIGTERM, ...)."""

    def __init__(self, signal_name: str = "SIGINT"):
        super().__init__(signal_name)
        self.signal_name = signal_name


def use_stop_file(state_dir: str | Path) -> Path:
    """Make stop requests reach worker processes through `<state_dir>/stop-requested` (before they start).

    A file left by a run that was killed during its stop is removed: the caller holds the search lock."""
    path = (Path(state_dir) / STOP_FILE).resolve()
    os.environ[STOP_FILE_ENV] = str(path)
    clear_stop()
    return path


def request_stop(signal_name: str) -> None:
    """Ask every training of this process and of its worker processes to stop."""
    _reason["signal"] = signal_name
    _requested.set()
    path = os.environ.get(STOP_FILE_ENV)
    if path:
        try:
            Path(path).write_text(signal_name)
        except OSError:  # the folder may be gone; in-process trainings still see the flag
            pass


def clear_stop() -> None:
    """Forget a stop request (at the start of a run, and after a stopped one)."""
    _requested.clear()
    _reason["signal"] = ""
    path = os.environ.get(STOP_FILE_ENV)
    if path:
        Path(path).unlink(missing_ok=True)


def stop_requested() -> Optional[str]:
    """The signal's name when a stop was requested (in this process or in the CLI that started it), else None."""
    if _requested.is_set():
        return _reason["signal"] or "SIGINT"
    path = os.environ.get(STOP_FILE_ENV)
    if path and os.path.exists(path):
        try:
            return Path(path).read_text().strip() or "SIGINT"
        except OSError:
            return "SIGINT"
    return None


def check_stop() -> None:
    """Raise SearchStopped when a stop was requested."""
    name = stop_requested()
    if name:
        raise SearchStopped(name)


def stop_check(then: Callable[[int, int, dict], Any] | None = None) -> Callable[[int, int, dict], None]:
    """An `on_progress(iteration, total, values)` hook for the trainers: stop between iterations, else `then`."""

    def on_progress(iteration: int, total: int, values: dict) -> None:
        check_stop()
        if then is not None:
            then(iteration, total, values)

    return on_progress


def signal_name(signum: int) -> str:
    try:
        return _signal.Signals(signum).name
    except ValueError:  # pragma: no cover
        return f"signal {signum}"
