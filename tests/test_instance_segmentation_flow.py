"""Instance segmentation searched end to end through the real CLI and flows: `search --task instance_segmentation`.

A tiny run (2 random initial candidates, a few Mask R-CNN iterations): each of the five branches bred and screened
on its own probe, proxy trainings, re-training against CE + smooth L1 + mask BCE with mask mAP, the report.
"""

from __future__ import annotations

import json

import pytest

INS = {  # the demo profile's `tasks.instance_segmentation` block is applied over `search`: the budget goes in there
    "evolution": {"initial_population": 2},
    "tasks": {"instance_segmentation": {
        "evolution": {"initial_population": 2, "seed_losses": []},  # random trees only (the demo seeds CE + GIoU)
        "search": {"budget": 2, "workers": 1, "losses_per_training": 2},
        "screening": {"samples": 3, "steps": 100, "lr": 0.01, "size": 64},
        "proxy": {"iterations": 4, "batch_size": 2, "eval_batch_size": 4, "seeds": [0]},
        "retrain": {"iterations": 4, "batch_size": 2, "eval_batch_size": 4, "seeds": [0],
                    "baselines": ["ce_smoothl1_bce"], "top_k": 1},
    }},
}
BRANCHES = {"cls_rpn", "reg_rpn", "cls_rcnn", "reg_rcnn", "mask"}


@pytest.mark.slow
@pytest.mark.timeout(900)
def test_instance_segmentation_search_retrain_and_report_through_the_cli(tmp_path):
    from test_flows_support import cli, write_tiny_params

    write_tiny_params(tmp_path, **INS)
    done = cli(["search", "--task", "instance_segmentation"], tmp_path, timeout=840)
    assert done.returncode == 0, done.stdout[-2000:] + done.stderr[-3000:]
    out = tmp_path / "losses" / "instance_segmentation-mAP"
    summary = json.loads((out / "search.json").read_text())
    assert summary["task"] == "instance_segmentation" and summary["metric"] == "mAP"
    assert summary["counters"]["accepted"] >= 2 and summary["counters"].get("accepted_branches", 0) >= 10
    best = json.loads((out / "best.json").read_text())
    assert best["task"] == "instance_segmentation" and set(best["branches"]) == BRANCHES
    assert (out / "best.py").exists()
    assert len(list(tmp_path.glob(".lossforge/runs/*/results/*.json"))) == 2
    comparison = json.loads((tmp_path / "reports" / "instance_segmentation-mAP" / "comparison.json").read_text())
    assert comparison["metrics"] == ["mAP", "AP50", "AP75", "box_mAP"]
    rows = {r["name"]: r for r in comparison["rows"]}
    assert set(rows) == {"searched", "ce_smoothl1_bce"}
    for row in rows.values():  # a real mask mAP in [0, 1] (tiny training: often 0) or a clean NaN stop
        assert row["status"] in ("ok", "nan")
        if row["status"] == "ok":
            assert 0.0 <= row["metrics"]["mAP"] <= 1.0 and 0.0 <= row["metrics"]["box_mAP"] <= 1.0
    report = (tmp_path / "reports" / "instance_segmentation-mAP" / "report.md").read_text()
    assert "mAP" in report and "ce_smoothl1_bce" in report
