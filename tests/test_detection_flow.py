"""Detection searched end to end through the real CLI and flows: the same flows as segmentation, `--task detection`.

A tiny run (2 random initial candidates, a few Faster R-CNN iterations): each branch bred and screened on its
own probe, proxy trainings, re-training against CE + smooth L1 with box mAP, the report, MLflow runs.
"""

from __future__ import annotations

import json

import pytest

DET = {  # the demo profile's `tasks.detection` block is applied over `search`: the budget goes in there
    "evolution": {"initial_population": 2},
    "tasks": {"detection": {
        "evolution": {"initial_population": 2, "seed_losses": []},  # random trees only (the demo seeds CE + GIoU)
        "search": {"budget": 2, "workers": 1, "losses_per_training": 2},
        "screening": {"samples": 3, "steps": 100, "lr": 0.01, "size": 64},
        "proxy": {"iterations": 4, "batch_size": 2, "eval_batch_size": 4, "seeds": [0]},
        "retrain": {"iterations": 4, "batch_size": 2, "eval_batch_size": 4, "seeds": [0],
                    "baselines": ["ce_smoothl1"], "top_k": 1},
    }},
}


@pytest.mark.slow
@pytest.mark.timeout(900)
def test_detection_search_retrain_and_report_through_the_cli(tmp_path):
    from test_flows_support import cli, write_tiny_params

    write_tiny_params(tmp_path, **DET)
    done = cli(["search", "--task", "detection"], tmp_path, timeout=840)
    assert done.returncode == 0, done.stdout[-2000:] + done.stderr[-3000:]
    out = tmp_path / "losses" / "detection-mAP"
    summary = json.loads((out / "search.json").read_text())
    assert summary["task"] == "detection" and summary["metric"] == "mAP"
    assert summary["counters"]["accepted"] >= 2 and summary["counters"].get("accepted_branches", 0) >= 8
    best = json.loads((out / "best.json").read_text())
    assert best["task"] == "detection" and set(best["branches"]) == {"cls_rpn", "reg_rpn", "cls_rcnn", "reg_rcnn"}
    assert (out / "best.py").exists()
    results = list(tmp_path.glob(".lossforge/runs/*/results/*.json"))
    assert len(results) == 2
    comparison = json.loads((tmp_path / "reports" / "detection-mAP" / "comparison.json").read_text())
    assert comparison["metrics"] == ["mAP", "AP50", "AP75"]
    rows = {r["name"]: r for r in comparison["rows"]}
    assert set(rows) == {"searched", "ce_smoothl1"}
    for row in rows.values():  # a real box mAP in [0, 1] (tiny training: often 0) or a clean NaN stop
        assert row["status"] in ("ok", "nan")
        if row["status"] == "ok":
            assert 0.0 <= row["metrics"]["mAP"] <= 1.0
    report = (tmp_path / "reports" / "detection-mAP" / "report.md").read_text()
    assert "mAP" in report and "ce_smoothl1" in report
