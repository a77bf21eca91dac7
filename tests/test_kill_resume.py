"""SIGKILL a running search, run it again: it resumes from the checkpoint, finished proxy evaluations are
not trained again, nothing is lost, and MLflow holds exactly one run per candidate."""

from __future__ import annotations

import json
import signal
from pathlib import Path

import pytest
from mlflow.tracking import MlflowClient

from test_flows_support import cli, kill_search_midway, prefect_server, write_tiny_params

pytestmark = pytest.mark.slow


def _results(folder: Path) -> dict[str, dict]:
    return {p.name: json.loads(p.read_text()) for p in folder.glob(".lossforge/runs/*/results/*.json")}


def test_sigkill_mid_search_then_resume(tmp_path):
    server = prefect_server()
    write_tiny_params(tmp_path, search={"budget": 5, "workers": 2})
    returncode = kill_search_midway(tmp_path, server.url, _results, timeout=400)
    assert returncode == -signal.SIGKILL, "the search finished before it could be killed"
    before = _results(tmp_path)
    assert len(before) >= 2
    checkpoints = list(tmp_path.glob(".lossforge/runs/*/checkpoint.json"))
    reported_before = json.loads(checkpoints[0].read_text())["history"] if checkpoints else []

    done = cli(["search", "--no-retrain"], tmp_path, PREFECT_API_URL=server.url)
    assert done.returncode == 0, done.stderr[-3000:]
    after = _results(tmp_path)
    # finished evaluations were read back, not trained again (same files, same timestamps)
    for name, res in before.items():
        assert after[name] == res
    state = json.loads(next(tmp_path.glob(".lossforge/runs/*/checkpoint.json")).read_text())
    history = state["history"]
    ids = [r["id"] for r in history]
    assert len(ids) == len(set(ids))
    trained = [r for r in history if r["status"] in ("evaluated", "nan-stopped", "failed")]
    assert len(trained) == 5  # the budget, no more, no less
    # every evaluation finished before the kill is in the resumed search with its result
    by_key = {f"{r['id']}-{r['hash']}.json": r for r in history}
    for name, res in before.items():
        assert name in by_key
        assert by_key[name]["target"] == (res["target"] if res["status"] == "ok" else None)
    for rec in reported_before:
        assert rec["id"] in ids
    # each proxy training ran once: one result file per trained candidate
    assert sorted(after) == sorted(f"{r['id']}-{r['hash']}.json" for r in trained)

    client = MlflowClient(f"sqlite:///{tmp_path}/mlruns/mlflow.db")
    exp = client.get_experiment_by_name(f"lossforge/{state_search_id(tmp_path)}")
    runs = client.search_runs([exp.experiment_id], "tags.`lossforge.kind` = 'candidate'")
    keys = [r.data.tags["lossforge.candidate_key"] for r in runs]
    assert len(keys) == len(set(keys)) == len(history)
    assert all(r.info.status == "FINISHED" for r in runs)
    parents = client.search_runs([exp.experiment_id], "tags.`lossforge.kind` = 'search'")
    assert len(parents) == 1


def state_search_id(folder: Path) -> str:
    return next(folder.glob(".lossforge/runs/*/checkpoint.json")).parent.name
