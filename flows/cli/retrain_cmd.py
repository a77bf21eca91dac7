"""`lossforge retrain`: re-train the best searched loss against the baselines (after `lossforge search`)."""

from __future__ import annotations

from typing import Optional

import typer

from flows.cli.common import user_errors
from flows.cli.search_cmd import PARAMS_OPT, PROFILE_OPT, prepare_run, run_and_print


@user_errors
def retrain(
    params_file: str = PARAMS_OPT,
    profile: Optional[str] = PROFILE_OPT,
    metric: Optional[str] = typer.Option(None, help="Target metric of the search to re-train."),
    verbose: bool = typer.Option(False, "--verbose", "-v", help="Show Prefect's logs."),
) -> None:
    """Re-train the searched loss and the `retrain.baselines` on all training images; compare on the test set."""
    params = prepare_run(params_file, profile, ("retrain", "report"), verbose, metric=metric)
    run_and_print(params, ("retrain", "report"))
