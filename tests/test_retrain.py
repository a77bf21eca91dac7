"""Final re-training: comparison table over losses and seeds, written as Markdown and JSON."""

import json
import math

import pytest
from torch import nn

from components.errors import LossforgeError
from components.tasks.loss_registry import build_loss
from components.tasks.retrain import ComparisonRow, ComparisonTable, merge_tables, write_table
from components.tasks.segmentation.retrain import PAPER_RETRAIN, RetrainConfig, baseline_losses, retrain_and_compare
from components.tasks.segmentation.models import model_preset
from components.tasks.segmentation.metrics import METRIC_NAMES
from components.tasks.segmentation.datasets import open_voc
from components.tasks.segmentation.shapes import generate_shapes


class AlwaysNan(nn.Module):
    def forward(self, logits, target):
        return logits.sum() * math.nan


def _table():
    rows = [
        ComparisonRow("searched", "ok", {m: 0.5 for m in METRIC_NAMES} | {"mIoU": 0.8, "BF1": 0.3}),
        ComparisonRow("ce", "ok", {m: 0.5 for m in METRIC_NAMES} | {"mIoU": 0.7, "BF1": 0.4, "gAcc": 0.9}),
        ComparisonRow("bad", "nan", iterations=3, message="loss was nan at iteration 3"),
    ]
    return ComparisonTable("mIoU", rows, METRIC_NAMES, (0,), {})


def test_best_per_column_and_markdown_marks():
    table = _table()
    assert table.best("mIoU") == ["searched"]
    assert table.best("BF1") == ["ce"]
    assert table.best("mAcc") == ["searched", "ce"]  # ties are all best
    md = table.to_markdown()
    header = next(line for line in md.splitlines() if line.startswith("| loss"))
    assert "**mIoU** (target)" in header and "| gAcc |" in header
    searched = next(line for line in md.splitlines() if line.startswith("| searched"))
    assert searched == "| searched | ok | 50.00 | **50.00** | **80.00** | **50.00** | **50.00** | 30.00 |"
    bad = next(line for line in md.splitlines() if line.startswith("| bad"))
    assert bad.count("—") == len(METRIC_NAMES) and "nan (it 3)" in bad
    assert "- bad: loss was nan at iteration 3" in md


def test_json_round_trip_marks_target_and_best(tmp_path):
    table = _table()
    md_path, json_path = write_table(table, tmp_path / "cmp" / "table.md", tmp_path / "cmp" / "table.json")
    data = json.loads(json_path.read_text())
    assert data["format"] == "lossforge.comparison/1" and data["target_metric"] == "mIoU"
    assert data["best"]["mIoU"] == ["searched"] and data["best"]["gAcc"] == ["ce"]
    assert data["rows"][2]["metrics"] == {} and data["rows"][2]["status"] == "nan"
    again = ComparisonTable.from_dict(data)
    assert again.to_markdown() == md_path.read_text()
    with pytest.raises(LossforgeError, match="format"):
        ComparisonTable.from_dict({**data, "format": "other/1"})
    with pytest.raises(LossforgeError, match="no loss 'x'"):
        table.row("x")


def test_retrain_and_compare_trains_every_loss_over_seeds(tmp_path):
    root = generate_shapes(tmp_path / "shapes", num_train=6, num_test=4, image_size=32, seed=0)
    train, test = open_voc(root, list_file="train"), open_voc(root, list_file="val")
    cfg = RetrainConfig(model=model_preset("lite", input_size=32), iterations=3, batch_size=2, eval_batch_size=4,
                        device="cpu")
    losses = {"ce": build_loss("ce"), "soft_iou": build_loss("soft_iou"), "broken": AlwaysNan()}
    ticks = []
    table = retrain_and_compare(losses, train, test, cfg, "BIoU", seeds=[0, 1],
                                on_progress=lambda i, t, v: ticks.append((i, t)))
    assert ticks == [(i, 6) for i in range(1, 7)]
    assert [r.name for r in table.rows] == ["ce", "soft_iou", "broken"]
    assert table.target_metric == "BIoU" and table.seeds == (0, 1)
    for name in ("ce", "soft_iou"):
        row = table.row(name)
        assert row.status == "ok" and set(row.metrics) == set(METRIC_NAMES)
        assert all(0 <= v <= 1 for v in row.metrics.values())
        assert all(v >= 0 for v in row.std.values())
    assert table.row("broken").status == "nan" and table.row("broken").iterations == 1
    md, js = write_table(table, tmp_path / "t.md", tmp_path / "t.json")
    assert "**BIoU** (target)" in md.read_text()
    assert json.loads(js.read_text())["config"]["config_class"] == "RetrainConfig"


def test_per_seed_tables_merge_into_the_all_seeds_table(tmp_path):
    root = generate_shapes(tmp_path / "shapes", num_train=6, num_test=4, image_size=32, seed=0)
    train, test = open_voc(root, list_file="train"), open_voc(root, list_file="val")
    cfg = RetrainConfig(model=model_preset("cpu_unet", widths=(4, 8)), iterations=3, batch_size=2,
                        eval_batch_size=4, device="cpu")
    losses = {"ce": build_loss("ce"), "dice": build_loss("dice"), "broken": AlwaysNan()}
    together = retrain_and_compare(losses, train, test, cfg, "mIoU", seeds=[0, 1])
    apart = [retrain_and_compare(losses, train, test, cfg, "mIoU", seeds=[s]) for s in (0, 1)]
    merged = merge_tables(apart)
    assert merged.seeds == (0, 1) and [r.name for r in merged.rows] == ["ce", "dice", "broken"]
    for name in ("ce", "dice"):
        for m in METRIC_NAMES:
            assert merged.row(name).metrics[m] == pytest.approx(together.row(name).metrics[m], abs=1e-9)
            assert merged.row(name).std[m] == pytest.approx(together.row(name).std[m], abs=1e-9)
    assert merged.row("broken").status == "nan"
    assert apart[0].row("ce").metrics != apart[1].row("ce").metrics or apart[0].row("ce").std == {}
    with pytest.raises(LossforgeError, match="seeds repeat"):
        merge_tables([apart[0], apart[0]])


def test_baselines_and_paper_settings():
    built = baseline_losses(["ce", {"type": "focal", "gamma": 1.0}], num_classes=8)
    assert list(built) == ["ce", "focal(gamma=1.0)"]
    assert PAPER_RETRAIN.model.encoder == "resnet101" and PAPER_RETRAIN.model.input_size == 512
    from components.tasks.segmentation.trainer import ProxyConfig

    assert RetrainConfig().iterations > ProxyConfig().iterations  # a longer schedule than the proxy default
