"""Resolving a run's parameters and paths, without importing Prefect (so the CLI can reject bad input
before anything is started or written)."""

from __future__ import annotations

import os
from pathlib import Path
from typing import TYPE_CHECKING, Any

from components.errors import LossforgeError
from components.params import Params, load_params

if TYPE_CHECKING:
    from flows.tracking import SearchTracker


def resolve_params(
    params_file: str | Path = "params.yaml",
    profile: str | None = None,
    metric: str | None = None,
    method: str | None = None,
    budget: int | None = None,
    workers: int | None = None,
    runner: str | None = None,
    dataset: str | None = None,
    tracking_uri: str | None = None,
    task: str | None = None,
) -> Params:
    """Load params.yaml with its profile, then apply the explicit overrides (validated again).

    `LOSSFORGE_TRACKING_URI` in the environment (e.g. set by docker-compose) overrides `tracking.uri`.
    """
    params = load_params(params_file, profile=profile)
    tracking_uri = tracking_uri or os.environ.get("LOSSFORGE_TRACKING_URI") or None
    overrides: dict[str, Any] = {
        "search.task": task,
        "search.metric": metric,
        "search.method": method,
        "search.budget": budget,
        "search.workers": workers,
        "search.runner": runner,
        "tracking.uri": tracking_uri,
    }
    if dataset is not None:
        overrides["data.path"] = dataset
        overrides["data.generate"] = False
    return params.with_overrides(overrides)


def state_dir(params: Params) -> Path:
    """Folder of the resumable state of this search (checkpoint, finished proxy results, loss files)."""
    return Path(params.search.state_dir) / params.search_id


def losses_dir(params: Params) -> Path:
    """losses/<task>-<metric>/ (a DVC out)."""
    return Path(params.search.out_dir) / params.search_name


def reports_dir(params: Params) -> Path:
    """reports/<task>-<metric>/ (DVC outs)."""
    return Path(params.report.dir) / params.search_name


def data_spec(params: Params) -> dict[str, str]:
    """The dataset path and split manifests written by the prepare/split stages (checked to exist)."""
    folder = Path(params.split.dir)
    spec = {"path": params.data.path, "task": params.search.task}
    for name in ("train", "eval", "test"):
        path = folder / f"{name}.txt"
        if not path.exists():
            raise LossforgeError(f"{path}: split manifest not found (run `lossforge search` or `dvc repro split` first)")
        spec[name] = str(path)
    if not Path(params.data.path).exists():
        raise LossforgeError(f"data.path: dataset not found: {params.data.path}")
    return spec


def proxy_seeds(params: Params) -> list[int]:
    """`proxy.seeds`: the seeds the proxy baselines are trained with (default: just `proxy.seed`)."""
    seeds = params.section_extra("proxy", "seeds")
    if seeds is None:
        return [int(params.config("proxy").seed)]
    if (not isinstance(seeds, list) or not seeds
            or not all(isinstance(s, int) and not isinstance(s, bool) for s in seeds)):
        raise LossforgeError(f"{params.source}: proxy.seeds: expected a non-empty list of integers (got {seeds!r})")
    if len(set(seeds)) != len(seeds):
        raise LossforgeError(f"{params.source}: proxy.seeds: seeds must be distinct (got {seeds!r})")
    return [int(s) for s in seeds]


def baseline_specs(params: Params) -> list[Any]:
    """The task's reference loss (segmentation: CE) plus `retrain.baselines` (build_loss specs, reference first,
    no duplicates); unknown loss types are errors."""
    from components.tasks.base import get_task

    task = get_task(params.search.task)
    loss_name, known = task.loss_name, task.known_baselines()
    raw = params.section_extra("retrain", "baselines", [task.reference_baseline])
    if not isinstance(raw, list):
        raise LossforgeError(f"{params.source}: retrain.baselines: expected a list of loss names (got {raw!r})")
    specs: list[Any] = [task.reference_baseline]
    for spec in raw:
        kind = spec if isinstance(spec, str) else spec.get("type") if isinstance(spec, dict) else None
        if not isinstance(kind, str) or kind not in known:
            raise LossforgeError(f"{params.source}: retrain.baselines: unknown loss {spec!r} "
                                 f"(known: {', '.join(known)})")
        if loss_name(spec) not in {loss_name(s) for s in specs}:
            specs.append(spec)
    return specs


def check_user_dataset(params: Params) -> None:
    """Open the user's dataset (train and val splits) as the split stage will, so malformed data (a box outside
    its image, an unknown category, a missing image file, ...) is a one-line error before anything is written."""
    from components.tasks.base import get_task

    task = get_task(params.search.task)
    for split in ("train", "val"):
        task.open_dataset(params.data.path, split=split)


def check_inputs(params: Params, stages: tuple[str, ...]) -> None:
    """Fail with a one-line error if the inputs of the first requested stage are missing."""
    if "prepare" in stages:
        if not params.data.generate and not Path(params.data.path).exists():
            raise LossforgeError(f"data.path: dataset not found: {params.data.path}")
    elif "split" in stages:
        if not Path(params.data.path).exists():
            raise LossforgeError(f"data.path: dataset not found: {params.data.path} (run the prepare stage first)")
    elif any(s in stages for s in ("search", "retrain")):
        data_spec(params)
    if not params.data.generate and any(s in stages for s in ("prepare", "split")):
        check_user_dataset(params)
    if any(s in stages for s in ("search", "retrain")):
        baseline_specs(params)
    if "search" in stages:
        proxy_seeds(params)
    if "search" not in stages and any(s in stages for s in ("retrain", "report")):
        summary = losses_dir(params) / "search.json"
        if not summary.exists():
            raise LossforgeError(f"{summary}: no search result yet (run `lossforge search` first)")


def make_tracker(params: Params) -> SearchTracker | None:
    """The MLflow tracker of this search (None when tracking is disabled)."""
    if not params.tracking.enabled:
        return None
    from flows.tracking import SearchTracker, resolve_tracking_uri  # mlflow is imported only when tracking
    flat = {"search_id": params.search_id, "profile": params.profile}
    for section in ("data", "split", "search"):
        for key, value in getattr(params, section).model_dump().items():
            flat[f"{section}.{key}"] = value
    for section in ("evolution", "screening", "proxy", "ppo"):
        for key, value in getattr(params, section).items():
            flat[f"{section}.{key}"] = value
    return SearchTracker(
        resolve_tracking_uri(params.tracking.uri),
        experiment=f"lossforge/{params.search_id}",
        search_id=params.search_id,
        artifact_root=params.tracking.artifacts,
        params=flat,
    )
