"""Choose the Prefect task runner that runs proxy trainings in parallel, from configuration.

`threads` (default) and `processes` ship with Prefect; `ray` and `dask` use prefect-ray / prefect-dask (the
`cluster` extra, installed by `uv sync`), so switching engines is a params.yaml change (`search.runner`,
`search.address`, `search.resources`), never a change to the flows.

Decisions:
- `search.address` empty: a local cluster sized by `search.workers` (dask: that many single-threaded
  worker processes; ray: a fresh local instance with `workers` x `resources.cpus` CPUs), torn down after the
  search. Set: join that cluster (dask scheduler, ray head) and leave it running.
- `search.resources` is requested by every task the runner submits; only proxy trainings (one task per wave
  of `search.losses_per_training` losses) are submitted, the rest of the search runs in the flow's thread.
- Workers report to the same Prefect API as the flow (`share_api_with_workers`): the URL travels in the
  settings Prefect serialises with each task run, so a worker started anywhere (no PREFECT_API_URL of its
  own) does not start a temporary server of its own, and the task runs show up in the flow's run.
- Workers resolve the search's relative paths (data/, data/splits, .lossforge/runs) from their working
  folder: start cluster workers in the project folder (other machines: a shared file system, same path).
"""

from __future__ import annotations

import functools
import importlib
import os
import socket
from contextlib import contextmanager
from typing import TYPE_CHECKING, Any, Iterator
from urllib.parse import urlsplit

from prefect.task_runners import ProcessPoolTaskRunner, TaskRunner, ThreadPoolTaskRunner

from components.errors import LossforgeError

if TYPE_CHECKING:
    from components.params import SearchParams

RUNNERS = ("threads", "processes", "ray", "dask")
CLUSTER_RUNNERS = ("ray", "dask")


def make_task_runner(name: str, workers: int, address: str = "",
                     resources: dict[str, float | None] | None = None) -> TaskRunner:
    """A task runner with `workers` parallel slots: threads | processes | ray | dask.

    ray / dask: join the cluster at `address`, or start a local one of `workers` slots; each submitted task
    requests `resources` ({"cpus": ..., "gpus": ...}, None = the runner's default)."""
    if workers < 1:
        raise LossforgeError(f"search.workers: must be > 0 (got {workers})")
    if name not in RUNNERS:
        raise LossforgeError(f"search.runner: unknown runner {name!r} (known: {', '.join(RUNNERS)})")
    if address and name not in CLUSTER_RUNNERS:
        raise LossforgeError(f"search.address: only the ray and dask runners join a cluster (runner {name!r})")
    if name == "threads":
        return ThreadPoolTaskRunner(max_workers=workers)
    if name == "processes":
        return ProcessPoolTaskRunner(max_workers=workers)
    wanted = {k: float(v) for k, v in (resources or {}).items() if v is not None}
    for key, value in wanted.items():
        if key not in ("cpus", "gpus"):
            raise LossforgeError(f"search.resources.{key}: unknown field (known: cpus, gpus)")
        if value < 0 or (key == "cpus" and value == 0):
            raise LossforgeError(f"search.resources.{key}: must be {'> 0' if key == 'cpus' else '>= 0'} "
                                 f"(got {value:g})")
    _import_integration(name)
    if name == "ray":
        return _ray_runner(workers, address, wanted)
    return _dask_runner(workers, address, wanted)


ADDRESS_ENV = {"dask": "LOSSFORGE_DASK_ADDRESS", "ray": "LOSSFORGE_RAY_ADDRESS"}


def cluster_address(search: SearchParams) -> str:
    """`search.address`, else LOSSFORGE_DASK_ADDRESS / LOSSFORGE_RAY_ADDRESS from the environment (set by the
    docker compose stack, so a search started there joins its cluster), else "" (a local cluster)."""
    if search.address or search.runner not in ADDRESS_ENV:
        return search.address
    return os.environ.get(ADDRESS_ENV[search.runner], "").strip()


def runner_for(search: SearchParams) -> TaskRunner:
    """The task runner that `search` (params.yaml's `search:` section) asks for; a cluster address that does
    not answer, or a dask cluster none of whose workers offers `search.resources`, is a one-line error here,
    before the search starts."""
    address = cluster_address(search)
    runner = make_task_runner(search.runner, search.workers, address, search.resources.model_dump())
    if address:
        check_reachable(search.runner, address, "search.address" if search.address else ADDRESS_ENV[search.runner])
        if search.runner == "dask" and getattr(runner, "requested", None):
            check_dask_workers_offer(address, runner.requested)
    return runner


def check_reachable(runner: str, address: str, field: str = "search.address", timeout: float = 5.0) -> None:
    """Open (and close) a TCP connection to the cluster's scheduler / head; `auto` (ray: the cluster that
    `ray start` runs on this machine) is left to ray."""
    if runner == "ray" and address in ("auto", "local"):
        return
    default_port = {"ray": 10001 if address.startswith("ray://") else 6379, "dask": 8786}[runner]
    parsed = urlsplit(address if "://" in address else f"tcp://{address}")
    try:
        host, port = parsed.hostname, parsed.port or default_port
    except ValueError:
        raise LossforgeError(f"{field}: bad port in {address!r}") from None
    if parsed.scheme not in ("tcp", "tls", "ray") or not host:
        return  # another transport (inproc://, ucx://): the runner reports its own errors
    try:
        socket.create_connection((host, port), timeout=timeout).close()
    except OSError as exc:
        what = "dask scheduler" if runner == "dask" else "ray cluster"
        raise LossforgeError(f"{field}: no {what} answers at {address} ({exc.strerror or exc})") from None


def _import_integration(name: str) -> None:
    module = {"ray": "prefect_ray", "dask": "prefect_dask"}[name]
    try:
        importlib.import_module(module)
    except ImportError:
        raise LossforgeError(
            f"search.runner: {name!r} needs the {module.replace('_', '-')} package (not installed: "
            "`uv sync` or `pip install lossforge[cluster]`); use 'threads' or 'processes'"
        ) from None


# ------------------------------------------------------------------------------------------ ray / dask
# The runner classes subclass the optional integrations, so they are built on first use (module __getattr__)
# rather than at import: importing ray and distributed costs seconds the threads runner should not pay. They
# still live at flows.task_runners.<name>, so the flow that carries its runner to the workers pickles them by
# reference.
@functools.cache
def _ray_class() -> type:
    from prefect_ray import RayTaskRunner
    from prefect_ray.context import remote_options

    class ResourceRayTaskRunner(RayTaskRunner):
        """RayTaskRunner whose tasks request `remote` (num_cpus / num_gpus); a remote_options block around a
        submit still overrides them."""

        def __init__(self, address: str | None = None, init_kwargs: dict[str, Any] | None = None,
                     remote: dict[str, float] | None = None):
            super().__init__(address=address, init_kwargs=init_kwargs)
            self.remote = dict(remote or {})

        def duplicate(self) -> "ResourceRayTaskRunner":
            return type(self)(address=self.address, init_kwargs=self.init_kwargs, remote=self.remote)

        def submit(self, task, parameters, wait_for=None, dependencies=None):  # type: ignore[override]
            with remote_options(**{**self.remote, **remote_options_now()}):
                return super().submit(task, parameters, wait_for=wait_for, dependencies=dependencies)

    def remote_options_now() -> dict[str, Any]:
        from prefect_ray.context import RemoteOptionsContext

        return RemoteOptionsContext.get().current_remote_options

    ResourceRayTaskRunner.__module__, ResourceRayTaskRunner.__qualname__ = __name__, "ResourceRayTaskRunner"
    return ResourceRayTaskRunner


@functools.cache
def _dask_class() -> type:
    from prefect_dask import DaskTaskRunner
    from prefect_dask.task_runners import PrefectDaskFuture

    class ResourceDaskTaskRunner(DaskTaskRunner):
        """DaskTaskRunner whose tasks request the worker resources `requested` (DaskTaskRunner.submit passes
        none; PrefectDaskClient.submit takes them)."""

        def __init__(self, *args: Any, requested: dict[str, float] | None = None, **kwargs: Any):
            super().__init__(*args, **kwargs)
            self.requested = dict(requested or {})

        def duplicate(self) -> "ResourceDaskTaskRunner":
            dup = super().duplicate()
            dup.requested = dict(self.requested)
            return dup

        def submit(self, task, parameters, wait_for=None, dependencies=None):  # type: ignore[override]
            if not self._started:
                raise RuntimeError("The task runner must be started before submitting work.")
            future = self.client.submit(
                task, parameters=self._optimize_futures(parameters),
                wait_for=self._optimize_futures(wait_for) if wait_for else None,
                dependencies=dependencies, return_type="state", resources=self.requested or None,
            )
            return PrefectDaskFuture(wrapped_future=future, task_run_id=future.task_run_id)

    ResourceDaskTaskRunner.__module__, ResourceDaskTaskRunner.__qualname__ = __name__, "ResourceDaskTaskRunner"
    return ResourceDaskTaskRunner


def check_dask_workers_offer(address: str, requested: dict[str, float]) -> None:
    """A task whose resources no worker offers waits forever: fail instead when the cluster has workers and
    none offers them (a cluster without workers yet may be scaling up)."""
    from distributed import Client

    with Client(address, timeout=10, set_as_default=False) as client:
        workers = client.scheduler_info().get("workers", {})
    if workers and not any(all(w.get("resources", {}).get(k, 0) >= v for k, v in requested.items())
                           for w in workers.values()):
        want = ",".join(f"{k}={v:g}" for k, v in requested.items())
        raise LossforgeError(f"search.resources: no worker of the dask cluster at {address} offers {want} "
                             f"(start workers with `dask worker {address} --resources \"{want}\"`)")


def __getattr__(name: str) -> type:
    if name == "ResourceRayTaskRunner":
        return _ray_class()
    if name == "ResourceDaskTaskRunner":
        return _dask_class()
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")


def _ray_runner(workers: int, address: str, wanted: dict[str, float]) -> TaskRunner:
    remote = {f"num_{k}": v for k, v in wanted.items()}
    if address:
        return _ray_class()(address=address, remote=remote)
    # a fresh local instance (address "local": never one that `ray start` left running here), `workers` tasks
    # at a time; GPUs: ray detects them and hands each task its share (CUDA_VISIBLE_DEVICES)
    init = {"num_cpus": max(1, round(workers * wanted.get("cpus", 1.0))), "include_dashboard": False}
    return _ray_class()(address="local", init_kwargs=init, remote=remote)


DASK_RESOURCE_NAMES = {"cpus": "CPU", "gpus": "GPU"}


def _dask_runner(workers: int, address: str, wanted: dict[str, float]) -> TaskRunner:
    requested = {DASK_RESOURCE_NAMES[k]: v for k, v in wanted.items() if v > 0}
    if address:
        return _dask_class()(address=address, requested=requested)
    # `workers` single-threaded worker processes, each offering what one training requests (so one training
    # per worker); no memory limit: the trainings' memory is the model's, not dask data dask could spill
    cluster: dict[str, Any] = {"n_workers": workers, "threads_per_worker": 1, "processes": True,
                               "memory_limit": 0, "dashboard_address": ":0"}
    if requested:
        cluster["resources"] = dict(requested)
    return _dask_class()(cluster_kwargs=cluster, requested=requested)


# ------------------------------------------------------------------------------------------ Prefect API
@contextmanager
def share_api_with_workers(runner: str) -> Iterator[str | None]:
    """Inside the block, task runs submitted to worker processes report to this process's Prefect API (the
    embedded temporary server when PREFECT_API_URL is not set); yields its URL (None for threads).

    Two channels: PREFECT_API_URL in the environment, inherited by the processes the runner starts (process
    pool, local dask cluster, local ray instance), and the settings Prefect serialises with every task run,
    which reach workers that were started elsewhere (`search.address`). Without this, each worker started a
    temporary API server of its own on the same database and the trainings timed out connecting to it."""
    if runner == "threads":
        yield None
        return
    from prefect.client.orchestration import get_client
    from prefect.settings import PREFECT_API_URL, temporary_settings

    before = os.environ.get("PREFECT_API_URL")
    url = before
    if not url:
        with get_client(sync_client=True) as client:
            url = str(client.api_url).rstrip("/")
    os.environ["PREFECT_API_URL"] = url
    try:
        with temporary_settings(updates={PREFECT_API_URL: url}):
            yield url
    finally:
        if before is None:
            os.environ.pop("PREFECT_API_URL", None)
        else:
            os.environ["PREFECT_API_URL"] = before
