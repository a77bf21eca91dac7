"""Method-specific MLflow logging beside the generic per-candidate runs.

Search methods themselves live in components (`components.search.method`: the ask/tell interface and
registry); the flows drive any of them through that interface. A method may add tracking of its own here
(PPO: the policy mean μ per step and plots of its curves, flows/ppo_artifacts.py); a method without an
entry gets only the generic tracking, so adding a method needs no change here.
"""

from __future__ import annotations

from typing import Any, Callable


def _ppo(method: Any, tracker: Any, final: bool) -> None:
    from flows import ppo_artifacts

    ppo_artifacts.log_ppo_steps(method, tracker)
    if final:
        ppo_artifacts.log_ppo_final(method, tracker)


TRACKING_HOOKS: dict[str, Callable[[Any, Any, bool], None]] = {"ppo": _ppo}


def log_method_tracking(method: Any, tracker: Any, final: bool = False) -> None:
    """Log what is new for `method` since the last call (idempotent across resumes); no-op without a hook."""
    hook = TRACKING_HOOKS.get(getattr(method, "name", ""))
    if hook is not None:
        hook(method, tracker, final)
