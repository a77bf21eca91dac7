"""`lossforge loss export --format mmseg|mmdet|mmpose` through the real CLI, without OpenMMLab: the snippet and
the loss copy are written, the snippet's dicts name the right modules and branches, and bad input is one error
line before anything is written. (Building the snippets in the OpenMMLab registries: test_openmmlab_backend.py.)"""

from __future__ import annotations

import json
from pathlib import Path

from typer.testing import CliRunner

from flows.cli import app

EXAMPLES = Path(__file__).resolve().parents[1] / "examples"
runner = CliRunner()


def _snippet(path: Path) -> dict:
    """The snippet's variables, as mmengine would see them ({{ fileDirname }} substituted, no _base_ merge)."""
    text = path.read_text().replace("{{ fileDirname }}", str(path.parent))
    namespace: dict = {}
    exec(compile(text, str(path), "exec"), namespace)  # noqa: S102 - our own generated config
    return namespace


def test_mmdet_snippet_names_every_branch_and_copies_the_loss(tmp_path):
    loss = EXAMPLES / "losses" / "autolosszero_ins_all_branches.json"
    out = tmp_path / "cfg" / "ins.py"
    result = runner.invoke(app, ["loss", "export", str(loss), "--format", "mmdet", "-o", str(out)])
    assert result.exit_code == 0, result.output
    assert json.loads(out.with_suffix(".json").read_text()) == json.loads(loss.read_text())
    cfg = _snippet(out)
    assert cfg["custom_imports"]["imports"] == ["components.openmmlab.registry"]
    rpn, bbox = cfg["model"]["rpn_head"], cfg["model"]["roi_head"]["bbox_head"]
    assert rpn["loss_cls"] == dict(type="SearchedClsLoss", path=str(out.with_suffix(".json")), branch="cls_rpn",
                                   use_sigmoid=True, loss_weight=1.0)
    assert rpn["loss_bbox"]["branch"] == "reg_rpn" and rpn["loss_bbox"]["loss_weight"] == 10.0 and rpn["reg_decoded_bbox"]
    assert bbox["loss_cls"]["branch"] == "cls_rcnn" and bbox["loss_bbox"]["type"] == "SearchedBBoxLoss"
    assert cfg["model"]["roi_head"]["mask_head"]["loss_mask"]["type"] == "SearchedMaskLoss"
    assert "_base_" not in cfg


def test_snippet_with_a_base_replaces_the_base_losses(tmp_path):
    base = EXAMPLES / "openmmlab" / "deeplabv3plus_r18_shapes.py"
    out = tmp_path / "seg.py"
    result = runner.invoke(app, ["loss", "export", str(EXAMPLES / "losses" / "autolosszero_seg_miou.json"),
                                 "--format", "mmseg", "-o", str(out), "--base", str(base)])
    assert result.exit_code == 0, result.output
    cfg = _snippet(out)
    assert (out.parent / cfg["_base_"][0]).resolve() == base.resolve()
    assert cfg["model"]["decode_head"]["loss_decode"] == dict(_delete_=True, type="SearchedLoss",
                                                               path=str(out.with_suffix(".json")), loss_weight=1.0)


def test_bad_exports_are_one_error_line_and_write_nothing(tmp_path):
    pose = str(EXAMPLES / "losses" / "autolosszero_pose.json")
    cases = [
        (["--format", "mmseg", "-o", str(tmp_path / "a.py")], "--format mmseg needs a segmentation loss, got task 'pose'"),
        (["--format", "mmdet", "-o", str(tmp_path / "a.py")], "--format mmdet needs a detection or instance_segmentation"),
        (["--format", "onnx", "-o", str(tmp_path / "a.py")], "--format must be one of py, mmseg, mmdet, mmpose"),
        (["--format", "mmpose", "-o", str(tmp_path / "a.txt")], "must be a .py file"),
        (["--format", "mmpose", "-o", str(tmp_path / "a.py"), "--base", str(tmp_path / "no.py")], "--base: "),
        (["-o", str(tmp_path / "a.py"), "--base", pose], "--base is for --format mmseg|mmdet|mmpose"),
    ]
    for args, message in cases:
        result = runner.invoke(app, ["loss", "export", pose] + args)
        assert result.exit_code != 0 and message in result.output, (args, result.output)
        assert result.output.count("error:") == 1
    assert list(tmp_path.iterdir()) == []
