"""`lossforge report`: (re)write the report of a search from its outputs."""

from __future__ import annotations

from typing import Optional

import typer

from flows.cli.common import user_errors
from flows.cli.search_cmd import PARAMS_OPT, PROFILE_OPT, prepare_run, run_and_print


@user_errors
def report(
    params_file: str = PARAMS_OPT,
    profile: Optional[str] = PROFILE_OPT,
    metric: Optional[str] = typer.Option(None, help="Target metric of the search to report."),
    verbose: bool = typer.Option(False, "--verbose", "-v", help="Show Prefect's logs."),
) -> None:
    """Write reports/<task>-<metric>/report.md, metrics.json and the progress plot; log them to MLflow."""
    params = prepare_run(params_file, profile, ("report",), verbose, metric=metric)
    run_and_print(params, ("report",), show_progress=False)
