"""`lossforge serve`: serve the search deployment so flow runs can be started from the Prefect UI."""

from __future__ import annotations

import os
from typing import Optional

import typer

from components.errors import LossforgeError
from flows.cli.common import user_errors
from flows.cli.runtime import configure_prefect, console
from flows.cli.search_cmd import PARAMS_OPT, PROFILE_OPT


@user_errors
def serve(
    params_file: str = PARAMS_OPT,
    profile: Optional[str] = PROFILE_OPT,
    name: str = typer.Option("lossforge-search", help="Deployment name."),
    limit: Optional[int] = typer.Option(None, help="At most this many flow runs at once."),
) -> None:
    """Serve the `lossforge-search` deployment against the Prefect server in PREFECT_API_URL."""
    if not os.environ.get("PREFECT_API_URL"):
        raise LossforgeError(
            "serve: PREFECT_API_URL is not set; start a server (`prefect server start`) and "
            "export PREFECT_API_URL=http://127.0.0.1:4200/api"
        )
    configure_prefect(verbose=True)
    from components.params import load_params
    from flows.deployments import serve_deployments

    load_params(params_file, profile)  # fail now on a bad params.yaml, not in the first flow run
    console.print(f"serving deployment 'lossforge-search/{name}' on {os.environ['PREFECT_API_URL']} (Ctrl-C stops)")
    serve_deployments(name, profile, params_file, limit)
