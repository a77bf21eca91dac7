"""Helpers shared by CLI commands: turn a LossforgeError into a one-line error and exit code 2."""

from __future__ import annotations

import functools
import sys
from typing import Callable, TypeVar

from rich.console import Console
from rich.markup import escape

from components.errors import LossforgeError

F = TypeVar("F", bound=Callable)
err_console = Console(stderr=True)


def user_errors(fn: F) -> F:
    """Decorator: print a LossforgeError as `error: <message>` on stderr and exit with status 2."""

    @functools.wraps(fn)
    def wrapper(*args, **kwargs):
        try:
            return fn(*args, **kwargs)
        except LossforgeError as exc:
            # escaped: messages hold brackets (`annotations[id=1].bbox`, `[1, 2, 3]`) that are not rich markup
            err_console.print(f"[bold red]error:[/] {escape(str(exc))}", highlight=False, soft_wrap=True)
            sys.exit(2)

    return wrapper  # type: ignore[return-value]
