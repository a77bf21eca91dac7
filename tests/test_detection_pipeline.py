"""Detection beyond the embedded data: a hand-written COCO dataset (non-contiguous category ids, non-square
images of two sizes, images in a sub-folder) searched through the CLI, bad data refused in one line before
anything is written, `lossforge compare --task detection`, one MLflow tag per loss branch, and the report
listing every branch of the best loss."""

from __future__ import annotations

import json
import random
import shutil

import pytest
from typer.testing import CliRunner

from test_flows_support import ROOT, cli, write_tiny_params

CATEGORIES = [{"id": 7, "name": "disc"}, {"id": 3, "name": "block"}]  # unsorted, non-contiguous on purpose
SIZES = [(96, 72), (80, 112)]  # (width, height)
DET_EXAMPLE = ROOT / "examples" / "losses" / "autolosszero_det_all_branches.json"


def write_coco(root, *, train=8, val=4, layout="plain", seed=0):
    """A small COCO dataset drawn with PIL: filled rectangles (category 3) and ellipses (category 7).

    layout "plain": ``<root>/train.json`` + ``val.json``; "instances": ``<root>/annotations/instances_<split>.json``.
    Images go to ``<root>/images/pics/<name>.png`` (``file_name`` = ``pics/<name>.png``)."""
    from PIL import Image, ImageDraw

    rng = random.Random(seed)
    (root / "images" / "pics").mkdir(parents=True, exist_ok=True)
    next_ann = 1
    for split, count in (("train", train), ("val", val)):
        images, annotations = [], []
        for k in range(count):
            width, height = SIZES[k % 2]
            name = f"pics/{split[0]}photo-{rng.randrange(10**6):06d}-{k}.png"
            image = Image.new("RGB", (width, height), (rng.randrange(40), rng.randrange(40), rng.randrange(40)))
            draw = ImageDraw.Draw(image)
            image_id = 1000 + 17 * len(images) + (0 if split == "train" else 500)
            for j in range(1 + k % 3):
                w, h = rng.randint(14, width // 2), rng.randint(14, height // 2)
                x, y = rng.randint(0, width - w), rng.randint(0, height - h)
                category = 3 if (j + k) % 2 == 0 else 7
                color = (220, 60 + rng.randrange(40), 40) if category == 3 else (40, 90, 230)
                shape = draw.rectangle if category == 3 else draw.ellipse
                shape([x, y, x + w - 1, y + h - 1], fill=color)
                annotations.append({"id": next_ann, "image_id": image_id, "category_id": category,
                                    "bbox": [x, y, w, h], "area": w * h, "iscrowd": 0})
                next_ann += 1
            image.save(root / "images" / name)
            images.append({"id": image_id, "file_name": name, "width": width, "height": height})
        data = {"images": images, "annotations": annotations, "categories": CATEGORIES}
        if layout == "plain":
            path = root / f"{split}.json"
        else:
            path = root / "annotations" / f"instances_{split}.json"
            path.parent.mkdir(parents=True, exist_ok=True)
        path.write_text(json.dumps(data))
    return root


@pytest.mark.parametrize("layout", ["plain", "instances"])
def test_hand_written_coco_opens(tmp_path, layout):
    from components.tasks.detection.datasets import open_detection_dataset

    root = write_coco(tmp_path / "mine", layout=layout)
    train = open_detection_dataset(root, split="train")
    val = open_detection_dataset(root, split="val")
    assert len(train) == 8 and len(val) == 4 and not set(train.ids) & set(val.ids)
    assert train.classes == ("background", "block", "disc") and train.num_classes == 3  # ids 3, 7 -> labels 1, 2
    shapes = {tuple(train[i][0].shape) for i in range(len(train))}
    assert shapes == {(3, 72, 96), (3, 112, 80)}
    train.validate()
    labels = {int(v) for i in range(len(train)) for v in train[i][1]["labels"]}
    assert labels == {1, 2}
    assert train.samples[0].image.parent == root / "images" / "pics"
    both = open_detection_dataset(root, ids=[val.ids[1], train.ids[2]])
    assert both.ids == [val.ids[1], train.ids[2]]


def test_unknown_folder_layout_is_one_line(tmp_path):
    from components.tasks.detection.datasets import DetectionDatasetError, open_detection_dataset

    (tmp_path / "empty").mkdir()
    with pytest.raises(DetectionDatasetError, match=r"no COCO annotation files \(expected annotations/instances_"):
        open_detection_dataset(tmp_path / "empty")


def _break_box(data, root):
    data["annotations"][0]["bbox"] = [60.0, 10.0, 50.0, 20.0]  # image 0 is 96 wide


def _break_file(data, root):
    (root / "images" / data["images"][1]["file_name"]).unlink()


def _break_category(data, root):
    data["annotations"][2]["category_id"] = 5


@pytest.mark.parametrize("edit, words", [
    (_break_box, ["train.json", "annotations[id=1].bbox", "outside image"]),
    (_break_file, ["image listed in train.json not found"]),
    (_break_category, ["train.json", "category_id 5 is not in 'categories'"]),
])
def test_bad_user_data_fails_in_one_line_before_anything_is_written(tmp_path, monkeypatch, edit, words):
    from flows.cli import app

    root = write_coco(tmp_path / "mine")
    data = json.loads((root / "train.json").read_text())
    edit(data, root)
    (root / "train.json").write_text(json.dumps(data))
    write_tiny_params(tmp_path)
    before = {p.name for p in tmp_path.iterdir()}
    monkeypatch.chdir(tmp_path)
    done = CliRunner().invoke(app, ["search", "--task", "detection", "--dataset", "mine", "--no-retrain"])
    assert done.exit_code == 2, done.output
    lines = [line for line in done.stderr.splitlines() if line.strip()]
    assert len(lines) == 1 and lines[0].startswith("error: "), done.stderr
    for word in words:
        assert word in lines[0], lines[0]
    if edit is _break_file:
        assert data["images"][1]["file_name"].split("/")[-1] in lines[0]
    assert {p.name for p in tmp_path.iterdir()} == before


@pytest.mark.slow
@pytest.mark.timeout(600)
def test_search_on_a_coco_dataset_the_project_did_not_generate(tmp_path):
    from mlflow.tracking import MlflowClient

    from test_detection_flow import DET

    write_coco(tmp_path / "mine")
    write_tiny_params(tmp_path, **DET)
    done = cli(["search", "--task", "detection", "--dataset", "mine", "--no-retrain"], tmp_path, timeout=540)
    assert done.returncode == 0, done.stdout[-2000:] + done.stderr[-3000:]
    out = tmp_path / "losses" / "detection-mAP"
    summary = json.loads((out / "search.json").read_text())
    assert summary["task"] == "detection" and summary["counters"]["accepted"] >= 2
    assert len(list(tmp_path.glob(".lossforge/runs/*/results/*.json"))) == 2
    best = json.loads((out / "best.json").read_text())
    assert set(best["branches"]) == {"cls_rpn", "reg_rpn", "cls_rcnn", "reg_rcnn"}
    manifests = {n: (tmp_path / "data" / "splits" / f"{n}.txt").read_text().split() for n in ("train", "eval", "test")}
    assert len(manifests["train"]) == 6 and len(manifests["eval"]) == 2 and len(manifests["test"]) == 4
    assert all("photo-" in i for ids in manifests.values() for i in ids)
    client = MlflowClient(f"sqlite:///{tmp_path}/mlruns/mlflow.db")  # one formula tag per branch per candidate
    runs = [r for e in client.search_experiments()
            for r in client.search_runs([e.experiment_id], "tags.`lossforge.kind` = 'candidate'")]
    assert len(runs) == 2
    for run in runs:
        assert {f"formula.{b}" for b in best["branches"]} <= set(run.data.tags), run.data.tags
    report = (tmp_path / "reports" / "detection-mAP" / "report.md").read_text()
    for branch in ("cls_rpn", "reg_rpn", "cls_rcnn", "reg_rcnn"):  # every branch of the best loss on its own line
        assert sum(line.lstrip("- ").startswith(f"`{branch}:") for line in report.splitlines()) == 1, report


@pytest.mark.slow
@pytest.mark.timeout(600)
def test_compare_detection_losses(tmp_path):
    shutil.copy(DET_EXAMPLE, tmp_path / "det.json")
    write_tiny_params(tmp_path, data={"num_train": 8, "num_test": 4, "image_size": 64}, tasks={"detection": {
        "retrain": {"iterations": 3, "batch_size": 2, "eval_batch_size": 4, "seeds": [0]}}})
    done = cli(["compare", "--task", "detection", "det.json", "ce_smoothl1", "ce_giou", "--out", "cmp"], tmp_path,
               timeout=540)
    assert done.returncode == 0, done.stdout[-2000:] + done.stderr[-3000:]
    table = json.loads((tmp_path / "cmp" / "comparison.json").read_text())
    assert table["metrics"] == ["mAP", "AP50", "AP75"] and table["target_metric"] == "mAP"
    assert [r["name"] for r in table["rows"]] == ["det", "ce_smoothl1", "ce_giou"] and table["seeds"] == [0]
    for row in table["rows"]:
        assert row["status"] in ("ok", "nan"), row
        if row["status"] == "ok":
            assert set(row["metrics"]) == {"mAP", "AP50", "AP75"}
            assert all(0.0 <= v <= 1.0 for v in row["metrics"].values())
    md = (tmp_path / "cmp" / "comparison.md").read_text()
    assert all(name in md for name in ("det", "ce_smoothl1", "ce_giou", "mAP", "AP50", "AP75"))


def test_tracker_tags_one_formula_per_branch(tmp_path):
    from mlflow.tracking import MlflowClient

    from components.search.graph_json import load_graph
    from flows.search_flow import _tracker_record
    from flows.tracking import SearchTracker, branch_formulas, resolve_tracking_uri

    graph = json.loads(DET_EXAMPLE.read_text())
    expected = {name: b.tree.formula() for name, b in load_graph(DET_EXAMPLE).branches.items()}
    assert len(expected) == 4 and len(set(expected.values())) == 4
    uri = resolve_tracking_uri("sqlite:///mlruns/mlflow.db", tmp_path)
    tracker = SearchTracker(uri, "lossforge/det", "det", artifact_root=tmp_path / "art")
    tracker.start()
    base = {"status": "evaluated", "formula": graph["formula"], "canonical": graph["canonical"], "parent_id": None,
            "mutation": "init", "metrics": {"mAP": 0.1}, "target": 0.1}
    seg = json.loads((ROOT / "examples" / "losses" / "autolosszero_seg_miou.json").read_text())
    class Method:  # what _tracker_record needs of the search method
        def write_loss_files(self, record, folder, stem):
            return folder / f"{stem}.json", folder / f"{stem}.py"

    history = {**base, "id": 1, "hash": "a", "graph": graph, "screening_score": 0.9}  # an evolution record
    flow_record = _tracker_record(Method(), history, tmp_path)
    assert flow_record["branch_formulas"] == branch_formulas(graph) and "graph" not in flow_record
    records = [  # the flow's record, a record with only the graph, a single-branch loss
        flow_record,
        {**base, "key": "2-b", "id": 2, "hash": "b", "graph": graph},
        {**base, "key": "3-c", "id": 3, "hash": "c", "graph": seg, "formula": seg["formula"]},
    ]
    assert tracker.sync(records) == 3
    tracker.finish()
    client = MlflowClient(uri)
    runs = {r.data.tags["lossforge.candidate_key"]: r.data.tags for r in client.search_runs(
        [tracker.experiment_id], "tags.`lossforge.kind` = 'candidate'")}
    for key in ("1-a", "2-b"):
        tags = runs[key]
        assert {k[len("formula."):]: v for k, v in tags.items() if k.startswith("formula.")} == expected
        assert tags["weight.reg_rpn"] == "10" and tags["weight.cls_rpn"] == "1"
        assert tags["formula"] == graph["formula"]
    assert not [k for k in runs["3-c"] if k.startswith("formula.")]


def test_report_lists_each_branch_on_its_own_line():
    from flows.report import formula_cell, formula_item

    formula = json.loads(DET_EXAMPLE.read_text())["formula"]
    lines = ("- formula" + formula_item(formula)).splitlines()
    assert lines[0] == "- formula (one line per branch):" and [line.split(":")[0] for line in lines[1:]] == [
        "  - `cls_rpn", "  - `reg_rpn", "  - `cls_rcnn", "  - `reg_rcnn"]
    assert "\n" not in formula_cell(formula) and formula_cell(formula).count("<br>") == 3
    assert formula_cell("a: |x|\nb: y") == "`a: \\|x\\|`<br>`b: y`"  # no stray table cell
    assert formula_item("-log(y_hat)") == ": `-log(y_hat)`"


@pytest.mark.timeout(300)
def test_screening_bench_on_the_detection_branches():
    import subprocess

    from test_flows_support import PYTHON, env

    done = subprocess.run([PYTHON, str(ROOT / "bench" / "screening.py"), "--task", "detection", "--candidates", "8",
                           "--size", "48", "--samples", "2", "--steps", "10", "--lr", "0.01", "--workers", "1"],
                          capture_output=True, text=True, timeout=280, env=env())
    assert done.returncode == 0, done.stdout[-2000:] + done.stderr[-2000:]
    lines = done.stdout.strip().splitlines()
    assert lines[0].startswith("settings: task detection, 8 candidates") and "metric mAP" in lines[0]
    for branch in ("cls_rpn", "reg_rpn", "cls_rcnn", "reg_rcnn"):
        assert f"--- {branch}: 2 candidates" in lines
    assert "--- all branches: accepted" in done.stdout and "verdict agreement 8/8" in done.stdout
    assert lines[-1].startswith("ratio: ") and lines[-1].endswith("x")
