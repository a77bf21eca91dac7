"""The search pipeline as Prefect flows: prepare data → split → search loop → re-train → report.

`search_pipeline` (flow "lossforge-search") is what `lossforge search`, `lossforge demo`, the DVC stages and
the Prefect deployments run. Its parameters are typed, so the Prefect UI shows a form for them; anything
not given comes from params.yaml (with its profile).

The search loop (`search_loop_flow`) is steady-state: it keeps `search.workers` proxy trainings running
through the configured task runner while the main thread generates and screens the next candidates;
each result is written to disk by the training task itself, then reported to the search method (in hand-out
order, so the run is reproducible from its seed), the search state is checkpointed (atomic JSON) and the MLflow
tracker logs what is new. Re-running with the same parameters resumes from the checkpoint: finished evaluations
are read back, never trained again, and told in the same turn as in an uninterrupted run (tested).
"""

from __future__ import annotations

import os
import time
from pathlib import Path
from typing import TYPE_CHECKING, Any, Literal, Optional

from prefect import flow, get_run_logger, task
from prefect.cache_policies import NO_CACHE

from components.atomic_io import write_json_atomic
from components.errors import LossforgeError
from components.params import Params
from flows import progress
from components.search.method import SearchMethod, get_method_class, make_method, method_names
from components.tasks.base import all_metric_names, task_names
from flows.methods import log_method_tracking
from flows.run_config import data_spec, losses_dir, make_tracker, reports_dir, resolve_params, state_dir  # noqa: F401
from flows.task_runners import runner_for, share_api_with_workers
from flows.tasks import open_split, prepare_data, proxy_training, read_result, split_dataset
from flows.timing import Timeline

if TYPE_CHECKING:
    from flows.tracking import SearchTracker

Runner = Literal["threads", "processes", "ray", "dask"]
# the Prefect UI's form offers the registered tasks, metrics and methods as choices (read from the registries)
TaskName = Literal[tuple(task_names())]  # type: ignore[valid-type]
MetricName = Literal[tuple(all_metric_names())]  # type: ignore[valid-type]
MethodName = Literal[tuple(method_names())]  # type: ignore[valid-type]


# ------------------------------------------------------------------------------------------ parameters
# ------------------------------------------------------------------------------------------ small tasks
@task(name="generate-and-screen", cache_policy=NO_CACHE)
def generate_and_screen(method: SearchMethod, n: int) -> list[dict[str, Any]]:
    """Generate/mutate, screen (loss rejection + equivalence) and hand out up to n candidates."""
    return method.ask(n)


@task(name="population-update", cache_policy=NO_CACHE, retries=2, retry_delay_seconds=0.2)
def population_update(method: SearchMethod, results: list[dict[str, Any]], checkpoint: str) -> list[dict[str, Any]]:
    """Tell finished proxy results (stored JSON records) to the method and checkpoint the search state (atomic
    JSON). Idempotent, so Prefect's retries are safe: a result the method already holds is not told again."""
    from components.tasks.base import ProxyResult

    told = {str(r["id"]): r for r in method.history}
    records = []
    for res in results:
        record = told.get(str(res["id"]))
        if record is None:
            record = method.tell(res["id"], ProxyResult.from_dict(res))
        records.append(record)
    method.save(checkpoint)
    return records


# ------------------------------------------------------------------------------------------ data flows
@flow(name="lossforge-prepare", log_prints=True)
def prepare_flow(params: Params) -> str:
    """Generate the embedded dataset (or check the user's dataset is there); returns its path."""
    return prepare_data(params.data.model_dump(), params.search.task)


@flow(name="lossforge-split", log_prints=True)
def split_flow(params: Params) -> dict[str, str]:
    """Write the split manifests (train = S_train, eval = S_eval, test) of the prepared dataset."""
    if not Path(params.data.path).exists():
        raise LossforgeError(f"data.path: dataset not found: {params.data.path} (run the prepare stage first)")
    manifests = split_dataset(params.data.path, params.split.model_dump(), params.search.task)
    return {"path": params.data.path, "task": params.search.task, **manifests}


# ------------------------------------------------------------------------------------------ search loop
def _tracker_record(method: SearchMethod, record: dict[str, Any], folder: Path) -> dict[str, Any]:
    """What the MLflow tracker logs of one history record (loss files written to `folder`)."""
    from flows.tracking import branch_formulas  # only imported when tracking (it imports mlflow)

    stem = f"candidate-{record['id']}-{record['hash']}"
    json_path, py_path = method.write_loss_files(record, folder, stem)
    return {
        "key": f"{record['id']}-{record['hash']}",
        "id": record["id"],
        "hash": record["hash"],
        "canonical": record.get("canonical", ""),
        "formula": record.get("formula", ""),
        "branch_formulas": branch_formulas(record.get("graph")),  # {} unless a multi-branch graph
        "parent_id": record.get("parent_id"),
        "mutation": record.get("mutation", ""),
        "screening_g": record.get("screening_score"),
        "status": record["status"],
        "metrics": record.get("metrics") or {},
        "target": record.get("target"),
        "seconds": record.get("seconds"),
        "iterations": record.get("iterations"),
        "message": record.get("message", ""),
        "loss_json": str(json_path),
        "module_py": str(py_path),
    }


class _ReadBack:
    """Results of a hand-out that finished before a kill, read back from disk: it takes a training slot and
    is told in its turn, exactly where the uninterrupted run told it."""

    def __init__(self, results: list[dict[str, Any]]):
        self.results = results


def _failed(cands: list[dict[str, Any]], exc: BaseException) -> list[dict[str, Any]]:
    now = time.time()
    return [
        {"id": c["id"], "hash": c["hash"], "status": "failed", "metrics": {}, "target": None, "iterations": 0,
         "seconds": 0.0, "message": f"{type(exc).__name__}: {exc}"[:2000], "started": now, "finished": now}
        for c in cands
    ]


@flow(name="lossforge-search-loop", log_prints=True)
def search_loop_flow(params: Params, data: dict[str, str]) -> dict[str, Any]:
    """Run (or resume) the search until the proxy budget is used; returns the search summary."""
    from components.tasks.base import get_task

    task = get_task(params.search.task)
    logger = get_run_logger()
    timeline = Timeline()
    state = state_dir(params)
    state.mkdir(parents=True, exist_ok=True)
    checkpoint = state / "checkpoint.json"
    write_json_atomic(state / "params.json", params.model_dump(mode="json"))

    with timeline.measure("screening"):  # the probe problem: B samples + a random network's predictions
        train_ds = open_split(data["path"], data["train"], task.name)
        screen_cfg = params.config("screening")
        problem = None
        if get_method_class(params.search.method).uses_screening_problem:
            problem = task.screening_problem(train_ds, params.search.metric, samples=screen_cfg.samples,
                                             size=params.section_extra("screening", "size", 64), seed=params.search.seed)
        method = make_method(params, problem, state)

    def warn(message: str) -> None:  # "N candidates rejected in a row, best g ..." reaches the log and the console
        logger.warning(message)
        progress.emit("warning", message=message)

    method.on_warning = warn
    resumed = checkpoint.exists()
    logger.info("search %s: %s (%d results so far)", params.search_id, "resumed" if resumed else "new",
                len(method.history))

    tracker = make_tracker(params)
    loss_files = state / "losses"
    if tracker is not None:
        tracker.start()
    synced = 0  # history records logged so far: each update logs only the new ones (history is append-only)

    def sync_new() -> None:
        nonlocal synced
        history = method.history
        tracker.sync(_tracker_record(method, r, loss_files) for r in history[synced:])
        synced = len(history)

    if tracker is not None:
        sync_new()

    # --- proxy baselines (CE + retrain.baselines on this proxy, stored under the state dir; flows/proxy_baselines.py)
    from flows.proxy_baselines import run_proxy_baselines
    with timeline.measure("training"):
        baselines = run_proxy_baselines(params, data, state, tracker)
    ce_proxy = ((baselines or {}).get("losses", {}).get(task.reference_baseline) or {}).get("target_mean")
    # --- end proxy baselines

    proxy_cfg = params.config("proxy")
    workers = params.search.workers
    threads = max(1, (os.cpu_count() or 1) // workers)
    torch_threads_before = _torch_threads()
    # screening works on tiny tensors: one intra-op thread. Two OpenMP threads beside busy training workers
    # made it ~3x slower (measured: 12 candidates in 80 s vs 28 s); the trainings set their own count.
    _torch_threads(1)
    group = params.search.losses_per_training
    in_flight: dict[Any, list[dict[str, Any]]] = {}
    budget = params.search.budget
    def emit_progress() -> None:
        best = method.best()
        progress.emit("search", done=_reported(method), total=budget, counters=method.counters,
                      best=None if best is None else best.get("target"), ce=ce_proxy)

    emit_progress()

    def record_results(results: list[dict[str, Any]]) -> None:
        for res in results:
            timeline.add("training", float(res.get("started", 0)), float(res.get("finished", 0)))
        with timeline.measure("update"):
            records = population_update(method, results, str(checkpoint))
        if tracker is not None:
            with timeline.measure("tracking"):
                sync_new()
                curve = method.progress()
                top = curve[-1]["top5_mean"] if curve else None
                tracker.log_search_state(method.counters, len(method.history), top)
                log_method_tracking(method, tracker, final=False)  # method-specific (e.g. PPO's policy μ)
        for rec in records:
            logger.info("candidate %s: %s target=%s", rec["id"], rec["status"], rec.get("target"))
        emit_progress()

    while True:
        # keep `workers` trainings in flight; screening runs here while the workers train
        while len(in_flight) < workers:
            with timeline.measure("screening"):
                cands = generate_and_screen(method, group)
            if not cands:
                break
            stored = [read_result(state, c["id"], c["hash"]) for c in cands]
            if all(s is not None for s in stored):  # finished before a kill: never trained again, and told
                in_flight[_ReadBack(stored)] = cands  # in its turn, as the uninterrupted run told it
                continue
            future = proxy_training.with_options(retries=params.search.task_retries, retry_delay_seconds=1).submit(
                [{"id": c["id"], "hash": c["hash"], "loss": c["loss"]} for c in cands],
                data, proxy_cfg, params.search.metric, str(state), threads,
            )
            in_flight[future] = cands
        if not in_flight:
            break
        # results are told in hand-out order, not as they finish: what the method breeds next never depends on
        # which training happened to end first, so a run is reproducible from its seed (and a resumed run
        # takes the uninterrupted run's path). Cost: a slot that frees early waits for the older training.
        future = next(iter(in_flight))
        cands = in_flight.pop(future)
        try:
            results = future.results if isinstance(future, _ReadBack) else future.result()
        except Exception as exc:  # retries used up: record as failed, the search goes on
            logger.warning("proxy training of %s failed: %s", [c["id"] for c in cands], exc)
            results = _failed(cands, exc)
        record_results(results)

    from flows.confirm_top import confirm_top  # the k best again with the other proxy seeds (search.confirm_top)
    with timeline.measure("training"):
        confirmed = confirm_top(params, method, data, state)
    timeline.end = time.time()
    _torch_threads(torch_threads_before)  # the trainings shared the cores; give them all back
    summary = write_search_outputs(params, method, timeline, confirmed)
    if tracker is not None:
        best = summary.get("best") or {}
        tracker.log_final(
            {"best_formula": best.get("formula", ""), "best_canonical": best.get("canonical", ""),
             "best_hash": best.get("hash", ""), "best_proxy_target": best.get("target") or float("nan"),
             "orchestration_overhead_share": summary["timing"]["overhead_share"]},
            [losses_dir(params) / "best.json", losses_dir(params) / "best.py", losses_dir(params) / "search.json"],
            artifact_path="search",
        )
        tracker.log_search_state(method.counters, len(method.history), summary.get("top5_mean"))
        log_method_tracking(method, tracker, final=True)
        tracker.finish()
    return summary


def _torch_threads(value: int | None = None) -> int:
    """torch's intra-op thread count (process-wide); set it when `value` is given."""
    import torch

    if value is not None:
        torch.set_num_threads(value)
    return torch.get_num_threads()


def _reported(method: SearchMethod) -> int:
    c = method.counters
    return int(c.get("evaluated", 0) + c.get("nan_stopped", 0) + c.get("failed", 0))


def write_search_outputs(params: Params, method: SearchMethod, timeline: Timeline,
                         confirmed: dict[Any, list[Any]] | None = None) -> dict[str, Any]:
    """losses/<task>-<metric>/: best.json + best.py, the top-k losses, search.json (summary + progress curve).

    With `confirmed` (id -> targets of confirmation trainings), the best and the top-k are ranked by the
    mean over the search score and those (components/search/confirmation.py)."""
    from components.search.confirmation import confirmed_ranking

    out = losses_dir(params)
    out.mkdir(parents=True, exist_ok=True)
    evaluated = sorted(
        (r for r in method.history if r["status"] == "evaluated" and r.get("target") is not None),
        key=lambda r: (-r["target"], r["id"]),
    )
    if confirmed:  # evolution with search.confirm_top: best mean over the proxy seeds
        ranked_all = confirmed_ranking(evaluated, confirmed)
        best = ranked_all[0]
    else:  # the method's own notion of best (PPO: the best policy mean μ, not the luckiest sample)
        ranked_all, best = evaluated, method.best()
    if best is None:
        raise LossforgeError(
            f"search {params.search_id}: no candidate finished with a valid score "
            f"(funnel: {method.counters}); raise search.budget or check the proxy settings"
        )
    import shutil

    for stale in (out / "best.json", out / "best.py"):  # a resumed or longer search may choose another loss
        stale.unlink(missing_ok=True)
    shutil.rmtree(out / "top", ignore_errors=True)
    best_json, _ = method.write_loss_files(best, out, "best")
    ranked = ranked_all[: params.report.top_k]
    top = []
    for rank, rec in enumerate(ranked, 1):
        method.write_loss_files(rec, out / "top", f"rank{rank}")
        top.append({k: rec.get(k) for k in ("id", "hash", "formula", "canonical", "target", "metrics",
                                             "parent_id", "mutation", "target_single", "target_std", "proxy_runs")})
    curve = method.progress()
    from flows.proxy_baselines import load_baselines  # proxy baselines section of search.json
    summary = {
        "format": "lossforge.search-summary/1",
        "search_id": params.search_id,
        "task": params.search.task,
        "metric": params.search.metric,
        "method": params.search.method,
        "budget": params.search.budget,
        "counters": method.counters,
        "best_loss": {"type": method.loss_type, "path": str(best_json)},
        "best": {k: best.get(k) for k in ("id", "hash", "formula", "canonical", "target", "metrics",
                                          "parent_id", "mutation", "screening_score", "target_single",
                                          "target_std", "proxy_runs")},
        "top": top,
        "top5_mean": curve[-1]["top5_mean"] if curve else None,
        "progress": curve,
        "candidates": [
            {k: r.get(k) for k in ("id", "hash", "status", "target", "parent_id", "mutation", "seconds")}
            for r in method.history
        ],
        "timing": timeline.summary(),
        "baselines": load_baselines(state_dir(params)),  # proxy baselines (flows/proxy_baselines.py)
    }
    write_json_atomic(out / "search.json", summary)
    return summary


# ------------------------------------------------------------------------------------------ pipeline
@flow(name="lossforge-search", log_prints=True)
def search_pipeline(
    task: Optional[TaskName] = None,
    metric: Optional[MetricName] = None,
    method: Optional[MethodName] = None,
    budget: Optional[int] = None,
    workers: Optional[int] = None,
    runner: Optional[Runner] = None,
    dataset: Optional[str] = None,
    profile: Optional[str] = None,
    params_file: str = "params.yaml",
    retrain: bool = True,
    tracking_uri: Optional[str] = None,
) -> dict[str, Any]:
    """Search a loss for `metric` end to end: prepare → split → search → re-train → report.

    Parameters left empty come from params.yaml (and its profile). `task`: a registered task
    (segmentation, detection). `dataset`: a VOC/COCO/folder dataset path to use instead of the embedded
    shapes data.
    """
    params = resolve_params(params_file, profile, metric, method, budget, workers, runner, dataset, tracking_uri,
                            task=task)
    stages = STAGES if retrain else tuple(s for s in STAGES if s != "retrain")
    from flows.run_config import check_inputs

    check_inputs(params, stages)  # a deployment run checks settings and every data file as the CLI does, first
    return run_stages(params, stages)


from flows.run_config import STAGES  # noqa: E402 (re-exported: the stages in order)


def run_stages(params: Params, stages: tuple[str, ...] = STAGES) -> dict[str, Any]:
    """Run the given stages in order (shared by the pipeline flow, the CLI and the DVC stages)."""
    from flows.report import report_flow
    from flows.retrain_flow import retrain_flow

    t0 = time.time()
    out: dict[str, Any] = {"search_id": params.search_id}
    data: dict[str, str] | None = None
    runner = runner_for(params.search) if "search" in stages else None  # a cluster that does not answer: now
    for stage in STAGES:
        if stage not in stages:
            continue
        progress.emit("stage", name=stage)
        if stage == "prepare":
            out["data"] = prepare_flow(params)
        elif stage == "split":
            data = split_flow(params)
        elif stage == "search":
            with share_api_with_workers(params.search.runner):  # processes, dask and ray workers: same API
                out["search"] = search_loop_flow.with_options(task_runner=runner)(params, data or data_spec(params))
        elif stage == "retrain":
            out["retrain"] = retrain_flow(params, data or data_spec(params))
        elif stage == "report":
            wall = time.time() - t0 if "search" in stages else None
            out["report"] = report_flow(params, pipeline_wall_s=wall)
    progress.emit("stage", name="done")
    return out


@flow(name="lossforge-stages", log_prints=True)
def stages_flow(params: Params, stages: list[str]) -> dict[str, Any]:
    """Run some stages of the pipeline with already validated parameters (the CLI and DVC stages)."""
    return run_stages(params, tuple(stages))
