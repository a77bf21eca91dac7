"""The report of a search: reports/<task>-<metric>/report.md, metrics.json (dvc metrics), progress.csv and
progress.png (dvc plots; Fig. 4 of AutoLoss-Zero: mean score of the top-5 vs number of evaluations),
all logged on the search's parent MLflow run."""

from __future__ import annotations

import csv
from pathlib import Path
from typing import Any

from prefect import flow, task
from prefect.cache_policies import NO_CACHE

from components.atomic_io import read_json, write_json_atomic
from components.errors import LossforgeError
from components.params import Params


def progress_rows(summary: dict[str, Any]) -> list[dict[str, Any]]:
    """(evaluations, top5_mean) after each result; only points with a score, last value per evaluation count."""
    rows: dict[int, float] = {}
    for point in summary.get("progress") or []:
        if point.get("top5_mean") is not None:
            rows[int(point["evaluations"])] = float(point["top5_mean"])
    return [{"evaluations": k, "top5_mean": v} for k, v in sorted(rows.items())]


def plot_progress(rows: list[dict[str, Any]], metric: str, path: Path) -> Path:
    """Search-progress plot as PNG (matplotlib, no display needed)."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(5.5, 3.5), dpi=110)
    if rows:
        ax.plot([r["evaluations"] for r in rows], [r["top5_mean"] for r in rows], marker="o", ms=3)
    ax.set_xlabel("number of evaluated losses")
    ax.set_ylabel(f"mean {metric} of the top-5 (proxy)")
    ax.set_title("search progress")
    ax.grid(alpha=0.3)
    fig.tight_layout()
    path.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(path)
    plt.close(fig)
    return path


def _table_markdown(path: Path) -> str:
    return path.read_text(encoding="utf-8") if path.exists() else "(re-training not run)\n"


def _retrain_metrics(comparison: Any, metric: str) -> dict[str, float]:
    """{loss name: target metric} from the comparison JSON (rows with `name`/`loss` and `metrics`)."""
    out: dict[str, float] = {}
    rows = comparison.get("rows") if isinstance(comparison, dict) else comparison
    for row in rows or []:
        name = row.get("name") or row.get("loss")
        metrics = row.get("metrics") or {}
        value = metrics.get(metric, row.get("target"))
        if name is not None and isinstance(value, (int, float)):
            out[str(name)] = float(value)
    return out


@task(name="write-report", cache_policy=NO_CACHE)
def write_report(params: Params, pipeline_wall_s: float | None = None) -> dict[str, Any]:
    """Write report.md, metrics.json, progress.csv and progress.png; returns the metrics dict."""
    from flows.search_flow import losses_dir, reports_dir

    summary_path = losses_dir(params) / "search.json"
    if not summary_path.exists():
        raise LossforgeError(f"{summary_path}: no search result yet (run the search stage first)")
    summary = read_json(summary_path)
    out = reports_dir(params)
    out.mkdir(parents=True, exist_ok=True)
    metric = params.search.metric
    rows = progress_rows(summary)
    with open(out / "progress.csv", "w", newline="", encoding="utf-8") as fh:
        writer = csv.DictWriter(fh, fieldnames=["evaluations", "top5_mean"])
        writer.writeheader()
        writer.writerows(rows)
    plot_progress(rows, metric, out / "progress.png")
    comparison_path = out / "comparison.json"
    retrain = _retrain_metrics(read_json(comparison_path), metric) if comparison_path.exists() else {}
    best = summary["best"]
    timing = summary.get("timing", {})
    metrics = {
        "best_proxy_target": best.get("target"),
        "top5_mean": summary.get("top5_mean"),
        "funnel": summary["counters"],
        "retrain": retrain,
        "search_overhead_share": timing.get("overhead_share"),
    }
    write_json_atomic(out / "metrics.json", metrics)

    funnel = "\n".join(f"| {k} | {v} |" for k, v in summary["counters"].items())
    top = "\n".join(
        f"| {i} | {t['id']} | `{t['formula']}` | {t['target']:.4f} |" for i, t in enumerate(summary["top"], 1)
    )
    timing_rows = "\n".join(f"| {k} | {v} |" for k, v in timing.items())
    text = f"""# Lossforge report: {params.search.task}, target metric {metric}

Search `{summary['search_id']}` ({summary['method']}, budget {summary['budget']} proxy evaluations,
profile `{params.profile}`).

## Best loss

- formula: `{best['formula']}`
- canonical: `{best['canonical']}`
- hash: `{best['hash']}`, candidate {best['id']} (parent {best.get('parent_id')}, {best.get('mutation')})
- proxy {metric}: {best['target']:.4f}
- files: `{losses_dir(params) / 'best.json'}` (loss JSON), `{losses_dir(params) / 'best.py'}` (nn.Module)

## Re-training comparison (test images, never seen by the search)

{_table_markdown(out / 'comparison.md')}
## Top {len(summary['top'])} of the search (proxy task)

| rank | candidate | formula | proxy {metric} |
|---|---|---|---|
{top}

## Rejection funnel

| counter | value |
|---|---|
{funnel}

## Search progress

![progress](progress.png)

## Timing of the search stage (orchestration overhead = wall time not spent screening or training)

| figure | value |
|---|---|
{timing_rows}
"""
    if pipeline_wall_s is not None:
        text += f"\nWhole pipeline wall time: {pipeline_wall_s:.1f} s.\n"
    (out / "report.md").write_text(text, encoding="utf-8")
    return metrics


@flow(name="lossforge-report", log_prints=True)
def report_flow(params: Params, pipeline_wall_s: float | None = None) -> dict[str, Any]:
    """Write the report files and log them (with the progress plot) on the parent MLflow run."""
    from flows.search_flow import make_tracker, reports_dir

    metrics = write_report(params, pipeline_wall_s)
    tracker = make_tracker(params)
    if tracker is not None:
        out = reports_dir(params)
        tracker.start()
        flat = {f"retrain_{k}": v for k, v in metrics["retrain"].items()}
        tracker.log_final(flat, [out / "report.md", out / "progress.png", out / "progress.csv",
                                 out / "metrics.json"], artifact_path="report")
        tracker.finish()
    return metrics
