"""Proxy baselines: CE and the `retrain.baselines` trained on the search's own proxy task.

At the start of every search, `run_proxy_baselines` (one call from `search_loop_flow`) trains CE (always)
and each loss of `retrain.baselines` on the same proxy as the candidates: the same `proxy` config, the
same S_train / S_eval manifests, the same target metric, through the same `proxy-training` Prefect
task and task runner. With `proxy.seeds` (default: just `proxy.seed`, the seed the candidates train
with) every baseline is trained once per seed, so the report can give a mean ± std and say whether the
best searched loss beats CE by more than the seed-to-seed spread. Baselines of one seed are trained side
by side, `search.losses_per_training` per task, like the candidates.

Resume: each training writes its result atomically to `<state>/baselines/results/<id>-<hash>.json` (kept
apart from the candidates' `results/`), where the id names the loss and the seed and the hash covers the
loss spec, the seed, the target metric and the proxy config. A re-run reads the stored results back and
trains only the missing ones; a training that crashed (retries used up) is stored nowhere and is tried
again next time. The summary (`lossforge.proxy-baselines/1`: mean ± std of the target and of all six
metrics per baseline, and every run) goes to `<state>/baselines.json`, is copied into the search summary
(`losses/<task>-<metric>/search.json`, section `baselines`) and is drawn on the progress plot. MLflow: one
nested run per (baseline, seed), tagged `baseline=true`, logged once (SearchTracker.sync_baselines), plus
`proxy_baseline_<name>_mean` / `_std` on the parent run.
"""

from __future__ import annotations

import dataclasses
import hashlib
import json
import os
import re
from pathlib import Path
from typing import TYPE_CHECKING, Any

from prefect import get_run_logger

from components.atomic_io import read_json, write_json_atomic
from components.errors import LossforgeError
from components.params import Params
from components.stats import mean_std
from components.tasks.base import get_task
from flows.run_config import baseline_specs, proxy_seeds
from flows.tasks import proxy_training, read_result

if TYPE_CHECKING:
    from flows.tracking import SearchTracker

BASELINES_FORMAT = "lossforge.proxy-baselines/1"
FOLDER = "baselines"      # <state>/baselines/results/<id>-<hash>.json
SUMMARY = "baselines.json"  # <state>/baselines.json


def slug(name: str) -> str:
    """A file- and MLflow-safe form of a loss name (e.g. `focal(gamma=2)` -> `focal_gamma_2`)."""
    return re.sub(r"[^A-Za-z0-9_.-]+", "_", name).strip("_") or "loss"


def jobs(params: Params) -> list[dict[str, Any]]:
    """One job per (baseline, seed): {"id", "hash", "loss", "name", "seed"} (CE first, seeds in order)."""
    loss_name = get_task(params.search.task).loss_name
    cfg = params.config("proxy")
    metric = params.search.metric
    out = []
    for seed in proxy_seeds(params):
        proxy = dataclasses.asdict(dataclasses.replace(cfg, seed=seed))
        for spec in baseline_specs(params):
            name = loss_name(spec)
            blob = json.dumps({"loss": spec, "seed": seed, "metric": metric, "proxy": proxy}, sort_keys=True,
                              default=str)
            out.append({"id": f"baseline-{slug(name)}-s{seed}", "hash": hashlib.sha256(blob.encode()).hexdigest()[:16],
                        "loss": spec, "name": name, "seed": seed})
    return out


def train_seeded_jobs(params: Params, data: dict[str, str], folder: Path, todo: list[dict[str, Any]],
                      what: str = "proxy training") -> dict[str, dict[str, Any]]:
    """Train jobs {"id", "hash", "loss", "seed"} on the search's proxy through the `proxy-training` task.

    Jobs of one seed go in waves of `search.losses_per_training`; every result is stored atomically under
    `folder` by the task itself (so a later run reads it back). Returns id -> result; a wave whose task
    failed after its retries is reported "failed" (stored nowhere, tried again on the next run).
    """
    import torch

    logger = get_run_logger()
    cfg = params.config("proxy")
    workers = params.search.workers
    threads = max(1, (os.cpu_count() or 1) // workers)
    group = params.search.losses_per_training
    threads_before = torch.get_num_threads()
    done: dict[str, dict[str, Any]] = {}
    submitted = []
    for seed in dict.fromkeys(j["seed"] for j in todo):
        same_seed = [j for j in todo if j["seed"] == seed]
        for start in range(0, len(same_seed), group):
            chunk = same_seed[start:start + group]
            future = proxy_training.with_options(retries=params.search.task_retries, retry_delay_seconds=1).submit(
                [{"id": j["id"], "hash": j["hash"], "loss": j["loss"]} for j in chunk],
                data, dataclasses.replace(cfg, seed=seed), params.search.metric, str(folder), threads,
            )
            submitted.append((future, chunk))
    for future, chunk in submitted:
        try:
            for res in future.result():
                done[str(res["id"])] = dict(res, stored=True)
        except Exception as exc:  # retries used up: reported as failed, trained again on the next run
            logger.warning("%s %s failed: %s", what, [j["id"] for j in chunk], exc)
            for job in chunk:
                done[job["id"]] = {"status": "failed", "metrics": {}, "target": None, "iterations": 0,
                                   "seconds": 0.0, "message": f"{type(exc).__name__}: {exc}"[:2000], "stored": False}
    torch.set_num_threads(threads_before)  # the trainings set the process-wide thread count
    return done


def run_proxy_baselines(params: Params, data: dict[str, str], state: Path,
                        tracker: SearchTracker | None = None) -> dict[str, Any]:
    """Train (or read back) the proxy baselines, write `<state>/baselines.json`, log them; returns the summary."""
    logger = get_run_logger()
    folder = state / FOLDER
    todo = jobs(params)
    done: dict[str, dict[str, Any]] = {}
    for job in todo:
        stored = read_result(folder, job["id"], job["hash"])
        if stored is not None:
            done[job["id"]] = dict(stored, stored=True)
    missing = [j for j in todo if j["id"] not in done]
    logger.info("proxy baselines: %d stored, %d to train", len(done), len(missing))
    done.update(train_seeded_jobs(params, data, folder, missing, "proxy baseline"))

    runs = [dict(done[j["id"]], id=j["id"], hash=j["hash"], key=f"{j['id']}-{j['hash']}", name=j["name"],
                 seed=j["seed"], spec=j["loss"]) for j in todo]
    summary = summarize(params, runs)
    write_json_atomic(state / SUMMARY, summary)
    for name, entry in summary["losses"].items():
        logger.info("proxy baseline %s: %s = %s ± %s (%s)", name, params.search.metric, entry["target_mean"],
                    entry["target_std"], entry["status"])
    if tracker is not None:
        tracker.sync_baselines(r for r in runs if r.get("stored"))
        flat: dict[str, float] = {}
        for name, entry in summary["losses"].items():
            if entry["target_mean"] is not None:
                flat[f"proxy_baseline_{slug(name)}_mean"] = entry["target_mean"]
                flat[f"proxy_baseline_{slug(name)}_std"] = entry["target_std"]
        tracker.log_final(flat, [state / SUMMARY], artifact_path="baselines")
    return summary


def summarize(params: Params, runs: list[dict[str, Any]]) -> dict[str, Any]:
    """The `lossforge.proxy-baselines/1` summary: per baseline, mean ± std over its seeds and every run."""
    seeds = proxy_seeds(params)
    losses: dict[str, dict[str, Any]] = {}
    for run in runs:
        entry = losses.setdefault(run["name"], {"spec": run["spec"], "runs": []})
        entry["runs"].append({k: run.get(k) for k in ("seed", "status", "target", "metrics", "iterations", "seconds",
                                                      "message", "id", "hash")})
    for entry in losses.values():
        ok = [r for r in entry["runs"] if r["status"] == "ok" and r.get("target") is not None]
        bad = next((r for r in entry["runs"] if r["status"] != "ok"), None)
        entry["status"] = "ok" if bad is None else bad["status"]
        entry["seeds_ok"] = [r["seed"] for r in ok]
        entry["target_mean"], entry["target_std"] = mean_std(r["target"] for r in ok)
        entry["metrics_mean"], entry["metrics_std"] = {}, {}
        for m in get_task(params.search.task).metrics:
            mean, std = mean_std((r.get("metrics") or {}).get(m) for r in ok)
            if mean is not None:
                entry["metrics_mean"][m], entry["metrics_std"][m] = mean, std
    return {
        "format": BASELINES_FORMAT,
        "metric": params.search.metric,
        "seeds": seeds,
        "candidate_seed": int(params.config("proxy").seed),
        "losses": losses,
    }


def load_baselines(state: Path) -> dict[str, Any] | None:
    """The stored summary of this search's proxy baselines (None before they ran)."""
    path = Path(state) / SUMMARY
    if not path.exists():
        return None
    try:
        data = read_json(path)
    except LossforgeError:
        return None
    return data if isinstance(data, dict) and data.get("format") == BASELINES_FORMAT else None
