"""Pose estimation searched end to end through the real CLI and flows: `search --task pose`.

A tiny run (2 random initial candidates, a few SimpleBaseline iterations on 32x32 crops): the heatmap branch bred
and screened on the pose probe, proxy trainings, re-training against the heatmap MSE with keypoint AP, the report.
"""

from __future__ import annotations

import json

import pytest

MODEL = {"backbone": "resnet18", "input_size": [32, 32], "deconv_channels": 32, "deconv_layers": 3}
POSE = {  # the demo profile's `tasks.pose` block is applied over `search`: the budget goes in there
    "evolution": {"initial_population": 2},
    "tasks": {"pose": {
        "search": {"budget": 2, "workers": 1, "losses_per_training": 2},
        "screening": {"samples": 3, "steps": 100, "lr": 0.01, "size": 32},
        "proxy": {"model": MODEL, "iterations": 3, "batch_size": 8, "eval_batch_size": 32, "seeds": [0]},
        "retrain": {"model": MODEL, "iterations": 3, "batch_size": 8, "eval_batch_size": 32, "seeds": [0],
                    "baselines": ["mse"], "top_k": 1},
    }},
}


@pytest.mark.slow
@pytest.mark.timeout(600)
def test_pose_search_retrain_and_report_through_the_cli(tmp_path):
    from test_flows_support import cli, write_tiny_params

    write_tiny_params(tmp_path, **POSE)
    done = cli(["search", "--task", "pose"], tmp_path, timeout=540)
    assert done.returncode == 0, done.stdout[-2000:] + done.stderr[-3000:]
    for line in ("stage search", "proxy evaluations 2/2", "stage retrain", "re-training iteration"):  # not a tty
        assert line in done.stdout, done.stdout
    out = tmp_path / "losses" / "pose-AP"
    summary = json.loads((out / "search.json").read_text())
    assert summary["task"] == "pose" and summary["metric"] == "AP"
    assert summary["counters"]["accepted"] >= 2
    best = json.loads((out / "best.json").read_text())
    assert best["task"] == "pose" and set(best["branches"]) == {"heatmap"}
    assert (out / "best.py").exists()
    assert len(list(tmp_path.glob(".lossforge/runs/*/results/*.json"))) == 2
    comparison = json.loads((tmp_path / "reports" / "pose-AP" / "comparison.json").read_text())
    assert comparison["metrics"] == ["AP", "AP50", "AP75"]
    rows = {r["name"]: r for r in comparison["rows"]}
    assert set(rows) == {"searched", "mse"}
    for row in rows.values():  # a real keypoint AP in [0, 1] (tiny training: often 0) or a clean NaN stop
        assert row["status"] in ("ok", "nan")
        if row["status"] == "ok":
            assert 0.0 <= row["metrics"]["AP"] <= 1.0
    report = (tmp_path / "reports" / "pose-AP" / "report.md").read_text()
    assert "AP" in report and "mse" in report
