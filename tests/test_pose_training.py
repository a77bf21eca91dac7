"""Pose proxy training: MSE learns (keypoint AP above the untrained network's, same initial weights), the Table-8
pose loss trains without NaN on the same batches, a loss that overflows is stopped as NaN without stopping the
others, and the configs refuse bad values in one line."""

from __future__ import annotations

import pytest
import torch

from components.errors import LossforgeError
from components.search.graph import Branch, LossGraph, branch_inputs, parse_prefix
from components.tasks.base import get_task
from components.tasks.pose.models import PoseModelConfig, build_pose_model
from components.tasks.pose.trainer import PAPER_PROXY, ProxyConfig, RetrainConfig, evaluate_models, sized
from components.tasks.seeding import seeded_init
from components.tasks.segmentation.shapes import ensure_shapes

TINY_MODEL = PoseModelConfig("resnet18", (32, 32), 32, 3)


@pytest.fixture(scope="module")
def data(tmp_path_factory):
    root = ensure_shapes(tmp_path_factory.mktemp("pose") / "shapes", num_train=8, num_test=2, image_size=64, seed=0)
    return get_task("pose").open_dataset(root, split="train")


@pytest.mark.timeout(600)
def test_mse_learns_and_table8_trains_and_an_overflowing_loss_stops_alone(data):
    task = get_task("pose")
    cfg = ProxyConfig(model=TINY_MODEL, iterations=60, batch_size=8, lr=2e-3, warmup_iterations=5, device="cpu")
    with seeded_init(cfg.seed):  # the trainer's template: same seed, same weights
        untrained = build_pose_model(cfg.model, data.num_keypoints)
    before = evaluate_models({"untrained": untrained}, sized(data, cfg), cfg, torch.device("cpu"))["untrained"]
    overflow = LossGraph("pose", {"heatmap": Branch(parse_prefix("exp(inv(abs(y_hat)))",
                                                                 inputs=branch_inputs("pose", "heatmap")))})
    losses = {"mse": task.build_loss("mse", data),
              "table8": task.build_loss("examples/losses/autolosszero_pose.json", data),
              "overflow": task.build_loss(overflow, data)}
    seen = []
    results = task.train_proxy(losses, data, data, cfg, "AP", on_progress=lambda i, n, v: seen.append((i, set(v))))
    mse, table8, nan = results["mse"], results["table8"], results["overflow"]
    assert mse.status == "ok" and mse.iterations == 60 and set(mse.metrics) == {"AP", "AP50", "AP75"}
    assert mse.target == mse.metrics["AP"] > before["AP"], (mse, before)  # it learned the training crops
    assert table8.status == "ok" and table8.iterations == 60 and table8.final_loss is not None
    assert nan.status == "nan" and nan.iterations == 1 and not nan.metrics
    assert seen[0] == (1, {"mse", "table8"}) and len(seen) == 60


def test_configs_validate_in_one_line():
    assert ProxyConfig().model.heatmap_size == (16, 16) and PAPER_PROXY.model.heatmap_size == (64, 48)
    assert RetrainConfig().iterations == 600
    paper = build_pose_model("paper", 17).eval()  # ResNet-50, 256x192 crops -> 64x48 heatmaps (A.4)
    with torch.no_grad():
        assert paper(torch.rand(1, 3, 256, 192)).shape == (1, 17, 64, 48)
    assert ProxyConfig(model={"backbone": "resnet18", "input_size": [32, 32]}).model.input_size == (32, 32)
    for bad, field in [({"iterations": 0}, "proxy.iterations"), ({"lr": -1.0}, "proxy.lr"),
                       ({"optimizer": "lbfgs"}, "proxy.optimizer"), ({"model": "huge"}, "proxy.model"),
                       ({"model": {"backbone": "vgg"}}, "proxy.model.backbone"),
                       ({"model": {"input_size": [50, 50]}}, "proxy.model.input_size"),
                       ({"model": {"width": 3}}, "proxy.model")]:
        with pytest.raises(LossforgeError) as err:
            ProxyConfig(**bad)
        assert str(err.value).startswith(field) and "\n" not in str(err.value)
