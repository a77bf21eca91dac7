"""The temporary Prefect API server of a CLI run (when no PREFECT_API_URL is set), owned by the CLI.

Prefect starts its own ("ephemeral") server in a child process of the same process group: a Ctrl-C in the
terminal reaches it too, it dies at once while the flows still talk to it (the client then loops on
connection errors), and a SIGTERM to the CLI alone left it running. It also gives up after 20 s, which a
loaded machine exceeded. So the CLI starts the same server itself (Prefect's own uvicorn command and
environment, see prefect.server.api.server.SubprocessASGIServer) before any flow runs, and points
PREFECT_API_URL at it (re-reading Prefect's settings if it was imported already):

- in its own session: terminal signals go to the CLI only, which stops the flows, then the server;
- on Linux the kernel kills it when the CLI dies (PR_SET_PDEATHSIG), so even `kill -9` leaves nothing;
- up to three tries of PREFECT_SERVER_EPHEMERAL_STARTUP_TIMEOUT_SECONDS (default 180 s) each, then one
  line naming its log file;
- stopped at exit (atexit), after Prefect's services sent their last logs and events (they drain at
  threading shutdown, which comes before the atexit hooks).
"""

from __future__ import annotations

import atexit
import importlib.util
import os
import signal
import socket
import subprocess
import sys
import time
import urllib.request
from pathlib import Path
from typing import Optional

from components.errors import LossforgeError

TRIES = 3
DEFAULT_TIMEOUT_S = 180
LOG_NAME = "embedded-server.log"

_server: Optional["EmbeddedServer"] = None


class EmbeddedServer:
    """One uvicorn process serving Prefect's API on 127.0.0.1:<port>, its output in `log`."""

    def __init__(self, log: Path):
        self.log = log
        self.port = _free_port()
        self.process: subprocess.Popen | None = None

    @property
    def api_url(self) -> str:
        return f"http://127.0.0.1:{self.port}/api"

    def start(self, timeout: float) -> None:
        """Start and wait until /api/health answers; RuntimeError (one line) when it does not in `timeout` s."""
        spec = importlib.util.find_spec("prefect")
        if spec is None or not spec.origin:  # pragma: no cover - prefect is a dependency
            raise RuntimeError("prefect is not installed")
        site = str(Path(spec.origin).parent.parent)
        # the environment Prefect gives its own ephemeral server (SubprocessASGIServer._run_uvicorn_command)
        env = {**os.environ, "PREFECT_UI_ENABLED": "0", "PREFECT__SERVER_EPHEMERAL": "1", "PREFECT__SERVER_FINAL": "1"}
        env.pop("PREFECT_API_URL", None)
        with open(self.log, "ab") as out:
            out.write(f"--- {time.strftime('%Y-%m-%d %H:%M:%S')} port {self.port}\n".encode())
            out.flush()
            self.process = subprocess.Popen(
                [sys.executable, "-m", "uvicorn", "--app-dir", site, "--factory", "prefect.server.api.server:create_app",
                 "--host", "127.0.0.1", "--port", str(self.port), "--log-level", "error", "--lifespan", "on"],
                env=env, stdin=subprocess.DEVNULL, stdout=out, stderr=subprocess.STDOUT,
                start_new_session=True, preexec_fn=_die_with_parent(),
            )
        opener = urllib.request.build_opener(urllib.request.ProxyHandler({}))  # never through an HTTP proxy
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            code = self.process.poll()
            if code is not None:
                raise RuntimeError(f"it exited with code {code}")
            try:
                with opener.open(f"{self.api_url}/health", timeout=2) as resp:
                    if resp.status == 200:
                        return
            except OSError:
                pass
            time.sleep(0.2)
        self.stop()
        raise RuntimeError(f"no answer within {timeout:g} s")

    def stop(self) -> None:
        """Terminate (then kill after 5 s) the server process."""
        proc, self.process = self.process, None
        if proc is None or proc.poll() is not None:
            return
        started, how = time.monotonic(), "terminated"
        proc.terminate()
        try:
            proc.wait(timeout=5)
        except subprocess.TimeoutExpired:
            proc.kill()
            proc.wait()
            how = "killed"
        with open(self.log, "a") as out:
            out.write(f"--- {time.strftime('%Y-%m-%d %H:%M:%S')} port {self.port}: {how} "
                      f"in {time.monotonic() - started:.1f} s\n")


def start_embedded_server() -> Optional[str]:
    """Start the temporary server when no PREFECT_API_URL is set; sets PREFECT_API_URL and returns it.

    Returns None when a server is configured. Raises a one-line LossforgeError when it does not start
    after TRIES tries."""
    global _server
    if os.environ.get("PREFECT_API_URL"):
        return None
    timeout = startup_timeout()
    home = Path(os.environ.get("PREFECT_HOME") or Path.home() / ".prefect").expanduser()
    home.mkdir(parents=True, exist_ok=True)
    log = home / LOG_NAME
    failures = []
    for _ in range(TRIES):
        server = EmbeddedServer(log)
        try:
            server.start(timeout)
        except RuntimeError as exc:
            failures.append(str(exc))
            continue
        except BaseException:  # Ctrl-C while it starts
            server.stop()
            raise
        _server = server
        atexit.register(server.stop)
        os.environ["PREFECT_API_URL"] = server.api_url
        _refresh_prefect_settings()
        return server.api_url
    raise LossforgeError(
        f"the temporary Prefect server did not start ({TRIES} tries: {'; '.join(failures)}; log: {log}); "
        "on a busy machine raise PREFECT_SERVER_EPHEMERAL_STARTUP_TIMEOUT_SECONDS, "
        "or set PREFECT_API_URL to a running `prefect server start`")


def embedded_server_pid() -> Optional[int]:
    return _server.process.pid if _server is not None and _server.process is not None else None


def _refresh_prefect_settings() -> None:
    """Prefect reads its settings from the environment when it is imported; if it already is, read them again."""
    context = sys.modules.get("prefect.context")
    refresh = getattr(context, "refresh_global_settings_context", None)
    if refresh is not None:
        refresh()


def startup_timeout() -> int:
    """PREFECT_SERVER_EPHEMERAL_STARTUP_TIMEOUT_SECONDS (whole seconds > 0, as Prefect's settings require; checked
    here first, since Prefect's own check is a traceback at import), default 180."""
    raw = os.environ.get("PREFECT_SERVER_EPHEMERAL_STARTUP_TIMEOUT_SECONDS", "").strip()
    if not raw:
        return DEFAULT_TIMEOUT_S
    try:
        value = int(raw)
    except ValueError:
        value = 0
    if value <= 0:
        raise LossforgeError(f"PREFECT_SERVER_EPHEMERAL_STARTUP_TIMEOUT_SECONDS: expected whole seconds > 0, got {raw!r}")
    return value


def _free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


def _die_with_parent():
    """A preexec_fn asking Linux to SIGKILL the child when the CLI dies (None elsewhere)."""
    if not sys.platform.startswith("linux"):
        return None
    try:
        import ctypes

        libc = ctypes.CDLL(None, use_errno=True)
        prctl = libc.prctl
    except (OSError, AttributeError):  # pragma: no cover
        return None
    parent = os.getpid()
    pr_set_pdeathsig = 1

    def preexec() -> None:
        prctl(pr_set_pdeathsig, int(signal.SIGKILL), 0, 0, 0)
        if os.getppid() != parent:  # the CLI died between fork and prctl
            os._exit(1)

    return preexec
