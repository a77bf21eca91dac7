"""Prefect deployments of the search pipeline, served by `lossforge serve` against a Prefect server.

The deployment exposes the typed parameters of `search_pipeline` (task, metric, method, budget, workers,
runner, dataset, profile, params file, ...) so the Prefect UI's "Run" button shows a form for them.
"""

from __future__ import annotations

from typing import Any

DEFAULT_NAME = "lossforge-search"


def build_deployments(name: str = DEFAULT_NAME, profile: str | None = None, params_file: str = "params.yaml",
                      limit: int | None = None) -> list[Any]:
    """The runner deployments to serve (one for the whole pipeline)."""
    from flows.search_flow import search_pipeline

    defaults: dict[str, Any] = {"params_file": params_file}
    if profile is not None:
        defaults["profile"] = profile
    return [
        search_pipeline.to_deployment(
            name=name,
            parameters=defaults,
            description="Search a loss aligned with the target metric: prepare → split → search → re-train → report.",
            tags=["lossforge"],
            concurrency_limit=limit,
        )
    ]


def serve_deployments(name: str = DEFAULT_NAME, profile: str | None = None, params_file: str = "params.yaml",
                      limit: int | None = None) -> None:
    """Register the deployments with the Prefect server (PREFECT_API_URL) and run their flow runs until stopped."""
    from prefect import serve

    serve(*build_deployments(name, profile, params_file, limit), print_starting_message=True)
