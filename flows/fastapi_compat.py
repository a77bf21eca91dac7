"""Compatibility shim: Prefect 3.8's server passes `min_items`/`max_items` to `fastapi.Body`, which the
locked FastAPI (0.165) no longer accepts, so Prefect's embedded API and `prefect server start` fail at
import (TypeError: Body() got an unexpected keyword argument 'min_items'). `apply()` maps them to
`min_length`/`max_length` (their pydantic-2 names, same meaning). `flows/compat/sitecustomize.py` applies it
in the server subprocesses Prefect starts (flows.cli.runtime puts that folder on PYTHONPATH).
Remove when the lock moves to a Prefect release that no longer uses the old keywords."""

from __future__ import annotations

import os
from pathlib import Path

SITE_DIR = Path(__file__).resolve().parent / "compat"


def apply() -> bool:
    """Patch fastapi.Body if it rejects `min_items`; returns True when a patch was installed."""
    try:
        import fastapi
        import fastapi.param_functions as pf
    except ImportError:
        return False
    if getattr(pf.Body, "_lossforge_compat", False):
        return False
    try:
        pf.Body(None, min_items=1)
        return False
    except TypeError:
        pass
    original = pf.Body

    def Body(*args, min_items=None, max_items=None, **kwargs):  # noqa: N802 - same name as FastAPI's
        if min_items is not None:
            kwargs.setdefault("min_length", min_items)
        if max_items is not None:
            kwargs.setdefault("max_length", max_items)
        return original(*args, **kwargs)

    Body._lossforge_compat = True  # type: ignore[attr-defined]
    Body.__doc__ = original.__doc__
    pf.Body = Body
    fastapi.Body = Body
    return True


def export_to_subprocesses() -> None:
    """Put the sitecustomize folder on PYTHONPATH so server subprocesses apply the patch too."""
    entries = [p for p in os.environ.get("PYTHONPATH", "").split(os.pathsep) if p]
    if str(SITE_DIR) not in entries:
        os.environ["PYTHONPATH"] = os.pathsep.join([str(SITE_DIR), *entries])
