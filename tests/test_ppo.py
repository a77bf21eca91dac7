"""PPO2 search: truncated normal, joint clipped ratio, convergence on a known optimum, failed samples,
exact resume after a real SIGKILL, and direct export of the result as a loss."""

import importlib.util
import json
import math
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch

from components.errors import LossforgeError
from components.surrogates.metric_surrogates import SurrogateLoss, SurrogateSpec, export_surrogate_module_source, load_surrogate, save_surrogate
from components.surrogates.ppo import (
    PPOConfig,
    PPOSearch,
    ppo_objective,
    sample_truncated_normal,
    truncated_normal_log_prob,
)

torch.set_num_threads(1)  # small tensors: threads only cost time on a shared CPU
REPO = Path(__file__).resolve().parents[1]
STAR = [0.1, 0.9, 0.2, 0.8, 0.7, 0.3]


def quadratic_reward(theta):
    """Known optimum θ* = STAR (tiled), reward 1 − mean squared distance ∈ [0, 1]."""
    star = [STAR[i % len(STAR)] for i in range(len(theta))]
    return 1.0 - sum((a - b) ** 2 for a, b in zip(theta, star)) / len(theta)


def run(search, batch=None, until=None):
    while not search.done and (until is None or search.reported < until):
        for c in search.next_candidates(batch):
            search.report(c.id, {"status": "ok", "target": quadratic_reward(c.theta)})
    return search


# ----------------------------------------------------------------------------- distribution and objective


def test_log_prob_is_the_joint_truncated_normal_density():
    from scipy import stats

    mu = torch.tensor([0.1, 0.5, 0.93], dtype=torch.float64)
    theta = torch.tensor([[0.0, 0.2, 1.0], [0.4, 0.5, 0.7]], dtype=torch.float64)
    for sigma in (0.2, 0.05):
        a, b = (0 - mu.numpy()) / sigma, (1 - mu.numpy()) / sigma
        ref = stats.truncnorm(a, b, loc=mu.numpy(), scale=sigma).logpdf(theta.numpy()).sum(-1)
        torch.testing.assert_close(truncated_normal_log_prob(theta, mu, sigma), torch.tensor(ref), rtol=1e-10, atol=1e-10)


def test_samples_follow_the_truncated_normal():
    import random

    from scipy import stats

    mu, sigma = [0.05, 0.5, 0.9], 0.2
    draws = torch.tensor(sample_truncated_normal(mu, sigma, 4000, random.Random(0)), dtype=torch.float64)
    assert draws.min() >= 0 and draws.max() <= 1
    m = torch.tensor(mu)
    ref = stats.truncnorm((0 - m.numpy()) / sigma, (1 - m.numpy()) / sigma, loc=m.numpy(), scale=sigma)
    torch.testing.assert_close(draws.mean(0), torch.tensor(ref.mean()), atol=0.01, rtol=0)
    torch.testing.assert_close(draws.std(0), torch.tensor(ref.std()), atol=0.01, rtol=0)
    for d in range(3):  # Kolmogorov-Smirnov per dimension
        dist = stats.truncnorm((0 - mu[d]) / sigma, (1 - mu[d]) / sigma, loc=mu[d], scale=sigma)
        assert stats.kstest(draws[:, d].numpy(), dist.cdf).pvalue > 1e-3


def test_objective_clips_the_joint_ratio_not_per_dimension():
    """Two dims each with ratio ~1.15 (inside the clip) give a joint ratio ~1.32: clipped to 1.2."""
    from scipy import stats

    sigma, clip = 0.2, 0.2
    mu_old = torch.tensor([0.5, 0.5], dtype=torch.float64)
    theta = torch.tensor([[0.6, 0.6]], dtype=torch.float64)
    old = truncated_normal_log_prob(theta, mu_old, sigma)

    def per_dim_ratio(m):
        dist = lambda mm: stats.truncnorm((0 - mm) / sigma, (1 - mm) / sigma, loc=mm, scale=sigma)
        return dist(m).pdf(0.6) / dist(0.5).pdf(0.6)

    lo, hi = 0.5, 0.6  # find μ_d with a per-dimension ratio of 1.15 by bisection
    for _ in range(60):
        mid = (lo + hi) / 2
        lo, hi = (mid, hi) if per_dim_ratio(mid) < 1.15 else (lo, mid)
    mu_new = torch.tensor([lo, lo], dtype=torch.float64)
    joint = per_dim_ratio(lo) ** 2
    assert 1.3 < joint < 1.35
    adv = torch.tensor([1.0], dtype=torch.float64)
    assert float(ppo_objective(mu_new, theta, adv, old, sigma, clip)) == pytest.approx(1.0 + clip, abs=1e-9)
    # with a negative advantage the unclipped (pessimistic) joint term is taken
    assert float(ppo_objective(mu_new, theta, -adv, old, sigma, clip)) == pytest.approx(-joint, rel=1e-6)


# ----------------------------------------------------------------------------- search behaviour


@pytest.mark.parametrize("baseline", ["mu", "mean"])
def test_mu_moves_toward_a_known_optimum(baseline):
    search = PPOSearch(SurrogateSpec({"gAcc": 1.0}), PPOConfig(samples=16, steps=6, baseline=baseline), seed=0)
    assert search.dim == len(STAR)
    start = math.dist(search.mu, STAR)
    run(search)
    assert math.dist(search.mu, STAR) < 0.6 * start
    best = search.best()
    assert math.dist(best["theta"], STAR) < 0.7 * start
    assert quadratic_reward(best["theta"]) > quadratic_reward(search.policy_history[0]["mu"]) + 0.03
    assert len(search.policy_history) == 6 and search.counters["steps"] == 6
    assert len(search.history) == 6 * (16 + (baseline == "mu"))


def test_candidates_and_counters():
    cfg = PPOConfig(samples=5, steps=2, sigma_decay="linear", sigma=0.3, sigma_final=0.1)
    search = PPOSearch(SurrogateSpec({"mIoU": 1.0, "BF1": 1.0}, family="linear", pieces=3), cfg, seed=1)
    first = search.next_candidates(2)
    assert [c.kind for c in first] == ["mu", "sample"]
    assert first[0].theta == search.mu
    assert first[1].spec.flat_theta() == pytest.approx(first[1].theta)
    assert first[1].spec.family == "linear" and search.dim == 6 * 4
    rest = search.next_candidates()
    assert len(rest) == 4 and search.next_candidates() == [] and search.in_flight == 6
    assert isinstance(rest[0].loss(3), SurrogateLoss)
    for c in first + rest:
        search.report(c.id, {"status": "ok", "target": 0.5})
    assert search.step == 1 and search.sigma == pytest.approx(0.1)
    assert search.history[0]["sigma"] == pytest.approx(0.3)
    assert search.funnel() == {"generated": 12, "evaluated": 6, "nan_stopped": 0, "failed": 0, "steps": 1, "in_flight": 0}


def test_batching_does_not_change_the_trajectory():
    cfg = PPOConfig(samples=7, steps=3, optimizer_steps=20)
    a = run(PPOSearch(SurrogateSpec({"mIoU": 1.0}), cfg, seed=5), batch=None)
    b = run(PPOSearch(SurrogateSpec({"mIoU": 1.0}), cfg, seed=5), batch=3)
    assert a.policy_history == b.policy_history


@pytest.mark.parametrize("mode", ["zero", "drop"])
def test_failed_and_nan_samples(mode):
    from components.tasks.segmentation.trainer import ProxyResult

    search = PPOSearch(SurrogateSpec({"mAcc": 1.0}), PPOConfig(samples=4, steps=2, failed=mode), seed=2)
    cands = search.next_candidates()
    outcomes = [ProxyResult(cands[0].id, "failed", message="boom"),  # μ itself fails → mean baseline
                ProxyResult(cands[1].id, "nan", iterations=3),
                ProxyResult(cands[2].id, "ok", target=float("nan")),  # ok without a score counts as nan
                ProxyResult(cands[3].id, "ok", metrics={"mAcc": 0.6}, target=0.6),
                ProxyResult(cands[4].id, "ok", metrics={"mAcc": 0.4}, target=0.4)]
    for c, r in zip(cands, outcomes):
        search.report(c.id, r)
    statuses = [r["status"] for r in search.history]
    assert statuses == ["failed", "nan-stopped", "nan-stopped", "evaluated", "evaluated"]
    assert search.counters["failed"] == 1 and search.counters["nan_stopped"] == 2 and search.counters["evaluated"] == 2
    step = search.policy_history[0]
    assert step["baseline_kind"] == "mean" and step["mu_reward"] is None
    rewards = [r["reward"] for r in search.history[1:]]
    if mode == "zero":
        assert rewards == [0.0, 0.0, 0.6, 0.4] and step["samples_used"] == 4
        assert step["mean_reward"] == pytest.approx(0.25)
    else:
        assert rewards == [None, None, 0.6, 0.4] and step["samples_used"] == 2
        assert step["mean_reward"] == pytest.approx(0.5) and search.history[1]["advantage"] is None
    assert search.history[3]["advantage"] == pytest.approx(0.6 - step["mean_reward"])
    assert search.history[0]["message"] == "boom"


def test_all_samples_dropped_keeps_mu():
    search = PPOSearch(SurrogateSpec({"gAcc": 1.0}), PPOConfig(samples=3, steps=2, failed="drop", baseline="mean"), seed=0)
    mu = list(search.mu)
    for c in search.next_candidates():
        search.report(c.id, {"status": "failed"})
    assert search.mu == mu and search.step == 1 and search.best() is None


def test_bad_reports_and_configs_are_clear_errors(tmp_path):
    search = PPOSearch(SurrogateSpec({"gAcc": 1.0}), PPOConfig(samples=2, steps=1), seed=0)
    with pytest.raises(LossforgeError, match="not in flight"):
        search.report("t000-s000", {"status": "ok", "target": 0.5})  # not handed out yet
    c = search.next_candidates(1)[0]
    with pytest.raises(LossforgeError, match="status"):
        search.report(c.id, {"status": "great"})
    search.report(c.id, {"status": "ok", "target": 0.5})
    with pytest.raises(LossforgeError, match="not in flight"):
        search.report(c.id, {"status": "ok", "target": 0.5})
    for bad in ({"samples": 0}, {"sigma": -1.0}, {"clip": 1.5}, {"baseline": "median"}, {"sigma_decay": "cosine"}):
        with pytest.raises(LossforgeError, match="ppo."):
            PPOConfig(**bad)
    (tmp_path / "s.json").write_text(json.dumps({"format": "lossforge.search_state/1"}))
    with pytest.raises(LossforgeError, match="s.json"):
        PPOSearch.load(tmp_path / "s.json")


# ----------------------------------------------------------------------------- resume


SCRIPT = '''
import os, signal, sys
sys.path.insert(0, {repo!r})
from tests.test_ppo import quadratic_reward, make_search

ckpt, kill_after = sys.argv[1], int(sys.argv[2])
search, n = make_search(), 0
while not search.done:
    for c in search.next_candidates(4):
        search.report(c.id, {{"status": "ok", "target": quadratic_reward(c.theta)}})
        search.save(ckpt)
        n += 1
        if n == kill_after:
            os.kill(os.getpid(), signal.SIGKILL)
'''


def make_search():
    cfg = PPOConfig(samples=6, steps=4, optimizer_steps=25, sigma_decay="linear")
    return PPOSearch(SurrogateSpec({"mIoU": 1.0}), cfg, seed=3)


def test_resume_after_sigkill_gives_the_same_trajectory(tmp_path):
    reference = run(make_search(), batch=4)
    script = tmp_path / "killed_search.py"
    script.write_text(SCRIPT.format(repo=str(REPO)))
    ckpt = tmp_path / "ppo_state.json"
    # 7 candidates per step (μ + 6): report 10 is in step 1, with one more of its batch of 4 in flight
    env = dict(os.environ, OMP_NUM_THREADS="1")
    proc = subprocess.run([sys.executable, str(script), str(ckpt), "10"], cwd=REPO, env=env, capture_output=True,
                          timeout=120)
    assert proc.returncode == -9, proc.stderr.decode()[-2000:]
    resumed = PPOSearch.load(ckpt)
    assert resumed.step == 1 and resumed.reported == 10 and resumed.in_flight == 0
    assert len(resumed.next_candidates(1)) == 1  # the candidate in flight at the kill is handed out again
    resumed = PPOSearch.load(ckpt)
    run(resumed, batch=4)
    assert resumed.policy_history == reference.policy_history  # exact μ trajectory
    assert [r["theta"] for r in resumed.history] == [r["theta"] for r in reference.history]
    assert [r["advantage"] for r in resumed.history] == [r["advantage"] for r in reference.history]
    assert resumed.counters == reference.counters and resumed.best() == reference.best()


def test_state_dict_round_trip_in_process(tmp_path):
    search = run(make_search(), batch=3, until=9)
    path = search.save(tmp_path / "s.json")
    copy = PPOSearch.load(path)
    assert copy.state_dict() == json.loads(path.read_text())
    run(search, batch=3)
    run(copy, batch=3)
    assert copy.policy_history == search.policy_history and copy.mu == search.mu


# ----------------------------------------------------------------------------- export


def test_result_exports_directly_as_a_loss(tmp_path):
    search = run(PPOSearch(SurrogateSpec({"mIoU": 1.0, "BF1": 0.5}), PPOConfig(samples=4, steps=2, optimizer_steps=10), seed=4))
    best = search.best()
    spec = search.best_spec()
    assert spec.flat_theta() == pytest.approx(best["theta"], abs=0) and SurrogateSpec.from_dict(best["spec"]) == spec
    path = save_surrogate(spec, tmp_path / "searched.json", meta={"reward": best["score"], "step": best["step"]})
    loaded = load_surrogate(path)
    assert loaded == spec and json.loads(path.read_text())["control_points"]["BF1.prec_and"][0] == [0.0, 0.0]
    src_path = tmp_path / "searched_loss.py"
    src_path.write_text(export_surrogate_module_source(loaded, "SearchedLoss"))
    mod_spec = importlib.util.spec_from_file_location("searched_loss", src_path)
    module = importlib.util.module_from_spec(mod_spec)
    mod_spec.loader.exec_module(module)
    gen = torch.Generator().manual_seed(0)
    logits = torch.randn(2, 3, 12, 12, generator=gen)
    target = torch.randint(0, 3, (2, 12, 12), generator=gen)
    assert float(module.SearchedLoss()(logits, target)) == float(SurrogateLoss(loaded, 3)(logits, target))


def test_flow_helpers_hash_loss_spec_and_progress():
    from components.tasks.loss_registry import build_loss

    search = PPOSearch(SurrogateSpec({"mIoU": 1.0}), PPOConfig(samples=3, steps=2, optimizer_steps=5), seed=6)
    cands = search.next_candidates()
    assert len({c.hash for c in cands}) == len(cands) and all(len(c.hash) == 16 for c in cands)
    loss = build_loss(cands[1].loss_spec(), num_classes=3)
    gen = torch.Generator().manual_seed(1)
    logits, target = torch.randn(1, 3, 8, 8, generator=gen), torch.randint(0, 3, (1, 8, 8), generator=gen)
    assert float(loss(logits, target)) == float(cands[1].loss(3)(logits, target))
    for c, reward in zip(cands, [0.5, 0.6, 0.4, 0.7]):
        search.report(c.id, {"status": "ok", "target": reward})
    assert search.history[1]["hash"] == cands[1].hash
    run(search)
    curve = search.progress_curve()
    assert [p["step"] for p in curve] == [0, 1] and [p["evaluations"] for p in curve] == [4, 8]
    assert curve[0]["mu_reward"] == 0.5 and curve[0]["max_reward"] == 0.7
    assert curve[1]["best_so_far"] == max(0.5, curve[1]["mu_reward"])
