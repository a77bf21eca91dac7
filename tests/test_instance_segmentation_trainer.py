"""Instance segmentation proxy training: same init and batches per loss, a NaN loss stops only its member, mask
AP reported; config validation; the task plug-in's loss specs."""

from __future__ import annotations

import pytest
import torch

from components.errors import LossforgeError
from components.search.graph import Branch, LossGraph, branch_inputs, parse_prefix
from components.tasks.base import get_task, task_names
from components.tasks.instance_segmentation.datasets import open_instance_dataset
from components.tasks.instance_segmentation.losses import GraphInstanceLoss, TorchvisionMaskLoss, baseline_loss
from components.tasks.instance_segmentation.models import MaskRCNNConfig
from components.tasks.instance_segmentation.trainer import (PAPER_PROXY, PAPER_RETRAIN, ProxyConfig, RetrainConfig,
                                                            train_proxy, training_batches)
from components.tasks.segmentation.shapes import ensure_shapes

TINY = MaskRCNNConfig(name="tiny", min_size=64, max_size=64, rpn_batch_size_per_image=32, box_batch_size_per_image=32)
CFG = ProxyConfig(model=TINY, iterations=3, batch_size=2, eval_batch_size=4, warmup_iterations=1, device="cpu", seed=3)


@pytest.fixture(scope="module")
def data(tmp_path_factory):
    root = ensure_shapes(tmp_path_factory.mktemp("ins") / "shapes", num_train=4, num_test=2, image_size=64, seed=3)
    return open_instance_dataset(root, split="train"), open_instance_dataset(root, split="val")


def _inf_mask() -> GraphInstanceLoss:
    # exp(1/(ŷ − ŷ)) = exp(1e12) = inf at the first iteration, in the mask branch
    tree = parse_prefix("exp(inv(add(y_hat,neg(y_hat))))", inputs=branch_inputs("instance_segmentation", "mask"))
    return GraphInstanceLoss(LossGraph("instance_segmentation", {"mask": Branch(tree, 1.0)}))


def test_two_losses_same_init_and_a_nan_stops_only_its_member(data):
    train, val = data
    seen = []
    together = train_proxy({"ce": baseline_loss("ce_smoothl1_bce"), "giou": baseline_loss("ce_giou_bce"),
                            "inf": _inf_mask()}, train, val, CFG, "mAP",
                           on_progress=lambda i, n, v: seen.append((i, sorted(v))))
    alone = train_proxy({"giou": baseline_loss("ce_giou_bce")}, train, val, CFG, "box_mAP")
    assert together["ce"].status == together["giou"].status == "ok"
    assert together["inf"].status == "nan" and together["inf"].iterations == 1
    assert seen == [(i, ["ce", "giou"]) for i in (1, 2, 3)]
    a, b = together["giou"], alone["giou"]
    assert a.final_loss == pytest.approx(b.final_loss, rel=1e-6, abs=1e-7)
    assert set(a.metrics) == {"mAP", "AP50", "AP75", "box_mAP"}
    for name in a.metrics:
        assert a.metrics[name] == pytest.approx(b.metrics[name], abs=1e-9) and 0.0 <= a.metrics[name] <= 1.0
    assert a.target == a.metrics["mAP"] and b.target == b.metrics["box_mAP"]
    assert together["ce"].final_loss != a.final_loss


def test_flips_move_masks_with_boxes(data):
    train, _ = data
    images, targets = next(training_batches(train, ProxyConfig(model=TINY, batch_size=4, seed=0, device="cpu")))
    for t in targets:
        for box, mask in zip(t["boxes"], t["masks"]):
            ys, xs = torch.where(mask > 0)
            assert float(box[0]) - 1 <= float(xs.min()) and float(xs.max()) + 1 <= float(box[2]) + 1


def test_config_and_task_plugin():
    assert isinstance(ProxyConfig(model="paper").model, MaskRCNNConfig) and ProxyConfig(model="paper").model.mask_size == 28
    assert ProxyConfig().model.mask_size == 14 and RetrainConfig().iterations > ProxyConfig().iterations
    assert PAPER_PROXY.batch_size == 32 and PAPER_PROXY.model.name == "paper_proxy" and PAPER_RETRAIN.iterations == 88000
    with pytest.raises(LossforgeError, match="instance segmentation model preset 'nope'"):
        ProxyConfig(model="nope")
    assert "instance_segmentation" in task_names()
    task = get_task("instance_segmentation")
    assert task.metrics == ("mAP", "AP50", "AP75", "box_mAP") and task.reference_baseline == "ce_smoothl1_bce"
    assert set(task.branches) == {"cls_rpn", "reg_rpn", "cls_rcnn", "reg_rcnn", "mask"}
    assert isinstance(task.build_loss("ce_smoothl1_bce"), TorchvisionMaskLoss)
    assert isinstance(task.build_loss({"type": "graph", "path": "examples/losses/autolosszero_ins_mask.json"}), GraphInstanceLoss)
    det = task.build_loss("examples/losses/autolosszero_det_all_branches.json")  # a detection graph: the four box branches
    assert set(det.graph.branches) == {"cls_rpn", "reg_rpn", "cls_rcnn", "reg_rcnn"}
    with pytest.raises(LossforgeError, match="unknown"):
        task.build_loss("ce")
    with pytest.raises(LossforgeError, match="expected 'instance_segmentation'"):
        task.build_loss("examples/losses/autolosszero_seg_miou.json")
    assert task.canonical_metric("segm_map") == "mAP"
