"""MLflow logging of an Auto Seg-Loss PPO search: the policy μ per step, rewards per sampled θ, and PNG plots
of the searched g curves and of the μ trajectory (matplotlib's object API: no display, thread-safe).

Called through `flows.methods.log_method_tracking(method, tracker, final)` by the search loop; logging is idempotent across
resumes (the parent run's tag `lossforge.ppo_logged_steps` says which steps are logged).
"""

from __future__ import annotations

import tempfile
import time
from pathlib import Path
from typing import Any, Mapping, Sequence

from mlflow.entities import Metric, RunTag

from flows.tracking import with_retries

TAG_LOGGED_STEPS = "lossforge.ppo_logged_steps"


def parameter_names(spec: Any) -> list[str]:
    """Names of the flat θ entries: `<curve>.<j>` (e.g. `mIoU.and.0`), in flat_theta order."""
    k = len(spec.flat_theta()) // max(1, len(spec.curve_names()))
    return [f"{n}.{j}" for n in spec.curve_names() for j in range(k)]


def plot_curves(spec: Any, path: str | Path, title: str = "") -> Path:
    """PNG of every g curve of `spec` (solid) against the identity (dashed)."""
    from matplotlib.figure import Figure

    from components.surrogates.metric_surrogates import curve_plot_data

    data = curve_plot_data(spec)
    fig = Figure(figsize=(4.2, 3.6), dpi=100)
    ax = fig.add_subplot()
    ax.plot([0, 1], [0, 1], ls="--", color="grey", lw=1, label="identity")
    for name, (ys, gs) in data.items():
        ax.plot(ys, gs, lw=1.8, label=name)
    ax.set_xlabel("y (soft operand)")
    ax.set_ylabel("g(y; θ)")
    ax.set_xlim(0, 1)
    ax.set_ylim(0, 1)
    ax.set_title(title or f"{spec.family} × {spec.pieces}")
    ax.legend(fontsize=7, loc="upper left")
    fig.tight_layout()
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(path)
    return path


def plot_policy(policy_history: Sequence[Mapping[str, Any]], names: Sequence[str], path: str | Path) -> Path:
    """PNG of the policy: μ_t per parameter (top) and μ's / mean / max sample reward per step (bottom)."""
    from matplotlib.figure import Figure

    fig = Figure(figsize=(6.0, 5.6), dpi=100)
    ax_mu, ax_r = fig.subplots(2, 1, sharex=True)
    steps = [s["step"] for s in policy_history]
    if policy_history:
        steps_mu = steps + [steps[-1] + 1]
        for j, name in enumerate(names):
            values = [s["mu"][j] for s in policy_history] + [policy_history[-1]["mu_next"][j]]
            ax_mu.plot(steps_mu, values, marker="o", ms=3, lw=1, label=name)
        for key, label in (("mu_reward", "μ's reward"), ("mean_reward", "mean sample reward"),
                           ("max_reward", "max sample reward")):
            pts = [(s["step"], s[key]) for s in policy_history if s.get(key) is not None]
            if pts:
                ax_r.plot(*zip(*pts), marker="o", ms=3, label=label)
    ax_mu.set_ylabel("μ_t")
    ax_mu.set_ylim(0, 1)
    ax_mu.legend(fontsize=6, ncol=2)
    ax_r.set_xlabel("PPO step")
    ax_r.set_ylabel("reward (S_eval)")
    ax_r.legend(fontsize=7)
    fig.tight_layout()
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(path)
    return path


def _logged_steps(method: Any, tracker: Any) -> int:
    if method._logged_steps is None:
        run = with_retries(lambda: tracker.client.get_run(tracker.parent_run_id), "get parent run")
        method._logged_steps = int(run.data.tags.get(TAG_LOGGED_STEPS, 0))
    return method._logged_steps


def log_ppo_steps(method: Any, tracker: Any) -> int:
    """Log every finished PPO step not logged yet; returns how many steps were logged now.

    Parent run, stepped by the PPO step t: `mu.<curve>.<j>` (μ_t), `ppo_mu_reward`, `ppo_mean_reward`,
    `ppo_max_reward`, `ppo_sigma`, `ppo_objective`; artifact `ppo/curves/step-<t>.png` (g curves of μ_t).
    Each candidate run of the step: `reward`, `advantage` and `theta.<curve>.<j>`.
    """
    search = method.search
    done = _logged_steps(method, tracker)
    names = parameter_names(search.template)
    count = 0
    for summary in search.policy_history:
        t = int(summary["step"])
        if t < done:
            continue
        now = int(time.time() * 1000)
        metrics = [Metric(f"mu.{n}", float(v), now, t) for n, v in zip(names, summary["mu"])]
        for key in ("mu_reward", "mean_reward", "max_reward", "sigma", "objective"):
            if summary.get(key) is not None:
                metrics.append(Metric(f"ppo_{key}", float(summary[key]), now, t))
        with_retries(lambda: tracker.client.log_batch(tracker.parent_run_id, metrics=metrics), "log policy")
        for rec in search.history:
            run_id = tracker.logged.get(f"{rec['id']}-{rec['hash']}")
            if rec["step"] != t or run_id is None:
                continue
            cm = [Metric(f"theta.{n}", float(v), now, 0) for n, v in zip(names, rec["theta"])]
            for key in ("reward", "advantage"):
                if rec.get(key) is not None:
                    cm.append(Metric(key, float(rec[key]), now, 0))
            with_retries(lambda: tracker.client.log_batch(run_id, metrics=cm), "log candidate reward")
        with tempfile.TemporaryDirectory() as tmp:
            png = plot_curves(search.spec_for(summary["mu"]), Path(tmp) / f"step-{t:03d}.png",
                              title=f"g curves of μ at step {t}")
            with_retries(lambda: tracker.client.log_artifact(tracker.parent_run_id, str(png), "ppo/curves"),
                         "log curve plot")
        with_retries(lambda: tracker.client.log_batch(tracker.parent_run_id, tags=[RunTag(TAG_LOGGED_STEPS, str(t + 1))]),
                     "tag logged steps")
        method._logged_steps = done = t + 1
        count += 1
    return count


def log_ppo_final(method: Any, tracker: Any) -> None:
    """Artifacts of the finished search: `ppo/best_curves.png` (g curves of the best μ), `ppo/policy.png`
    (μ and rewards per step) and `ppo/policy.json` (the policy history)."""
    search = method.search
    with tempfile.TemporaryDirectory() as tmp:
        files = [plot_policy(search.policy_history, parameter_names(search.template), Path(tmp) / "policy.png")]
        best = search.best()
        if best is not None:
            files.append(plot_curves(search.spec_for(best["theta"]), Path(tmp) / "best_curves.png",
                                     title=f"best μ (step {best['step']}, {best['score']:.4f})"))
        for f in files:
            with_retries(lambda: tracker.client.log_artifact(tracker.parent_run_id, str(f), "ppo"), "log ppo plot")
    tracker.log_dict({"policy_history": search.policy_history, "best": best}, "ppo/policy.json")
