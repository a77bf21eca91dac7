"""Search method `cse` (components/cse/method.py): registry, funnel, resume, params, and a tiny real
`lossforge search --task detection --method cse` through the CLI, Prefect flow and MLflow."""

from __future__ import annotations

import json

import pytest

from components.cse.config import CSEConfig
from components.cse.convergence import REASONS as CONVERGENCE_REASONS
from components.cse.method import CSEMethod
from components.errors import LossforgeError
from components.search.evolution import SearchStalledError
from components.search.method import get_method_class, method_names
from components.tasks.base import ProxyResult


def _score(cand) -> ProxyResult:
    """A deterministic stand-in for a proxy training's score (the method only sees the number)."""
    return ProxyResult(name=str(cand["id"]), status="ok", target=int(cand["hash"][:4], 16) / 65536,
                       metrics={"mAP": 0.0}, target_metric="mAP")


def _run(method, stop_after_groups=None, checkpoint=None):
    """Drive ask/tell as the flow does with 2 workers and groups of 2: two groups in flight, results told in
    hand-out order, the state saved after each group's update (where a kill can leave it)."""
    in_flight, groups = [], 0
    while True:
        while len(in_flight) < 2:
            cands = method.ask(2)
            if not cands:
                break
            in_flight.append(cands)
        if not in_flight:
            return
        for cand in in_flight.pop(0):
            method.tell(cand["id"], _score(cand))
        if checkpoint is not None:
            method.save(checkpoint)
        groups += 1
        if stop_after_groups is not None and groups >= stop_after_groups:
            return


def _fresh(**kw):
    config = CSEConfig(**{"simulation": False, "initial_population": 3, **kw})
    return CSEMethod(config, budget=8, seed=5)


def test_cse_is_a_registered_search_method():
    assert "cse" in method_names() and get_method_class("cse") is CSEMethod


def test_funnel_adds_up_and_candidates_are_detection_cse_graphs():
    method = _fresh()
    _run(method)
    c = method.counters
    rejected = sum(v for k, v in c.items() if k.startswith("rejected_"))
    assert c["generated_branches"] == c["verified_branches"] + rejected > c["verified_branches"]
    assert {k[len("rejected_"):] for k in c if k.startswith("rejected_")} <= set(CONVERGENCE_REASONS)
    assert c["verified"] == c["accepted"] == c["duplicates"] + c["evaluated"] and c["evaluated"] == 8
    assert c["in_flight"] == 0 and len(method.history) == 8 + c["duplicates"]
    graph = method.history[0]["graph"]
    assert graph["task"] == "detection_cse" and set(graph["branches"]) == {"cls", "reg"}
    assert method.best()["target"] == max(r["target"] for r in method.history if r["status"] == "evaluated")


def test_resumed_search_takes_the_uninterrupted_path(tmp_path):
    whole = _fresh()
    _run(whole)
    first = _fresh()
    _run(first, stop_after_groups=2, checkpoint=tmp_path / "checkpoint.json")  # killed: a group still in flight
    assert first.counters["in_flight"] == 2
    resumed = _fresh()
    resumed.load_state(json.loads((tmp_path / "checkpoint.json").read_text()))
    _run(resumed)
    key = lambda m: [(r["id"], r["hash"], r["status"], r["target"]) for r in m.history]  # noqa: E731
    assert key(resumed) == key(whole)
    other = _fresh(depth=2)
    with pytest.raises(LossforgeError, match="other cse settings"):
        other.load_state(json.loads((tmp_path / "checkpoint.json").read_text()))


def test_seed_losses_are_verified_first(tmp_path):
    from components.cse import published as P
    from components.search.graph_json import save_graph

    junk = save_graph(P.graph("neg(dot(y,x))", P.GIOU_REG), tmp_path / "junk.json")  # never converges
    method = _fresh(seed_losses=("cse_autoloss_a", str(junk), "cse_autoloss_b"))
    cands = method.ask(2)
    hashes = [c["hash"] for c in cands]
    assert hashes == [P.published_graph("cse_autoloss_a").hash(), P.published_graph("cse_autoloss_b").hash()]
    assert method.counters["rejected_cls_not_convergent"] == 1


def test_simulation_rejections_are_counted_and_a_hopeless_search_stalls(tmp_path):
    """With a bar no loss reaches, every verified loss is simulated and rejected; after max_attempts the search
    stops with one line that gives the funnel."""
    from components.cse.simulation import OptimizationSimulator
    from components.tasks.detection.datasets import open_detection_dataset
    from components.tasks.detection.models import DetectorConfig
    from components.tasks.detection.trainer import ProxyConfig
    from components.tasks.segmentation.shapes import ensure_shapes

    root = ensure_shapes(tmp_path / "shapes", num_train=8, num_test=2, image_size=64, seed=3)
    tiny = DetectorConfig(name="tiny", min_size=64, max_size=64, rpn_batch_size_per_image=32, box_batch_size_per_image=32)
    simulator = OptimizationSimulator(open_detection_dataset(root, split="train"), ProxyConfig(model=tiny, device="cpu"),
                                      images_per_class=1, iterations=2, batch_size=2, min_gain=1.0)
    config = CSEConfig(initial_population=2, max_attempts=2, seed_losses=("ce_giou_cse",))
    method = CSEMethod(config, budget=4, seed=0, simulator=simulator)
    with pytest.raises(SearchStalledError, match="cse search stalled.*simulation_no_gain"):
        method.ask(1)
    c = method.counters
    assert c["simulated"] == c["rejected_simulation_no_gain"] >= 1 and c["accepted"] == 0
    assert all(r["accepted"] is False for r in method.simulations.values())


@pytest.mark.parametrize("override,message", [
    ({"cse.images_per_class": 0}, "params.yaml: cse: images_per_class: must be >= 1 (got 0)"),
    ({"cse.min_gradient": -1.0}, "params.yaml: cse: min_gradient: must be > 0 (got -1.0)"),
    ({"cse.min_ap_ratio": -0.5}, "params.yaml: cse: min_ap_ratio: must be >= 0 (got -0.5)"),
    ({"cse.seed_losses": ["cse_autoloss_c"]}, "params.yaml: cse: seed_losses: 'cse_autoloss_c' is neither"),
    ({"cse.simulation_iterations": True}, "params.yaml: cse.simulation_iterations: expected a number (got True)"),
    ({"search.task": "segmentation"}, "params.yaml: search.method: 'cse' searches detection losses"),
])
def test_bad_cse_params_are_one_line_errors(override, message):
    from pathlib import Path

    from components.params import load_params

    params = load_params(Path(__file__).resolve().parents[1] / "params.yaml", profile="demo")
    overrides = {"search.task": "detection", "search.method": "cse", **override}
    with pytest.raises(LossforgeError) as info:
        params.with_overrides(overrides)
    assert str(info.value).startswith(message) and "\n" not in str(info.value)


def test_cse_settings_change_only_cse_search_ids():
    from pathlib import Path

    from components.params import load_params

    params = load_params(Path(__file__).resolve().parents[1] / "params.yaml", profile="demo")
    det = params.with_overrides({"search.task": "detection"})
    assert det.with_overrides({"cse.depth": 4}).search_id == det.search_id  # evolution: cse is not its business
    cse = det.with_overrides({"search.method": "cse"})
    assert cse.with_overrides({"cse.depth": 4}).search_id != cse.search_id


CSE = {
    "tasks": {"detection": {
        "search": {"budget": 2, "workers": 1, "losses_per_training": 2},
        "proxy": {"iterations": 4, "batch_size": 2, "eval_batch_size": 4, "seeds": [0]},
        "retrain": {"iterations": 4, "batch_size": 2, "eval_batch_size": 4, "seeds": [0],
                    "baselines": ["cse_autoloss_a"], "top_k": 1},
        # in the task block, as the demo profile's (which a top-level `cse:` would not override)
        "cse": {"initial_population": 2, "seed_losses": ["cse_autoloss_a", "cse_autoloss_b"], "images_per_class": 1,
                "simulation_iterations": 12, "min_ap_ratio": 0.0},  # the reference check: tests/test_cse_simulation.py
    }},
}


@pytest.mark.slow
@pytest.mark.timeout(900)
def test_cse_search_through_the_cli(tmp_path):
    """Measured: ~3 min on 2 busy cores (prepare, proxy baselines, 2 simulations, 2 proxy trainings, re-training)."""
    import sqlite3

    from test_flows_support import cli, write_tiny_params

    write_tiny_params(tmp_path, **CSE)
    done = cli(["search", "--task", "detection", "--method", "cse"], tmp_path, timeout=840)
    assert done.returncode == 0, done.stdout[-2000:] + done.stderr[-3000:]
    summary = json.loads((tmp_path / "losses" / "detection-mAP" / "search.json").read_text())
    assert summary["method"] == "cse" and summary["search_id"].startswith("detection-mAP-cse-")
    c = summary["counters"]
    assert c["simulated"] == 2 and c["accepted"] == 2 and c["evaluated"] == 2 and c["generated_branches"] == 4
    best = json.loads((tmp_path / "losses" / "detection-mAP" / "best.json").read_text())
    assert best["task"] == "detection_cse" and best["metadata"]["method"] == "cse"
    assert best["metadata"]["simulation"]["accepted"] is True
    rows = {r["name"]: r for r in json.loads((tmp_path / "reports" / "detection-mAP" / "comparison.json").read_text())["rows"]}
    assert set(rows) == {"searched", "ce_smoothl1", "cse_autoloss_a"} and all(r["status"] in ("ok", "nan") for r in rows.values())
    with sqlite3.connect(tmp_path / "mlruns" / "mlflow.db") as db:  # the cse funnel on the parent run
        logged = {k for (k,) in db.execute("select distinct key from metrics where key like 'funnel_%'")}
    assert {"funnel_simulated", "funnel_verified_branches", "funnel_evaluated"} <= logged


def test_a_searched_cse_loss_file_is_a_detection_loss_for_compare(tmp_path):
    """`lossforge compare --task detection best.json` takes the `detection_cse` file a cse search writes."""
    from components.cse.published import published_graph
    from components.search.graph_json import save_graph
    from flows.cli.compare_cmd import resolve_loss

    path = tmp_path / "best.json"
    save_graph(published_graph("cse_autoloss_a"), path, name="best")
    name, spec = resolve_loss(str(path), "detection")
    assert name == "best" and spec == {"type": "graph", "path": str(path.resolve())}
    from components.tasks.base import get_task

    assert type(get_task("detection").build_loss(spec)).__name__ == "CSEDetectionLoss"
    for task in ("segmentation", "instance_segmentation"):
        with pytest.raises(LossforgeError, match="a detection_cse loss, but the task is"):
            resolve_loss(str(path), task)
