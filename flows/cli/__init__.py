"""The `lossforge` command line (typer). Each command group lives in its own module."""

from __future__ import annotations

import typer

from flows.cli import (compare_cmd, data_cmd, demo_cmd, loss_cmd, report_cmd, retrain_cmd, search_cmd, serve_cmd,
                       stage_cmd)

app = typer.Typer(
    name="lossforge",
    help="Search loss functions aligned with your evaluation metric.",
    no_args_is_help=True,
    pretty_exceptions_enable=False,
)
app.add_typer(loss_cmd.app, name="loss", help="Inspect, screen and export loss JSON files.")
app.add_typer(data_cmd.app, name="data", help="Generate the embedded dataset and write splits.")
app.command("demo")(demo_cmd.demo)
app.command("search")(search_cmd.search)
app.command("retrain")(retrain_cmd.retrain)
app.command("report")(report_cmd.report)
app.command("compare")(compare_cmd.compare)
app.command("serve")(serve_cmd.serve)
app.command("stage")(stage_cmd.stage)


def main() -> None:  # pragma: no cover - console entry point
    """Entry point used by `python -m flows.cli`."""
    app()
