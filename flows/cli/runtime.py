"""Shared set-up of the orchestration commands: local Prefect home, quiet logs, rich progress display."""

from __future__ import annotations

import _thread
import logging
import multiprocessing
import os
import signal
import sys
import threading
import time
from contextlib import contextmanager
from pathlib import Path
from typing import Any, Callable, Iterator

from rich.console import Console
from rich.progress import BarColumn, MofNCompleteColumn, Progress, SpinnerColumn, TextColumn, TimeElapsedColumn

console = Console()
_options = {"verbose": False}


def configure_prefect(verbose: bool = False) -> None:
    """Use Prefect's embedded local API with its database under ./.prefect unless a server or home is set.

    Must run before prefect is imported (its settings are read at import time).
    """
    _options["verbose"] = verbose
    if not os.environ.get("PREFECT_API_URL") and not os.environ.get("PREFECT_HOME"):
        os.environ["PREFECT_HOME"] = str(Path(".prefect").resolve())
    os.environ.setdefault("PREFECT_SERVER_ANALYTICS_ENABLED", "false")
    # the embedded API server starts in a subprocess; on a busy machine it needs more than the default 20 s
    os.environ.setdefault("PREFECT_SERVER_EPHEMERAL_STARTUP_TIMEOUT_SECONDS", "180")
    from flows.cli.embedded_server import startup_timeout

    startup_timeout()  # a bad value is one line here, not Prefect's traceback when it is imported
    os.environ.setdefault("DO_NOT_TRACK", "1")
    os.environ.setdefault("MLFLOW_ENABLE_ASYNC_LOGGING", "false")
    if not verbose:  # INFO logs still go to the Prefect API (the UI); the console shows warnings only, and the
        # flows' own warnings (a stalled search) once, through the progress display, not a second time as log lines
        levels = {"CONSOLE": "WARNING", "CONSOLE_FLOW_RUNS": "ERROR", "CONSOLE_TASK_RUNS": "ERROR"}
        for handler, level in levels.items():
            os.environ.setdefault(f"PREFECT_LOGGING_HANDLERS_{handler}_LEVEL", level)


def _search_info(data: dict[str, Any]) -> str:
    counters = data.get("counters") or {}
    info = ", ".join(f"{k}={counters[k]}" for k in ("generated", "accepted", "duplicates", "failed", "nan_stopped")
                     if k in counters)
    if data.get("best") is not None:
        info = f"best={100 * data['best']:.1f}%" + (f" (CE {100 * data['ce']:.1f}%)" if data.get("ce") else "") \
            + ", " + info
    return info


def _plain_lines(print_line: Callable[[str], None]) -> Callable[[str, dict[str, Any]], None]:
    """The progress events as timestamped lines, for a console that is not a terminal (a log file, CI, docker
    logs), where rich draws its bars only once at the end: a stage, every proxy evaluation, every 10 % of a
    re-training, every warning."""
    last = {"search": None, "retrain": None}

    def on_event(kind: str, data: dict[str, Any]) -> None:
        stamp = time.strftime("%H:%M:%S")
        if kind == "stage" and data["name"] != "done":
            print_line(f"{stamp} stage {data['name']}")
        elif kind == "search" and data["done"] != last["search"]:
            last["search"] = data["done"]
            print_line(f"{stamp} proxy evaluations {data['done']}/{data['total']}  {_search_info(data)}")
        elif kind == "warning":
            print_line(f"{stamp} warning: {data.get('message', '')}")
        elif kind == "retrain" and data.get("total"):
            tenth = 10 * data["done"] // data["total"]
            if tenth != last["retrain"]:
                last["retrain"] = tenth
                print_line(f"{stamp} re-training iteration {data['done']}/{data['total']}")

    return on_event


@contextmanager
def progress_display(enabled: bool = True) -> Iterator[None]:
    """Show the pipeline's stages and the search's proxy evaluations as rich progress bars (as plain lines when
    the console is not a terminal)."""
    from flows import progress as events

    if not enabled:
        yield
        return
    if not console.is_terminal:
        with events.listen(_plain_lines(lambda line: console.print(line, markup=False, highlight=False,
                                                                   soft_wrap=True))):
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
            info = _search_info(data)
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


# ------------------------------------------------------------------------------------------ stopping
STOP_SIGNALS = (signal.SIGINT, signal.SIGTERM)


@contextmanager
def stop_on_signals() -> Iterator[None]:
    """Ctrl-C / SIGTERM stop the run within seconds (main thread only; the previous handlers come back after).

    First signal: every training is asked to stop at its next iteration (flows/stopping.py) and
    SearchStopped is raised here, so the flows unwind as from a Ctrl-C while the trainings end. A second
    signal (the stop hangs, or the user insists) ends the process at once, children included."""
    from flows.stopping import SearchStopped, request_stop, signal_name, stop_requested

    if threading.current_thread() is not threading.main_thread():
        yield
        return

    def on_signal(signum: int, _frame: Any) -> None:
        name = signal_name(signum)
        again = _resent_by_prefect.pop(signum, False) or _redelivered.pop(signum, False)
        if stop_requested() and not again:
            _force_exit(signum)
        request_stop(name)
        raise SearchStopped(name)

    previous_hook = sys.unraisablehook

    def on_unraisable(args: Any) -> None:
        # The handler's exception is lost when the signal lands while the main thread runs a weakref callback
        # or a __del__ (seen: during an import): "Exception ignored in ...". Deliver it again, from another
        # thread a moment later (raised in this hook, it would be ignored as well).
        if isinstance(args.exc_value, SearchStopped):
            signum = int(getattr(signal, args.exc_value.signal_name, signal.SIGINT))
            _redelivered[signum] = True
            threading.Timer(0.05, _thread.interrupt_main, (signum,)).start()
            return
        previous_hook(args)

    previous = {sig: signal.signal(sig, on_signal) for sig in STOP_SIGNALS}
    sys.unraisablehook = on_unraisable
    try:
        yield
    finally:
        sys.unraisablehook = previous_hook
        stopping = stop_requested() is not None
        for sig, handler in previous.items():  # after a stop the process is on its way out: a signal ends it
            signal.signal(sig, (lambda signum, _frame: _force_exit(signum)) if stopping else handler)


_resent_by_prefect: dict[int, bool] = {}  # Prefect's SIGTERM bridge sends the signal again after the flow unwound
_redelivered: dict[int, bool] = {}  # the handler's SearchStopped was swallowed, and raised again


def route_prefect_sigterm() -> None:
    """Make a SIGTERM during a flow run stop the trainings at once (call after Prefect is imported).

    While a flow runs, Prefect's engine replaces the SIGTERM handler with its own
    (`prefect.utilities.engine._prefect_sigterm_handler`, installed by `capture_sigterm`), which raises
    TerminationSignal in the main thread: the flow unwinds, but its task runner then waits for the trainings
    in flight, and only then Prefect sends the signal again to the previous handler (ours). The module
    function is wrapped so that the stop is requested first. It is Prefect's private name: if it goes away,
    a SIGTERM still stops the run, after the trainings in flight end (tests/test_stop_and_lock.py measures
    how long a SIGTERM takes)."""
    from flows.stopping import request_stop, signal_name

    try:
        from prefect.utilities import engine
    except ImportError:  # pragma: no cover
        return
    prefect_handler = getattr(engine, "_prefect_sigterm_handler", None)
    if prefect_handler is None or getattr(prefect_handler, "lossforge_stops_trainings", False):
        return

    def stop_then_prefect(signum: int, *args: Any) -> Any:
        request_stop(signal_name(signum))
        _resent_by_prefect[signum] = True  # Prefect re-sends it once the flow has unwound: not a second signal
        return prefect_handler(signum, *args)

    stop_then_prefect.lossforge_stops_trainings = True  # type: ignore[attr-defined]
    engine._prefect_sigterm_handler = stop_then_prefect


def end_worker_processes(timeout: float = 5.0) -> None:
    """End the worker processes this process started (task runner pools) that are still alive after a stop.

    The temporary Prefect server is not one of them: it stops at exit, after Prefect sent its last records."""
    children = multiprocessing.active_children()
    for child in children:
        child.terminate()
    for child in children:
        child.join(timeout)
        if child.is_alive():
            child.kill()
            child.join(1)


def _force_exit(signum: int) -> None:
    from flows.cli.embedded_server import embedded_server_pid

    sys.stderr.write(f"{signal.Signals(signum).name} again: stopped at once (unfinished trainings are lost)\n")
    for child in multiprocessing.active_children():
        child.kill()
    pid = embedded_server_pid()
    if pid is not None:
        try:
            os.kill(pid, signal.SIGKILL)
        except ProcessLookupError:
            pass
    os._exit(128 + signum)


# ------------------------------------------------------------------------------------------ quiet console
class PrefectConsoleFilter(logging.Filter):
    """Keep Prefect's console copies of what the CLI itself reports in one line.

    Dropped: records carrying a LossforgeError (the CLI prints it as its `error:` line; Prefect printed it
    with a traceback once per flow and task it went through) or a stop, and everything once a stop was
    requested ("Crash detected", ...). Other exceptions (bugs) keep their tracebacks. The Prefect API (the
    UI) still gets every record: this filter sits on the console handlers only."""

    def filter(self, record: logging.LogRecord) -> bool:
        from components.errors import LossforgeError
        from flows.stopping import stop_requested

        if stop_requested():
            return False
        exc = record.exc_info[1] if record.exc_info else None
        return not isinstance(exc, (LossforgeError, KeyboardInterrupt))


def quiet_prefect_console() -> None:
    """Install PrefectConsoleFilter on Prefect's console handlers (after Prefect set up its logging) unless
    `configure_prefect(verbose=True)` asked for Prefect's logs as they are."""
    if _options["verbose"]:
        return
    from prefect.logging.handlers import PrefectConsoleHandler

    loggers = [logging.getLogger()] + [logging.getLogger(name) for name in list(logging.Logger.manager.loggerDict)
                                       if name == "prefect" or name.startswith("prefect.")]
    for logger in loggers:
        for handler in logger.handlers:
            if isinstance(handler, PrefectConsoleHandler) and not any(
                    isinstance(f, PrefectConsoleFilter) for f in handler.filters):
                handler.addFilter(PrefectConsoleFilter())
