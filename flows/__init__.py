"""Orchestration: Prefect flows, MLflow tracking, the typer CLI (no maths here; the logic is in components/)."""
