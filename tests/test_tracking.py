"""SearchTracker on the default local SQLite store: one experiment per search, idempotent candidate runs,
half-written runs replaced on resume, transient 'database is locked' errors retried."""

from __future__ import annotations

import json
import sqlite3
import threading
import time

import pytest
from mlflow.tracking import MlflowClient

from flows.tracking import TAG_KEY, SearchTracker, resolve_tracking_uri, with_retries


def record(i: int, tmp_path, status="evaluated", target=0.5):
    loss = tmp_path / f"c{i}.json"
    loss.write_text(json.dumps({"format": "lossforge.loss/1", "id": i}))
    module = tmp_path / f"c{i}.py"
    module.write_text("import torch\n")
    return {
        "key": f"{i}-h{i}", "id": i, "hash": f"h{i}", "canonical": f"neg(log(y_hat))#{i}", "formula": f"-log(y_hat) #{i}",
        "parent_id": None if i == 0 else i - 1, "mutation": "init" if i == 0 else "mutate:insertion+deletion",
        "screening_g": 0.9, "status": status, "metrics": {"mIoU": target, "gAcc": 0.8}, "target": target,
        "seconds": 1.5, "iterations": 10, "message": "", "loss_json": str(loss), "module_py": str(module),
    }


@pytest.fixture(scope="module")
def store(tmp_path_factory):
    """One SQLite store for the module (creating MLflow's tables takes seconds); searches differ by id."""
    root = tmp_path_factory.mktemp("store")
    return root, resolve_tracking_uri("sqlite:///mlruns/mlflow.db", root)


@pytest.fixture()
def uri(store):
    return store[1]


def tracker(uri, tmp_path, search_id=None):
    search_id = search_id or tmp_path.name
    return SearchTracker(uri, f"lossforge/{search_id}", search_id, artifact_root=tmp_path / "art",
                         params={"search.budget": 3, "search.metric": "mIoU"})


def test_candidate_runs_are_nested_and_idempotent(uri, tmp_path):
    assert uri.startswith("sqlite:////") and uri.endswith("/mlruns/mlflow.db")
    t = tracker(uri, tmp_path)
    parent = t.start()
    recs = [record(0, tmp_path), record(1, tmp_path, "nan-stopped", None), record(2, tmp_path, "duplicate-reused")]
    assert t.sync(recs[:2]) == 2
    t.log_search_state({"generated": 10, "rejected_zero_gradient": 6, "evaluated": 2}, 2, 0.5)
    t.finish()

    # a second process resumes the same search: same parent, nothing logged twice
    t2 = tracker(uri, tmp_path)
    assert t2.start() == parent
    assert t2.sync(recs) == 1
    client = MlflowClient(uri)
    exp = client.get_experiment_by_name(f"lossforge/{tmp_path.name}")
    runs = client.search_runs([exp.experiment_id])
    children = [r for r in runs if r.data.tags.get("mlflow.parentRunId") == parent]
    assert sorted(r.data.tags[TAG_KEY] for r in children) == ["0-h0", "1-h1", "2-h2"]
    by_key = {r.data.tags[TAG_KEY]: r for r in children}
    first = by_key["1-h1"]
    assert first.data.tags["status"] == "nan-stopped"
    assert first.data.tags["parent_candidate"] == "0" and first.data.tags["mutation"] == "mutate:insertion+deletion"
    assert first.data.tags["formula"] == "-log(y_hat) #1"
    assert first.data.metrics["screening_g"] == 0.9 and first.data.metrics["wall_time_s"] == 1.5
    assert "target" not in first.data.metrics
    assert by_key["0-h0"].data.metrics["proxy_mIoU"] == 0.5
    arts = sorted(a.path for a in client.list_artifacts(by_key["0-h0"].info.run_id, "loss"))
    assert arts == ["loss/c0.json", "loss/c0.py"]
    parent_run = client.get_run(parent)
    assert parent_run.data.params["search.budget"] == "3"
    assert parent_run.data.metrics["funnel_rejected_zero_gradient"] == 6
    # only the parent and its children: screened-out candidates are counters, not runs
    assert len(runs) == 4


def test_half_written_run_is_replaced_on_resume(uri, tmp_path):
    t = tracker(uri, tmp_path)
    parent = t.start()
    # what a SIGKILL between create_run and set_terminated leaves behind
    t.client.create_run(t.experiment_id, tags={"mlflow.parentRunId": parent, "lossforge.search_id": t.search_id,
                                                "lossforge.kind": "candidate", TAG_KEY: "0-h0"})
    t2 = tracker(uri, tmp_path)
    t2.start()
    assert "0-h0" not in t2.logged
    assert t2.sync([record(0, tmp_path)]) == 1
    live = MlflowClient(uri).search_runs([t2.experiment_id], f"tags.`{TAG_KEY}` = '0-h0'")
    assert len(live) == 1 and live[0].info.status == "FINISHED"


def test_locked_database_is_retried(uri, tmp_path):
    t = tracker(uri, tmp_path)
    t.start()
    db = uri[len("sqlite:///"):]
    lock = sqlite3.connect(db, timeout=0.1, check_same_thread=False)
    lock.execute("BEGIN EXCLUSIVE")
    threading.Timer(1.5, lock.rollback).start()
    start = time.time()
    t.sync([record(5, tmp_path)])  # blocked by the exclusive lock for 1.5 s, then succeeds
    assert "5-h5" in t.logged
    assert time.time() - start >= 1.0
    lock.close()


def test_with_retries_gives_up_on_real_errors():
    calls = []

    def boom():
        calls.append(1)
        raise ValueError("RESOURCE_DOES_NOT_EXIST")

    with pytest.raises(ValueError):
        with_retries(boom, "test")
    assert len(calls) == 1
