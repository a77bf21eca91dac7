"""Shared set-up of the orchestration commands: local Prefect home, quiet logs, rich progress display."""

from __future__ import annotations

import os
from contextlib import contextmanager
from pathlib import Path
from typing import Any, Iterator

from rich.console import Console
from rich.progress import BarColumn, MofNCompleteColumn, Progress, SpinnerColumn, TextColumn, TimeElapsedColumn

console = Console()


def configure_prefect(verbose: bool = False) -> None:
    """Use Prefect's embedded local API with its database under ./.prefect unless a server or home is set.

    Must run before prefect is imported (its settings are read at import time).
    """
    if not os.environ.get("PREFECT_API_URL") and not os.environ.get("PREFECT_HOME"):
        os.environ["PREFECT_HOME"] = str(Path(".prefect").resolve())
    os.environ.setdefault("PREFECT_SERVER_ANALYTICS_ENABLED", "false")
    # the embedded API server starts in a subprocess; on a busy machine it needs more than the default 20 s
    os.environ.setdefault("PREFECT_SERVER_EPHEMERAL_STARTUP_TIMEOUT_SECONDS", "180")
    os.environ.setdefault("DO_NOT_TRACK", "1")
    os.environ.setdefault("MLFLOW_ENABLE_ASYNC_LOGGING", "false")
    if not verbose:  # INFO logs still go to the Prefect API (the UI); the console shows warnings only
        for handler in ("CONSOLE", "CONSOLE_FLOW_RUNS", "CONSOLE_TASK_RUNS"):
            os.environ.setdefault(f"PREFECT_LOGGING_HANDLERS_{handler}_LEVEL", "WARNING")


@contextmanager
def progress_display(enabled: bool = True) -> Iterator[None]:
    """Show the pipeline's stages and the search's proxy evaluations as rich progress bars."""
    from flows import progress as events

    if not enabled:
        yield
        return
    bars = Progress(
        SpinnerColumn(), TextColumn("[bold]{task.description}"), BarColumn(), MofNCompleteColumn(),
        TextColumn("{task.fields[info]}"), TimeElapsedColumn(), console=console, transient=False,
    )
    tasks: dict[str, Any] = {}

    def on_event(kind: str, data: dict[str, Any]) -> None:
        if kind == "stage":
            for name, tid in tasks.items():
                if name.startswith("stage:"):
                    bars.update(tid, completed=1)
            if data["name"] != "done":
                tasks[f"stage:{data['name']}"] = bars.add_task(data["name"], total=1, info="")
        elif kind == "search":
            counters = data.get("counters") or {}
            info = ", ".join(f"{k}={counters[k]}" for k in ("generated", "accepted", "duplicates", "failed",
                                                            "nan_stopped") if k in counters)
            if data.get("best") is not None:
                info = f"best={100 * data['best']:.1f}%" + (f" (CE {100 * data['ce']:.1f}%)" if data.get("ce") else "") \
                    + ", " + info
            if "search" not in tasks:
                tasks["search"] = bars.add_task("  proxy evaluations", total=data["total"], info=info)
            bars.update(tasks["search"], completed=data["done"], info=info)
        elif kind == "warning":
            bars.console.print(f"[yellow]warning:[/] {data.get('message', '')}")
        elif kind == "retrain" and "total" in data:
            if "retrain" not in tasks:
                tasks["retrain"] = bars.add_task("  re-training iterations", total=data["total"], info="")
            bars.update(tasks["retrain"], completed=data["done"])

    with bars, events.listen(on_event):
        yield
