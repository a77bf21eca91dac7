"""The OpenMMLab backend for real (marked `openmmlab`, skipped when `bash run.sh openmmlab-install` has not run):
`lossforge loss export --format mmseg|mmdet|mmpose` snippets build in the OpenMMLab registries with the searched
losses in place, and a tiny DeepLabV3+ and a tiny Faster R-CNN train a few iterations on the embedded data with
a searched loss, through mmengine's Runner."""

from __future__ import annotations

import math
import random
from pathlib import Path

import pytest
import torch
from typer.testing import CliRunner

from components.openmmlab import INSTALL_HINT, missing_packages

pytestmark = [
    pytest.mark.openmmlab,
    pytest.mark.skipif(bool(missing_packages(("mmengine", "mmcv", "mmseg", "mmdet"))),
                       reason=f"OpenMMLab backend not installed ({', '.join(missing_packages())} missing); "
                              f"{INSTALL_HINT}"),
]

EXAMPLES = Path(__file__).resolve().parents[1] / "examples"
SEG_CONFIG = EXAMPLES / "openmmlab" / "deeplabv3plus_r18_shapes.py"
DET_CONFIG = EXAMPLES / "openmmlab" / "faster_rcnn_r18_fpn_shapes.py"
MASK_CONFIG = EXAMPLES / "openmmlab" / "mask_rcnn_r18_fpn_shapes.py"
runner = CliRunner()


@pytest.fixture(scope="module")
def shapes(tmp_path_factory):
    from components.tasks.segmentation.shapes import ensure_shapes

    return ensure_shapes(tmp_path_factory.mktemp("oml") / "shapes", num_train=8, num_test=2, image_size=128, seed=0)


def export(loss: Path, fmt: str, out: Path, base: Path | None = None):
    """`lossforge loss export` through the real CLI; returns the loaded mmengine Config of the snippet."""
    from mmengine.config import Config

    from flows.cli import app

    args = ["loss", "export", str(loss), "--format", fmt, "-o", str(out)] + (["--base", str(base)] if base else [])
    result = runner.invoke(app, args)
    assert result.exit_code == 0, result.output
    assert out.with_suffix(".json").is_file()
    return Config.fromfile(str(out))


def test_mmseg_snippet_builds_deeplabv3plus_with_the_searched_loss(tmp_path):
    from mmengine.registry import init_default_scope
    from mmseg.registry import MODELS

    from components.openmmlab.losses import SearchedLoss
    from components.tasks.loss_registry import build_loss

    loss_file = EXAMPLES / "losses" / "autolosszero_seg_bf1.json"
    cfg = export(loss_file, "mmseg", tmp_path / "cfg" / "bf1.py", base=SEG_CONFIG)
    assert cfg.model.decode_head.type == "DepthwiseSeparableASPPHead"  # the base is inherited
    init_default_scope("mmseg")
    model = MODELS.build(cfg.model)
    loss = model.decode_head.loss_decode
    assert isinstance(loss, SearchedLoss) and "use_sigmoid" not in cfg.model.decode_head.loss_decode
    gen = torch.Generator().manual_seed(0)
    logits, label = torch.randn(2, 8, 16, 16, generator=gen), torch.randint(0, 8, (2, 16, 16), generator=gen)
    assert float(loss(logits, label, ignore_index=255)) == float(build_loss({"type": "graph", "path": str(loss_file)})(logits, label))
    # a cross-entropy tree is mmseg's own CrossEntropyLoss (mean over the non-ignored pixels)
    from components.search.graph import LossGraph, parse_prefix
    from components.search.graph_json import graph_to_dict

    ce = LossGraph.single("segmentation", "seg", parse_prefix("neg(mul(y,log(y_hat)))").root)
    label[0, :4] = 255
    searched = MODELS.build(dict(type="SearchedLoss", graph=graph_to_dict(ce)))
    theirs = MODELS.build(dict(type="CrossEntropyLoss", avg_non_ignore=True))
    assert float(searched(logits, label, ignore_index=255)) == pytest.approx(float(theirs(logits, label, ignore_index=255)), rel=1e-5)


def test_mmseg_snippet_of_an_auto_seg_loss_surrogate_builds_the_surrogate_loss(tmp_path):
    from mmseg.registry import MODELS

    from components.openmmlab.losses import SurrogateLoss
    from components.surrogates.metric_surrogates import SurrogateSpec, save_surrogate

    theta = {"mIoU.and": [random.Random(1).random() for _ in range(6)]}
    path = save_surrogate(SurrogateSpec({"mIoU": 1.0}, theta=theta), tmp_path / "surrogate.json")
    cfg = export(path, "mmseg", tmp_path / "cfg" / "sur.py")
    assert isinstance(MODELS.build(cfg.searched_decode_head_loss_decode), SurrogateLoss)


def test_mmdet_snippet_puts_every_searched_branch_into_mask_rcnn(tmp_path):
    from mmengine.registry import init_default_scope
    from mmdet.registry import MODELS

    from components.openmmlab import losses

    cfg = export(EXAMPLES / "losses" / "autolosszero_ins_all_branches.json", "mmdet", tmp_path / "ins.py", base=MASK_CONFIG)
    init_default_scope("mmdet")
    model = MODELS.build(cfg.model)
    rpn, bbox, mask = model.rpn_head, model.roi_head.bbox_head, model.roi_head.mask_head
    assert isinstance(rpn.loss_cls, losses.SearchedClsLoss) and rpn.loss_cls.branch == "cls_rpn" and rpn.use_sigmoid_cls
    assert isinstance(rpn.loss_bbox, losses.SearchedBBoxLoss) and rpn.loss_bbox.loss_weight == 10.0
    assert isinstance(bbox.loss_cls, losses.SearchedClsLoss) and bbox.loss_cls.branch == "cls_rcnn"
    assert isinstance(bbox.loss_bbox, losses.SearchedBBoxLoss) and bbox.loss_bbox.branch == "reg_rcnn"
    assert rpn.reg_decoded_bbox and bbox.reg_decoded_bbox
    assert isinstance(mask.loss_mask, losses.SearchedMaskLoss)
    # a one-branch loss replaces only that branch: the others keep the config's losses
    cfg = export(EXAMPLES / "losses" / "autolosszero_det_reg_rcnn.json", "mmdet", tmp_path / "reg.py", base=DET_CONFIG)
    model = MODELS.build(cfg.model)
    assert type(model.rpn_head.loss_cls).__name__ == "CrossEntropyLoss" and not model.rpn_head.reg_decoded_bbox
    assert isinstance(model.roi_head.bbox_head.loss_bbox, losses.SearchedBBoxLoss)


def test_mmpose_snippet_builds_a_heatmap_head_with_the_searched_loss(tmp_path):
    if missing_packages(("mmpose",)):
        pytest.skip(f"mmpose not installed; {INSTALL_HINT}")
    from mmengine.registry import init_default_scope
    from mmpose.registry import MODELS

    from components.openmmlab.losses import SearchedKeypointLoss

    cfg = export(EXAMPLES / "losses" / "autolosszero_pose.json", "mmpose", tmp_path / "pose.py")
    init_default_scope("mmpose")
    head = MODELS.build(dict(type="HeatmapHead", in_channels=8, out_channels=5, deconv_out_channels=None,
                             loss=cfg.searched_head_loss))
    assert isinstance(head.loss_module, SearchedKeypointLoss)


def _train(cfg, work_dir: Path, iters: int):
    """Train `iters` iterations with mmengine's Runner; returns the logged scalars of the last iteration."""
    from mmengine.runner import Runner

    cfg.work_dir = str(work_dir)
    cfg.train_cfg.max_iters = iters
    cfg.train_cfg.val_interval = iters + 1
    torch.manual_seed(0)
    runner_ = Runner.from_cfg(cfg)
    runner_.train()
    assert runner_.iter == iters
    scalars = runner_.message_hub.log_scalars
    return runner_, {k: scalars[k].current() for k in scalars if k.startswith("train/")}


def test_tiny_deeplabv3plus_trains_with_a_searched_loss_on_the_embedded_data(tmp_path, shapes):
    cfg = export(EXAMPLES / "losses" / "autolosszero_seg_miou.json", "mmseg", tmp_path / "miou.py", base=SEG_CONFIG)
    for loader in ("train_dataloader", "val_dataloader", "test_dataloader"):
        cfg[loader].dataset.data_root = str(shapes)
    runner_, logged = _train(cfg, tmp_path / "work", iters=3)
    assert type(runner_.model.decode_head.loss_decode).__name__ == "SearchedLoss"
    assert math.isfinite(logged["train/decode.loss_searched"]) and logged["train/decode.loss_searched"] > 0


def test_tiny_faster_rcnn_trains_with_a_searched_loss_on_the_embedded_data(tmp_path, shapes):
    cfg = export(EXAMPLES / "losses" / "autolosszero_det_all_branches.json", "mmdet", tmp_path / "det.py", base=DET_CONFIG)
    for loader in ("train_dataloader", "val_dataloader", "test_dataloader"):
        cfg[loader].dataset.data_root = str(shapes)
    cfg.val_evaluator.ann_file = str(shapes / "annotations" / "instances_val.json")
    cfg.test_evaluator = cfg.val_evaluator
    runner_, logged = _train(cfg, tmp_path / "work", iters=3)
    assert type(runner_.model.roi_head.bbox_head.loss_bbox).__name__ == "SearchedBBoxLoss"
    for key in ("train/loss_rpn_cls", "train/loss_rpn_bbox", "train/loss_cls", "train/loss_bbox"):
        assert math.isfinite(logged[key]), (key, logged)
    assert logged["train/loss_cls"] > 0


@pytest.mark.parametrize("task", ["detection", "instance_segmentation"])
def test_searched_ce_and_giou_inside_mmdet_heads_equal_mmdets_own_losses(tmp_path, shapes, task):
    """In the real RPN, R-CNN and mask heads (their sampling, FPN levels, label order, avg_factor, mask targets):
    CE + GIoU (+ CE mask) as a loss graph through the searched-loss modules gives mmdet's CrossEntropyLoss +
    GIoULoss (weight 10) (+ mask CrossEntropyLoss) values."""
    import copy
    import importlib

    from mmengine.config import Config
    from mmengine.registry import init_default_scope
    from mmengine.runner import Runner
    from mmdet.registry import MODELS

    import components.openmmlab.registry  # noqa: F401 - registers the modules
    from components.search.graph_json import save_graph
    from components.tasks.detection.losses import GIOU_TREE

    graph = importlib.import_module(f"components.tasks.{task}.losses").baseline_graph(GIOU_TREE)
    path = str(save_graph(graph, tmp_path / "ce_giou.json"))
    cfg = Config.fromfile(str(DET_CONFIG if task == "detection" else MASK_CONFIG))
    cfg.train_dataloader.dataset.data_root = str(shapes)
    init_default_scope("mmdet")

    def build(rpn_cls, rpn_bbox, rcnn_cls, rcnn_bbox, mask):
        model = copy.deepcopy(cfg.model)  # item assignment replaces (ConfigDict.update would merge the base's keys)
        for head, cls_loss, bbox_loss in ((model.rpn_head, rpn_cls, rpn_bbox),
                                          (model.roi_head.bbox_head, rcnn_cls, rcnn_bbox)):
            head["loss_cls"], head["loss_bbox"], head["reg_decoded_bbox"] = cls_loss, bbox_loss, True
        if "mask_head" in model.roi_head:
            model.roi_head.mask_head["loss_mask"] = mask
        return MODELS.build(model)

    ours = build(dict(type="SearchedClsLoss", path=path, branch="cls_rpn", use_sigmoid=True),
                 dict(type="SearchedBBoxLoss", path=path, branch="reg_rpn"),
                 dict(type="SearchedClsLoss", path=path, branch="cls_rcnn"),
                 dict(type="SearchedBBoxLoss", path=path, branch="reg_rcnn"),
                 dict(type="SearchedMaskLoss", path=path))
    theirs = build(dict(type="CrossEntropyLoss", use_sigmoid=True, loss_weight=1.0), dict(type="GIoULoss", loss_weight=10.0),
                   dict(type="CrossEntropyLoss", use_sigmoid=False, loss_weight=1.0), dict(type="GIoULoss", loss_weight=10.0),
                   dict(type="CrossEntropyLoss", use_mask=True, loss_weight=1.0))
    theirs.load_state_dict(ours.state_dict())
    data = ours.data_preprocessor(next(iter(Runner.build_dataloader(cfg.train_dataloader, seed=0))), True)

    def losses(model):
        torch.manual_seed(1)  # the samplers' random draws
        out = model.loss(data["inputs"], data["data_samples"])
        return {k: float(sum(v) if isinstance(v, list) else v) for k, v in out.items() if k.startswith("loss")}

    got, want = losses(ours), losses(theirs)
    keys = {"loss_rpn_cls", "loss_rpn_bbox", "loss_cls", "loss_bbox"} | ({"loss_mask"} if task != "detection" else set())
    assert set(got) == keys and want.keys() == got.keys()
    for key in got:
        assert got[key] == pytest.approx(want[key], rel=1e-4), (key, got, want)
    assert all(got[key] > 0 for key in keys)
