"""MLflow artifact locations of the default local store are relative to the project folder: a project folder
moved elsewhere still opens its artifacts, through the MLflow client and through `mlflow server` (the UI)."""

from __future__ import annotations

import shutil
import subprocess
import urllib.request
from pathlib import Path

import pytest
from mlflow.tracking import MlflowClient

from components.params import load_params
from flows.run_config import make_tracker
from flows.tracking import TAG_KEY, log_comparison, resolve_tracking_uri
from test_flows_support import PYTHON, env, free_port, stop, wait_http, write_tiny_params
from test_tracking import record

pytestmark = pytest.mark.slow


def _log_a_search(project: Path) -> tuple[str, str]:
    """A search's parent run, one candidate run and a comparison run, logged with the shipped `tracking:`
    settings from inside `project`; returns (parent run id, comparison run id)."""
    params = load_params(project / "params.yaml")
    assert params.tracking.uri == "sqlite:///mlruns/mlflow.db" and params.tracking.artifacts == "mlruns/artifacts"
    tracker = make_tracker(params)
    parent = tracker.start()
    files = project / "files"
    files.mkdir()
    assert tracker.sync([record(0, files)]) == 1
    report = files / "report.md"
    report.write_text("# the report\n")
    tracker.log_final({"best_formula": "-log(y_hat)"}, [report], artifact_path="report")
    tracker.finish()
    table = files / "comparison.md"
    table.write_text("| loss | mIoU |\n")
    compare = log_comparison(resolve_tracking_uri(params.tracking.uri), "lossforge/compare", "compare", {}, {"x": 1.0},
                             [table], artifact_root=params.tracking.artifacts)
    shutil.rmtree(files)  # only the copies in the artifact store remain
    return parent, compare


def test_moved_project_still_opens_its_artifacts(tmp_path, monkeypatch):
    project = tmp_path / "project"
    project.mkdir()
    write_tiny_params(project)
    monkeypatch.chdir(project)
    parent, compare = _log_a_search(project)

    moved = tmp_path / "elsewhere" / "project-moved"
    moved.parent.mkdir()
    monkeypatch.chdir(tmp_path)
    shutil.move(str(project), str(moved))
    monkeypatch.chdir(moved)

    client = MlflowClient(resolve_tracking_uri("sqlite:///mlruns/mlflow.db"))
    assert [a.path for a in client.list_artifacts(parent, "report")] == ["report/report.md"]
    assert Path(client.download_artifacts(parent, "report/report.md", str(tmp_path))).read_text() == "# the report\n"
    run = client.get_run(parent)
    assert run.info.artifact_uri.startswith("mlruns/artifacts/lossforge/") and str(project) not in run.info.artifact_uri
    child = client.search_runs([run.info.experiment_id], f"tags.`{TAG_KEY}` = '0-h0'")[0]
    assert sorted(a.path for a in client.list_artifacts(child.info.run_id, "loss")) == ["loss/c0.json", "loss/c0.py"]
    assert [a.path for a in client.list_artifacts(compare, "compare")] == ["compare/comparison.md"]

    # the MLflow UI's server, started in the moved folder as the README says, serves them too
    port = free_port()
    log = tmp_path / "mlflow.log"
    server = subprocess.Popen(
        [PYTHON, "-m", "mlflow", "server", "--host", "127.0.0.1", "--port", str(port), "--workers", "1",
         "--backend-store-uri", "sqlite:///mlruns/mlflow.db"],
        cwd=moved, env=env(), stdout=open(log, "w"), stderr=subprocess.STDOUT, start_new_session=True,
    )
    try:
        url = f"http://127.0.0.1:{port}"
        wait_http(f"{url}/health", 240, server)
        with urllib.request.urlopen(f"{url}/get-artifact?path=report/report.md&run_id={parent}", timeout=30) as resp:
            assert resp.read().decode() == "# the report\n"
    finally:
        stop(server)

    # an absolute tracking.artifacts is recorded as is
    run_id = log_comparison(client.tracking_uri, "lossforge/abs", "abs", {}, {}, [], artifact_root=tmp_path / "art")
    assert client.get_run(run_id).info.artifact_uri.startswith(f"file://{tmp_path}/art/lossforge/abs/")
