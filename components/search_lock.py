"""One process per search state folder: an OS file lock on `<state>/lock` that names its holder.

Two `lossforge search` runs of the same search in one folder would train the same candidates twice and race
on MLflow; the second one must stop at once and say who holds the search. The lock is `fcntl.flock` on a
file in the state folder (the holder's pid, command and start time written into it): the kernel releases
it when the holder exits or dies, `kill -9` included, so a lock is never stale and nothing has to be
cleaned up. Where `fcntl` does not exist (Windows) no lock is taken.

The lock belongs to the open file, so a child forked while it is held (not spawned: spawned children do
not inherit the descriptor) holds it too until it exits.
"""

from __future__ import annotations

import json
import os
import sys
import time
from contextlib import contextmanager
from pathlib import Path
from typing import Any, Iterator

from components.errors import LossforgeError

LOCK_NAME = "lock"


class SearchLocked(LossforgeError):
    """The search state folder is held by another live process (`holder`: its pid, command, start time)."""

    def __init__(self, message: str, holder: dict[str, Any]):
        super().__init__(message)
        self.holder = holder


def read_holder(folder: str | Path) -> dict[str, Any]:
    """What the lock file says about its holder ({} when it is empty or unreadable)."""
    try:
        return json.loads((Path(folder) / LOCK_NAME).read_text(encoding="utf-8"))
    except (OSError, ValueError):
        return {}


@contextmanager
def search_lock(folder: str | Path, label: str = "this search") -> Iterator[dict[str, Any]]:
    """Hold the lock of the state folder `folder` inside the block (created if needed); yields the holder record.

    Raises SearchLocked (one line naming the holder's pid) when another process holds it."""
    try:
        import fcntl
    except ImportError:  # pragma: no cover - Windows: no advisory locks
        yield {}
        return
    folder = Path(folder)
    folder.mkdir(parents=True, exist_ok=True)
    fd = os.open(folder / LOCK_NAME, os.O_RDWR | os.O_CREAT, 0o644)
    try:
        try:
            fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            raise _locked(folder, label) from None
        holder = {"pid": os.getpid(), "command": " ".join([Path(sys.argv[0]).name, *sys.argv[1:]]),
                  "started": time.strftime("%Y-%m-%d %H:%M:%S", time.localtime())}
        os.ftruncate(fd, 0)
        os.pwrite(fd, json.dumps(holder).encode(), 0)
        try:
            yield holder
        finally:
            os.ftruncate(fd, 0)  # the next holder writes its own record; a reader never sees ours after this
            fcntl.flock(fd, fcntl.LOCK_UN)
    finally:
        os.close(fd)


def _locked(folder: Path, label: str) -> SearchLocked:
    holder: dict[str, Any] = {}
    for _ in range(20):  # the holder writes its record right after taking the lock: give it a moment
        holder = read_holder(folder)
        if holder.get("pid"):
            break
        time.sleep(0.05)
    pid = holder.get("pid", "?")
    since = f" since {holder['started']}" if holder.get("started") else ""
    command = f" (`{holder['command']}`)" if holder.get("command") else ""
    return SearchLocked(
        f"{label} is already running in process {pid}{command}{since}, state {folder}; "
        f"wait for it to end or stop it (kill -INT {pid}), then run again to resume", holder)
