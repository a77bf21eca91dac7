"""A tiny search (proxy trainings in worker processes) logged to a real `mlflow server` on localhost:
experiment, parent run (params, funnel, best loss, comparison table, progress plot) and one nested run per
evaluated candidate with artifacts."""

from __future__ import annotations

import json

import pytest
from mlflow.tracking import MlflowClient

from test_flows_support import cli, mlflow_server, prefect_server, write_tiny_params

pytestmark = pytest.mark.slow


def test_search_logged_to_mlflow_server(tmp_path):
    store = tmp_path / "mlflow"
    store.mkdir()
    server = mlflow_server(store)
    try:
        project = tmp_path / "project"
        project.mkdir()
        write_tiny_params(project, tracking={"uri": server.url}, search={"runner": "processes"})
        done = cli(["search"], project, PREFECT_API_URL=prefect_server().url)
        assert done.returncode == 0, done.stderr[-3000:]
        summary = json.loads((project / "losses" / "segmentation-mIoU" / "search.json").read_text())

        client = MlflowClient(server.url)
        exp = client.get_experiment_by_name(f"lossforge/{summary['search_id']}")
        assert exp is not None
        parent = client.search_runs([exp.experiment_id], "tags.`lossforge.kind` = 'search'")
        assert len(parent) == 1
        parent = parent[0]
        assert parent.info.status == "FINISHED"
        assert parent.data.params["search.budget"] == "3" and parent.data.params["search.metric"] == "mIoU"
        assert parent.data.metrics["funnel_evaluated"] + parent.data.metrics.get("funnel_nan_stopped", 0) \
            + parent.data.metrics.get("funnel_failed", 0) == 3
        assert parent.data.metrics["funnel_generated"] >= 3
        assert parent.data.tags["best.best_hash"] == summary["best"]["hash"]
        parent_files = {a.path for d in ("search", "retrain", "report") for a in client.list_artifacts(parent.info.run_id, d)}
        assert {"search/best.json", "search/best.py", "retrain/comparison.md", "report/progress.png"} <= parent_files

        nested = client.search_runs([exp.experiment_id], f"tags.`mlflow.parentRunId` = '{parent.info.run_id}'")
        baselines = [c for c in nested if c.data.tags.get("baseline") == "true"]
        assert [b.data.tags["baseline_name"] for b in baselines] == ["ce"]  # CE on the proxy, one seed
        children = [c for c in nested if c.data.tags.get("baseline") != "true"]
        assert len(children) == len(summary["candidates"])
        statuses = {c.data.tags["status"] for c in children}
        assert statuses <= {"evaluated", "duplicate-reused", "nan-stopped", "failed"}
        evaluated = [c for c in children if c.data.tags["status"] == "evaluated"]
        assert evaluated
        run = evaluated[0]
        assert {"canonical", "formula", "loss_hash", "parent_candidate", "mutation"} <= set(run.data.tags)
        assert {"screening_g", "proxy_mIoU", "target", "wall_time_s"} <= set(run.data.metrics)
        files = sorted(a.path for a in client.list_artifacts(run.info.run_id, "loss"))
        assert len(files) == 2 and files[0].endswith(".json") and files[1].endswith(".py")
        local = client.download_artifacts(run.info.run_id, files[0], str(tmp_path))
        assert json.loads(open(local).read())["format"] == "lossforge.loss/1"
    finally:
        server.close()
