"""After the search: train the `search.confirm_top` best candidates with the other proxy seeds, so the
searched loss is chosen by its mean over as many seeds as the CE baseline (components/search/confirmation.py).

Results are stored under `<state>/confirm/results/` like every proxy training (a resumed search reads
them back); the trainings go through the same `proxy-training` task and task runner as the candidates.
"""

from __future__ import annotations

import hashlib
import json
from pathlib import Path
from typing import Any

from prefect import get_run_logger

from components.search.confirmation import confirmation_seeds
from components.params import Params
from flows.proxy_baselines import train_seeded_jobs
from flows.run_config import proxy_seeds
from flows.tasks import read_result

FOLDER = "confirm"


def confirm_top(params: Params, method: Any, data: dict[str, str], state: Path) -> dict[Any, list[Any]]:
    """id -> confirmation targets (one per extra seed) of the k best evaluated candidates ({} when off)."""
    k = params.search.confirm_top
    seeds = confirmation_seeds(proxy_seeds(params), params.config("proxy").seed)
    if k <= 0 or not seeds or method.loss_type != "graph":  # PPO keeps its own best (the policy mean μ)
        return {}
    ranked = sorted((r for r in method.history if r["status"] == "evaluated" and r.get("target") is not None),
                    key=lambda r: (-r["target"], r["id"]))[:k]
    folder = state / FOLDER
    todo, done = [], {}
    for rec in ranked:
        spec = method.loss_spec(rec)
        for seed in seeds:
            blob = json.dumps({"loss": spec, "seed": seed}, sort_keys=True, default=str)
            job = {"id": f"confirm-{rec['id']}-s{seed}", "hash": hashlib.sha256(blob.encode()).hexdigest()[:16],
                   "loss": spec, "seed": seed}
            stored = read_result(folder, job["id"], job["hash"])
            if stored is not None:
                done[job["id"]] = stored
            else:
                todo.append(job)
    logger = get_run_logger()
    logger.info("confirming the %d best candidates with proxy seeds %s: %d trainings to run", len(ranked), seeds,
                len(todo))
    done.update(train_seeded_jobs(params, data, folder, todo, "confirmation training"))
    out: dict[Any, list[Any]] = {}
    for rec in ranked:
        values = []
        for seed in seeds:
            res = done.get(f"confirm-{rec['id']}-s{seed}") or {}
            values.append(res.get("target") if res.get("status") == "ok" else None)
        out[rec["id"]] = values
        logger.info("candidate %s: proxy %s %.4f, confirmation %s", rec["id"], params.search.metric, rec["target"],
                    values)
    return out
