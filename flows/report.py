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


def baseline_lines(summary: dict[str, Any]) -> list[dict[str, Any]]:
    """The proxy baselines of a search summary as [{"name", "mean", "std", "seeds"}] (those with a score)."""
    section = summary.get("baselines") or {}
    out = []
    for name, entry in (section.get("losses") or {}).items():
        if entry.get("target_mean") is not None:
            out.append({"name": name, "mean": float(entry["target_mean"]), "std": float(entry.get("target_std") or 0.0),
                        "seeds": len(entry.get("seeds_ok") or [])})
    return out


def progress_figure(rows: list[dict[str, Any]], metric: str, baselines: list[dict[str, Any]] | None = None):
    """The search-progress figure: top-5 mean vs evaluations, proxy baselines as horizontal lines (± std band)."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(5.5, 3.5), dpi=110)
    if rows:
        ax.plot([r["evaluations"] for r in rows], [r["top5_mean"] for r in rows], marker="o", ms=3,
                label="searched: top-5 mean")
    for k, line in enumerate(baselines or []):
        color = f"C{k + 1}"
        seeds = f", {line['seeds']} seeds" if line["seeds"] > 1 else ""
        ax.axhline(line["mean"], color=color, linestyle="--", linewidth=1.2,
                   label=f"{line['name']} (proxy{seeds})")
        if line["std"] > 0:
            ax.axhspan(line["mean"] - line["std"], line["mean"] + line["std"], color=color, alpha=0.12)
    ax.set_xlabel("number of evaluated losses")
    ax.set_ylabel(f"mean {metric} of the top-5 (proxy)")
    ax.set_title("search progress")
    ax.grid(alpha=0.3)
    if baselines:
        ax.legend(fontsize=7, loc="best")
    fig.tight_layout()
    return fig


def plot_progress(rows: list[dict[str, Any]], metric: str, path: Path,
                  baselines: list[dict[str, Any]] | None = None) -> Path:
    """Search-progress plot as PNG (matplotlib, no display needed); `baselines` from `baseline_lines`."""
    import matplotlib.pyplot as plt

    fig = progress_figure(rows, metric, baselines)
    path.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(path)
    plt.close(fig)
    return path


def ce_margin(summary: dict[str, Any], metric: str, reference: str = "ce") -> tuple[dict[str, Any], str]:
    """Whether the best searched loss beats CE (the task's reference baseline, e.g. detection's CE + smooth L1)
    on the proxy: (figures for metrics.json, one report line)."""
    best = (summary.get("best") or {}).get("target")
    ce = ((summary.get("baselines") or {}).get("losses") or {}).get(reference) or {}
    mean, std, seeds = ce.get("target_mean"), ce.get("target_std"), len(ce.get("seeds_ok") or [])
    if best is None or mean is None:
        why = "no proxy score for CE" if mean is None else "no proxy score for the searched loss"
        return {"proxy_ce_mean": mean, "proxy_margin_vs_ce": None}, f"Best searched loss vs CE on the proxy: {why}."
    margin = float(best) - float(mean)
    figures = {"proxy_ce_mean": mean, "proxy_ce_std": std, "proxy_ce_seeds": seeds, "proxy_margin_vs_ce": margin}
    verdict = "beats" if margin > 0 else "does not beat"
    line = (f"The best searched loss **{verdict} CE on the proxy**: {metric} {float(best):.4f} vs CE "
            f"{float(mean):.4f}")
    if seeds > 1:
        line += f" ± {float(std):.4f} (mean ± std over {seeds} seeds), margin {margin:+.4f}"
        if std and std > 0:
            ratio = abs(margin) / float(std)
            noise = "larger than" if ratio > 2 else "within"
            line += f" = {ratio:.1f}× CE's seed spread ({noise} 2 std of the seed-to-seed noise)."
        else:
            line += " (CE gave the same score on every seed)."
    else:
        line += f" (one seed), margin {margin:+.4f}. With one seed the noise is unknown: set `proxy.seeds` " \
                "(e.g. [0, 1, 2]) to train the baselines over several seeds."
    runs = int((summary.get("best") or {}).get("proxy_runs") or 1)
    if runs > 1:
        line += (f" The searched loss's score is its mean over {runs} proxy seeds ± "
                 f"{float((summary.get('best') or {}).get('target_std') or 0):.4f} (`search.confirm_top`).")
    else:
        line += (" The searched loss's score is one proxy training (the best of many: expect it to be optimistic; "
                 "`search.confirm_top` re-trains the best few with the other proxy seeds).")
    return figures, line


def proxy_validity(summary: dict[str, Any], comparison: Any, metric: str) -> dict[str, Any]:
    """Spearman ρ between proxy and re-training scores of the re-trained losses that have both.

    Re-training rows are matched to proxy scores by name: `searched` is the best loss, `rank<i>` the i-th
    loss of the search's top list (losses/<task>-<metric>/top/rank<i>.json), any other name a proxy baseline
    (mean over proxy seeds). A loss counted once even if re-trained under two names (searched and rank1).
    """
    from components.stats import spearman

    retrain = _retrain_metrics(comparison, metric)
    best = summary.get("best") or {}
    proxy: dict[str, tuple[Any, float | None]] = {"searched": (("cand", best.get("id")), best.get("target"))}
    for i, rec in enumerate(summary.get("top") or [], 1):
        proxy[f"rank{i}"] = (("cand", rec.get("id")), rec.get("target"))
    for name, entry in ((summary.get("baselines") or {}).get("losses") or {}).items():
        proxy.setdefault(name, (("baseline", name), entry.get("target_mean")))
    names, xs, ys, seen = [], [], [], set()
    for name, value in retrain.items():
        key, score = proxy.get(name, (None, None))
        if key is None or score is None or key in seen:
            continue
        seen.add(key)
        names.append(name)
        xs.append(float(score))
        ys.append(value)
    return {"rho": spearman(xs, ys), "n": len(names), "losses": names, "proxy": xs, "retrain": ys}


def formula_item(formula: str | None) -> str:
    """The rest of the markdown list item "- formula": the formula as inline code, or for a multi-branch loss
    (`name: formula` lines) one sub-item per branch."""
    lines = [line for line in str(formula or "").splitlines() if line.strip()] or [""]
    if len(lines) == 1:
        return f": `{lines[0]}`"
    return " (one line per branch):" + "".join(f"\n  - `{line}`" for line in lines)


def formula_cell(formula: str | None) -> str:
    """A formula for a markdown table cell: one inline code span per branch, separated by <br>."""
    lines = [line for line in str(formula or "").splitlines() if line.strip()] or [""]
    return "<br>".join(f"`{line}`".replace("|", "\\|") for line in lines)  # GFM: \| even in code spans


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


def _baseline_row(name: str, entry: dict[str, Any]) -> str:
    mean, std = entry.get("target_mean"), entry.get("target_std")
    value = "—" if mean is None else f"{mean:.4f}"
    if mean is not None and len(entry.get("seeds_ok") or []) > 1:
        value += f" ± {std:.4f}"
    seeds = ", ".join(str(r["seed"]) for r in entry.get("runs") or [])
    return f"| {name} | {value} | {seeds} | {entry.get('status')} |"


@task(name="write-report", cache_policy=NO_CACHE)
def write_report(params: Params, pipeline_wall_s: float | None = None) -> dict[str, Any]:
    """Write report.md, metrics.json, progress.csv and progress.png; returns the metrics dict."""
    from flows.run_config import losses_dir, reports_dir

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
    baselines = baseline_lines(summary)
    plot_progress(rows, metric, out / "progress.png", baselines)
    comparison_path = out / "comparison.json"
    comparison = read_json(comparison_path) if comparison_path.exists() else None
    retrain = _retrain_metrics(comparison, metric) if comparison is not None else {}
    best = summary["best"]
    timing = summary.get("timing", {})
    from components.tasks.base import get_task

    margin, margin_line = ce_margin(summary, metric, get_task(params.search.task).reference_baseline)
    validity = proxy_validity(summary, comparison, metric) if comparison is not None else None
    metrics = {
        "best_proxy_target": best.get("target"),
        "top5_mean": summary.get("top5_mean"),
        "funnel": summary["counters"],
        "retrain": retrain,
        "search_overhead_share": timing.get("overhead_share"),
        "proxy_baselines": {b["name"]: b["mean"] for b in baselines},
        **margin,
        "proxy_spearman": None if validity is None else validity["rho"],
        "proxy_spearman_n": 0 if validity is None else validity["n"],
    }
    write_json_atomic(out / "metrics.json", metrics)

    funnel = "\n".join(f"| {k} | {v} |" for k, v in summary["counters"].items())
    top = "\n".join(
        f"| {i} | {t['id']} | {formula_cell(t['formula'])} | {t['target']:.4f} |" for i, t in enumerate(summary["top"], 1)
    )
    timing_rows = "\n".join(f"| {k} | {v} |" for k, v in timing.items())
    baseline_rows = "\n".join(_baseline_row(name, entry) for name, entry in
                              ((summary.get("baselines") or {}).get("losses") or {}).items())
    baseline_block = (f"| loss | proxy {metric} (mean ± std) | seeds | status |\n|---|---|---|---|\n{baseline_rows}"
                      if baseline_rows else "(this search's summary has no proxy baselines)")
    if validity is None:
        validity_line = "Re-training not run: no rank correlation yet."
    elif validity["rho"] is None:
        validity_line = (f"Spearman ρ not defined: {validity['n']} re-trained loss(es) with a proxy score "
                         f"({', '.join(validity['losses']) or 'none'}); it needs at least 3 with distinct scores.")
    else:
        validity_line = (f"Spearman ρ = **{validity['rho']:.3f}** between the proxy {metric} and the re-training "
                         f"{metric} over {validity['n']} re-trained losses ({', '.join(validity['losses'])}); "
                         "1 = the proxy ranks the losses as the full training does.")
    text = f"""# Lossforge report: {params.search.task}, target metric {metric}

Search `{summary['search_id']}` ({summary['method']}, budget {summary['budget']} proxy evaluations,
profile `{params.profile}`).

## Best loss

- formula{formula_item(best['formula'])}
- canonical: `{best['canonical']}`
- hash: `{best['hash']}`, candidate {best['id']} (parent {best.get('parent_id')}, {best.get('mutation')})
- proxy {metric}: {best['target']:.4f}
- files: `{losses_dir(params) / 'best.json'}` (loss JSON), `{losses_dir(params) / 'best.py'}` (nn.Module)

## Proxy baselines (same proxy config and data split as the candidates)

{margin_line}

{baseline_block}

## Re-training comparison (test images, never seen by the search)

{_table_markdown(out / 'comparison.md')}
## Proxy validity

{validity_line}

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
    from flows.run_config import make_tracker, reports_dir

    metrics = write_report(params, pipeline_wall_s)
    tracker = make_tracker(params)
    if tracker is not None:
        out = reports_dir(params)
        tracker.start()
        flat = {f"retrain_{k}": v for k, v in metrics["retrain"].items()}
        for key in ("proxy_spearman", "proxy_margin_vs_ce"):
            if metrics.get(key) is not None:
                flat[key] = metrics[key]
        tracker.log_final(flat, [out / "report.md", out / "progress.png", out / "progress.csv",
                                 out / "metrics.json"], artifact_path="report")
        tracker.finish()
    return metrics
