"""Detection proxy training: same init and batches per loss, results independent of the other members,
a NaN loss or an exception stops only its member; real (tiny) trainings, no mocks."""

from __future__ import annotations

import dataclasses

import pytest

from components.errors import LossforgeError
from components.search.graph import Branch, LossGraph, branch_inputs, parse_prefix
from components.tasks.detection.datasets import open_detection_dataset
from components.tasks.detection.losses import TorchvisionLoss, baseline_loss
from components.tasks.detection.models import DetectorConfig
from components.tasks.detection.trainer import PAPER_PROXY, ProxyConfig, RetrainConfig, lr_at, train_proxy
from components.tasks.segmentation.shapes import ensure_shapes

TINY = DetectorConfig(name="tiny", min_size=64, max_size=64, rpn_batch_size_per_image=32, box_batch_size_per_image=32)
CFG = ProxyConfig(model=TINY, iterations=3, batch_size=2, eval_batch_size=4, warmup_iterations=1, device="cpu", seed=3)


@pytest.fixture(scope="module")
def data(tmp_path_factory):
    root = ensure_shapes(tmp_path_factory.mktemp("det") / "shapes", num_train=4, num_test=2, image_size=64, seed=3)
    return open_detection_dataset(root, split="train"), open_detection_dataset(root, split="val")


class Raises(TorchvisionLoss):
    """A loss whose RCNN classification raises (a broken candidate)."""

    def classification(self, branch, logits, labels):
        if branch == "cls_rcnn":
            raise RuntimeError("broken\nloss")
        return super().classification(branch, logits, labels)


def _inf_graph() -> LossGraph:
    # exp(1/(ŷ − ŷ)) = exp(1e12) = inf at the first iteration
    tree = parse_prefix("exp(inv(add(y_hat,neg(y_hat))))", inputs=branch_inputs("detection", "cls_rpn"))
    return LossGraph("detection", {"cls_rpn": Branch(tree, 1.0)})


def test_members_are_independent_and_bad_losses_stop_alone(data):
    from components.tasks.detection.losses import GraphDetectionLoss

    train, val = data
    seen = []
    together = train_proxy({"ce": baseline_loss("ce_smoothl1"), "giou": baseline_loss("ce_giou"),
                            "inf": GraphDetectionLoss(_inf_graph()), "broken": Raises()},
                           train, val, CFG, "mAP", on_progress=lambda i, n, v: seen.append((i, n, sorted(v))))
    alone = train_proxy({"giou": baseline_loss("ce_giou")}, train, val, CFG, "AP50")
    assert together["ce"].status == together["giou"].status == "ok"
    assert together["inf"].status == "nan" and together["inf"].iterations == 1 and "inf" in together["inf"].message
    assert together["broken"].status == "failed" and together["broken"].message.startswith("RuntimeError: broken loss")
    assert together["broken"].metrics == {} and together["broken"].target is None
    assert seen == [(i, 3, ["ce", "giou"]) for i in (1, 2, 3)]
    a, b = together["giou"], alone["giou"]
    assert a.iterations == b.iterations == 3
    assert a.final_loss == pytest.approx(b.final_loss, rel=1e-6, abs=1e-7)
    for name in ("mAP", "AP50", "AP75"):
        assert a.metrics[name] == pytest.approx(b.metrics[name], abs=1e-9)
        assert 0.0 <= a.metrics[name] <= 1.0
    assert a.target_metric == "mAP" and a.target == a.metrics["mAP"]
    assert b.target_metric == "AP50" and b.target == b.metrics["AP50"]
    assert together["ce"].final_loss != a.final_loss  # the losses really differ


def test_config_validation_and_schedule():
    with pytest.raises(LossforgeError, match=r"proxy\.optimizer"):
        ProxyConfig(optimizer="adam")
    with pytest.raises(LossforgeError, match=r"proxy\.lr_steps"):
        ProxyConfig(lr_steps=(0.9, 0.5))
    assert ProxyConfig(model="paper").model.backbone == "resnet50"
    cfg = ProxyConfig(iterations=100, warmup_iterations=10, lr=0.02, lr_steps=(0.5,))
    assert lr_at(cfg, 0) == pytest.approx(0.02 * 0.001) and lr_at(cfg, 10) == pytest.approx(0.02)
    assert lr_at(cfg, 60) == pytest.approx(0.002)
    assert RetrainConfig().iterations > ProxyConfig().iterations
    assert PAPER_PROXY.batch_size == 32 and PAPER_PROXY.lr == 0.04 and PAPER_PROXY.warmup_iterations == 250
    assert dataclasses.replace(CFG, seed=1).seed == 1
