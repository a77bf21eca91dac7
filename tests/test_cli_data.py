"""`lossforge data make-shapes` and `lossforge data split`: files written, summaries, one-line errors."""

from __future__ import annotations

import json
import shutil
import subprocess
import sys
from pathlib import Path

import pytest
from typer.testing import CliRunner

from components.tasks.segmentation.datasets import open_segmentation_dataset
from components.tasks.segmentation.shapes import SHAPES_CLASSES
from components.tasks.splits import make_split, read_manifest
from flows.cli import app

LOSSFORGE = Path(sys.executable).parent / "lossforge"


def invoke(*args: str):
    return CliRunner().invoke(app, ["data", *args])


def assert_user_error(done, *words: str) -> None:
    """Exit status 2, exactly one `error:` line on stderr naming `words`, nothing on stdout."""
    assert done.exit_code == 2, (done.exit_code, done.output, done.stderr)
    lines = [line for line in done.stderr.splitlines() if line.strip()]
    assert len(lines) == 1 and lines[0].startswith("error: "), done.stderr
    for word in words:
        assert word in lines[0], lines[0]
    assert done.stdout.strip() == ""


@pytest.fixture(scope="module")
def shapes(tmp_path_factory) -> Path:
    out = tmp_path_factory.mktemp("cli") / "data" / "shapes"
    done = invoke("make-shapes", "--out", str(out), "--num-train", "12", "--num-test", "4", "--size", "64",
                  "--seed", "2")
    assert done.exit_code == 0, done.output
    return out


def test_make_shapes_writes_the_dataset_and_a_summary(tmp_path):
    out = tmp_path / "shapes"
    done = invoke("make-shapes", "--out", str(out), "--num-train", "5", "--num-test", "2", "--size", "48",
                  "--seed", "4", "--ignore-band", "1", "--format", "png")
    assert done.exit_code == 0, done.output
    assert str(out) in done.stdout
    assert "train: 5 images" in done.stdout and "val: 2 images" in done.stdout
    assert all(name in done.stdout for name in SHAPES_CLASSES)
    meta = json.loads((out / "dataset.json").read_text())
    assert {k: meta["params"][k] for k in ("num_train", "num_test", "image_size", "seed", "ignore_band",
                                           "image_format")} == {
        "num_train": 5, "num_test": 2, "image_size": 48, "seed": 4, "ignore_band": 1, "image_format": "png"}
    assert len(list((out / "JPEGImages").glob("*.png"))) == 7
    assert (out / "annotations" / "instances_train.json").exists()
    ds = open_segmentation_dataset(out)
    assert len(ds) == 5 and ds[0][1].shape == (48, 48)


def test_split_writes_three_manifests(shapes, tmp_path):
    out = tmp_path / "splits"
    done = invoke("split", "--data", str(shapes), "--out", str(out), "--eval-count", "3", "--seed", "5")
    assert done.exit_code == 0, done.output
    for name in ("train.txt", "eval.txt", "test.txt"):
        assert str(out / name) in done.stdout
    train_ids = (shapes / "ImageSets" / "Segmentation" / "train.txt").read_text().split()
    expected = make_split(train_ids, eval_count=3, seed=5)
    assert read_manifest(out / "train.txt") == expected.train
    assert read_manifest(out / "eval.txt") == expected.eval
    assert read_manifest(out / "test.txt") == [f"val_{k:05d}" for k in range(4)]
    counts = {line.split()[0]: int(line.split()[1]) for line in done.stdout.splitlines()[1:] if line.strip()}
    assert counts == {"S_train": 9, "S_eval": 3, "test": 4}

    again = tmp_path / "again"
    assert invoke("split", "--data", str(shapes), "--out", str(again), "--eval-fraction", "0.25",
                  "--seed", "5").exit_code == 0
    assert read_manifest(again / "eval.txt") == expected.eval  # 0.25 * 12 = 3, same seed: same ids


def test_split_of_a_coco_layout(shapes, tmp_path):
    """--data can be any layout open_segmentation_dataset detects: here annotations/ + images/ (COCO)."""
    coco = tmp_path / "coco"
    shutil.copytree(shapes / "annotations", coco / "annotations")
    shutil.copytree(shapes / "JPEGImages", coco / "images")
    done = invoke("split", "--data", str(coco), "--out", str(tmp_path / "splits"), "--eval-fraction", "0.5")
    assert done.exit_code == 0, done.output
    assert len(read_manifest(tmp_path / "splits" / "eval.txt")) == 6
    assert len(read_manifest(tmp_path / "splits" / "test.txt")) == 4


def test_split_refuses_overlapping_lists(shapes, tmp_path):
    out = tmp_path / "splits"
    done = invoke("split", "--data", str(shapes), "--out", str(out), "--eval-fraction", "0.5",
                  "--train-split", "trainval", "--test-split", "val")
    assert_user_error(done, "val_00000")  # trainval contains the val ids
    assert not out.exists()


@pytest.mark.parametrize(
    "args, words",
    [
        (["--data", "{tmp}/nothing-here", "--eval-count", "2"], ["nothing-here", "not found"]),
        (["--data", "{shapes}", "--eval-count", "12"], ["eval_count", "12"]),
        (["--data", "{shapes}", "--eval-count", "2", "--eval-fraction", "0.1"], ["exactly one"]),
        (["--data", "{shapes}"], ["exactly one"]),
        (["--data", "{shapes}", "--eval-fraction", "1.5"], ["eval_fraction", "1.5"]),
        (["--data", "{shapes}", "--eval-count", "2", "--test-split", "test"], ["test.txt", "not found"]),
    ],
)
def test_split_bad_input(shapes, tmp_path, args, words):
    out = tmp_path / "splits"
    args = [a.format(tmp=tmp_path, shapes=shapes) for a in args]
    done = invoke("split", *args, "--out", str(out))
    assert_user_error(done, *words)
    assert not out.exists()


@pytest.mark.parametrize(
    "args, words",
    [
        (["--size", "8"], ["image_size", "8"]),
        (["--num-train", "0"], ["num_train"]),
        (["--format", "gif"], ["image_format", "gif"]),
        (["--ignore-band", "-1"], ["ignore_band"]),
    ],
)
def test_make_shapes_bad_input(tmp_path, args, words):
    out = tmp_path / "shapes"
    done = invoke("make-shapes", "--out", str(out), "--num-train", "2", "--num-test", "1", *args)
    assert_user_error(done, *words)
    assert list(tmp_path.iterdir()) == []


def test_make_shapes_refuses_a_foreign_folder(tmp_path):
    (tmp_path / "mine").mkdir()
    (tmp_path / "mine" / "thesis.tex").write_text("do not delete")
    done = invoke("make-shapes", "--out", str(tmp_path / "mine"), "--num-train", "2", "--num-test", "1")
    assert_user_error(done, str(tmp_path / "mine"))
    assert [p.name for p in (tmp_path / "mine").iterdir()] == ["thesis.tex"]


def test_installed_entry_point(tmp_path):
    """The real `lossforge` executable: make-shapes, split, and a bad request (exit 2, one line)."""
    def run(*args):
        return subprocess.run([str(LOSSFORGE), "data", *args], cwd=tmp_path, capture_output=True, text=True,
                              timeout=120)

    made = run("make-shapes", "--out", "data/shapes", "--num-train", "6", "--num-test", "2", "--size", "40")
    assert made.returncode == 0, made.stderr
    split = run("split", "--data", "data/shapes", "--out", "data/splits", "--eval-count", "2")
    assert split.returncode == 0, split.stderr
    assert len(read_manifest(tmp_path / "data" / "splits" / "eval.txt")) == 2
    bad = run("make-shapes", "--out", "data/other", "--size", "20")
    assert bad.returncode == 2 and bad.stdout == ""
    assert bad.stderr.startswith("error: image_size must be in [32, 2048], got 20")
    assert len(bad.stderr.strip().splitlines()) == 1
    assert not (tmp_path / "data" / "other").exists()
