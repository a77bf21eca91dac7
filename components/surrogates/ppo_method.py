"""Auto Seg-Loss as a search method: `PPOMethod` puts components.surrogates.ppo.PPOSearch behind the ask/tell
interface of `components.search.method` (registered as "ppo", imported on first use).

What params.yaml configures (`ppo:` section):

- the PPOConfig fields (samples M, steps T, sigma, sigma_decay, clip, lr, optimizer_steps, baseline, failed);
- `metrics`: the surrogate to search: a metric name, "mIoU+BF1", a list of names or a mapping name -> weight
  (a combined surrogate, Table 2 of the paper); default: `search.metric` alone;
- `family` ("bezier" | "linear") and `pieces` of the g curves (default: Bézier, 2 pieces).

The reward of a sampled θ is always `search.metric` after proxy training on S_eval (also for a combined
surrogate). `search.budget` caps the number of proxy evaluations: the search runs
min(ppo.steps, budget // evaluations per step) steps (at least one), where a step trains M samples plus μ
itself with the "mu" baseline. The screening problem of the flow is not used (Auto Seg-Loss has no
rejection protocol: every θ in [0,1]^k gives a valid, monotone surrogate).

Tracking (flows/ppo_artifacts.py, called by the search loop for this method after each population update
and once at the end): per finished step the policy mean μ_t (one metric per parameter,
`mu.<curve>.<j>`), μ's reward, the mean/max sample reward and σ on the parent run, the reward and advantage
on each sampled θ's nested run, and PNG plots of the g curves (flows/ppo_artifacts.py) as artifacts.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any, Mapping

from components.errors import LossforgeError
from components.params import Params
from components.search.method import SearchMethod, register_method

def surrogate_metrics(value: Any, default_metric: str) -> dict[str, float]:
    """`ppo.metrics` as a mapping name -> weight (None: the search metric alone)."""
    if value is None:
        return {default_metric: 1.0}
    if isinstance(value, str):
        names = [v.strip() for v in value.split("+")]
        if not all(names):
            raise LossforgeError(f"ppo.metrics: bad metric list {value!r} (expected e.g. 'mIoU' or 'mIoU+BF1')")
        return {n: 1.0 for n in names}
    if isinstance(value, (list, tuple)):
        if not value or not all(isinstance(v, str) for v in value):
            raise LossforgeError(f"ppo.metrics: expected a non-empty list of metric names, got {value!r}")
        return {n: 1.0 for n in value}
    if isinstance(value, Mapping):
        return dict(value)
    raise LossforgeError(f"ppo.metrics: expected a metric name, a list or a mapping name -> weight, got {value!r}")


def build_template(params: Params) -> Any:
    """The SurrogateSpec searched (θ = identity, the paper's initial μ) from the `ppo:` section."""
    from components.surrogates.metric_surrogates import SurrogateSpec

    metrics = surrogate_metrics(params.section_extra("ppo", "metrics"), params.search.metric)
    kwargs: dict[str, Any] = {"metrics": metrics}
    for key in ("family", "pieces"):
        if params.section_extra("ppo", key) is not None:
            kwargs[key] = params.section_extra("ppo", key)
    try:
        return SurrogateSpec(**kwargs)
    except LossforgeError as exc:
        raise LossforgeError(f"{params.source}: ppo: {exc}") from None


def build_config(params: Params) -> Any:
    """PPOConfig from the `ppo:` section, with the number of steps capped by `search.budget`."""
    config = params.config("ppo")
    per_step = config.samples + (1 if config.baseline == "mu" else 0)
    steps = min(config.steps, max(1, params.search.budget // per_step))
    return params.config("ppo", steps=steps) if steps != config.steps else config


def _fmt(values: list[float]) -> str:
    return "[" + ", ".join(f"{v:.3f}" for v in values) + "]"


@register_method
class PPOMethod(SearchMethod):
    """Auto Seg-Loss PPO2 search (components.surrogates.ppo.PPOSearch) behind the flow's SearchMethod interface."""

    name = "ppo"
    loss_type = "surrogate"  # build_loss type of this method's loss files

    def __init__(self, search: Any, metric: str):
        self.search = search
        self.metric = metric
        self._logged_steps: int | None = None  # PPO steps already logged to MLflow (read from the parent run)

    @classmethod
    def create(cls, params: Params, problem: Any, state_dir: Path) -> "PPOMethod":
        """Resume from `state_dir/checkpoint.json` when it exists, else start a new search (μ = identity θ)."""
        from components.surrogates.ppo import PPOSearch

        checkpoint = Path(state_dir) / "checkpoint.json"
        if checkpoint.exists():
            return cls(PPOSearch.load(checkpoint), params.search.metric)
        search = PPOSearch(build_template(params), build_config(params), seed=params.search.seed)
        return cls(search, params.search.metric)

    # --------------------------------------------------------------- the shared interface
    @property
    def done(self) -> bool:
        return self.search.done

    @property
    def counters(self) -> dict[str, int]:
        return self.search.funnel()

    @property
    def history(self) -> list[dict[str, Any]]:
        """PPOSearch's records with the display fields the flow logs (formula, mutation, parent)."""
        return [self._display(r) for r in self.search.history]

    def _display(self, record: Mapping[str, Any]) -> dict[str, Any]:
        kind, step = record.get("kind"), record.get("step")
        names = "+".join(self.search.template.metrics)
        what = "policy mean μ" if kind == "mu" else f"sample (σ={record.get('sigma', 0):.3f})"
        out = dict(record)
        spec = self.search.template
        theta = _fmt(record["theta"]) if len(record["theta"]) <= 8 else f"#{record['hash'][:8]}"
        out.setdefault("formula", f"1 - s{names}(g_θ), {spec.family}×{spec.pieces}, θ={theta}")
        out.setdefault("canonical", f"surrogate:{record['hash']}")
        out.setdefault("mutation", f"ppo step {step}: {what}")
        mu_id = f"t{step:03d}-mu" if isinstance(step, int) else None
        has_mu = self.search.config.baseline == "mu"
        out.setdefault("parent_id", mu_id if kind == "sample" and has_mu else None)
        return out

    def ask(self, n: int) -> list[dict[str, Any]]:
        """Up to n candidates of the current PPO step ([] while the rest of the step is in flight)."""
        return [
            {"id": c.id, "hash": c.hash, "loss": c.loss_spec(), "theta": list(c.theta), "step": c.step,
             "kind": c.kind}
            for c in self.search.next_candidates(n)
        ]

    def tell(self, candidate_id: Any, result: Any) -> dict[str, Any]:
        """Record a proxy result; the policy update runs when it was the last one of its step."""
        return self._display(self.search.report(str(candidate_id), result))

    def best(self) -> dict[str, Any] | None:
        """The μ_t with the best evaluation score (the paper's output), as a history-like record."""
        best = self.search.best()
        if best is None:
            return None
        mu_record = next((r for r in self.search.history if r["id"] == best["id"]), None) if best["id"] else None
        record = {**best, "kind": "mu", "metrics": (mu_record or {}).get("metrics") or {},
                  "status": "evaluated"}
        out = self._display(record)
        out["mutation"] = f"policy mean μ of step {best['step']} ({best['score_kind']})"
        return out

    def save(self, path: str | Path) -> Path:
        return self.search.save(path)

    def progress(self) -> list[dict[str, Any]]:
        """One point per reported evaluation: top-5 mean of the targets so far (as the evolution curve), the
        best so far and, where a PPO step finished, the step's μ reward and mean/max sample reward."""
        steps = {s["step"]: s for s in self.search.policy_history}
        out, targets = [], []
        for i, rec in enumerate(self.search.history, 1):
            if rec["status"] == "evaluated" and rec.get("target") is not None:
                targets.append(float(rec["target"]))
            top = sorted(targets, reverse=True)[:5]
            point: dict[str, Any] = {
                "evaluations": i, "step": rec["step"],
                "top5_mean": sum(top) / len(top) if top else None,
                "best_so_far": top[0] if top else None,
            }
            finished = steps.get(rec["step"])
            last_of_step = finished is not None and all(
                r["step"] != rec["step"] for r in self.search.history[i:]
            )
            if last_of_step:
                point.update(mu_reward=finished["mu_reward"], mean_reward=finished["mean_reward"],
                             max_reward=finished["max_reward"], sigma=finished["sigma"])
            out.append(point)
        return out

    def spec_of(self, record: Mapping[str, Any]) -> Any:
        """The SurrogateSpec of a history/best record."""
        return self.search.spec_for(record["theta"])

    def loss_spec(self, record: Mapping[str, Any]) -> dict[str, Any]:
        """A build_loss spec for a history record (the surrogate inline)."""
        return {"type": "surrogate", "spec": self.spec_of(record).to_dict()}

    def write_loss_files(self, record: Mapping[str, Any], folder: Path, stem: str) -> tuple[Path, Path]:
        """The record's surrogate as lossforge.surrogate/1 JSON (θ, control points, search meta) and as a
        standalone nn.Module .py file. Files whose stem carries the record's hash are written once."""
        from components.surrogates.metric_surrogates import save_surrogate, write_surrogate_module

        spec = self.spec_of(record)
        folder = Path(folder)
        folder.mkdir(parents=True, exist_ok=True)
        json_path, py_path = folder / f"{stem}.json", folder / f"{stem}.py"
        immutable = str(record.get("hash", "")) in stem and bool(record.get("hash"))
        meta = {"method": "ppo", "reward_metric": self.metric, "step": record.get("step"),
                "kind": record.get("kind"), "candidate_id": record.get("id"), "target": record.get("target")}
        if not (immutable and json_path.exists()):
            save_surrogate(spec, json_path, meta=meta)
        if not (immutable and py_path.exists()):
            write_surrogate_module(spec, py_path)
        return json_path, py_path
