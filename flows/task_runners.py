"""Choose the Prefect task runner that runs proxy trainings in parallel, from configuration.

`threads` (default) and `processes` ship with Prefect; `ray` and `dask` use the prefect-ray / prefect-dask
integrations when they are installed (for GPUs and clusters), so switching engines is a params.yaml
change (`search.runner`), never a change to the flows.
"""

from __future__ import annotations

import importlib

from prefect.task_runners import ProcessPoolTaskRunner, TaskRunner, ThreadPoolTaskRunner

from components.errors import LossforgeError

RUNNERS = ("threads", "processes", "ray", "dask")


def make_task_runner(name: str, workers: int) -> TaskRunner:
    """A task runner with `workers` parallel slots: threads | processes | ray | dask."""
    if workers < 1:
        raise LossforgeError(f"search.workers: must be > 0 (got {workers})")
    if name == "threads":
        return ThreadPoolTaskRunner(max_workers=workers)
    if name == "processes":
        return ProcessPoolTaskRunner(max_workers=workers)
    if name in ("ray", "dask"):
        module, cls = {"ray": ("prefect_ray", "RayTaskRunner"), "dask": ("prefect_dask", "DaskTaskRunner")}[name]
        try:
            runner_cls = getattr(importlib.import_module(module), cls)
        except ImportError:
            raise LossforgeError(
                f"search.runner: {name!r} needs the {module.replace('_', '-')} package (not installed); "
                "use 'threads' or 'processes'"
            ) from None
        return runner_cls()
    raise LossforgeError(f"search.runner: unknown runner {name!r} (known: {', '.join(RUNNERS)})")
