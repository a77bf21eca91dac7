"""Auto Seg-Loss PPO as `method: ppo` of the search flow.

Fast tests drive components.surrogates.ppo_method.PPOMethod directly through the SearchMethod protocol (real PPOSearch,
ProxyResults with chosen rewards). The slow tests run the real `lossforge search` CLI (Prefect flow, proxy
trainings on the embedded shapes data, MLflow SQLite store in tmp): one search is SIGKILLed mid-way and
resumed, then checked for one nested run per θ with its reward, μ per step, plots, and loadable loss
files; a combined mIoU + BF1 surrogate search runs and its result loads.
"""

from __future__ import annotations

import importlib.util
import json
import signal
from pathlib import Path

import pytest
import torch

from components.errors import LossforgeError
from components.tasks.loss_registry import build_loss
from components.surrogates.metric_surrogates import SurrogateLoss, load_surrogate
from components.params import parse_params
from components.tasks.segmentation.trainer import ProxyResult
from components.search.method import make_method, method_names
from components.surrogates.ppo_method import PPOMethod, build_config, build_template, surrogate_metrics


def _params(**ppo):
    search = {"method": "ppo", "metric": "mIoU", "budget": ppo.pop("budget", 100)}
    return parse_params({"search": search, "ppo": ppo})


def _load_module(path: Path):
    spec = importlib.util.spec_from_file_location(f"exported_{path.stem.replace('-', '_')}", path)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def _same_loss(a, b, classes: int = 3) -> None:
    gen = torch.Generator().manual_seed(1)
    logits = torch.randn(2, classes, 12, 12, generator=gen)
    target = torch.randint(0, classes, (2, 12, 12), generator=gen)
    torch.testing.assert_close(a(logits, target), b(logits, target))


# ------------------------------------------------------------------------------------------ configuration
def test_make_method_registers_and_builds_ppo(tmp_path):
    method = make_method(_params(samples=3, steps=4), None, tmp_path)
    assert isinstance(method, PPOMethod) and "ppo" in method_names()
    assert method.loss_type == "surrogate"
    assert method.search.template.metrics == {"mIoU": 1.0}
    assert method.search.mu == pytest.approx(method.search.template.identity().flat_theta(), abs=1e-9)


@pytest.mark.parametrize("samples, baseline, steps, budget, expected", [
    (4, "mu", 12, 12, 2),     # 5 evaluations per step: 12 // 5 = 2 steps
    (4, "mean", 12, 12, 3),   # 4 per step
    (4, "mu", 12, 3, 1),      # budget below one step: still one step
    (2, "mu", 2, 1000, 2),    # ppo.steps below the budget
])
def test_budget_caps_the_number_of_steps(samples, baseline, steps, budget, expected):
    cfg = build_config(_params(samples=samples, baseline=baseline, steps=steps, budget=budget))
    assert (cfg.steps, cfg.samples, cfg.baseline) == (expected, samples, baseline)


def test_surrogate_template_from_the_ppo_section():
    assert surrogate_metrics(None, "BIoU") == {"BIoU": 1.0}
    assert surrogate_metrics("mIoU+BF1", "x") == {"mIoU": 1.0, "BF1": 1.0}
    assert surrogate_metrics(["mIoU", "BF1"], "x") == {"mIoU": 1.0, "BF1": 1.0}
    spec = build_template(_params(metrics={"mIoU": 1, "BF1": 0.5}, family="linear", pieces=3))
    assert spec.metrics == {"mIoU": 1.0, "BF1": 0.5}
    assert (spec.family, spec.pieces) == ("linear", 3)
    assert len(spec.curve_names()) == 2 + 4  # mIoU: and, or; BF1: xor_and, xor_or, prec_and, recall_and


@pytest.mark.parametrize("metrics, message", [("mIoU+", "ppo.metrics"), (7, "ppo.metrics"),
                                              ({"Dice": 1}, "ppo"), ({"mIoU": -1}, "ppo")])
def test_bad_surrogate_metrics_are_one_line_errors(metrics, message):
    with pytest.raises(LossforgeError, match=message) as info:
        build_template(_params(metrics=metrics))
    assert "\n" not in str(info.value)


# ------------------------------------------------------------------------------------------ protocol
def _run_steps(method: PPOMethod, rewards: dict[str, float], checkpoint: Path, n: int = 2) -> list[str]:
    """Drive the method as the search loop does (n candidates per call, `rewards` by id, default 0.1)."""
    order = []
    while not method.done:
        cands = method.ask(n)
        assert cands, "nothing in flight, not done, but no candidate"
        for c in cands:
            assert c["loss"]["type"] == "surrogate" and c["hash"] == build_loss(
                c["loss"], num_classes=3).spec.hash()
            r = rewards.get(c["id"], 0.1)
            method.tell(c["id"], ProxyResult(c["id"], "ok", metrics={"mIoU": r}, target=r))
            order.append(c["id"])
        method.save(checkpoint)
    return order


def test_protocol_progress_best_and_loss_files(tmp_path):
    method = PPOMethod.create(_params(samples=2, steps=2), None, tmp_path)
    # a step is handed out in full before the next one starts: [] while its last candidate is in flight
    first = method.ask(2)
    assert [c["id"] for c in first] == ["t000-mu", "t000-s000"]
    last = method.ask(2)
    assert [c["id"] for c in last] == ["t000-s001"]
    assert method.ask(2) == []
    assert method.counters["in_flight"] == 3
    rewards = {"t000-mu": 0.30, "t000-s000": 0.50, "t000-s001": 0.20, "t001-mu": 0.45, "t001-s000": 0.10,
               "t001-s001": 0.40}
    for c in first + last:
        method.tell(c["id"], ProxyResult(c["id"], "ok", target=rewards[c["id"]]))
    _run_steps(method, rewards, tmp_path / "checkpoint.json")
    assert method.done and method.counters["evaluated"] == 6 and method.counters["steps"] == 2

    # progress: top-5 mean of the targets so far, after each of the 6 evaluations (hand-worked)
    curve = method.progress()
    assert [p["evaluations"] for p in curve] == [1, 2, 3, 4, 5, 6]
    assert [p["top5_mean"] for p in curve] == pytest.approx(
        [0.30, 0.40, 1.0 / 3.0, 0.3625, 0.31, (0.5 + 0.45 + 0.4 + 0.3 + 0.2) / 5])
    assert curve[2]["mu_reward"] == 0.30 and curve[2]["max_reward"] == 0.50 and "mu_reward" not in curve[1]

    # history records carry what the flow logs; samples advantage = reward - μ's reward of their step
    hist = {r["id"]: r for r in method.history}
    assert hist["t000-s000"]["advantage"] == pytest.approx(0.20)
    assert hist["t001-s001"]["advantage"] == pytest.approx(-0.05)
    assert hist["t001-s000"]["parent_id"] == "t001-mu" and hist["t000-mu"]["parent_id"] is None
    assert all(r["formula"].startswith("1 - smIoU") for r in hist.values())

    # best = the μ_t with the highest own reward: μ_1 (0.45), i.e. the policy mean after step 0
    best = method.best()
    assert (best["id"], best["step"], best["target"]) == ("t001-mu", 1, 0.45)
    assert best["theta"] == pytest.approx(method.search.policy_history[0]["mu_next"])
    json_path, py_path = method.write_loss_files(best, tmp_path / "out", "best")
    loaded = build_loss({"type": "surrogate", "path": str(json_path)}, num_classes=3)
    assert load_surrogate(json_path).flat_theta() == pytest.approx(best["theta"])
    assert json.loads(json_path.read_text())["meta"]["candidate_id"] == "t001-mu"
    _same_loss(loaded, _load_module(py_path).SearchedSurrogateLoss())
    assert method.loss_spec(best)["spec"]["theta"] == load_surrogate(json_path).to_dict()["theta"]


def test_resume_from_the_checkpoint_hands_out_unreported_candidates_again(tmp_path):
    params = _params(samples=2, steps=2)
    method = PPOMethod.create(params, None, tmp_path)
    issued = method.ask(2)
    method.tell(issued[0]["id"], ProxyResult(issued[0]["id"], "ok", target=0.3))
    method.save(tmp_path / "checkpoint.json")  # killed with issued[1] in flight
    resumed = make_method(params, None, tmp_path)
    assert [r["id"] for r in resumed.history] == ["t000-mu"]
    again = resumed.ask(5)
    assert [c["id"] for c in again] == ["t000-s000", "t000-s001"]
    assert again[0]["hash"] == issued[1]["hash"]


# ------------------------------------------------------------------------------------------ the real flow
def _results(folder: Path) -> dict[str, str]:
    return {p.name: p.read_text() for p in folder.glob(".lossforge/runs/*/results/*.json")}


def _search_runs(folder: Path):
    from mlflow.tracking import MlflowClient

    client = MlflowClient(tracking_uri=f"sqlite:///{folder / 'mlruns' / 'mlflow.db'}")
    (exp,) = [e for e in client.search_experiments() if e.name.startswith("lossforge/")]
    runs = client.search_runs([exp.experiment_id], max_results=1000)
    parent = [r for r in runs if r.data.tags.get("lossforge.kind") == "search"]
    cands = [r for r in runs if r.data.tags.get("lossforge.kind") == "candidate"]
    assert len(parent) == 1
    return client, parent[0], cands


def _run_flow_here(folder: Path, api_url: str, monkeypatch=None) -> None:
    """`lossforge search --no-retrain` in a fresh process against the test's Prefect server.

    (In-process runs late in a long pytest session hit Prefect's console log handler holding a stream
    that pytest already closed, so the flow runs where a user would run it: in its own process.)"""
    from test_flows_support import cli

    done = cli(["search", "--no-retrain"], folder, timeout=360, PREFECT_API_URL=api_url)
    assert done.returncode == 0, done.stdout[-2000:] + done.stderr[-3000:]


@pytest.mark.slow
@pytest.mark.timeout(400)
def test_ppo_search_through_the_flow_killed_and_resumed(tmp_path, monkeypatch):
    from test_flows_support import kill_search_midway, prefect_server, write_tiny_params

    server = prefect_server()
    write_tiny_params(tmp_path, search={"method": "ppo", "budget": 6, "workers": 2},
                      proxy={"iterations": 4}, ppo={"samples": 2, "steps": 2})
    returncode = kill_search_midway(tmp_path, server.url, _results)
    assert returncode == -signal.SIGKILL, "the search finished before it could be killed"
    before = _results(tmp_path)
    assert 2 <= len(before) < 6

    _run_flow_here(tmp_path, server.url, monkeypatch)  # resume: the same search, in this process
    after = _results(tmp_path)
    assert len(after) == 6
    for name, text in before.items():  # finished samples were read back, never trained again
        assert after[name] == text
    state = json.loads(next(tmp_path.glob(".lossforge/runs/*/checkpoint.json")).read_text())
    ids = [r["id"] for r in state["history"]]
    assert sorted(ids) == ["t000-mu", "t000-s000", "t000-s001", "t001-mu", "t001-s000", "t001-s001"]
    assert [s["step"] for s in state["policy_history"]] == [0, 1]

    # MLflow: one nested run per trained θ, with its reward (and advantage for samples); artifact locations are
    # relative to the project folder (a moved project keeps its artifacts), so the client reads from there
    monkeypatch.chdir(tmp_path)
    client, parent, cands = _search_runs(tmp_path)
    by_key = {r.data.tags["lossforge.candidate_key"]: r for r in cands}
    assert sorted(by_key) == sorted(f"{r['id']}-{r['hash']}" for r in state["history"])
    mu_target = {r["step"]: r["target"] for r in state["history"] if r["kind"] == "mu"}
    for rec in state["history"]:
        run = by_key[f"{rec['id']}-{rec['hash']}"]
        assert run.data.tags["mlflow.parentRunId"] == parent.info.run_id
        assert run.data.metrics["reward"] == pytest.approx(rec["target"])
        assert run.data.metrics["target"] == pytest.approx(rec["target"])
        if rec["kind"] == "sample":
            assert run.data.metrics["advantage"] == pytest.approx(rec["target"] - mu_target[rec["step"]])
    # μ per step on the parent run: each step exactly once despite the kill
    names = [k for k in parent.data.metrics if k.startswith("mu.")]
    assert len(names) == len(state["policy_history"][0]["mu"]) == 12  # mIoU: 2 curves x 6 (Bézier, 2 pieces)
    for name in names:
        hist = client.get_metric_history(parent.info.run_id, name)
        assert sorted(m.step for m in hist) == [0, 1]
    first = client.get_metric_history(parent.info.run_id, "ppo_mu_reward")
    assert {m.step: m.value for m in first} == pytest.approx(mu_target)
    arts = {a.path for a in client.list_artifacts(parent.info.run_id, "ppo")}
    assert {"ppo/policy.png", "ppo/best_curves.png", "ppo/policy.json", "ppo/curves"} <= arts
    curves = {a.path for a in client.list_artifacts(parent.info.run_id, "ppo/curves")}
    assert curves == {"ppo/curves/step-000.png", "ppo/curves/step-001.png"}

    # the searched surrogate: best μ exported as JSON + .py under losses/<task>-<metric>/, both loadable
    out = tmp_path / "losses" / "segmentation-mIoU"
    summary = json.loads((out / "search.json").read_text())
    assert summary["best_loss"] == {"type": "surrogate", "path": "losses/segmentation-mIoU/best.json"}
    best_step = max(mu_target, key=lambda s: (mu_target[s], -s))
    best_mu = state["policy_history"][best_step]["mu"]
    spec = load_surrogate(out / "best.json")
    assert spec.flat_theta() == pytest.approx(best_mu, abs=1e-9)
    loss = build_loss({"type": "surrogate", "path": str(out / "best.json")}, num_classes=3)
    _same_loss(loss, _load_module(out / "best.py").SearchedSurrogateLoss())
    _same_loss(loss, SurrogateLoss(spec, 3))


@pytest.mark.slow
@pytest.mark.timeout(300)
def test_combined_miou_bf1_surrogate_search(tmp_path, monkeypatch):
    from test_flows_support import prefect_server, write_tiny_params

    server = prefect_server()
    write_tiny_params(tmp_path, search={"method": "ppo", "budget": 2, "workers": 2},
                      ppo={"samples": 2, "steps": 1, "baseline": "mean", "metrics": {"mIoU": 1, "BF1": 1}},
                      tracking={"enabled": False})
    _run_flow_here(tmp_path, server.url, monkeypatch)
    spec = load_surrogate(tmp_path / "losses" / "segmentation-mIoU" / "best.json")
    assert spec.metrics == {"mIoU": 1.0, "BF1": 1.0} and len(spec.curve_names()) == 6
    # with the "mean" baseline the result is μ_0 = the identity initialisation (only one step)
    assert spec.flat_theta() == pytest.approx(spec.identity().flat_theta(), abs=1e-6)
    loss = build_loss({"type": "surrogate", "path": str(tmp_path / "losses/segmentation-mIoU/best.json")},
                      num_classes=3)
    _same_loss(loss, _load_module(tmp_path / "losses/segmentation-mIoU/best.py").SearchedSurrogateLoss())
    state = json.loads(next(tmp_path.glob(".lossforge/runs/*/checkpoint.json")).read_text())
    assert [r["kind"] for r in state["history"]] == ["sample", "sample"]
    assert all(r["status"] == "evaluated" for r in state["history"])
