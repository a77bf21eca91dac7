"""Final re-training, for any task: the searched loss and every baseline on the full schedule, compared on
the test set.

``retrain_over_seeds`` trains one model per loss side by side with the task's trainer (same initial
weights, same batches), once per seed, evaluates the held-out test set with all the task's metrics and
returns a ``ComparisonTable`` (mean and std over seeds). ``merge_tables`` joins per-seed tables (the flow
re-trains one seed per task). ``write_table`` writes it as Markdown (target metric column marked, best value
per column in bold) and JSON (``lossforge.comparison/1``). The task-specific schedules live with each task
(e.g. ``components.tasks.segmentation.retrain``).
"""

from __future__ import annotations

import dataclasses
import math
import os
import statistics
from collections.abc import Iterable, Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Callable


from components.atomic_io import write_json_atomic, write_text_atomic
from components.errors import LossforgeError

TABLE_FORMAT = "lossforge.comparison/1"


@dataclass
class ComparisonRow:
    """One loss after re-training: mean (and std over seeds) of each metric, or why it has none."""

    name: str
    status: str
    metrics: dict[str, float] = field(default_factory=dict)
    std: dict[str, float] = field(default_factory=dict)
    iterations: int = 0
    seconds: float = 0.0
    message: str = ""


@dataclass
class ComparisonTable:
    """Metrics of every loss on the test set; ``target_metric`` is the metric the search optimised."""

    target_metric: str
    rows: list[ComparisonRow]
    metrics: tuple[str, ...] = ()
    seeds: tuple[int, ...] = (0,)
    config: dict[str, Any] = field(default_factory=dict)

    def row(self, name: str) -> ComparisonRow:
        """The row of loss ``name``."""
        for r in self.rows:
            if r.name == name:
                return r
        raise LossforgeError(f"comparison table has no loss {name!r}; rows: {', '.join(r.name for r in self.rows)}")

    def best(self, metric: str) -> list[str]:
        """Names of the losses with the highest value of ``metric`` (ties all listed; [] if none finite)."""
        values = {r.name: r.metrics.get(metric) for r in self.rows if r.status == "ok"}
        finite = {k: v for k, v in values.items() if v is not None and math.isfinite(v)}
        if not finite:
            return []
        top = max(finite.values())
        return [k for k, v in finite.items() if v == top]

    def to_dict(self) -> dict[str, Any]:
        """JSON-able form (non-finite numbers become null)."""

        def clean(d: Mapping[str, float]) -> dict[str, float | None]:
            return {k: (v if v is not None and math.isfinite(v) else None) for k, v in d.items()}

        return {
            "format": TABLE_FORMAT,
            "target_metric": self.target_metric,
            "metrics": list(self.metrics),
            "seeds": list(self.seeds),
            "best": {m: self.best(m) for m in self.metrics},
            "rows": [
                {"name": r.name, "status": r.status, "metrics": clean(r.metrics), "std": clean(r.std),
                 "iterations": r.iterations, "seconds": round(r.seconds, 3), "message": r.message}
                for r in self.rows
            ],
            "config": self.config,
        }

    @classmethod
    def from_dict(cls, data: Mapping[str, Any]) -> "ComparisonTable":
        """Rebuild a table written by ``to_dict`` (e.g. to re-render the Markdown)."""
        if data.get("format") != TABLE_FORMAT:
            raise LossforgeError(f"comparison table: format must be {TABLE_FORMAT!r}, got {data.get('format')!r}")

        def unclean(d: Mapping[str, Any]) -> dict[str, float]:
            return {k: (math.nan if v is None else float(v)) for k, v in d.items()}

        rows = [
            ComparisonRow(r["name"], r["status"], unclean(r.get("metrics", {})), unclean(r.get("std", {})),
                          int(r.get("iterations", 0)), float(r.get("seconds", 0.0)), r.get("message", ""))
            for r in data["rows"]
        ]
        return cls(data["target_metric"], rows, tuple(data["metrics"]), tuple(data.get("seeds", (0,))), data.get("config", {}))

    def to_markdown(self) -> str:
        """Markdown table in percent; the target metric's column is marked, the best value per column is bold."""
        header = ["loss", "status"] + [f"**{m}** (target)" if m == self.target_metric else m for m in self.metrics]
        lines = [
            f"Re-training comparison on the test set (target metric: **{self.target_metric}**; "
            f"values in %, mean over seeds {', '.join(map(str, self.seeds))}; best per column in bold).",
            "",
            "| " + " | ".join(header) + " |",
            "|" + "|".join(["---", "---"] + ["---:"] * len(self.metrics)) + "|",
        ]
        best = {m: set(self.best(m)) for m in self.metrics}
        for r in self.rows:
            cells = [r.name, r.status if r.status == "ok" else f"{r.status} (it {r.iterations})"]
            for m in self.metrics:
                v = r.metrics.get(m)
                if r.status != "ok" or v is None or not math.isfinite(v):
                    cells.append("—")
                    continue
                text = f"{100 * v:.2f}"
                s = r.std.get(m)
                if len(self.seeds) > 1 and s is not None and math.isfinite(s):
                    text += f" ± {100 * s:.2f}"
                cells.append(f"**{text}**" if r.name in best[m] else text)
            lines.append("| " + " | ".join(cells) + " |")
        failed = [r for r in self.rows if r.status != "ok" and r.message]
        if failed:
            lines.append("")
            lines.extend(f"- {r.name}: {r.message}" for r in failed)
        return "\n".join(lines) + "\n"


def _aggregate(name: str, results: Sequence[Any], metric_names: Sequence[str]) -> ComparisonRow:
    bad = next((r for r in results if r.status != "ok"), None)
    if bad is not None:
        return ComparisonRow(name, bad.status, iterations=bad.iterations, seconds=sum(r.seconds for r in results),
                             message=bad.message)
    means, stds = {}, {}
    for m in metric_names:
        vals = [r.metrics[m] for r in results if m in r.metrics]
        means[m] = statistics.fmean(vals) if vals else math.nan
        stds[m] = statistics.pstdev(vals) if len(vals) > 1 else 0.0
    return ComparisonRow(name, "ok", means, stds, iterations=results[0].iterations,
                         seconds=sum(r.seconds for r in results))


def retrain_over_seeds(
    train: Callable[..., Mapping[str, Any]],
    losses: Mapping[str, Any],
    train_ds: Any,
    test_ds: Any,
    cfg: Any,
    target_metric: str,
    metric_names: Sequence[str],
    *,
    seeds: Iterable[int] | None = None,
    on_progress: Callable[[int, int, dict], None] | None = None,
) -> ComparisonTable:
    """``train(losses, train_ds, test_ds, cfg_with_seed, target_metric, on_progress=...)`` (a task's trainer,
    returning name -> ProxyResult) once per seed; the table holds the mean and std of every metric.

    ``seeds`` defaults to ``(cfg.seed,)``; ``on_progress(iteration, total, losses)`` counts iterations over
    all seeds.
    """
    seed_list = tuple(int(s) for s in (seeds if seeds is not None else (cfg.seed,)))
    if not seed_list:
        raise LossforgeError("retrain: seeds must not be empty")
    per_loss: dict[str, list[Any]] = {name: [] for name in losses}
    for k, seed in enumerate(seed_list):
        progress = None
        if on_progress is not None:
            offset, grand = k * cfg.iterations, len(seed_list) * cfg.iterations

            def progress(it: int, _total: int, values: dict[str, float], _o: int = offset, _g: int = grand) -> None:
                on_progress(_o + it, _g, values)

        results = train(losses, train_ds, test_ds, dataclasses.replace(cfg, seed=seed), target_metric,
                        on_progress=progress)
        for name, result in results.items():
            per_loss[name].append(result)
    rows = [_aggregate(name, results, metric_names) for name, results in per_loss.items()]
    config = dataclasses.asdict(cfg)
    config["config_class"] = type(cfg).__name__
    return ComparisonTable(target_metric, rows, tuple(metric_names), seed_list, config)


def merge_tables(tables: Sequence[ComparisonTable]) -> ComparisonTable:
    """One table over several seeds from per-seed tables (each trained with one seed): mean and std per metric.

    Re-training runs one task per seed (in parallel, and a finished seed is never trained again); this
    gives the same numbers as ``retrain_over_seeds`` over all seeds at once. Rows keep the first table's
    order; a loss that failed in any seed is reported with that seed's status.
    """
    if not tables:
        raise LossforgeError("merge_tables: no tables")
    first = tables[0]
    seeds = tuple(s for t in tables for s in t.seeds)
    if len(set(seeds)) != len(seeds):
        raise LossforgeError(f"merge_tables: seeds repeat across tables: {seeds}")
    rows = []
    for row in first.rows:
        per_seed = [t.row(row.name) for t in tables]
        bad = next((r for r in per_seed if r.status != "ok"), None)
        if bad is not None:
            rows.append(ComparisonRow(row.name, bad.status, iterations=bad.iterations,
                                      seconds=sum(r.seconds for r in per_seed), message=bad.message))
            continue
        means, stds = {}, {}
        for m in first.metrics:
            vals = [v for r in per_seed if (v := r.metrics.get(m)) is not None and math.isfinite(v)]
            means[m] = statistics.fmean(vals) if vals else math.nan
            stds[m] = statistics.pstdev(vals) if len(vals) > 1 else 0.0
        rows.append(ComparisonRow(row.name, "ok", means, stds, iterations=row.iterations,
                                  seconds=sum(r.seconds for r in per_seed)))
    return ComparisonTable(first.target_metric, rows, first.metrics, seeds, dict(first.config))


def write_table(table: ComparisonTable, md_path: str | os.PathLike, json_path: str | os.PathLike) -> tuple[Path, Path]:
    """Write the table as Markdown and as JSON (both atomically); returns the two paths."""
    md, js = Path(md_path), Path(json_path)
    write_text_atomic(md, table.to_markdown())
    write_json_atomic(js, table.to_dict())
    return md, js
