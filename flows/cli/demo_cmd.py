"""`lossforge demo`: a small search end to end on the embedded dataset (CPU, a few minutes)."""

from __future__ import annotations

import time
from typing import Optional

import typer

from flows.cli.common import user_errors
from flows.cli.runtime import console
from flows.cli.search_cmd import PARAMS_OPT, prepare_run, run_and_print


@user_errors
def demo(
    params_file: str = PARAMS_OPT,
    task: Optional[str] = typer.Option(None, help="Task: segmentation, detection or instance_segmentation "
                                                  "(default: params.yaml's)."),
    metric: Optional[str] = typer.Option(None, help="Target metric (default: params.yaml's, or the task's)."),
    verbose: bool = typer.Option(False, "--verbose", "-v", help="Show Prefect's logs."),
) -> None:
    """Run the `demo` profile: embedded shapes data → split → search → re-train → report."""
    from flows.run_config import STAGES  # not flows.search_flow: Prefect must not be imported yet

    t0 = time.time()
    params = prepare_run(params_file, "demo", STAGES, verbose, task=task, metric=metric)
    console.print(f"[bold]Lossforge demo[/]: searching a loss for {params.search.metric} "
                  f"({params.search.budget} proxy evaluations, {params.search.workers} workers)")
    run_and_print(params, STAGES)
    uri = params.tracking.uri
    console.print(f"\ndone in {time.time() - t0:.0f} s. Where to look:")
    console.print(f"  report      : reports/{params.search_name}/report.md (+ progress.png, comparison.md)")
    console.print(f"  losses      : losses/{params.search_name}/best.json, best.py")
    console.print(f"  MLflow UI   : uv run mlflow ui --backend-store-uri {uri} --port 5000  -> http://127.0.0.1:5000")
    console.print("  Prefect UI  : PREFECT_HOME=.prefect uv run prefect server start  -> http://127.0.0.1:4200")
