"""The detection task through the registry: data, loss specs, screening and proxy training by name."""

from __future__ import annotations

import json

import pytest

from components.errors import LossforgeError
from components.search.graph_json import graph_to_dict, load_graph
from components.search.screening import ScreeningConfig, screen
from components.tasks.base import get_task, task_names
from components.tasks.detection.losses import GraphDetectionLoss, TorchvisionLoss
from components.tasks.detection.models import DetectorConfig
from components.tasks.detection.trainer import ProxyConfig

TABLE8 = "examples/losses/autolosszero_det_all_branches.json"


@pytest.fixture(scope="module")
def task():
    return get_task("detection")


@pytest.fixture(scope="module")
def root(task, tmp_path_factory):
    path = tmp_path_factory.mktemp("det") / "shapes"
    task.ensure_embedded_data(path, num_train=6, num_test=2, image_size=64, seed=4)
    return path


def test_registered_task(task):
    assert "detection" in task_names()
    assert task.name == "detection" and task.metrics == ("mAP", "AP50", "AP75") and task.default_metric == "mAP"
    assert task.default_baselines == ("ce_smoothl1", "ce_giou")
    assert set(task.branches) == {"cls_rpn", "reg_rpn", "cls_rcnn", "reg_rcnn"}
    assert task.proxy_config_class is ProxyConfig and task.canonical_metric("ap50") == "AP50"
    with pytest.raises(LossforgeError, match="not a detection metric"):
        task.canonical_metric("mIoU")


def test_datasets_and_loss_specs(task, root, tmp_path):
    train = task.open_dataset(root, split="train")
    assert len(train) == 6 and task.open_dataset(root, ids=["val_00001"]).ids == ["val_00001"]
    assert isinstance(task.build_loss("ce_smoothl1", train), TorchvisionLoss)
    assert isinstance(task.build_loss({"type": "ce_iou"}, train), GraphDetectionLoss)
    data = json.loads(open(TABLE8).read())
    by_dict = task.build_loss({"type": "graph", "graph": data}, train)
    by_path = task.build_loss(TABLE8, train)
    assert by_dict.graph.canonical() == by_path.graph.canonical() == load_graph(TABLE8).canonical()
    seg = tmp_path / "seg.json"
    seg.write_text(json.dumps(graph_to_dict(load_graph("examples/losses/autolosszero_seg_miou.json"))))
    with pytest.raises(LossforgeError, match="expected 'detection'"):
        task.build_loss({"type": "graph", "path": str(seg)}, train)
    with pytest.raises(LossforgeError, match="unknown; known: ce_smoothl1"):
        task.build_loss("focal", train)
    with pytest.raises(LossforgeError, match="unknown key"):
        task.build_loss({"type": "graph", "graph": data, "target": "boundary"}, train)


def test_screening_and_training_through_the_task(task, root):
    train, val = task.open_dataset(root, split="train"), task.open_dataset(root, split="val")
    problem = task.screening_problem(train, "mAP", samples=3, size=64, seed=0)
    assert screen(load_graph(TABLE8), problem, ScreeningConfig(samples=3)).accepted
    tiny = DetectorConfig(name="tiny", min_size=64, max_size=64, rpn_batch_size_per_image=32, box_batch_size_per_image=32)
    cfg = task.retrain_config_class(model=tiny, iterations=2, batch_size=2, warmup_iterations=1, device="cpu")
    losses = {"ce_smoothl1": task.build_loss("ce_smoothl1", train), "table8": task.build_loss(TABLE8, train)}
    results = task.train_proxy(losses, train, val, cfg, "mAP")
    assert {r.status for r in results.values()} == {"ok"} and all(r.iterations == 2 for r in results.values())
    table = task.retrain(losses, train, val, cfg, "AP50", seeds=(0,))
    assert table.target_metric == "AP50" and [row.name for row in table.rows] == ["ce_smoothl1", "table8"]
    assert all(set(row.metrics) == {"mAP", "AP50", "AP75"} for row in table.rows)
