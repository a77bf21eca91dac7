"""The dask and ray runners for real: a tiny search through `lossforge search` against a dask cluster whose
scheduler and workers are separate processes (joined with search.address) and against a local ray instance,
both with the default embedded Prefect API, give the threads runner's candidates and scores; cluster
settings that cannot work fail in one line before anything is written."""

from __future__ import annotations

import json
import sqlite3
import subprocess
from pathlib import Path

import pytest

from test_flows_support import PYTHON, cli, env, free_port, prefect_server, stop, write_tiny_params

pytestmark = pytest.mark.slow

NO_TRACKING = {"enabled": False}  # MLflow is not what these tests are about (and its tables cost ~10 s)


def _search(folder: Path, mkdir: bool = True, **search) -> subprocess.CompletedProcess:
    folder.mkdir(exist_ok=not mkdir)
    write_tiny_params(folder, search=search, tracking=NO_TRACKING)
    return cli(["search", "--no-retrain"], folder, timeout=600, PREFECT_HOME=str(folder / ".prefect"))


def _outcome(folder: Path) -> dict:
    """What a search computed: every candidate's hash, status and score, the best, the proxy baselines."""
    summary = json.loads((folder / "losses" / "segmentation-mIoU" / "search.json").read_text())
    return {
        "candidates": [(c["id"], c["hash"], c["status"], c["target"]) for c in summary["candidates"]],
        "best": (summary["best"]["hash"], summary["best"]["target"]),
        "baselines": {name: [(run["seed"], run["status"], run["target"], run["metrics"]) for run in loss["runs"]]
                      for name, loss in summary["baselines"]["losses"].items()},  # all but the seconds
    }


def _proxy_task_runs(folder: Path) -> list[tuple[str, str]]:
    """(name, state) of the proxy-training task runs in the search's embedded Prefect database."""
    with sqlite3.connect(folder / ".prefect" / "prefect.db") as db:
        return db.execute("SELECT name, state_type FROM task_run WHERE name LIKE 'proxy-training-%'").fetchall()


def _trainings(folder: Path) -> int:
    """Proxy trainings the search ran: one per evaluated candidate and per proxy baseline (waves of one)."""
    summary = json.loads((folder / "losses" / "segmentation-mIoU" / "search.json").read_text())
    evaluated = sum(c["status"] in ("evaluated", "nan-stopped") for c in summary["candidates"])
    return evaluated + len(summary["baselines"]["losses"])


@pytest.fixture(scope="module")
def threads_outcome(tmp_path_factory) -> dict:
    """The reference: the same search with the threads runner (on the session's Prefect server: the API is
    not what this run checks)."""
    folder = tmp_path_factory.mktemp("threads") / "project"
    folder.mkdir()
    write_tiny_params(folder, search={"runner": "threads"}, tracking=NO_TRACKING)
    done = cli(["search", "--no-retrain"], folder, timeout=600, PREFECT_API_URL=prefect_server().url)
    assert done.returncode == 0, done.stderr[-3000:]
    return _outcome(folder)


@pytest.fixture(scope="module")
def dask_cluster(tmp_path_factory):
    """`dask scheduler` + `dask worker` (2 single-threaded worker processes offering CPU=1 each), started
    without PREFECT_API_URL, in the folder the searches run in (they resolve relative paths from there)."""
    base = tmp_path_factory.mktemp("dask")
    project = base / "project"  # the searches run here, and so do the workers
    project.mkdir()
    address = f"tcp://127.0.0.1:{free_port()}"
    bare = env(PREFECT_HOME=str(base / "worker-prefect-home"))  # had a worker started an API, it would be here
    bare.pop("PREFECT_API_URL", None)
    dask = str(Path(PYTHON).with_name("dask"))
    procs = [subprocess.Popen([dask, "scheduler", "--host", "127.0.0.1", "--port", address.rsplit(":", 1)[1],
                               "--no-dashboard"], cwd=base, env=bare, stdout=open(base / "scheduler.log", "w"),
                              stderr=subprocess.STDOUT, start_new_session=True)]
    try:
        from distributed import Client

        procs.append(subprocess.Popen([dask, "worker", address, "--nworkers", "2", "--nthreads", "1",
                                       "--resources", "CPU=1", "--no-dashboard", "--memory-limit", "0"],
                                      cwd=project, env=bare, stdout=open(base / "workers.log", "w"),
                                      stderr=subprocess.STDOUT, start_new_session=True))
        with Client(address, timeout=120, set_as_default=False) as client:
            client.wait_for_workers(2, timeout=180)
        yield address, base
    finally:
        for proc in reversed(procs):
            stop(proc)


def test_dask_cluster_in_separate_processes_gives_the_threads_results(dask_cluster, threads_outcome):
    address, base = dask_cluster
    folder = base / "project"  # the workers' working folder
    done = _search(folder, mkdir=False, runner="dask", address=address, workers=2, resources={"cpus": 1})
    assert done.returncode == 0, done.stderr[-3000:]
    assert _outcome(folder) == threads_outcome
    # the trainings reported to the search's own (embedded) Prefect API: no worker started one of its own
    assert "temporary server" not in (base / "workers.log").read_text()
    runs = _proxy_task_runs(folder)
    assert len(runs) == _trainings(folder) and {state for _, state in runs} == {"COMPLETED"}


def test_local_ray_instance_gives_the_threads_results(tmp_path, threads_outcome):
    folder = tmp_path / "project"
    done = _search(folder, runner="ray", workers=2, resources={"cpus": 1})
    assert done.returncode == 0, done.stderr[-3000:]
    assert _outcome(folder) == threads_outcome
    runs = _proxy_task_runs(folder)  # the ray workers reported to the search's embedded Prefect API
    assert len(runs) == _trainings(folder) and {state for _, state in runs} == {"COMPLETED"}


def test_local_dask_cluster_is_sized_by_workers_and_offers_the_resources():
    from flows.task_runners import make_task_runner

    with make_task_runner("dask", 3, resources={"cpus": 2, "gpus": 0.5}) as runner:
        workers = runner.client.scheduler_info()["workers"].values()
        assert len(workers) == 3
        assert all(w["nthreads"] == 1 and w["resources"] == {"CPU": 2, "GPU": 0.5} for w in workers)
        assert runner.requested == {"CPU": 2, "GPU": 0.5}  # what each submitted training asks for


def test_resources_no_dask_worker_offers_fail_in_one_line(dask_cluster, tmp_path):
    address, _ = dask_cluster
    done = _search(tmp_path / "project", runner="dask", address=address, resources={"gpus": 1})
    assert done.returncode != 0
    assert done.stderr.strip().splitlines()[-1] == (
        f'error: search.resources: no worker of the dask cluster at {address} offers GPU=1 '
        f'(start workers with `dask worker {address} --resources "GPU=1"`)')
    assert not (tmp_path / "project" / "data").exists()


@pytest.mark.parametrize("runner", ["dask", "ray"])
def test_cluster_address_that_does_not_answer_fails_in_one_line(tmp_path, runner):
    address = f"127.0.0.1:{free_port()}"
    done = _search(tmp_path / "project", runner=runner, address=address)
    assert done.returncode != 0
    last = done.stderr.strip().splitlines()[-1]
    assert last.startswith(f"error: search.address: no {runner} ") and address in last, done.stderr[-2000:]
    assert not (tmp_path / "project" / "data").exists()


@pytest.mark.parametrize("search, message", [
    ({"runner": "threads", "address": "tcp://127.0.0.1:8786"}, "search.address: only the ray and dask runners"),
    ({"runner": "dask", "address": "tcp://a b"}, "search.address: expected one cluster address"),
    ({"runner": "ray", "resources": {"gpus": -0.5}}, "search.resources.gpus: must be >= 0"),
    ({"runner": "ray", "resources": {"cpus": 0}}, "search.resources.cpus: must be > 0"),
    ({"runner": "dask", "resources": {"gpu": 1}}, "search.resources.gpu: unknown field"),
])
def test_bad_cluster_settings_are_one_line_params_errors(tmp_path, search, message):
    from components.errors import LossforgeError
    from components.params import load_params

    with pytest.raises(LossforgeError) as err:
        load_params(write_tiny_params(tmp_path, search=search))
    assert message in str(err.value) and "\n" not in str(err.value)
