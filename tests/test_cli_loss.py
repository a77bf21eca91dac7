"""`lossforge loss show | check | export` through the real typer app."""

from __future__ import annotations

import importlib.util
import json

import pytest
import torch
from typer.testing import CliRunner

from components.search.graph import LossGraph, Node
from components.search.graph_json import save_graph
from components.tasks.segmentation.shapes import generate_shapes
from flows.cli import app

L, N = Node.leaf, Node.apply
CE = LossGraph.single("segmentation", "seg", N("neg", N("log", N("mul", L("y_hat"), L("y")))))
runner = CliRunner()


def _out(result) -> str:
    """stdout and stderr together (click >= 8.2 mixes both into `output`)."""
    return result.output


@pytest.fixture(scope="module", autouse=True)
def one_thread():
    """One torch thread: on a small shared CPU, more threads only add contention."""
    before = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(before)


@pytest.fixture(scope="module")
def shapes_root(tmp_path_factory):
    root = tmp_path_factory.mktemp("probe") / "shapes-probe"
    generate_shapes(root, num_train=6, num_test=1, image_size=32, seed=0)
    return root


@pytest.fixture()
def ce_file(tmp_path):
    return save_graph(CE, tmp_path / "ce.json")


def test_show_prints_formula_simplified_and_latex(ce_file):
    result = runner.invoke(app, ["loss", "show", str(ce_file)])
    assert result.exit_code == 0, _out(result)
    out = result.output
    assert "formula:" in out and "y_hat" in out
    assert "neg(log(mul(y_hat,y)))" in out  # canonical form
    assert "LaTeX:" in out and "\\log" in out
    assert "simplified (SymPy):" in out


@pytest.mark.parametrize("content, needle", [
    ("{not json", "invalid JSON"),
    (json.dumps({"format": "lossforge.loss/1", "task": "segmentation",
                 "branches": {"seg": {"tree": {"op": "eval", "children": [{"input": "y_hat"}]}}}}), "eval"),
])
def test_bad_files_give_one_line_error_and_exit_2(tmp_path, content, needle):
    bad = tmp_path / "bad.json"
    bad.write_text(content)
    for cmd in (["loss", "show", str(bad)], ["loss", "check", str(bad)], ["loss", "export", str(bad), "-o", str(tmp_path / "x.py")]):
        result = runner.invoke(app, cmd)
        assert result.exit_code == 2, (cmd, _out(result))
        text = _out(result).strip()
        assert text.startswith("error:") and needle in text and "bad.json" in text
        assert len(text.splitlines()) == 1
        assert "Traceback" not in text


def test_missing_file_exit_2(tmp_path):
    result = runner.invoke(app, ["loss", "show", str(tmp_path / "nope.json")])
    assert result.exit_code == 2 and "not found" in _out(result)


def test_check_accepts_cross_entropy_on_given_data(ce_file, shapes_root):
    result = runner.invoke(app, ["loss", "check", str(ce_file), "--data", str(shapes_root), "--steps", "120",
                                 "--samples", "3", "--size", "16", "--metric", "mIoU"])
    assert result.exit_code == 0, _out(result)
    assert "g = " in result.output and "accepted" in result.output
    g = float(result.output.split("g = ")[1].split()[0])
    assert 0.6 <= g <= 1.0


def test_check_rejects_constant_loss_on_embedded_probe(tmp_path, shapes_root, monkeypatch):
    # no --data: the embedded probe from the cache dir (pre-generated here, so nothing is written to ~)
    monkeypatch.chdir(tmp_path)
    monkeypatch.setenv("LOSSFORGE_CACHE", str(shapes_root.parent))
    const = save_graph(LossGraph.single("segmentation", "seg", N("exp", L("y"))), tmp_path / "const.json")
    result = runner.invoke(app, ["loss", "check", str(const), "--steps", "20", "--samples", "3", "--size", "16"])
    assert result.exit_code == 0, _out(result)
    assert "rejected" in result.output and "zero_gradient" in result.output
    assert "embedded shapes" in result.output


def test_check_other_task_and_bad_metric_exit_2(tmp_path, shapes_root):
    # a loss graph task without a registered Task (CSE-AutoLoss's detection inputs: no trainer yet)
    cse = save_graph(LossGraph.single("detection_cse", "reg", N("neg", N("log", L("i")))), tmp_path / "cse.json")
    result = runner.invoke(app, ["loss", "check", str(cse), "--data", str(shapes_root)])
    assert result.exit_code == 2 and "for task 'detection_cse'" in _out(result) and "detection" in _out(result)
    ce = save_graph(CE, tmp_path / "ce.json")
    result = runner.invoke(app, ["loss", "check", str(ce), "--data", str(shapes_root), "--metric", "accuracyy",
                                 "--samples", "2", "--size", "16", "--steps", "2"])
    assert result.exit_code == 2 and "accuracyy" in _out(result)


def test_export_writes_standalone_module_equal_to_graph(ce_file, tmp_path):
    out = tmp_path / "searched_loss.py"
    result = runner.invoke(app, ["loss", "export", str(ce_file), "-o", str(out), "--class-name", "MyLoss"])
    assert result.exit_code == 0, _out(result)
    spec = importlib.util.spec_from_file_location("searched_loss", out)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    torch.manual_seed(0)
    y_hat = torch.softmax(torch.randn(2, 4, 5, 5), dim=1)
    y = torch.nn.functional.one_hot(torch.randint(0, 4, (2, 5, 5)), 4).permute(0, 3, 1, 2).float()
    inputs = {"seg": {"y_hat": y_hat, "y": y}}
    assert torch.allclose(module.MyLoss()(inputs), CE.total(inputs))
    bad = runner.invoke(app, ["loss", "export", str(ce_file), "-o", str(out), "--class-name", "not valid"])
    assert bad.exit_code == 2


def test_check_bad_gain_rule_exit_2(ce_file, shapes_root):
    result = runner.invoke(app, ["loss", "check", str(ce_file), "--data", str(shapes_root), "--gain", "relative"])
    text = _out(result).strip()
    assert result.exit_code == 2 and text.startswith("error:") and "gain" in text and "relative" in text
    assert len(text.splitlines()) == 1


def test_check_screens_a_detection_loss_on_the_detection_probe(tmp_path, shapes_root):
    """`loss check` follows the task named in the loss file: the Table 8 detection loss passes, -y_hat does not."""
    import shutil

    from test_flows_support import ROOT

    table8 = tmp_path / "det.json"
    shutil.copy(ROOT / "examples/losses/autolosszero_det_all_branches.json", table8)
    result = runner.invoke(app, ["loss", "check", str(table8), "--data", str(shapes_root), "--samples", "2",
                                 "--steps", "100"])
    assert result.exit_code == 0, _out(result)
    assert "accepted" in _out(result) and "metric mAP" in _out(result)
    from components.search.graph import Branch, branch_inputs, parse_prefix

    trees = {"cls_rpn": "neg(y_hat)", "reg_rpn": "neg(i)", "cls_rcnn": "neg(y_hat)", "reg_rcnn": "neg(i)"}
    bad = save_graph(LossGraph("detection", {b: Branch(parse_prefix(t, inputs=branch_inputs("detection", b)))
                                             for b, t in trees.items()}), tmp_path / "bad.json")
    result = runner.invoke(app, ["loss", "check", str(bad), "--data", str(shapes_root), "--samples", "2",
                                 "--steps", "100"])
    assert result.exit_code == 0 and "rejected" in _out(result), _out(result)
