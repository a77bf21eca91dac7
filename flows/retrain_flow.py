"""Final re-training: the searched loss (and the next best of the search, `retrain.top_k`) against the
handcrafted baselines, on the full training set (S_train ∪ S_eval), evaluated on the test images that the
search never saw.

One task per seed, submitted together (the cores are shared between them); each writes its own table
under `<report>/seeds/`, so a re-run after a crash only trains the seeds that are missing, and the
tables are merged into `comparison.md/json` (mean ± std over the seeds)."""

from __future__ import annotations

from pathlib import Path
from typing import Any

from prefect import flow, get_run_logger, task
from prefect.cache_policies import NO_CACHE

from components.atomic_io import read_json
from components.errors import LossforgeError
from components.params import Params
from components.tasks.base import get_task
from flows import progress


@task(name="retrain-and-compare", retries=1, retry_delay_seconds=1, cache_policy=NO_CACHE)
def retrain_task(loss_specs: dict[str, Any], data: dict[str, str], cfg: Any, metric: str, md_path: str,
                 json_path: str, seeds: list[int] | None = None) -> dict[str, Any]:
    """Train one model per loss (same data, same initial weights) and write the comparison table."""
    from components.tasks.base import get_task
    from components.tasks.retrain import write_table
    from flows.tasks import open_split

    task_ = get_task(data.get("task", "segmentation"))
    train_ds = open_split(data["path"], [data["train"], data["eval"]], task_.name)
    test_ds = open_split(data["path"], data["test"], task_.name)
    losses = {name: task_.build_loss(spec, train_ds) for name, spec in loss_specs.items()}
    from flows.stopping import stop_check  # Ctrl-C / SIGTERM: stop at the next iteration

    table = task_.retrain(losses, train_ds, test_ds, cfg, metric, seeds=seeds,
                          on_progress=stop_check(lambda it, total, *_: progress.emit("retrain", done=it, total=total)))
    write_table(table, Path(md_path), Path(json_path))
    return read_json(json_path)


@task(name="retrain-seed", retries=1, retry_delay_seconds=1, cache_policy=NO_CACHE,
      task_run_name="retrain-seed-{seed}")
def retrain_seed_task(loss_specs: dict[str, Any], data: dict[str, str], cfg: Any, metric: str, folder: str, seed: int,
                      torch_threads: int | None = None) -> dict[str, Any]:
    """Re-train every loss with one seed; the table goes to `<folder>/comparison-s<seed>.json` (reused if there)."""
    import torch

    json_path = Path(folder) / f"comparison-s{seed}.json"
    wanted = {"losses": loss_specs, "config": repr(cfg)}
    if json_path.exists():
        stored = read_json(json_path)
        if stored.get("config", {}).get("request") == wanted and stored.get("seeds") == [seed]:
            return stored
    if torch_threads:
        torch.set_num_threads(torch_threads)
    table = retrain_task.fn(loss_specs, data, cfg, metric, str(json_path.with_suffix(".md")), str(json_path), [seed])
    table["config"]["request"] = wanted
    from components.atomic_io import write_json_atomic

    write_json_atomic(json_path, table)
    return table


def retrain_specs(params: Params, summary: dict[str, Any]) -> dict[str, Any]:
    """Loss specs to re-train: `searched` (the best), `rank2..rank<top_k>` of the search, then the baselines."""
    from flows.run_config import losses_dir

    best = summary["best_loss"]
    specs: dict[str, Any] = {"searched": best}
    top_k = int(params.section_extra("retrain", "top_k", 1) or 1)
    for rank in range(2, min(top_k, len(summary.get("top") or [])) + 1):
        path = losses_dir(params) / "top" / f"rank{rank}.json"
        if path.exists():
            specs[f"rank{rank}"] = {**best, "path": str(path)}
    from flows.run_config import baseline_specs

    for spec in baseline_specs(params):
        specs[get_task(params.search.task).loss_name(spec)] = spec
    return specs


@flow(name="lossforge-retrain", log_prints=True)
def retrain_flow(params: Params, data: dict[str, str]) -> dict[str, Any]:
    """Re-train the best searched losses and the baselines of `retrain.baselines`; log the table to MLflow."""
    import os

    from components.tasks.retrain import ComparisonTable, merge_tables, write_table
    from flows.run_config import losses_dir, make_tracker, reports_dir

    logger = get_run_logger()
    summary_path = losses_dir(params) / "search.json"
    if not summary_path.exists():
        raise LossforgeError(f"{summary_path}: no search result yet (run the search stage first)")
    summary = read_json(summary_path)
    specs = retrain_specs(params, summary)
    out = reports_dir(params)
    (out / "seeds").mkdir(parents=True, exist_ok=True)
    md_path, json_path = out / "comparison.md", out / "comparison.json"
    progress.emit("retrain", losses=list(specs))
    cfg = params.config("retrain")
    seeds = [int(s) for s in (params.section_extra("retrain", "seeds") or [cfg.seed])]
    parallel = max(1, min(len(seeds), params.search.workers, os.cpu_count() or 1))
    threads = max(1, (os.cpu_count() or 1) // parallel)
    futures = [retrain_seed_task.submit(specs, data, cfg, params.search.metric, str(out / "seeds"), seed, threads)
               for seed in seeds]
    tables = [ComparisonTable.from_dict(f.result()) for f in futures]
    merged = merge_tables(tables)
    merged.config.pop("request", None)
    write_table(merged, md_path, json_path)
    table = read_json(json_path)
    logger.info("re-training done: %s", md_path)
    tracker = make_tracker(params)
    if tracker is not None:
        tracker.start()
        tracker.log_final({}, [md_path, json_path], artifact_path="retrain")
        tracker.finish()
    return table
