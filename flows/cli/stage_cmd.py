"""`lossforge stage NAME`: run one pipeline stage (what dvc.yaml calls): prepare, split, search, retrain, report."""

from __future__ import annotations

from typing import Optional

import typer

from components.errors import LossforgeError
from flows.cli.common import user_errors
from flows.cli.search_cmd import PARAMS_OPT, PROFILE_OPT, prepare_run, run_and_print

STAGE_NAMES = ("prepare", "split", "search", "retrain", "report")


@user_errors
def stage(
    name: str = typer.Argument(..., help=f"One of: {', '.join(STAGE_NAMES)}."),
    params_file: str = PARAMS_OPT,
    profile: Optional[str] = PROFILE_OPT,
    verbose: bool = typer.Option(False, "--verbose", "-v", help="Show Prefect's logs."),
) -> None:
    """Run one stage of the pipeline with the settings of params.yaml (used by `dvc repro`)."""
    if name not in STAGE_NAMES:
        raise LossforgeError(f"stage: unknown stage {name!r} (known: {', '.join(STAGE_NAMES)})")
    params = prepare_run(params_file, profile, (name,), verbose)
    run_and_print(params, (name,), show_progress=name == "search")
