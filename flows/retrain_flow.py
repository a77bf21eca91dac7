"""Final re-training: the searched loss against the handcrafted baselines, on the full training set
(S_train ∪ S_eval), evaluated on the test images that the search never saw."""

from __future__ import annotations

from pathlib import Path
from typing import Any

from prefect import flow, get_run_logger, task
from prefect.cache_policies import NO_CACHE

from components.atomic_io import read_json
from components.errors import LossforgeError
from components.params import Params
from flows import progress


@task(name="retrain-and-compare", retries=1, retry_delay_seconds=1, cache_policy=NO_CACHE)
def retrain_task(loss_specs: dict[str, Any], data: dict[str, str], cfg: Any, metric: str, md_path: str,
                 json_path: str, seeds: list[int] | None = None) -> dict[str, Any]:
    """Train one model per loss (same data, same initial weights) and write the comparison table."""
    from components.loss_registry import build_loss
    from components.retrain import retrain_and_compare, write_table
    from flows.tasks import open_split

    train_ds = open_split(data["path"], [data["train"], data["eval"]])
    test_ds = open_split(data["path"], data["test"])
    losses = {name: build_loss(spec, num_classes=train_ds.num_classes) for name, spec in loss_specs.items()}
    table = retrain_and_compare(losses, train_ds, test_ds, cfg, metric, seeds=seeds,
                                on_progress=lambda it, total, *_: progress.emit("retrain", done=it, total=total))
    write_table(table, Path(md_path), Path(json_path))
    return read_json(json_path)


@flow(name="lossforge-retrain", log_prints=True)
def retrain_flow(params: Params, data: dict[str, str]) -> dict[str, Any]:
    """Re-train the best searched loss and the baselines of `retrain.baselines`; log the table to MLflow."""
    from flows.search_flow import losses_dir, make_tracker, reports_dir

    logger = get_run_logger()
    summary_path = losses_dir(params) / "search.json"
    if not summary_path.exists():
        raise LossforgeError(f"{summary_path}: no search result yet (run the search stage first)")
    summary = read_json(summary_path)
    specs: dict[str, Any] = {"searched": summary["best_loss"]}
    for name in params.section_extra("retrain", "baselines", ["ce"]):
        specs[str(name)] = name
    out = reports_dir(params)
    out.mkdir(parents=True, exist_ok=True)
    md_path, json_path = out / "comparison.md", out / "comparison.json"
    progress.emit("retrain", losses=list(specs))
    seeds = params.section_extra("retrain", "seeds")
    table = retrain_task(specs, data, params.config("retrain"), params.search.metric, str(md_path), str(json_path),
                         seeds=None if seeds is None else [int(s) for s in seeds])
    logger.info("re-training done: %s", md_path)
    tracker = make_tracker(params)
    if tracker is not None:
        tracker.start()
        tracker.log_final({}, [md_path, json_path], artifact_path="retrain")
        tracker.finish()
    return table
