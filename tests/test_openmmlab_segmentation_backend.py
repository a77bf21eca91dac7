"""The segmentation task's `model.backend: openmmlab` for real (marked `openmmlab`, skipped without
`bash run.sh openmmlab-install`): the tiny mmseg DeepLabV3+ of examples/openmmlab trained side by side with the
candidate losses as its decode head's loss, scored with the project's metrics, bad settings as one-line errors,
and a tiny `lossforge search --task segmentation` through the CLI."""

from __future__ import annotations

import json
import math
from pathlib import Path

import pytest
import torch
import torch.nn.functional as F
from torch import nn

from components.openmmlab import INSTALL_HINT, missing_packages

pytestmark = [
    pytest.mark.openmmlab,
    pytest.mark.skipif(bool(missing_packages(("mmengine", "mmcv", "mmseg"))),
                       reason=f"OpenMMLab backend not installed; {INSTALL_HINT}"),
]

SEG_CONFIG = Path(__file__).resolve().parents[1] / "examples" / "openmmlab" / "deeplabv3plus_r18_shapes.py"


@pytest.fixture(scope="module")
def data(tmp_path_factory):
    from components.tasks.base import get_task
    from components.tasks.segmentation.shapes import ensure_shapes

    root = ensure_shapes(tmp_path_factory.mktemp("omlseg") / "shapes", num_train=8, num_test=4, image_size=64, seed=0)
    task = get_task("segmentation")
    return task, task.open_dataset(root, split="train"), task.open_dataset(root, split="val")


def proxy_config(**overrides):
    from components.tasks.segmentation.models import ModelConfig
    from components.tasks.segmentation.trainer import ProxyConfig

    model = ModelConfig(backend="openmmlab", config=str(SEG_CONFIG), input_size=64)
    values = dict(model=model, iterations=3, batch_size=2, eval_batch_size=4, lr=0.01, optimizer="sgd", device="cpu")
    return ProxyConfig(**{**values, **overrides})


class NaNLoss(nn.Module):
    def forward(self, logits, target):
        return logits.mean() * float("nan")


class BrokenLoss(nn.Module):
    def forward(self, logits, target):
        raise RuntimeError("this candidate is broken")


def test_the_decode_head_loss_is_the_native_value_and_the_metrics_are_the_projects(data):
    """mmseg's loss path with the candidate injected gives the native loss on the segmentor's logits, and the
    project's mIoU of the segmentor's predictions equals mmseg's own IoUMetric on the same predictions."""
    from mmseg.evaluation import IoUMetric

    from components.openmmlab.segmentation_trainer import build_segmentor, data_samples
    from components.tasks.segmentation.trainer import evaluate_models

    task, train_ds, eval_ds = data
    model = build_segmentor(SEG_CONFIG, train_ds.num_classes, seed=0)
    with torch.no_grad():  # predictions that vary per pixel (a random init predicts nearly one class)
        head = model.segmentor.decode_head.conv_seg
        head.weight.copy_(torch.randn(head.weight.shape, generator=torch.Generator().manual_seed(3)) * 5)
    ce = task.build_loss("ce", train_ds)
    model.set_loss(ce)
    model.eval()  # no dropout, BN running stats: the two paths see the same logits
    images = torch.stack([train_ds[i][0] for i in range(2)])
    masks = torch.stack([train_ds[i][1] for i in range(2)])
    masks[0, :5] = 255  # ignored pixels reach the loss as the native trainer gives them
    with torch.no_grad():
        mmseg_value = model.losses(images, data_samples(masks))["decode.loss_candidate"]
        native_value = ce(model(images), masks)
    assert float(mmseg_value) == pytest.approx(float(native_value), rel=1e-6)

    cfg = proxy_config()
    ours = evaluate_models({"m": model}, eval_ds, cfg, eval_ds.num_classes, torch.device("cpu"))["m"]
    metric = IoUMetric(iou_metrics=["mIoU"])
    metric.dataset_meta = dict(classes=eval_ds.classes)
    preds = []
    with torch.no_grad():
        for image, mask in (eval_ds[i] for i in range(len(eval_ds))):
            logits = F.interpolate(model(image[None]), size=tuple(mask.shape), mode="bilinear", align_corners=False)
            preds.append(logits.argmax(1)[0])
            metric.process({}, [dict(pred_sem_seg=dict(data=preds[-1][None]), gt_sem_seg=dict(data=mask[None]))])
    theirs = metric.compute_metrics(metric.results)
    assert len(torch.cat([p.flatten() for p in preds]).unique()) > 1
    assert 0 < ours["mIoU"] < 1
    assert ours["mIoU"] * 100 == pytest.approx(theirs["mIoU"], abs=0.006)  # mmseg rounds to 2 decimals (percent)
    assert ours["gAcc"] * 100 == pytest.approx(theirs["aAcc"], abs=0.006)


def test_losses_train_side_by_side_and_a_nan_or_broken_loss_stops_alone(data):
    from components.openmmlab.segmentation_trainer import train_proxy as train_openmmlab

    task, train_ds, eval_ds = data
    cfg = proxy_config()
    losses = {"ce": task.build_loss("ce", train_ds), "nan": NaNLoss(), "broken": BrokenLoss(),
              "dice": task.build_loss("dice", train_ds)}
    progress = []
    results = task.train_proxy(losses, train_ds, eval_ds, cfg, "mIoU",
                               on_progress=lambda i, n, values: progress.append((i, n, sorted(values))))
    assert results["nan"].status == "nan" and results["nan"].iterations == 1 and not results["nan"].metrics
    assert results["broken"].status == "failed" and "this candidate is broken" in results["broken"].message
    for name in ("ce", "dice"):
        result = results[name]
        assert result.status == "ok" and result.iterations == 3 and math.isfinite(result.final_loss)
        assert set(result.metrics) == set(task.metrics) and 0 <= result.target <= 1
        assert result.target == result.metrics["mIoU"] and result.seconds > 0
    assert progress == [(i, 3, ["ce", "dice"]) for i in (1, 2, 3)]
    # same images, same order, same initial weights, own dropout stream: CE alone gives CE's numbers (and the
    # task dispatched to the openmmlab trainer: the native DeepLabV3+ of the same ModelConfig gives others)
    alone = train_openmmlab({"ce": task.build_loss("ce", train_ds)}, train_ds, eval_ds, cfg, "mIoU")["ce"]
    assert alone.metrics == results["ce"].metrics and alone.final_loss == results["ce"].final_loss


@pytest.mark.parametrize("model, message", [
    ({"backend": "mmlab"}, "proxy: model.backend: must be one of native, openmmlab, got 'mmlab'"),
    ({"backend": "openmmlab"}, "proxy: model.config: the openmmlab backend needs an mmseg config file"),
    ({"backend": "openmmlab", "config": "no/such.py"}, "proxy: model.config: no/such.py: no such file"),
    ({"backend": "openmmlab", "config": "CFG:x = 1\n"}, "needs model=dict(type=..., decode_head=dict(...))"),
    ({"backend": "openmmlab", "config": "CFG:model = dict(\n"}, "cannot load it"),
    ({"backend": "openmmlab", "config": "CFG:model = dict(type='EncoderDecoder', decode_head=dict(type='NoHead'))\n"},
     "model.decode_head.type 'NoHead' is not an mmseg model"),
    ({"config": str(SEG_CONFIG)}, "proxy: model.config: only used with model.backend: openmmlab"),
])
def test_a_bad_backend_or_config_is_a_one_line_error_naming_the_field(tmp_path, model, message):
    from components.errors import LossforgeError
    from components.params import load_params
    from test_flows_support import write_tiny_params

    if model.get("config", "").startswith("CFG:"):
        bad = tmp_path / "bad_config.py"
        bad.write_text(model["config"][4:])
        model = {**model, "config": str(bad)}
    path = write_tiny_params(tmp_path, proxy={"model": model})
    with pytest.raises(LossforgeError) as err:  # checked when params.yaml is read, before anything runs
        load_params(path)
    assert message in str(err.value) and "\n" not in str(err.value)


@pytest.mark.slow
@pytest.mark.timeout(900)
def test_a_tiny_segmentation_search_with_the_openmmlab_backend_through_the_cli(tmp_path):
    from test_flows_support import cli, write_tiny_params

    model = {"backend": "openmmlab", "config": str(SEG_CONFIG), "input_size": 32}
    write_tiny_params(
        tmp_path,
        search={"budget": 2, "workers": 1, "losses_per_training": 2, "runner": "threads"},
        proxy={"model": model, "iterations": 3, "batch_size": 2, "optimizer": "sgd", "seeds": [0]},
        retrain={"model": model, "iterations": 3, "batch_size": 2, "optimizer": "sgd", "baselines": ["ce"],
                 "seeds": [0], "top_k": 1})
    done = cli(["search", "--task", "segmentation"], tmp_path, timeout=840)
    assert done.returncode == 0, done.stdout[-2000:] + done.stderr[-3000:]
    out = tmp_path / "losses" / "segmentation-mIoU"
    summary = json.loads((out / "search.json").read_text())
    assert summary["task"] == "segmentation" and summary["counters"]["accepted"] >= 1
    assert json.loads((out / "best.json").read_text())["task"] == "segmentation"
    results = [json.loads(p.read_text()) for p in tmp_path.glob(".lossforge/runs/*/results/*.json")]
    assert results
    comparison = json.loads((tmp_path / "reports" / "segmentation-mIoU" / "comparison.json").read_text())
    assert comparison["config"]["model"]["backend"] == "openmmlab"
    rows = {r["name"]: r for r in comparison["rows"]}
    assert set(rows) == {"searched", "ce"}
    for row in rows.values():  # the project's mIoU of the mmseg model, or a clean NaN stop
        assert row["status"] in ("ok", "nan")
        if row["status"] == "ok":
            assert 0.0 <= row["metrics"]["mIoU"] <= 1.0
