"""`dvc repro` for real on the tiny profile in a temporary git repository: every stage runs and writes its
outs, metrics and plots are readable, and changing one parameter re-runs only the stages depending on it."""

from __future__ import annotations

import json
import os
import shutil
import subprocess
from pathlib import Path

import pytest
import yaml

from test_flows_support import ROOT, env, prefect_server, write_tiny_params

pytestmark = pytest.mark.slow
DVC = str(Path(os.sys.executable).parent / "dvc")


def run(args: list[str], cwd: Path, extra: dict[str, str], timeout: float = 900) -> str:
    done = subprocess.run(args, cwd=cwd, env=env(**extra), capture_output=True, text=True, timeout=timeout)
    assert done.returncode == 0, f"{args}: {done.stdout[-3000:]}\n{done.stderr[-3000:]}"
    return done.stdout + done.stderr


def test_dvc_repro_then_one_parameter_change(tmp_path):
    repo = tmp_path / "repo"
    repo.mkdir()
    for name in ("dvc.yaml", ".dvcignore"):
        shutil.copy(ROOT / name, repo / name)
    write_tiny_params(repo, profile="demo")
    extra = {"PREFECT_API_URL": prefect_server().url,
             "PATH": f"{Path(os.sys.executable).parent}{os.pathsep}{os.environ.get('PATH', '')}",
             "GIT_AUTHOR_NAME": "t", "GIT_AUTHOR_EMAIL": "t@t", "GIT_COMMITTER_NAME": "t", "GIT_COMMITTER_EMAIL": "t@t"}
    run(["git", "init", "-q"], repo, extra)
    run([DVC, "init", "-q"], repo, extra)
    run([DVC, "config", "core.analytics", "false"], repo, extra)
    run(["git", "add", "-A"], repo, extra)
    run(["git", "commit", "-qm", "pipeline"], repo, extra)

    out = run([DVC, "repro"], repo, extra)
    for stage in ("prepare", "split", "search", "retrain", "report"):
        assert f"Running stage '{stage}'" in out
    name = "segmentation-mIoU"
    for path in ("data/shapes/classes.txt", "data/splits/train.txt", "data/splits/eval.txt", "data/splits/test.txt",
                 f"losses/{name}/best.json", f"losses/{name}/best.py", f"losses/{name}/search.json",
                 f"reports/{name}/comparison.md", f"reports/{name}/report.md", f"reports/{name}/progress.png",
                 f"reports/{name}/progress.csv", f"reports/{name}/metrics.json"):
        assert (repo / path).exists(), path
    assert (repo / "dvc.lock").exists()
    metrics = json.loads(run([DVC, "metrics", "show", "--json"], repo, extra))
    flat = json.dumps(metrics)
    assert "best_proxy_target" in flat and "search_overhead_share" in flat
    plots = run([DVC, "plots", "show", "--json"], repo, extra)
    assert "top5_mean" in plots and "evaluations" in plots
    assert "up to date" in run([DVC, "status"], repo, extra)

    # change one re-training parameter: only retrain (and report, which reads its table) are stale
    raw = yaml.safe_load((repo / "params.yaml").read_text())
    raw["profiles"]["demo"]["retrain"]["iterations"] = 4
    (repo / "params.yaml").write_text(yaml.safe_dump(raw, sort_keys=False))
    status = run([DVC, "status", "--json"], repo, extra)
    stale = set(json.loads(status))
    assert stale == {"retrain"} or stale == {"retrain", "report"}, status
    search_json = (repo / f"losses/{name}/search.json").read_text()
    out = run([DVC, "repro"], repo, extra)
    assert "Running stage 'retrain'" in out
    for stage in ("prepare", "split", "search"):
        assert f"Running stage '{stage}'" not in out
    assert (repo / f"losses/{name}/search.json").read_text() == search_json
    assert "up to date" in run([DVC, "status"], repo, extra)
