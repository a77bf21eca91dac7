"""Stopping a search and one search per folder, with the real `lossforge` CLI in real processes.

- Ctrl-C (SIGINT to the process group, as a terminal sends it) during a proxy training: the CLI ends within
  seconds with one line, the training in flight is abandoned (not finished first), no process is left (the
  temporary Prefect server included), the lock is free again;
- a second search in the same folder meanwhile: one line naming the holder's pid, nothing started;
- SIGTERM to the CLI alone (`kill PID`, `docker stop`): the same, and a re-run resumes: what finished before
  is read back, not trained again, and the budget is spent exactly;
- an error raised inside a flow: the `error:` line, no Prefect traceback before it;
- the temporary Prefect server that does not start: retried, then one line.

The stopped CLI runs with its temporary Prefect server (no PREFECT_API_URL), as a user runs it; re-runs and
the error case use the test session's Prefect server (one start-up less).
"""

from __future__ import annotations

import json
import os
import signal
import subprocess
import textwrap
import time
from pathlib import Path

import psutil
import pytest

from test_flows_support import PYTHON, ROOT, env, prefect_server, write_tiny_params

pytestmark = pytest.mark.slow

LOSSFORGE = Path(PYTHON).with_name("lossforge")
STOP_WITHIN_S = 30  # measured 6-8 s on 2 loaded cores (Prefect records the crash, then exits)


def user_env(**extra: str) -> dict[str, str]:
    """A user's environment: no Prefect server or home set (the CLI starts its own in ./.prefect)."""
    out = env(**extra)
    for name in ("PREFECT_API_URL", "PREFECT_HOME"):
        if name not in extra:
            out.pop(name, None)
    return out


def search_cmd(*args: str) -> list[str]:
    return [str(LOSSFORGE) if LOSSFORGE.exists() else PYTHON, *([] if LOSSFORGE.exists() else ["-m", "flows.cli"]),
            "search", "--no-retrain", *args]


def start_cli(folder: Path, *args: str, **extra_env: str) -> subprocess.Popen:
    """`lossforge search --no-retrain ARGS` in `folder`, in its own process group (like a terminal job)."""
    return subprocess.Popen(search_cmd(*args), cwd=folder, env=user_env(**extra_env), text=True,
                            stdout=open(folder / "stdout.log", "w"), stderr=subprocess.PIPE, start_new_session=True)


def run_cli(folder: Path, timeout: float = 600, **extra_env: str) -> subprocess.CompletedProcess:
    return subprocess.run(search_cmd(), cwd=folder, env=user_env(**extra_env), text=True, capture_output=True,
                          timeout=timeout)


def state_of(folder: Path) -> Path:
    return next(folder.glob(".lossforge/runs/*/lock")).parent


def wait_for(condition, timeout: float, proc: subprocess.Popen | None = None, what: str = "") -> None:
    deadline = time.time() + timeout
    while time.time() < deadline:
        if condition():
            return
        if proc is not None and proc.poll() is not None:
            raise AssertionError(f"the CLI ended (rc {proc.returncode}) before {what}: {proc.stderr.read()[-3000:]}")
        time.sleep(0.05)
    raise AssertionError(f"timed out waiting for {what}")


def descendants(proc: subprocess.Popen) -> list[psutil.Process]:
    return psutil.Process(proc.pid).children(recursive=True)


def alive(processes: list[psutil.Process]) -> list[str]:
    out = []
    for p in processes:
        try:
            if p.is_running() and p.status() != psutil.STATUS_ZOMBIE:
                out.append(" ".join(p.cmdline())[:200])
        except psutil.NoSuchProcess:
            pass
    return out


def kill_all(proc: subprocess.Popen, others: list[psutil.Process]) -> None:
    for p in others:
        try:
            p.kill()
        except psutil.NoSuchProcess:
            pass
    if proc.poll() is None:
        os.killpg(proc.pid, signal.SIGKILL)
        proc.wait(10)


def group_is_empty(pgid: int) -> bool:
    try:
        os.killpg(pgid, 0)
    except ProcessLookupError:
        return True
    return False


def results(folder: Path) -> dict[str, dict]:
    return {p.name: json.loads(p.read_text()) for p in folder.glob(".lossforge/runs/*/results/*.json")}


def test_ctrl_c_stops_a_training_in_flight_and_a_second_search_names_the_holder(tmp_path):
    # one proxy training takes hours at this setting: only a cooperative stop ends it within seconds
    write_tiny_params(tmp_path, search={"budget": 2, "workers": 1}, proxy={"iterations": 100_000})
    first = start_cli(tmp_path, "--verbose")  # -v: Prefect's log says when the first training is submitted
    lines: list[str] = []
    children: list[psutil.Process] = []
    try:
        deadline = time.time() + 400
        while time.time() < deadline:  # "proxy baselines: 0 stored, 1 to train": the CE baseline is submitted
            line = first.stderr.readline()
            assert line or first.poll() is None, "".join(lines)[-3000:]
            lines.append(line)
            if "to train" in line:
                break
        else:
            raise AssertionError("the baseline training was not submitted in time:\n" + "".join(lines)[-3000:])
        state = state_of(tmp_path)
        holder = json.loads((state / "lock").read_text())
        assert holder["pid"] == first.pid

        # a second search of the same folder: one line naming the holder, nothing else started
        second = run_cli(tmp_path, timeout=300)  # before the lock it ran a second search of the same candidates
        assert second.returncode == 2, second.stderr
        err = second.stderr.strip().splitlines()
        assert len(err) == 1 and err[0].startswith("error: search "), second.stderr
        assert f"already running in process {first.pid}" in err[0], err[0]

        time.sleep(3)  # the baseline training is under way
        children = descendants(first)
        assert children, "the temporary Prefect server should be a child of the CLI"
        started = time.time()
        os.killpg(first.pid, signal.SIGINT)  # what a terminal's Ctrl-C does
        _, rest = first.communicate(timeout=120)
        took = time.time() - started
    finally:
        kill_all(first, children)
    lines.append(rest or "")
    stderr = "".join(lines)
    assert first.returncode == 128 + signal.SIGINT, stderr[-3000:]
    assert took < STOP_WITHIN_S, f"stopped after {took:.1f} s"
    last = stderr.strip().splitlines()[-1]
    assert last.startswith("stopped by SIGINT: what finished is kept (search state .lossforge/runs/"), stderr[-3000:]
    assert "Traceback" not in stderr
    assert alive(children) == [], "left running after the stop"
    assert group_is_empty(first.pid)
    assert not list(state.glob("baselines/**/*.json")), "the baseline training was finished, not stopped"
    assert not (state / "stop-requested").exists()
    assert (state / "lock").read_text() == ""  # released (and the OS lock with it: the holder is gone)


def test_sigterm_stops_the_cli_and_a_rerun_resumes(tmp_path):
    write_tiny_params(tmp_path, search={"budget": 3, "workers": 1}, proxy={"iterations": 30})
    proc = start_cli(tmp_path)
    children: list[psutil.Process] = []
    try:
        wait_for(lambda: len(results(tmp_path)) >= 1, 400, proc, "the first proxy result")
        children = descendants(proc)
        started = time.time()
        os.kill(proc.pid, signal.SIGTERM)  # the CLI alone, as `kill PID` or `docker stop` does
        _, stderr = proc.communicate(timeout=120)
        took = time.time() - started
    finally:
        kill_all(proc, children)
    assert proc.returncode == 128 + signal.SIGTERM, stderr[-3000:]
    assert took < STOP_WITHIN_S, f"stopped after {took:.1f} s"
    assert stderr.strip().splitlines()[-1].startswith("stopped by SIGTERM: "), stderr[-3000:]
    assert "Traceback" not in stderr and "Crash detected" not in stderr, stderr[-3000:]
    assert alive(children) == [], "left running after SIGTERM (the temporary Prefect server before the fix)"
    before = results(tmp_path)
    assert 1 <= len(before) < 3, "the search was not stopped midway"

    again = run_cli(tmp_path, PREFECT_API_URL=prefect_server().url)  # the session's server: saves a start-up
    assert again.returncode == 0, again.stderr[-3000:]
    after = results(tmp_path)
    for name, res in before.items():  # read back, not trained again (same file, same timestamps)
        assert after[name] == res
    history = json.loads(next(tmp_path.glob(".lossforge/runs/*/checkpoint.json")).read_text())["history"]
    trained = [r for r in history if r["status"] in ("evaluated", "nan-stopped", "failed")]
    assert len(trained) == 3 and len({r["id"] for r in history}) == len(history)
    assert sorted(after) == sorted(f"{r['id']}-{r['hash']}.json" for r in trained)


FAILING_METHOD = textwrap.dedent('''
    from components.errors import LossforgeError
    from components.search.method import SearchMethod, register_method


    @register_method
    class Unavailable(SearchMethod):
        """A user's method whose set-up fails inside the search flow."""
        name = "unavailable"
        loss_type = "graph"

        @classmethod
        def create(cls, params, problem, state_dir):
            raise LossforgeError("unavailable: the method's service is not reachable")
''')


def test_an_error_inside_a_flow_prints_one_line(tmp_path):
    (tmp_path / "unavailable_method.py").write_text(FAILING_METHOD)
    params = write_tiny_params(tmp_path, search={"method": "unavailable"})
    params.write_text("plugins: [unavailable_method]\n" + params.read_text())
    done = run_cli(tmp_path, PYTHONPATH=f"{tmp_path}:{ROOT}", PREFECT_API_URL=prefect_server().url)
    assert done.returncode == 2, done.stderr[-3000:]
    lines = done.stderr.strip().splitlines()
    assert lines[-1] == "error: unavailable: the method's service is not reachable", done.stderr[-3000:]
    assert "Traceback" not in done.stderr and "Encountered exception" not in done.stderr, done.stderr
    assert len(lines) <= 3, done.stderr  # Prefect printed 2 tracebacks (96 lines) here before


def test_a_prefect_server_that_does_not_start_is_one_line(tmp_path):
    write_tiny_params(tmp_path)
    proc = start_cli(tmp_path, PREFECT_SERVER_EPHEMERAL_STARTUP_TIMEOUT_SECONDS="1")
    _, stderr = proc.communicate(timeout=300)
    assert proc.returncode == 2, stderr
    lines = stderr.strip().splitlines()
    assert len(lines) == 1, stderr
    assert lines[0].startswith("error: the temporary Prefect server did not start (3 tries: no answer within 1 s"), stderr
    assert "log: " in lines[0] and "PREFECT_SERVER_EPHEMERAL_STARTUP_TIMEOUT_SECONDS" in lines[0]
    assert group_is_empty(proc.pid)
    servers = [p for p in psutil.process_iter(["cmdline", "cwd"])
               if "prefect.server.api.server:create_app" in " ".join(p.info["cmdline"] or [])
               and str(tmp_path) in (p.info["cwd"] or "")]
    assert servers == [], "a server of a failed try is still running"


def test_the_lock_names_its_holder_and_is_released_by_kill_9(tmp_path):
    from components.search_lock import SearchLocked, search_lock

    holder = subprocess.Popen(
        [PYTHON, "-c", "import sys, time\nfrom components.search_lock import search_lock\n"
                       "with search_lock(sys.argv[1]):\n    print('held', flush=True)\n    time.sleep(600)\n",
         str(tmp_path)], env=env(), stdout=subprocess.PIPE, text=True)
    try:
        assert holder.stdout.readline().strip() == "held"
        with pytest.raises(SearchLocked, match=rf"^search x is already running in process {holder.pid} "):
            with search_lock(tmp_path, "search x"):
                pass
    finally:
        holder.kill()  # SIGKILL: no clean-up code runs, the OS releases the lock
        holder.wait(10)
    with search_lock(tmp_path, "search x") as me:
        assert me["pid"] == os.getpid()
        assert json.loads((tmp_path / "lock").read_text())["pid"] == os.getpid()
