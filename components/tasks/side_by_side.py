"""Training several models side by side, one per loss: the loop the detection-family and pose trainers share.

Every member starts from a deep copy of one template (the same initial weights) and sees the same batch at every
iteration, so the losses are compared on equal terms. A member whose loss or gradient norm is non-finite stops
alone (``"nan"``, ``iterations`` = the 1-based iteration); an exception in its loss, its step or its evaluation
marks it ``"failed"`` with a one-line message; the others go on. The time of each member's own steps is
measured, and the shared evaluation's time is split evenly among the members evaluated.

The task-specific parts are passed in: how a member's loss is computed from a batch (``compute_loss``), how a
model gets its loss and optimiser (``prepare``) and how the surviving models are evaluated (``evaluate``).
The segmentation trainer keeps its own loop: it trains grouped networks (waves) and gives each member a private
RNG for dropout.
"""

from __future__ import annotations

import copy
import math
import time
from dataclasses import dataclass
from typing import Any, Callable, Iterator, Mapping

import torch
from torch import nn

from components.tasks.base import ProxyResult

ProgressCallback = Callable[[int, int, dict], None]


@dataclass
class Member:
    """One model under training with its loss, optimiser and (growing) result."""

    name: str
    loss: Any
    model: nn.Module | None
    optimizer: torch.optim.Optimizer | None
    result: ProxyResult

    @property
    def active(self) -> bool:
        return self.result.status == "ok" and self.model is not None

    def stop(self, status: str, message: str, iteration: int) -> None:
        """Stop training this member (its model and optimiser are released)."""
        self.result.status, self.result.message, self.result.iterations = status, message[:500], iteration
        self.model, self.optimizer = None, None


def one_line(exc: BaseException) -> str:
    """`Type: message` on one line, at most 500 characters."""
    return " ".join(f"{type(exc).__name__}: {exc}".split())[:500]


def make_members(losses: Mapping[str, Any], template: nn.Module, target_metric: str, loss_type: type,
                 make_optimizer: Callable[[nn.Module], torch.optim.Optimizer], device: torch.device, *,
                 prepare: Callable[[nn.Module, Any], None] | None = None) -> list[Member]:
    """One member per loss: a deep copy of `template` (``prepare(model, loss)`` installs the loss where the model
    needs it), moved to `device`, with ``make_optimizer(model)``. A wrong loss type or a failing set-up marks only
    that member "failed"."""
    members = []
    for name, loss in losses.items():
        member = Member(name, loss, None, None, ProxyResult(name=name, status="ok", target_metric=target_metric))
        try:
            if not isinstance(loss, loss_type):
                article = "an" if loss_type.__name__[:1] in "AEIOU" else "a"
                raise TypeError(f"loss must be {article} {loss_type.__name__}, got {type(loss).__name__}")
            model = copy.deepcopy(template)
            if prepare is not None:
                prepare(model, loss)
            member.model = model.to(device)
            loss.to(device)
            member.optimizer = make_optimizer(member.model)
        except Exception as exc:
            member.stop("failed", one_line(exc), 0)
        members.append(member)
    return members


def optimisation_step(member: Member, compute_loss: Callable[[Member], torch.Tensor], iteration: int,
                      lr: float | Callable[[dict], float], *, grad_clip: float = 0.0, check_gradient: bool = False,
                      what: str = "loss") -> float | None:
    """One step of one member at learning rate `lr` (or `lr(param_group)` per group): the loss value, or None
    after stopping the member.

    The gradient norm is computed (and checked) when clipping, or always with ``check_gradient``."""
    model, opt = member.model, member.optimizer
    for group in opt.param_groups:
        group["lr"] = lr(group) if callable(lr) else lr
    try:
        model.train()
        total = compute_loss(member)
        if not isinstance(total, torch.Tensor) or total.numel() != 1:
            raise ValueError(f"{what} must be a scalar, got {type(total).__name__}")
        value = float(total.detach())
        if not math.isfinite(value):
            member.stop("nan", f"loss was {value} at iteration {iteration}", iteration)
            return None
        opt.zero_grad(set_to_none=True)
        total.backward()
        if grad_clip > 0 or check_gradient:
            norm = torch.nn.utils.clip_grad_norm_(model.parameters(), grad_clip if grad_clip > 0 else math.inf)
            if not math.isfinite(float(norm)):
                member.stop("nan", f"gradient norm was {float(norm)} at iteration {iteration}", iteration)
                return None
        opt.step()
    except Exception as exc:  # one bad loss never stops the others
        member.stop("failed", one_line(exc), iteration)
        return None
    member.result.iterations = iteration
    member.result.final_loss = value
    return value


def train_and_evaluate(members: list[Member], stream: Iterator, step: Callable[[Member, Any, int], float | None],
                       iterations: int, device: torch.device, target_metric: str,
                       evaluate: Callable[[dict[str, nn.Module]], Mapping[str, Mapping[str, float] | Exception]],
                       on_progress: ProgressCallback | None = None) -> dict[str, ProxyResult]:
    """Run `iterations` steps (``step(member, batch, iteration)`` for every active member on each batch of
    `stream`), then ``evaluate({name: model})`` the survivors: name → ProxyResult.

    ``on_progress(iteration, total, {name: loss value})`` is called after every iteration with the losses of the
    members still training; it may raise to stop the run (the search's stop request)."""
    clock = {m.name: 0.0 for m in members}
    for iteration in range(1, iterations + 1):
        if not any(m.active for m in members):
            break
        batch = next(stream)
        values: dict[str, float] = {}
        for member in members:
            if not member.active:
                continue
            start = time.perf_counter()
            value = step(member, batch, iteration)
            if device.type == "cuda":
                torch.cuda.synchronize(device)
            clock[member.name] += time.perf_counter() - start
            if value is not None:
                values[member.name] = value
        if on_progress is not None:
            on_progress(iteration, iterations, values)
    alive = {m.name: m.model for m in members if m.active}
    if alive:
        start = time.perf_counter()
        evaluated = evaluate(alive)
        share = (time.perf_counter() - start) / len(alive)
        for member in members:
            if member.name not in evaluated:
                continue
            clock[member.name] += share
            outcome = evaluated[member.name]
            if isinstance(outcome, Exception):
                member.stop("failed", "evaluation: " + one_line(outcome), member.result.iterations)
            else:
                member.result.metrics = dict(outcome)
                member.result.target = outcome[target_metric]
                member.model, member.optimizer = None, None
    for member in members:
        member.result.seconds = clock[member.name]
    return {m.name: m.result for m in members}


__all__ = ["Member", "ProgressCallback", "make_members", "one_line", "optimisation_step", "train_and_evaluate"]
