"""Resolving a run's parameters and paths, without importing Prefect (so the CLI can reject bad input
before anything is started or written)."""

from __future__ import annotations

import importlib.util
import os
import re
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


# the pipeline's stages in order (here, not in search_flow, so the CLI can name them before Prefect is imported)
STAGES = ("prepare", "split", "search", "retrain", "report")


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
    """Validate the user's dataset (train and val splits) as the split stage will open it, every file included
    (`Task.validate_data`: images decode, masks fit their image and the classes, boxes lie inside their image,
    categories are known), so malformed data is a one-line error naming the file before anything is written."""
    from components.tasks.base import get_task

    task = get_task(params.search.task)
    for split in ("train", "val"):
        task.validate_data(params.data.path, split=split)


MAX_TREE_DEPTH = 10  # evolution.depth: random trees of depth D have up to 2^D - 1 nodes; 1000 hit a RecursionError
TRACKING_SCHEMES = ("", "file", "sqlite", "http", "https", "databricks", "postgresql", "mysql", "mssql")
RUNNER_PACKAGES = {"ray": ("prefect_ray", "prefect-ray"), "dask": ("prefect_dask", "prefect-dask")}


def _installed(module: str) -> bool:
    try:
        return importlib.util.find_spec(module) is not None
    except (ImportError, ValueError):  # a parent package is missing / the module was blocked (sys.modules[...] = None)
        return False


def _check_device(value: Any, field: str) -> None:
    """`auto`, `cpu`, `cuda` or `cuda:N` on a machine that has it (what the trainers' resolve_device accepts)."""
    if value in ("auto", "cpu"):
        return
    match = re.fullmatch(r"cuda(?::(\d+))?", value) if isinstance(value, str) else None
    if match is None:
        raise LossforgeError(f"{field}: expected auto, cpu, cuda or cuda:N (got {value!r})")
    import torch

    if not torch.cuda.is_available():
        raise LossforgeError(f"{field}: {value!r} requested but CUDA is not available on this machine "
                             "(use auto or cpu)")
    if match.group(1) is not None and int(match.group(1)) >= torch.cuda.device_count():
        raise LossforgeError(f"{field}: {value!r}: this machine has {torch.cuda.device_count()} CUDA device(s)")


def _check_encoder(model: Any, field: str) -> None:
    """A DeepLabV3+ encoder name segmentation-models-pytorch (or timm, as `tu-<name>`) can build."""
    from components.tasks.segmentation.models import ModelConfig

    if not isinstance(model, ModelConfig) or model.name != "deeplabv3plus":
        return
    if model.encoder.startswith("tu-"):
        import timm

        if not timm.is_model(model.encoder[3:]):
            raise LossforgeError(f"{field}.encoder: {model.encoder!r}: timm has no model {model.encoder[3:]!r}")
        return
    from segmentation_models_pytorch.encoders import get_encoder_names

    if model.encoder not in get_encoder_names():
        raise LossforgeError(f"{field}.encoder: unknown encoder {model.encoder!r} (e.g. resnet18, resnet50, resnet101, "
                             "or tu-<timm model>)")


def _check_tracking_uri(uri: str, source: str) -> None:
    from importlib.metadata import entry_points
    from urllib.parse import urlparse

    scheme = urlparse(uri).scheme.split("+")[0]
    plugins = {ep.name for ep in entry_points(group="mlflow.tracking_store")}
    if len(scheme) == 1:  # a Windows drive letter
        scheme = ""
    if scheme not in TRACKING_SCHEMES and scheme not in plugins:
        raise LossforgeError(f"{source}: tracking.uri: unsupported MLflow store {uri!r} (expected a path, sqlite:///, "
                             "file://, http(s)://, postgresql://, mysql://, ...)")


def check_settings(params: Params, stages: tuple[str, ...]) -> None:
    """Settings whose mistakes used to surface only after prepare/split had written files (or after the whole
    search): the search method's own sections, devices, the model's encoder, the runner's package, the tracking
    store. One line naming the field."""
    source = params.source
    if "search" in stages:
        runner = params.search.runner
        if runner in RUNNER_PACKAGES and not _installed(RUNNER_PACKAGES[runner][0]):
            raise LossforgeError(f"search.runner: {runner!r} needs the {RUNNER_PACKAGES[runner][1]} package "
                                 "(not installed); use 'threads' or 'processes'")
        evolution = params.config("evolution")
        if params.search.method == "evolution":
            from components.search.operators import get_operator_set

            try:
                get_operator_set(evolution.operator_set)
            except LossforgeError as exc:
                raise LossforgeError(f"{source}: evolution.operator_set: {exc}") from None
            if evolution.depth > MAX_TREE_DEPTH:
                raise LossforgeError(f"{source}: evolution.depth: must be <= {MAX_TREE_DEPTH} (got {evolution.depth})")
            from components.search.evolution_method import seed_graphs

            try:
                seed_graphs(params.search.task, evolution.seed_losses)  # names and files, before anything is written
            except LossforgeError as exc:
                raise LossforgeError(f"{source}: {exc}") from None
        if params.search.method == "ppo":
            from components.surrogates.ppo_method import build_config, build_template

            build_template(params)
            build_config(params)
    for section in ("proxy", "retrain"):
        if section == "proxy" and "search" not in stages or section == "retrain" and "retrain" not in stages:
            continue
        config = params.config(section)
        if hasattr(config, "device"):
            _check_device(config.device, f"{source}: {section}.device")
        _check_encoder(getattr(config, "model", None), f"{source}: {section}.model")
    if "retrain" in stages:  # read only after the whole search: a string of seeds was iterated letter by letter
        seeds, top_k = params.section_extra("retrain", "seeds"), params.section_extra("retrain", "top_k", 1)
        if seeds is not None and (not isinstance(seeds, list) or not seeds or len(set(seeds)) != len(seeds) or not all(
                isinstance(s, int) and not isinstance(s, bool) for s in seeds)):
            raise LossforgeError(f"{source}: retrain.seeds: expected a non-empty list of distinct integers "
                                 f"(got {seeds!r})")
        if top_k is not None and (not isinstance(top_k, int) or isinstance(top_k, bool) or top_k < 1):
            raise LossforgeError(f"{source}: retrain.top_k: expected an integer >= 1 (got {top_k!r})")
    if params.tracking.enabled and any(s in stages for s in ("search", "retrain", "report")):
        _check_tracking_uri(params.tracking.uri, source)


def _planned_split_sizes(params: Params, stages: tuple[str, ...]) -> tuple[dict[str, int], str] | None:
    """(sizes of S_train / S_eval / test the run will train on, where they come from): planned from the dataset (or
    the embedded data's counts) when the split stage runs, else read from the manifests; None without data yet."""
    from components.tasks.splits import plan_search_splits, read_manifest

    if "split" in stages or "prepare" in stages:
        if params.data.generate:
            train = [f"train_{k}" for k in range(params.data.num_train)]
            test = [f"val_{k}" for k in range(params.data.num_test)]
        elif Path(params.data.path).exists():
            from components.tasks.base import get_task

            task = get_task(params.search.task)
            train = task.open_dataset(params.data.path, split="train").ids
            test = task.open_dataset(params.data.path, split="val").ids
        else:
            return None
        planned = plan_search_splits(train, test, eval_count=params.split.eval_count,
                                     eval_fraction=params.split.eval_fraction, seed=params.split.seed)
        return {name: len(ids) for name, ids in planned.items()}, f"once {params.data.path} is split by split:"
    folder = Path(params.split.dir)
    if not all((folder / f"{n}.txt").exists() for n in ("train", "eval", "test")):
        return None
    return {n: len(read_manifest(folder / f"{n}.txt")) for n in ("train", "eval", "test")}, f"manifests in {folder}"


def check_split_sizes(params: Params, stages: tuple[str, ...]) -> None:
    """S_train must fill one proxy batch (the trainers drop the last partial batch: a smaller S_train made every
    proxy training fail and the whole budget was spent on failures); S_train + S_eval one re-training batch."""
    planned = _planned_split_sizes(params, stages)
    if planned is None:
        return
    sizes, origin = planned
    checks = []
    if "search" in stages:
        checks.append(("proxy", sizes["train"], "S_train"))
    if "retrain" in stages:
        checks.append(("retrain", sizes["train"] + sizes["eval"], "S_train + S_eval"))
    for section, count, what in checks:
        batch = getattr(params.config(section), "batch_size", None)
        if isinstance(batch, int) and count < batch:
            raise LossforgeError(
                f"{params.source}: {section}.batch_size: {batch} is larger than {what} ({count} images, {origin}); "
                "lower it or use more images")


def check_manifest_data(params: Params, stages: tuple[str, ...]) -> None:
    """Validate the images of the existing split manifests a search / re-training without the split stage reads."""
    from components.tasks.base import get_task
    from components.tasks.splits import read_manifest

    names = ["train", "eval"] + (["test"] if "retrain" in stages else [])
    ids = [i for n in names for i in read_manifest(Path(params.split.dir) / f"{n}.txt")]
    get_task(params.search.task).validate_data(params.data.path, ids=ids)


def check_inputs(params: Params, stages: tuple[str, ...]) -> None:
    """Fail with a one-line error if the inputs of the first requested stage are missing, a setting is wrong, or
    the data is bad (every file is checked), before any stage writes anything."""
    if "prepare" in stages:
        if not params.data.generate and not Path(params.data.path).exists():
            raise LossforgeError(f"data.path: dataset not found: {params.data.path}")
    elif "split" in stages:
        if not Path(params.data.path).exists():
            raise LossforgeError(f"data.path: dataset not found: {params.data.path} (run the prepare stage first)")
    elif any(s in stages for s in ("search", "retrain")):
        data_spec(params)
    check_settings(params, stages)
    if any(s in stages for s in ("search", "retrain")):
        baseline_specs(params)
    if "search" in stages:
        proxy_seeds(params)
    if any(s in stages for s in ("search", "retrain")):
        check_split_sizes(params, stages)
    if not params.data.generate and any(s in stages for s in ("prepare", "split")):
        check_user_dataset(params)
    elif not any(s in stages for s in ("prepare", "split")) and any(s in stages for s in ("search", "retrain")):
        check_manifest_data(params, stages)
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
