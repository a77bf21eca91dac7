"""Prefect tasks: thin wrappers that call components/ (all logic lives there).

Tasks that run in the task runner's workers (`proxy_training`) take and return plain JSON-able data, so
they work with thread and process runners alike (and Ray/Dask); they rebuild losses from JSON through
the operator whitelist. Every training writes its result atomically to `<state>/results/<id>-<hash>.json`
before returning, so a finished evaluation survives a SIGKILL of the flow and is never trained again.
"""

from __future__ import annotations

import functools
import time
from pathlib import Path
from typing import Any, Mapping

from prefect import task
from prefect.cache_policies import NO_CACHE

from components.atomic_io import read_json, write_json_atomic
from components.errors import LossforgeError

RESULT_FORMAT = "lossforge.proxy-result/1"


# ---------------------------------------------------------------------------------------------- data
@task(name="prepare-data", retries=1, retry_delay_seconds=1, cache_policy=NO_CACHE)
def prepare_data(data: Mapping[str, Any], task_name: str = "segmentation") -> str:
    """Generate the task's embedded dataset (if `data.generate`) or check the user's dataset exists."""
    from components.tasks.base import get_task

    path = Path(data["path"])
    if data["generate"]:
        get_task(task_name).ensure_embedded_data(path, **{k: data[k] for k in ("num_train", "num_test", "image_size", "seed")})
        return str(path)
    if not path.exists():
        raise LossforgeError(f"data.path: dataset not found: {path}")
    return str(path)


@task(name="split-dataset", retries=1, retry_delay_seconds=1, cache_policy=NO_CACHE)
def split_dataset(data_path: str, split: Mapping[str, Any], task_name: str = "segmentation") -> dict[str, str]:
    """Carve S_train / S_eval from the training images and write the manifests (+ the test manifest)."""
    from components.tasks.base import get_task
    from components.tasks.splits import write_search_splits

    task = get_task(task_name)
    train = task.open_dataset(data_path, split="train")
    test = task.open_dataset(data_path, split="val")
    paths = write_search_splits(list(train.ids), list(test.ids), split["dir"], eval_count=split.get("eval_count"),
                                eval_fraction=split.get("eval_fraction"), seed=split.get("seed", 0))
    return {name: str(path) for name, path in paths.items()}


def open_split(data_path: str, manifests: str | list[str] | tuple[str, ...], task_name: str = "segmentation") -> Any:
    """The dataset restricted to the ids of one manifest (or the union of several, in order)."""
    from components.tasks.base import get_task
    from components.tasks.splits import read_manifest

    if isinstance(manifests, str):
        manifests = [manifests]
    ids: list[str] = []
    for manifest in manifests:
        ids.extend(read_manifest(manifest))
    return get_task(task_name).open_dataset(data_path, ids=ids)


# ---------------------------------------------------------------------------------------------- training
@functools.lru_cache(maxsize=4)
def _datasets(data_path: str, train_manifest: str, eval_manifest: str, task_name: str):
    return open_split(data_path, train_manifest, task_name), open_split(data_path, eval_manifest, task_name)


def result_path(state_dir: str | Path, candidate_id: int, loss_hash: str) -> Path:
    """Where the proxy result of one candidate is stored."""
    return Path(state_dir) / "results" / f"{candidate_id}-{loss_hash}.json"


def read_result(state_dir: str | Path, candidate_id: int, loss_hash: str) -> dict[str, Any] | None:
    """A stored proxy result (from before a kill), or None."""
    path = result_path(state_dir, candidate_id, loss_hash)
    if not path.exists():
        return None
    try:
        data = read_json(path)
    except LossforgeError:
        return None
    return data if data.get("format") == RESULT_FORMAT else None


@task(name="proxy-training", cache_policy=NO_CACHE, task_run_name="proxy-training-{candidates[0][id]}")
def proxy_training(
    candidates: list[dict[str, Any]],
    data: Mapping[str, str],
    proxy_config: Any,
    metric: str,
    state_dir: str,
    torch_threads: int | None = None,
) -> list[dict[str, Any]]:
    """Train the candidates' losses side by side on the proxy task; one JSON-able result per candidate.

    `candidates`: [{"id", "hash", "loss" (a build_loss spec)}]; `data`: {"path", "train", "eval", "task"}
    (task: a registered task name, default segmentation). A loss that cannot be built is reported
    "failed" (never raises for a bad candidate); an exception of the training itself propagates, so the
    task's retries apply, and the flow records "failed" once they are used up. When a loss stopped on a
    non-finite value, the task run ends in a Completed state named "NaN-stopped" (same records as its result).
    """
    import torch

    from components.tasks.base import get_task

    task = get_task(data.get("task", "segmentation"))
    from flows.stopping import check_stop, stop_check

    check_stop()  # submitted just before a Ctrl-C: do not start
    if torch_threads:  # share the CPU cores between the parallel trainings. OpenMP keeps the count per thread
        # (measured), so this fixes this training thread's count, the same for every training of a search:
        # results do not depend on what the flow's thread or another training set meanwhile
        torch.set_num_threads(torch_threads)

    train_ds, eval_ds = _datasets(data["path"], data["train"], data["eval"], task.name)
    losses, results = {}, {}
    for cand in candidates:
        try:
            losses[str(cand["id"])] = task.build_loss(cand["loss"], train_ds)
        except LossforgeError as exc:
            results[str(cand["id"])] = {"status": "failed", "metrics": {}, "target": None, "iterations": 0,
                                        "seconds": 0.0, "message": f"invalid loss: {exc}"}
    started = time.time()
    if losses:
        # Ctrl-C / SIGTERM: SearchStopped at the next iteration, no result written (flows/stopping.py)
        out = task.train_proxy(losses, train_ds, eval_ds, proxy_config, metric, on_progress=stop_check())
        for name, res in out.items():
            results[name] = res.to_dict()  # JSON-able; components.tasks.base.ProxyResult.from_dict reads it back
    finished = time.time()
    stored = []
    for cand in candidates:
        record = dict(results[str(cand["id"])], id=cand["id"], hash=cand["hash"], format=RESULT_FORMAT,
                      started=started, finished=finished)
        write_json_atomic(result_path(state_dir, cand["id"], cand["hash"]), record)
        stored.append(record)
    return _finished_state(stored)


NAN_STOPPED_STATE = "NaN-stopped"


def _finished_state(stored: list[dict[str, Any]]) -> Any:
    """The records, as a Completed state named "NaN-stopped" when a training stopped on a non-finite loss.

    A NaN stop is a result, not a crash (no retry, the flow goes on), so the state type stays COMPLETED
    and `future.result()` still returns the records; only the name tells the Prefect UI what happened."""
    nan_ids = [r["id"] for r in stored if r.get("status") == "nan"]
    if not nan_ids:
        return stored
    from prefect.states import Completed

    return Completed(name=NAN_STOPPED_STATE, data=stored,
                     message=f"{len(nan_ids)} of {len(stored)} losses stopped on a non-finite loss: {nan_ids}")
