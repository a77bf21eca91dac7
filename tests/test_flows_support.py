"""Helpers shared by the orchestration tests (no tests here): a tiny project folder, the CLI in a
subprocess, and real Prefect / MLflow servers on localhost (random free ports, state in tmp, cleaned up)."""

from __future__ import annotations

import atexit
import copy
import os
import shutil
import signal
import socket
import subprocess
import sys
import tempfile
import time
import urllib.request
from pathlib import Path
from typing import Any

import yaml

ROOT = Path(__file__).resolve().parents[1]
PYTHON = sys.executable

# A search small enough for a test: 3 proxy evaluations of a few iterations on 32x32 images.
TINY = {
    "data": {"num_train": 20, "num_test": 6, "image_size": 32},
    "split": {"eval_fraction": 0.25},
    "search": {"budget": 3, "workers": 2, "losses_per_training": 1, "confirm_top": 0, "runner": "threads"},
    "evolution": {"initial_population": 2},
    "screening": {"samples": 2, "steps": 20, "size": 32},
    "proxy": {"model": {"input_size": 32}, "iterations": 3, "batch_size": 4, "eval_batch_size": 8, "seeds": [0]},
    "retrain": {"model": {"input_size": 32}, "iterations": 3, "batch_size": 4, "eval_batch_size": 8,
                "baselines": ["ce"], "seeds": [0], "top_k": 1},
}


def merge(base: dict, over: dict) -> dict:
    out = copy.deepcopy(base)
    for k, v in over.items():
        out[k] = merge(out[k], v) if isinstance(v, dict) and isinstance(out.get(k), dict) else copy.deepcopy(v)
    return out


def write_tiny_params(folder: Path, profile: str = "tiny", **sections: Any) -> Path:
    """params.yaml = the shipped file with profile `profile` = the demo profile + TINY + `sections`, selected."""
    raw = yaml.safe_load((ROOT / "params.yaml").read_text())
    raw["profiles"][profile] = merge(merge(raw["profiles"]["demo"], TINY), sections)
    raw["profile"] = profile
    path = folder / "params.yaml"
    path.write_text(yaml.safe_dump(raw, sort_keys=False))
    return path


def env(**extra: str) -> dict[str, str]:
    """Environment for subprocesses: quiet, no telemetry, the project on PYTHONPATH, 1 torch thread."""
    out = dict(os.environ)
    out.update({
        "PREFECT_SERVER_ANALYTICS_ENABLED": "false",
        "DO_NOT_TRACK": "1",
        "PREFECT_SERVER_EPHEMERAL_STARTUP_TIMEOUT_SECONDS": "180",
        "PYTHONPATH": os.pathsep.join(p for p in (str(ROOT), os.environ.get("PYTHONPATH", "")) if p),
        "OMP_NUM_THREADS": "1",
        "MKL_NUM_THREADS": "1",
        "MLFLOW_ENABLE_ASYNC_LOGGING": "false",
    })
    out.update(extra)
    return out


def cli(args: list[str], cwd: Path, timeout: float = 600, **extra_env: str) -> subprocess.CompletedProcess:
    """Run `python -m flows.cli ARGS` in `cwd`."""
    return subprocess.run([PYTHON, "-m", "flows.cli", *args], cwd=cwd, env=env(**extra_env), capture_output=True,
                          text=True, timeout=timeout)


def kill_search_midway(folder: Path, api_url: str, finished, at_least: int = 2, timeout: float = 300) -> int:
    """Start `lossforge search --no-retrain` in `folder`, SIGKILL it once `finished(folder)` has `at_least`
    entries (or it ended, or `timeout` passed); return its exit status (-SIGKILL when it was killed)."""
    proc = subprocess.Popen([PYTHON, "-m", "flows.cli", "search", "--no-retrain"], cwd=folder,
                            env=env(PREFECT_API_URL=api_url), stdout=subprocess.DEVNULL,
                            stderr=subprocess.DEVNULL, start_new_session=True)
    deadline = time.time() + timeout
    try:
        while time.time() < deadline and len(finished(folder)) < at_least and proc.poll() is None:
            time.sleep(0.05)
    finally:
        if proc.poll() is None:
            os.killpg(proc.pid, signal.SIGKILL)
        proc.wait(timeout=30)
    return proc.returncode


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def wait_http(url: str, timeout: float, proc: subprocess.Popen | None = None) -> None:
    deadline = time.time() + timeout
    while time.time() < deadline:
        if proc is not None and proc.poll() is not None:
            raise RuntimeError(f"server exited with {proc.returncode} before {url} answered")
        try:
            with urllib.request.urlopen(url, timeout=2) as resp:
                if resp.status == 200:
                    return
        except Exception:
            time.sleep(0.5)
    raise TimeoutError(f"{url} did not answer within {timeout} s")


def stop(proc: subprocess.Popen) -> None:
    """Stop a server started with start_new_session=True (its whole process group)."""
    if proc.poll() is None:
        try:
            os.killpg(proc.pid, signal.SIGTERM)
            proc.wait(timeout=20)
        except (ProcessLookupError, subprocess.TimeoutExpired):
            try:
                os.killpg(proc.pid, signal.SIGKILL)
            except ProcessLookupError:
                pass
            proc.wait(timeout=10)


class Server:
    """A process on localhost with its own temporary folder."""

    def __init__(self, proc: subprocess.Popen, url: str, folder: Path, log: Path):
        self.proc, self.url, self.folder, self.log = proc, url, folder, log

    def close(self) -> None:
        stop(self.proc)
        shutil.rmtree(self.folder, ignore_errors=True)


_prefect: Server | None = None


def prefect_server() -> Server:
    """One real `prefect server start` for the test session (sqlite in tmp, UI off), started on first use."""
    global _prefect
    if _prefect is not None and _prefect.proc.poll() is None:
        return _prefect
    folder = Path(tempfile.mkdtemp(prefix="lf-prefect-"))
    port = free_port()
    log = folder / "server.log"
    proc = subprocess.Popen(
        [PYTHON, "-m", "prefect", "server", "start", "--host", "127.0.0.1", "--port", str(port)],
        env=env(PREFECT_HOME=str(folder), PREFECT_UI_ENABLED="false",
                PREFECT_API_DATABASE_CONNECTION_URL=f"sqlite+aiosqlite:///{folder}/prefect.db",
                PREFECT_SERVER_API_HOST="127.0.0.1"),
        stdout=open(log, "w"), stderr=subprocess.STDOUT, start_new_session=True,
    )
    url = f"http://127.0.0.1:{port}/api"
    try:
        wait_http(f"{url}/health", 240, proc)
    except Exception:
        stop(proc)
        raise RuntimeError(f"prefect server did not start:\n{log.read_text()[-3000:]}")
    _prefect = Server(proc, url, folder, log)
    atexit.register(_prefect.close)
    return _prefect


def mlflow_server(folder: Path) -> Server:
    """A real `mlflow server` (sqlite backend + artifact store in `folder`)."""
    port = free_port()
    log = folder / "mlflow.log"
    proc = subprocess.Popen(
        [PYTHON, "-m", "mlflow", "server", "--host", "127.0.0.1", "--port", str(port), "--workers", "1",
         "--backend-store-uri", f"sqlite:///{folder}/mlflow.db", "--artifacts-destination", str(folder / "artifacts")],
        cwd=folder, env=env(), stdout=open(log, "w"), stderr=subprocess.STDOUT, start_new_session=True,
    )
    url = f"http://127.0.0.1:{port}"
    try:
        wait_http(f"{url}/health", 240, proc)
    except Exception:
        stop(proc)
        raise RuntimeError(f"mlflow server did not start:\n{log.read_text()[-3000:]}")
    return Server(proc, url, folder, log)
