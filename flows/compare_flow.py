"""`lossforge compare` as a Prefect flow: re-train any set of losses on any dataset and write the table.

The losses (build_loss specs, already validated by the CLI) are re-trained with the `retrain` schedule of
the active profile (optionally fewer/more `iterations`) by the re-training stage's own task
(`retrain_flow.retrain_task`: same initial weights, same batches, one model per loss, per seed), on
S_train ∪ S_eval and evaluated on the test split, exactly like the final re-training of a search.

Data: without `dataset`, the embedded data of params.yaml and its split manifests (`split.dir`); when they
are not there yet they are made first (prepare + split tasks, as `lossforge search` would). With `dataset`
(VOC, COCO or image/mask folders), its `train` images are split with the `split` settings and the
manifests are written to `<out>/splits/`; its `val` images are the test set.

The table goes to `<out>/comparison.md` and `<out>/comparison.json` (`components.tasks.retrain.write_table`).
With tracking enabled, one MLflow run (experiment `lossforge/compare`, tag `lossforge.kind=comparison`)
gets the settings as params, `<loss>.<metric>` / `<loss>.<metric>_std` per loss and the two files.
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any, Optional

from prefect import flow, get_run_logger

from components.errors import LossforgeError
from components.params import Params
from flows import progress
from flows.retrain_flow import retrain_task
from flows.run_config import data_spec
from flows.tasks import prepare_data, split_dataset

EXPERIMENT = "lossforge/compare"


def compare_data(params: Params, dataset: str | None, out_dir: Path) -> dict[str, str]:
    """Dataset path + split manifests for the comparison (see module docstring)."""
    task = params.search.task
    if dataset is None:
        try:
            return data_spec(params)
        except LossforgeError:  # no split yet: make the embedded data and its split as the search would
            path = prepare_data(params.data.model_dump(), task)
            return {"path": path, "task": task, **split_dataset(path, params.split.model_dump(), task)}
    split = {**params.split.model_dump(), "dir": str(out_dir / "splits")}
    return {"path": str(dataset), "task": task, **split_dataset(str(dataset), split, task)}


def _safe(name: str) -> str:
    from flows.proxy_baselines import slug

    return slug(name)


@flow(name="lossforge-compare", log_prints=True)
def compare_flow(params: Params, losses: dict[str, Any], seeds: list[int], metric: str, out_dir: str,
                 dataset: Optional[str] = None, iterations: Optional[int] = None) -> dict[str, Any]:
    """Re-train `losses` ({row name: build_loss spec}) over `seeds`; write and log the comparison table."""
    logger = get_run_logger()
    out = Path(out_dir)
    data = compare_data(params, dataset, out)
    cfg = params.config("retrain", **({} if iterations is None else {"iterations": int(iterations)}))
    md_path, json_path = out / "comparison.md", out / "comparison.json"
    progress.emit("retrain", losses=list(losses))
    table = retrain_task(dict(losses), data, cfg, metric, str(md_path), str(json_path), seeds=[int(s) for s in seeds])
    logger.info("comparison written: %s", md_path)
    if params.tracking.enabled:
        from flows.tracking import log_comparison, resolve_tracking_uri

        metrics: dict[str, float] = {}
        for row in table["rows"]:
            for m, value in (row.get("metrics") or {}).items():
                if value is not None:
                    metrics[f"{_safe(row['name'])}.{m}"] = float(value)
                    std = (row.get("std") or {}).get(m)
                    if std is not None:
                        metrics[f"{_safe(row['name'])}.{m}_std"] = float(std)
        settings = {
            "losses": json.dumps(losses, sort_keys=True), "dataset": data["path"], "seeds": json.dumps(list(seeds)),
            "metric": metric, "iterations": cfg.iterations, "profile": params.profile,
        }
        log_comparison(resolve_tracking_uri(params.tracking.uri), EXPERIMENT, f"compare {', '.join(losses)}",
                       settings, metrics, [md_path, json_path], artifact_root=params.tracking.artifacts)
    return table
