"""`lossforge search`: search a loss end to end (prepare → split → search → re-train → report)."""

from __future__ import annotations

import os
import signal
from pathlib import Path
from typing import Any, Optional

import typer
from rich.markup import escape

from components.errors import LossforgeError
from components.params import RUNNERS
from flows.cli.common import err_console, user_errors
from flows.cli.embedded_server import start_embedded_server
from flows.cli.runtime import (configure_prefect, console, end_worker_processes, progress_display,
                               quiet_prefect_console, route_prefect_sigterm, stop_on_signals)
from flows.stopping import STOP_FILE, STOP_FILE_ENV

PARAMS_OPT = typer.Option("params.yaml", "--params", "-p", help="The params.yaml to read.")
PROFILE_OPT = typer.Option(None, "--profile", help="Profile of params.yaml to apply (default: its `profile:` key).")


def check_choice(option: str, value: Optional[str], known: tuple[str, ...]) -> None:
    """A one-line error for an unknown option value."""
    if value is not None and value not in known:
        raise LossforgeError(f"{option}: unknown value {value!r} (known: {', '.join(known)})")


def prepare_run(params_file: str, profile: Optional[str], stages: tuple[str, ...], verbose: bool = False,
                **overrides: Any):
    """Validate everything a run needs before anything is written; returns the Params."""
    from components.params import load_params
    from components.search.method import method_names
    from components.tasks.base import get_task, task_names

    check_choice("--task", overrides.get("task"), tuple(task_names()))
    if overrides.get("metric") is not None:
        task_name = overrides.get("task") or load_params(params_file, profile=profile).search.task
        check_choice("--metric", overrides["metric"], get_task(task_name).metrics)
    check_choice("--method", overrides.get("method"), tuple(method_names()))
    check_choice("--runner", overrides.get("runner"), RUNNERS)
    for name in ("budget", "workers"):
        if overrides.get(name) is not None and overrides[name] < 1:
            raise LossforgeError(f"--{name}: must be > 0 (got {overrides[name]})")
    if overrides.get("dataset") is not None and not Path(overrides["dataset"]).exists():
        raise LossforgeError(f"--dataset: dataset not found: {overrides['dataset']}")
    from flows.run_config import check_inputs, resolve_params

    params = resolve_params(params_file, profile, **overrides)
    check_inputs(params, stages)
    configure_prefect(verbose)
    if "search" in stages:  # the runner's settings, and a cluster at search.address, answer before anything runs
        from flows.task_runners import runner_for

        runner_for(params.search)
    return params


def run_and_print(params, stages: tuple[str, ...], show_progress: bool = True) -> dict[str, Any]:
    """Run the stages with progress bars and print where the outputs are.

    One process per search: the search state folder is locked first (a second run in the same folder stops
    with one line naming the holder's pid). Ctrl-C / SIGTERM stop the trainings at their next iteration and
    exit with 128 + the signal's number and one line; what finished is kept and a re-run resumes from it."""
    from components.search_lock import search_lock
    from flows.run_config import state_dir
    from flows.stopping import SearchStopped, use_stop_file

    state = state_dir(params)
    with search_lock(state, f"search {params.search_id}"):
        use_stop_file(state)
        try:
            with stop_on_signals():
                start_embedded_server()  # before any flow runs (flows/cli/embedded_server.py)
                from flows.search_flow import losses_dir, reports_dir

                quiet_prefect_console()
                route_prefect_sigterm()
                with progress_display(show_progress):
                    out = _run_in_flow(params, stages)
        except SearchStopped as stop:
            end_worker_processes()
            (state / STOP_FILE).unlink(missing_ok=True)
            sig = getattr(signal, stop.signal_name, signal.SIGINT)
            err_console.print(f"stopped by {stop.signal_name}: what finished is kept (search state {state}); "
                              "run the same command again to resume", highlight=False, soft_wrap=True)
            raise typer.Exit(128 + int(sig)) from None
        finally:
            os.environ.pop(STOP_FILE_ENV, None)  # the CLI called in-process (tests): no stale path for later runs
    if "search" in stages and "search" in out:
        best = out["search"]["best"]
        lines = str(best["formula"]).splitlines() or [""]
        score = f"(proxy {params.search.metric} = {best['target']:.4f})"
        if len(lines) == 1:
            console.print(f"best loss: [bold]{escape(lines[0])}[/]  {score}")
        else:  # a multi-branch loss: one line per branch
            console.print(f"best loss {score}:")
            for line in lines:
                console.print(f"  [bold]{escape(line)}[/]")
        console.print(f"loss files: {losses_dir(params)}/best.json, best.py")
        timing = out["search"].get("timing", {})
        if timing:
            console.print(
                f"search wall time {timing['wall_s']:.1f} s, orchestration overhead "
                f"{100 * timing['overhead_share']:.1f}% (not screening or training)"
            )
    if "report" in stages:
        console.print(f"report: {reports_dir(params)}/report.md")
    return out


def _run_in_flow(params, stages: tuple[str, ...]) -> dict[str, Any]:
    from flows.search_flow import stages_flow

    return stages_flow.with_options(flow_run_name=f"{params.search_id}: {'+'.join(stages)}")(params, list(stages))


@user_errors
def search(
    params_file: str = PARAMS_OPT,
    profile: Optional[str] = PROFILE_OPT,
    task: Optional[str] = typer.Option(None, help="Task: segmentation, detection or instance_segmentation "
                                                  "(default: params.yaml's)."),
    metric: Optional[str] = typer.Option(None, help="Target metric of the task (segmentation: mIoU, BF1, ...; "
                                                    "detection: mAP, AP50, AP75; "
                                                    "instance_segmentation: mAP, AP50, AP75, box_mAP)."),
    method: Optional[str] = typer.Option(None, help="evolution (AutoLoss-Zero), ppo (Auto Seg-Loss) or cse (CSE-AutoLoss, detection)."),
    budget: Optional[int] = typer.Option(None, help="Number of proxy evaluations."),
    workers: Optional[int] = typer.Option(None, help="Proxy trainings in parallel."),
    runner: Optional[str] = typer.Option(None, help="Task runner: threads, processes, ray, dask."),
    dataset: Optional[str] = typer.Option(None, help="Your VOC/COCO/folder dataset instead of the embedded one."),
    retrain: bool = typer.Option(True, "--retrain/--no-retrain", help="Re-train the best loss against baselines."),
    verbose: bool = typer.Option(False, "--verbose", "-v", help="Show Prefect's logs."),
) -> None:
    """Search a loss for the target metric end to end; re-running resumes an interrupted search."""
    from flows.run_config import STAGES  # not flows.search_flow: Prefect must not be imported yet

    stages = STAGES if retrain else tuple(s for s in STAGES if s != "retrain")
    params = prepare_run(params_file, profile, stages, verbose, task=task, metric=metric, method=method,
                         budget=budget, workers=workers, runner=runner, dataset=dataset)
    run_and_print(params, stages)
