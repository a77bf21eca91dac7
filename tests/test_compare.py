"""`lossforge compare`: bad inputs are one-line errors before anything is written; a tiny real run (Prefect
flow, re-training on the embedded shapes data or on a dataset given with --dataset, MLflow in tmp) writes the
table with the requested losses and seeds."""

from __future__ import annotations

import json
import shutil

import pytest
from typer.testing import CliRunner

from components.surrogates.metric_surrogates import SurrogateSpec, save_surrogate
from flows.cli import app
from test_flows_support import ROOT, write_tiny_params

EXAMPLE = ROOT / "examples" / "losses" / "autolosszero_seg_miou.json"


def _inputs(folder):
    """A tiny project: params.yaml, a valid surrogate, an invalid loss, a malformed file, a non-loss JSON."""
    write_tiny_params(folder)
    save_surrogate(SurrogateSpec({"mIoU": 1.0}), folder / "surr.json")
    (folder / "bad_op.json").write_text(json.dumps({
        "format": "lossforge.loss/1", "task": "segmentation",
        "branches": {"seg": {"operator_set": "autoloss_zero", "weight": 1.0, "tree": {"op": "system", "children": []}}},
    }))
    (folder / "broken.json").write_text("{\"format\": ")
    (folder / "table.json").write_text(json.dumps({"format": "lossforge.comparison/1"}))
    shutil.copy(ROOT / "examples/losses/autolosszero_det_all_branches.json", folder / "det.json")
    return {p.name for p in folder.iterdir()}


@pytest.mark.parametrize("args, message", [
    (["ce", "missing.json"], "error: missing.json: loss file not found"),
    (["ce", "cee"], "error: cee: unknown loss: not a file and not a baseline (known: ce, dice,"),
    (["bad_op.json"], "error: bad_op.json: branches.seg.tree: unknown operator 'system'"),
    (["broken.json"], "error: broken.json"),
    (["table.json"], "error: table.json: not a loss file (format 'lossforge.comparison/1'"),
    (["det.json"], "error: det.json: a detection loss, but the task is segmentation (use --task detection)"),
    (["ce", "--seeds", "0"], "error: --seeds: must be > 0 (got 0)"),
    (["ce", "--iterations", "0"], "error: --iterations: must be > 0 (got 0)"),
    (["ce", "--metric", "mIoUU"], "error: --metric: unknown value 'mIoUU'"),
    (["ce", "--dataset", "/nonexistent/voc"], "error: --dataset: dataset not found: /nonexistent/voc"),
    (["ce", "--out", "params.yaml"], "error: --out: params.yaml exists and is not a folder"),
])
def test_bad_inputs_fail_in_one_line_before_anything_is_written(tmp_path, monkeypatch, args, message):
    before = _inputs(tmp_path)
    monkeypatch.chdir(tmp_path)
    done = CliRunner().invoke(app, ["compare", *args])
    assert done.exit_code == 2, done.output
    lines = [line for line in done.stderr.splitlines() if line.strip()]
    assert len(lines) == 1 and lines[0].startswith(message), done.stderr
    assert {p.name for p in tmp_path.iterdir()} == before


def test_loss_arguments_resolve_to_specs(tmp_path):
    from flows.cli.compare_cmd import resolve_losses

    _inputs(tmp_path)
    specs = resolve_losses(["ce", str(EXAMPLE), str(tmp_path / "surr.json"), "soft_iou", "ce"])
    assert list(specs) == ["ce", "autolosszero_seg_miou", "surr", "soft_iou", "ce-2"]
    assert specs["autolosszero_seg_miou"] == {"type": "graph", "path": str(EXAMPLE.resolve())}
    assert specs["surr"] == {"type": "surrogate", "path": str((tmp_path / "surr.json").resolve())}


@pytest.mark.slow
@pytest.mark.timeout(900)
def test_compare_writes_the_table_for_the_requested_losses_and_seeds(tmp_path, monkeypatch):
    from mlflow.tracking import MlflowClient

    from components.tasks.segmentation.shapes import generate_shapes
    from test_flows_support import cli, prefect_server

    server = prefect_server()
    _inputs(tmp_path)
    write_tiny_params(tmp_path, retrain={"seeds": [4, 5]})
    # the embedded data of params.yaml (made on the way: no split yet), 2 seeds, 2 iterations, BIoU marked
    done = cli(["compare", "ce", "soft_iou", str(EXAMPLE), "surr.json", "--seeds", "2", "--iterations", "2",
                "--metric", "BIoU", "--out", "cmp"], tmp_path, PREFECT_API_URL=server.url)
    assert done.returncode == 0, done.stdout[-2000:] + done.stderr[-3000:]
    table = json.loads((tmp_path / "cmp/comparison.json").read_text())
    assert table["format"] == "lossforge.comparison/1" and table["target_metric"] == "BIoU"
    assert [r["name"] for r in table["rows"]] == ["ce", "soft_iou", "autolosszero_seg_miou", "surr"]
    assert table["seeds"] == [0, 1] and table["config"]["iterations"] == 2
    for row in table["rows"]:
        assert row["status"] in ("ok", "nan", "failed")
        if row["status"] == "ok":
            assert set(row["metrics"]) == set(table["metrics"]) and all(v >= 0 for v in row["std"].values())
    assert table["rows"][0]["status"] == "ok"  # CE trains on anything
    md = (tmp_path / "cmp/comparison.md").read_text()
    assert "**BIoU** (target)" in md and "seeds 0, 1" in md and " ± " in md
    assert (tmp_path / "data/splits/test.txt").exists()

    # a dataset of one's own (VOC layout), default seeds = retrain.seeds of the profile
    generate_shapes(tmp_path / "mine", num_train=8, num_test=4, image_size=32, seed=3)
    done = cli(["compare", "ce", "surr.json", "--dataset", "mine", "--out", "cmp2"], tmp_path,
               PREFECT_API_URL=server.url)
    assert done.returncode == 0, done.stdout[-2000:] + done.stderr[-3000:]
    table = json.loads((tmp_path / "cmp2/comparison.json").read_text())
    assert [r["name"] for r in table["rows"]] == ["ce", "surr"] and table["seeds"] == [4, 5]
    assert table["config"]["iterations"] == 3  # the profile's retrain.iterations
    test_ids = (tmp_path / "cmp2/splits/test.txt").read_text().split()
    assert len(test_ids) == 4 and test_ids == (tmp_path / "mine/ImageSets/Segmentation/val.txt").read_text().split()

    monkeypatch.chdir(tmp_path)  # artifact locations are relative to the project folder (a moved project keeps them)
    client = MlflowClient(f"sqlite:///{tmp_path}/mlruns/mlflow.db")
    exp = client.get_experiment_by_name("lossforge/compare")
    runs = client.search_runs([exp.experiment_id], "tags.`lossforge.kind` = 'comparison'")
    assert len(runs) == 2 and all(r.info.status == "FINISHED" for r in runs)
    mine = next(r for r in runs if r.data.params["dataset"] == "mine")
    assert mine.data.params["seeds"] == "[4, 5]"
    assert mine.data.metrics["ce.mIoU"] == pytest.approx(table["rows"][0]["metrics"]["mIoU"])
    arts = {a.path for a in client.list_artifacts(mine.info.run_id, "compare")}
    assert arts == {"compare/comparison.md", "compare/comparison.json"}
