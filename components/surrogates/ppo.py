"""PPO2 search over the surrogate parameters θ ∈ [0,1]^k (Auto Seg-Loss §4.3), resumable.

Policy: a truncated normal N_trunc[0,1](μ, σ²I), μ = sigmoid(μ_logit) (as in the official code), σ = 0.2
fixed or decayed linearly to `sigma_final` over the steps. Each of the T steps:

1. M samples θ_i are drawn by inverse CDF (uniforms from a `random.Random`, so the RNG state is JSON);
   with ``baseline="mu"`` μ_t itself is one extra candidate of the step.
2. The flow trains one proxy model per candidate (all M (+1) side by side) and reports each ProxyResult;
   reward = the target metric on S_eval. A failed or NaN-stopped training gets reward 0 (``failed="zero"``,
   default: the policy learns to avoid that region) or is left out of the update (``failed="drop"``).
3. Once every candidate of the step is reported the policy steps: advantage A_i = r_i − baseline (μ's own
   reward; the mean sample reward when ``baseline="mean"`` or when μ's training failed), then
   `optimizer_steps` Adam steps (lr, a fresh optimiser per step) on the clipped PPO2 objective
   mean_i min(ρ_i A_i, clip(ρ_i, 1 − ε, 1 + ε) A_i) with the JOINT probability ratio
   ρ_i = exp(Σ_d log p_d(θ_id; μ) − Σ_d log p_d(θ_id; μ_t)) of the truncated normal (normaliser
   included) — the official code used a per-dimension ratio, a known flaw fixed here.

`best()` is the paper's output: the μ_t with the highest evaluation score (μ's own reward with the "mu"
baseline, else the mean reward of its samples). The whole state (μ, σ schedule, step, samples, rewards,
RNG state, history) is JSON: `save(path)` after every report and `PPOSearch.load(path)` resumes after a
kill, with exactly the μ trajectory of an uninterrupted run (candidates handed out but not reported are
handed out again). Candidates carry a SurrogateSpec, so the result is directly a loss (save_surrogate /
SurrogateLoss / export_surrogate_module_source), with no hand conversion.
"""

from __future__ import annotations

import dataclasses
import math
import random
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch

from components.atomic_io import read_json, write_json_atomic
from components.errors import LossforgeError
from components.search.proxy_outcome import COUNTER, RECORD_STATUS, proxy_outcome
from components.search.proxy_outcome import field as _field, finite as _finite
from components.surrogates.metric_surrogates import SurrogateLoss, SurrogateSpec

STATE_FORMAT = "lossforge.ppo_state/1"
MU_LIMIT = 1e-4  # μ is kept in [MU_LIMIT, 1 - MU_LIMIT] (finite logit)
_COUNTER_OF, _STATUS_OF = COUNTER, RECORD_STATUS  # funnel counter / history status, as every search method


@dataclass(frozen=True)
class PPOConfig:
    """PPO2 hyper-parameters; defaults = the official Auto Seg-Loss search (32 × 12, σ 0.2, lr 0.2, 60 steps)."""

    samples: int = 32
    steps: int = 12
    sigma: float = 0.2
    sigma_decay: str = "none"  # "none" | "linear" (σ goes linearly from `sigma` to `sigma_final` at the last step)
    sigma_final: float = 0.05
    clip: float = 0.2
    lr: float = 0.2
    optimizer_steps: int = 60
    baseline: str = "mu"  # "mu" (μ_t is trained too, its reward is the baseline) | "mean" (mean sample reward)
    failed: str = "zero"  # "zero" (failed/NaN trainings get reward 0) | "drop" (left out of the update)

    def __post_init__(self) -> None:
        for name in ("samples", "steps", "optimizer_steps"):
            v = getattr(self, name)
            if isinstance(v, bool) or not isinstance(v, int) or v < 1:
                raise LossforgeError(f"ppo.{name}: must be a positive integer, got {v!r}")
        for name in ("sigma", "sigma_final", "lr"):
            v = getattr(self, name)
            if isinstance(v, bool) or not isinstance(v, (int, float)) or not (v > 0 and math.isfinite(v)):
                raise LossforgeError(f"ppo.{name}: must be a positive number, got {v!r}")
        if isinstance(self.clip, bool) or not isinstance(self.clip, (int, float)) or not 0 < self.clip < 1:
            raise LossforgeError(f"ppo.clip: must be in (0, 1), got {self.clip!r}")
        choices = {"sigma_decay": ("none", "linear"), "baseline": ("mu", "mean"), "failed": ("zero", "drop")}
        for name, allowed in choices.items():
            if getattr(self, name) not in allowed:
                raise LossforgeError(f"ppo.{name}: must be one of {', '.join(allowed)}, got {getattr(self, name)!r}")

    def sigma_at(self, step: int) -> float:
        """σ used at step `step` (0-based)."""
        if self.sigma_decay == "none" or self.steps == 1:
            return float(self.sigma)
        return float(self.sigma + (self.sigma_final - self.sigma) * step / (self.steps - 1))

    def to_dict(self) -> dict[str, Any]:
        """JSON-able dict."""
        return dataclasses.asdict(self)

    @classmethod
    def from_dict(cls, data: Mapping[str, Any]) -> PPOConfig:
        """Rebuild from to_dict(); unknown fields are an error naming them."""
        names = {f.name for f in dataclasses.fields(cls)}
        extra = sorted(set(data) - names)
        if extra:
            raise LossforgeError(f"ppo: unknown field {extra[0]!r} (known: {', '.join(sorted(names))})")
        return cls(**dict(data))


@dataclass(frozen=True)
class PPOCandidate:
    """One surrogate to proxy-train: a sample θ of step `step` (kind "sample") or the policy mean μ_t ("mu")."""

    id: str
    spec: SurrogateSpec
    theta: list[float]
    step: int
    kind: str

    @property
    def hash(self) -> str:
        """Content hash of the candidate's surrogate (SurrogateSpec.hash)."""
        return self.spec.hash()

    def loss(self, num_classes: int) -> SurrogateLoss:
        """The nn.Module loss to train with."""
        return SurrogateLoss(self.spec, num_classes)

    def loss_spec(self) -> dict[str, Any]:
        """A components.tasks.loss_registry.build_loss spec of this candidate (the surrogate inline)."""
        return {"type": "surrogate", "spec": self.spec.to_dict()}


# ----------------------------------------------------------------------------- truncated normal


def truncated_normal_log_prob(theta: torch.Tensor, mu: torch.Tensor, sigma: float) -> torch.Tensor:
    """Joint log density of θ (..., k) under N_trunc[0,1](μ, σ²I): Σ_d of the per-dimension log densities."""
    z = (theta - mu) / sigma
    alpha, beta = (0.0 - mu) / sigma, (1.0 - mu) / sigma
    mass = torch.special.ndtr(beta) - torch.special.ndtr(alpha)
    per_dim = -0.5 * z * z - math.log(sigma * math.sqrt(2.0 * math.pi)) - torch.log(mass)
    return per_dim.sum(-1)


def sample_truncated_normal(mu: Sequence[float], sigma: float, count: int, rng: random.Random) -> list[list[float]]:
    """`count` draws from N_trunc[0,1](μ, σ²I) by inverse CDF; uniforms come from `rng` (row by row)."""
    mu_t = torch.tensor(list(mu), dtype=torch.float64)
    lo = torch.special.ndtr((0.0 - mu_t) / sigma)
    hi = torch.special.ndtr((1.0 - mu_t) / sigma)
    u = torch.tensor([[rng.random() for _ in range(len(mu))] for _ in range(count)], dtype=torch.float64)
    p = (lo + u * (hi - lo)).clamp(1e-300, 1.0 - 1e-16)
    theta = (mu_t + sigma * torch.special.ndtri(p)).clamp(0.0, 1.0)
    return theta.tolist()


def _logit(p: float) -> float:
    p = min(max(float(p), MU_LIMIT), 1.0 - MU_LIMIT)
    return math.log(p / (1.0 - p))


def _mu_of(mu_logit: torch.Tensor) -> torch.Tensor:
    return torch.sigmoid(mu_logit).clamp(MU_LIMIT, 1.0 - MU_LIMIT)


def ppo_objective(mu: torch.Tensor, theta: torch.Tensor, advantages: torch.Tensor, old_log_prob: torch.Tensor,
                  sigma: float, clip: float) -> torch.Tensor:
    """PPO2 clipped objective mean_i min(ρ_i A_i, clip(ρ_i, 1 − ε, 1 + ε) A_i) (to maximise) with the JOINT
    ratio ρ_i = p(θ_i; μ) / p_old(θ_i) over all dimensions (old_log_prob = joint log p(θ_i; μ_t))."""
    ratio = torch.exp(truncated_normal_log_prob(theta, mu, sigma) - old_log_prob)
    return torch.minimum(ratio * advantages, ratio.clamp(1.0 - clip, 1.0 + clip) * advantages).mean()


def ppo_update(mu: Sequence[float], thetas: Sequence[Sequence[float]], advantages: Sequence[float], sigma: float,
               clip: float = 0.2, lr: float = 0.2, optimizer_steps: int = 60) -> tuple[list[float], float]:
    """One PPO2 policy step: maximise ppo_objective over μ (through its logit) with a fresh Adam.

    Returns (μ_{t+1}, final objective).
    """
    mu_old = _mu_of(torch.tensor([_logit(m) for m in mu], dtype=torch.float64))
    theta = torch.tensor([list(t) for t in thetas], dtype=torch.float64)
    adv = torch.tensor(list(advantages), dtype=torch.float64)
    old_logp = truncated_normal_log_prob(theta, mu_old, sigma)
    mu_logit = torch.logit(mu_old).clone().requires_grad_(True)
    opt = torch.optim.Adam([mu_logit], lr=lr)
    objective = torch.zeros((), dtype=torch.float64)
    for _ in range(optimizer_steps):
        opt.zero_grad()
        objective = ppo_objective(_mu_of(mu_logit), theta, adv, old_logp, sigma, clip)
        (-objective).backward()
        opt.step()
    with torch.no_grad():
        new_mu = _mu_of(mu_logit)
    return new_mu.tolist(), float(objective.detach())


# ----------------------------------------------------------------------------- search


class PPOSearch:
    """PPO2 search of a surrogate's θ with the SearchEngine shape used by the flows.

    `spec_template` fixes metrics, family, pieces and boundary options; its θ is the initial μ (identity by
    default, as in the paper). Loop: ``next_candidates(m)`` → train → ``report(id, ProxyResult)`` until
    ``done``; the policy steps by itself when the last candidate of a step is reported.
    """

    def __init__(self, spec_template: SurrogateSpec, config: PPOConfig | None = None, seed: int = 0):
        if not isinstance(spec_template, SurrogateSpec):
            spec_template = SurrogateSpec.from_dict(spec_template)
        self.template = spec_template
        self.config = config or PPOConfig()
        self.seed = int(seed)
        self.rng = random.Random(self.seed)
        self.mu: list[float] = _mu_of(
            torch.tensor([_logit(v) for v in spec_template.flat_theta()], dtype=torch.float64)
        ).tolist()
        self.step = 0
        self.counters: dict[str, int] = {"generated": 0, "evaluated": 0, "nan_stopped": 0, "failed": 0, "steps": 0}
        self.history: list[dict[str, Any]] = []
        self.policy_history: list[dict[str, Any]] = []
        self._current: list[dict[str, Any]] = []
        self._begin_step()

    # ----------------------------------------------------------------- properties
    @property
    def dim(self) -> int:
        """Number of searched parameters k."""
        return self.template.dim

    @property
    def sigma(self) -> float:
        """σ of the current step."""
        return self.config.sigma_at(min(self.step, self.config.steps - 1))

    @property
    def done(self) -> bool:
        """True once all T steps are done."""
        return self.step >= self.config.steps

    @property
    def reported(self) -> int:
        """Proxy results received so far."""
        return self.counters["evaluated"] + self.counters["nan_stopped"] + self.counters["failed"]

    @property
    def in_flight(self) -> int:
        """Candidates handed out and not reported yet."""
        return sum(1 for c in self._current if c["issued"] and c["record"] is None)

    def funnel(self) -> dict[str, int]:
        """The counters plus `in_flight` (a copy, for logging)."""
        return dict(self.counters) | {"in_flight": self.in_flight}

    def spec_for(self, theta: Sequence[float]) -> SurrogateSpec:
        """The template with θ replaced by a flat vector."""
        return self.template.with_flat_theta(theta)

    def current_spec(self) -> SurrogateSpec:
        """The surrogate of the current policy mean μ (after the last update)."""
        return self.spec_for(self.mu)

    # ----------------------------------------------------------------- loop
    def _begin_step(self) -> None:
        if self.done:
            self._current = []
            return
        sigma = self.config.sigma_at(self.step)
        thetas = sample_truncated_normal(self.mu, sigma, self.config.samples, self.rng)
        current = []
        if self.config.baseline == "mu":
            current.append({"id": f"t{self.step:03d}-mu", "kind": "mu", "theta": list(self.mu)})
        for i, theta in enumerate(thetas):
            current.append({"id": f"t{self.step:03d}-s{i:03d}", "kind": "sample", "theta": theta})
        for c in current:
            c.update(issued=False, record=None)
        self.counters["generated"] += len(current)
        self._current = current

    def _candidate(self, entry: Mapping[str, Any]) -> PPOCandidate:
        return PPOCandidate(entry["id"], self.spec_for(entry["theta"]), list(entry["theta"]), self.step, entry["kind"])

    def next_candidates(self, m: int | None = None) -> list[PPOCandidate]:
        """Up to `m` (default: all) not yet handed out candidates of the current step; [] when done or when
        the rest of the step is in flight (report them first)."""
        out = []
        for entry in self._current:
            if m is not None and len(out) >= m:
                break
            if not entry["issued"]:
                entry["issued"] = True
                out.append(self._candidate(entry))
        return out

    def report(self, candidate_id: str, result: Any) -> dict[str, Any]:
        """Record a ProxyResult(-like: status, target, metrics, ...) for a handed-out candidate; returns its
        history record. The policy update runs when this was the step's last result."""
        entry = next((c for c in self._current if c["id"] == candidate_id), None)
        if entry is None or not entry["issued"] or entry["record"] is not None:
            raise LossforgeError(f"ppo: candidate {candidate_id!r} is not in flight (unknown, not handed out or already reported)")
        status, target = proxy_outcome(result)
        if status == "ok":
            reward = target
        else:
            reward = 0.0 if self.config.failed == "zero" else None
        metrics = {k: _finite(v) for k, v in (_field(result, "metrics", None) or {}).items()}
        record = {
            "id": entry["id"], "hash": self.spec_for(entry["theta"]).hash(), "step": self.step, "kind": entry["kind"],
            "theta": list(entry["theta"]),
            "status": _STATUS_OF[status], "target": target if status == "ok" else None, "reward": reward,
            "advantage": None, "metrics": metrics, "sigma": self.sigma,
            "iterations": _field(result, "iterations", None), "seconds": _finite(_field(result, "seconds", None)),
            "message": str(_field(result, "message", "") or ""),
        }
        entry["record"] = record
        self.counters[_COUNTER_OF[status]] += 1
        self.history.append(record)
        if all(c["record"] is not None for c in self._current):
            self._update()
        return record

    def _update(self) -> None:
        cfg = self.config
        samples = [c["record"] for c in self._current if c["kind"] == "sample"]
        used = [r for r in samples if r["reward"] is not None]
        mu_rec = next((c["record"] for c in self._current if c["kind"] == "mu"), None)
        mu_reward = mu_rec["target"] if mu_rec is not None else None
        summary: dict[str, Any] = {
            "step": self.step, "sigma": self.sigma, "mu": list(self.mu), "mu_reward": mu_reward,
            "mean_reward": None, "max_reward": None, "baseline": None, "baseline_kind": None,
            "samples_used": len(used), "objective": None, "mu_next": list(self.mu),
        }
        if used:
            rewards = [r["reward"] for r in used]
            mean = sum(rewards) / len(rewards)
            if cfg.baseline == "mu" and mu_reward is not None:
                baseline, kind = mu_reward, "mu"
            else:
                baseline, kind = mean, "mean"
            for r in used:
                r["advantage"] = r["reward"] - baseline
            new_mu, objective = ppo_update(self.mu, [r["theta"] for r in used], [r["advantage"] for r in used],
                                           self.sigma, cfg.clip, cfg.lr, cfg.optimizer_steps)
            summary.update(mean_reward=mean, max_reward=max(rewards), baseline=baseline, baseline_kind=kind,
                           objective=objective, mu_next=new_mu)
            self.mu = new_mu
        self.policy_history.append(summary)
        self.step += 1
        self.counters["steps"] += 1
        self._begin_step()

    # ----------------------------------------------------------------- results
    def best(self) -> dict[str, Any] | None:
        """The best policy mean so far (the paper's output): a dict with step, theta (= μ_t), score (= target),
        score_kind ("mu_reward" or "mean_sample_reward"), id / candidate_id (μ's candidate, None with the "mean"
        baseline), hash and spec (SurrogateSpec dict); None if nothing was scored yet. Ties: earliest step."""
        options = []
        if self.config.baseline == "mu":
            for r in self.history:
                if r["kind"] == "mu" and r["target"] is not None:
                    options.append((r["target"], -r["step"], r["step"], r["theta"], "mu_reward", r["id"]))
        else:
            for s in self.policy_history:
                if s["mean_reward"] is not None:
                    options.append((s["mean_reward"], -s["step"], s["step"], s["mu"], "mean_sample_reward", None))
        if not options:
            return None
        score, _, step, theta, kind, cid = max(options, key=lambda o: (o[0], o[1]))
        spec = self.spec_for(theta)
        return {"id": cid, "candidate_id": cid, "hash": spec.hash(), "step": step, "theta": list(theta),
                "score": score, "target": score, "score_kind": kind, "spec": spec.to_dict()}

    def progress_curve(self) -> list[dict[str, Any]]:
        """Per finished step (Fig. 3 of the paper): μ's reward, the mean/max sample reward, the best μ score so
        far and the number of proxy results reported by then."""
        out, best = [], None
        for s in self.policy_history:
            reported = sum(1 for r in self.history if r["step"] <= s["step"])
            score = s["mu_reward"] if self.config.baseline == "mu" else s["mean_reward"]
            if score is not None and (best is None or score > best):
                best = score
            out.append({"step": s["step"], "evaluations": reported, "mu_reward": s["mu_reward"],
                        "mean_reward": s["mean_reward"], "max_reward": s["max_reward"], "best_so_far": best})
        return out

    def best_spec(self) -> SurrogateSpec | None:
        """best() as a SurrogateSpec, ready for save_surrogate / SurrogateLoss / export."""
        b = self.best()
        return None if b is None else self.spec_for(b["theta"])

    def best_sample(self) -> dict[str, Any] | None:
        """The history record with the highest target among trained candidates (status "evaluated"), or None."""
        ok = [r for r in self.history if r["status"] == "evaluated"]
        return max(ok, key=lambda r: r["target"]) if ok else None

    # ----------------------------------------------------------------- persistence
    def state_dict(self) -> dict[str, Any]:
        """The whole search state as JSON-able data (μ exact as float64, RNG state, samples, rewards)."""
        version, internal, gauss = self.rng.getstate()
        return {
            "format": STATE_FORMAT,
            "seed": self.seed,
            "config": self.config.to_dict(),
            "template": self.template.to_dict(include_points=False),
            "step": self.step,
            "mu": list(self.mu),
            "rng": [version, list(internal), gauss],
            "current": [dict(c) for c in self._current],
            "counters": dict(self.counters),
            "history": self.history,
            "policy_history": self.policy_history,
        }

    def load_state_dict(self, state: Any) -> None:
        """Restore `state_dict()` output (validated); handed-out but unreported candidates are re-issued."""
        if not isinstance(state, Mapping) or state.get("format") != STATE_FORMAT:
            got = state.get("format") if isinstance(state, Mapping) else type(state).__name__
            raise LossforgeError(f"not a PPO search state: format must be {STATE_FORMAT!r}, got {got!r}")
        try:
            template = SurrogateSpec.from_dict(state["template"], source="template")
            config = PPOConfig.from_dict(state["config"])
            mu = [float(v) for v in state["mu"]]
            if len(mu) != template.dim:
                raise LossforgeError(f"mu has {len(mu)} values, the template needs {template.dim}")
            version, internal, gauss = state["rng"]
            rng = random.Random()
            rng.setstate((int(version), tuple(int(v) for v in internal), gauss))
            current = []
            for c in state["current"]:
                entry = {"id": str(c["id"]), "kind": str(c["kind"]), "theta": [float(v) for v in c["theta"]],
                         "record": c["record"], "issued": c["record"] is not None}
                current.append(entry)
            history = list(state["history"])
            # records of the current step are shared between `current` and `history`
            by_id = {r["id"]: r for r in history}
            for entry in current:
                if entry["record"] is not None:
                    entry["record"] = by_id.get(entry["id"], entry["record"])
            counters = {k: int(v) for k, v in state["counters"].items()}
            step = int(state["step"])
            policy_history = list(state["policy_history"])
            seed = int(state["seed"])
        except LossforgeError:
            raise
        except (KeyError, TypeError, ValueError) as exc:
            raise LossforgeError(f"PPO search state is malformed ({type(exc).__name__}: {exc})") from None
        self.template, self.config, self.seed, self.rng = template, config, seed, rng
        self.mu, self.step, self.counters = mu, step, counters
        self.history, self.policy_history, self._current = history, policy_history, current

    def save(self, path: str | Path) -> Path:
        """Write the state atomically as JSON (call after every report to survive a kill)."""
        return write_json_atomic(path, self.state_dict())

    @classmethod
    def from_state_dict(cls, state: Any) -> PPOSearch:
        """A PPOSearch rebuilt from `state_dict()` output."""
        if not isinstance(state, Mapping) or "template" not in state:
            raise LossforgeError(f"not a PPO search state: format must be {STATE_FORMAT!r}")
        search = cls.__new__(cls)
        search.load_state_dict(state)
        return search

    @classmethod
    def load(cls, path: str | Path) -> PPOSearch:
        """Resume a saved search; errors name the file."""
        state = read_json(path)
        try:
            return cls.from_state_dict(state)
        except LossforgeError as exc:
            raise LossforgeError(f"{path}: {exc}") from None
