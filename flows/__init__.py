"""Orchestration: Prefect flows, MLflow tracking, the typer CLI (no maths here; the logic is in components/)."""

from flows import fastapi_compat as _fastapi_compat

_fastapi_compat.apply()  # Prefect 3.8's server vs the locked FastAPI; see flows/fastapi_compat.py
_fastapi_compat.export_to_subprocesses()
