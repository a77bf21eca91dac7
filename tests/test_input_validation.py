"""Bad input is caught before anything is written (issue 10, part 4): every case goes through the real CLI and
must end with exit status 2, exactly one `error:` line naming the field or the file, no traceback, and the project
folder unchanged (an earlier run's data/splits included; no .lossforge, mlruns or losses appear).

Data cases use a user dataset (`--dataset data/user`, the embedded generator's VOC + COCO layout at 32 px) with one
file broken; settings cases edit the tiny profile of tests/test_flows_support.py."""

from __future__ import annotations

import json
import shutil
import subprocess
import sys
from pathlib import Path
from typing import Callable

import numpy as np
import pytest
import yaml
from PIL import Image
from typer.testing import CliRunner

from components.tasks.segmentation.shapes import generate_shapes
from flows.cli import app

SEARCH = ["search", "--no-retrain", "--dataset", "data/user"]
OLD_SPLITS = {"train.txt": "".join(f"train_{k:05d}\n" for k in range(5)), "eval.txt": "train_00005\ntrain_00006\n",
              "test.txt": "val_00000\n"}


@pytest.fixture(scope="module")
def template(tmp_path_factory) -> Path:
    """A project folder: tiny params.yaml, a 12 + 4 image user dataset, and an earlier run's split manifests."""
    from test_flows_support import write_tiny_params

    root = tmp_path_factory.mktemp("validation")
    write_tiny_params(root)
    generate_shapes(root / "data" / "user", num_train=12, num_test=4, image_size=32, seed=1)
    (root / "data" / "splits").mkdir()
    for name, text in OLD_SPLITS.items():
        (root / "data" / "splits" / name).write_text(text)
    return root


@pytest.fixture
def project(template, tmp_path, monkeypatch) -> Path:
    folder = tmp_path / "project"
    shutil.copytree(template, folder)
    monkeypatch.chdir(folder)
    return folder


def snapshot(folder: Path) -> dict[str, tuple[int, int]]:
    """Every path under `folder` with its mtime and size (folders too: a new file changes its folder's mtime)."""
    return {str(p.relative_to(folder)): (p.stat().st_mtime_ns, p.stat().st_size) for p in sorted(folder.rglob("*"))}


def assert_rejected(project: Path, args: list[str], *words: str) -> str:
    """Run the CLI in-process; exit status 2, one `error:` line naming `words`, no traceback, nothing written."""
    before = snapshot(project)
    done = CliRunner().invoke(app, args)
    assert done.exit_code == 2, (done.exit_code, done.output[-3000:], done.exception)
    lines = [line for line in done.stderr.splitlines() if line.strip()]
    assert len(lines) == 1 and lines[0].startswith("error: "), done.stderr[-3000:]
    assert "Traceback" not in done.output
    for word in words:
        assert word in lines[0], lines[0]
    assert snapshot(project) == before, "the rejected command wrote files"
    return lines[0]


def edit_params(project: Path, change: Callable[[dict], None]) -> None:
    """Apply `change` to the selected (tiny) profile of params.yaml."""
    raw = yaml.safe_load((project / "params.yaml").read_text())
    change(raw["profiles"][raw["profile"]])
    (project / "params.yaml").write_text(yaml.safe_dump(raw, sort_keys=False))


def set_key(dotted: str, value) -> Callable[[dict], None]:
    def change(profile: dict) -> None:
        node = profile
        *parents, leaf = dotted.split(".")
        for key in parents:
            node = node.setdefault(key, {})
        node[leaf] = value
    return change


# ------------------------------------------------------------------------------------------ data contents
def _mask_of_other_size(root: Path) -> Path:
    path = root / "SegmentationClass" / "train_00003.png"
    with Image.open(path) as im:
        im.resize((16, 16)).save(path)
    return path


def _truncated_jpeg(root: Path) -> Path:
    path = root / "JPEGImages" / "train_00005.jpg"
    data = path.read_bytes()
    path.write_bytes(data[: len(data) // 2])
    return path


def _label_out_of_range(root: Path) -> Path:
    path = root / "SegmentationClass" / "train_00007.png"
    with Image.open(path) as im:
        labels = np.array(im)
        palette = im.getpalette()
    labels[0, 0] = 9  # 8 classes: 0..7
    out = Image.fromarray(labels.astype(np.uint8), mode="P")
    out.putpalette(palette)
    out.save(path)
    return path


@pytest.mark.parametrize("breaks", [_mask_of_other_size, _truncated_jpeg, _label_out_of_range],
                         ids=["mask-size", "truncated-jpeg", "label-out-of-range"])
def test_bad_segmentation_file_is_named_before_the_split_is_written(project, breaks):
    bad = breaks(project / "data" / "user")
    line = assert_rejected(project, SEARCH, str(Path("data/user") / bad.relative_to(project / "data" / "user")))
    assert (project / "data" / "splits" / "train.txt").read_text() == OLD_SPLITS["train.txt"], line


def test_training_split_smaller_than_the_batch_is_rejected(project):
    edit_params(project, set_key("proxy.batch_size", 10))  # 12 images, eval_fraction 0.25: S_train has 9
    assert_rejected(project, SEARCH, "proxy.batch_size", "S_train (9 images")


def test_search_stage_alone_validates_the_images_of_its_manifests(project):
    """`lossforge stage search` (DVC) reads existing manifests: their images are checked before the search."""
    edit_params(project, lambda p: p.setdefault("data", {}).update({"path": "data/user", "generate": False}))
    _truncated_jpeg(project / "data" / "user")  # train_00005: in the old manifests' S_eval
    assert_rejected(project, ["stage", "search"], "train_00005.jpg")


# ------------------------------------------------------------------------------------------ COCO: detection / instances
def _coco(project: Path, split: str = "train") -> tuple[Path, dict]:
    path = project / "data" / "user" / "annotations" / f"instances_{split}.json"
    return path, json.loads(path.read_text())


def _box_outside_unannotated_size(project: Path) -> str:
    path, data = _coco(project)
    image = data["images"][0]
    del image["width"], image["height"]  # only the decoded image can tell the box is outside it
    ann = next(a for a in data["annotations"] if a["image_id"] == image["id"])
    ann["bbox"] = [20.0, 20.0, 30.0, 30.0]
    path.write_text(json.dumps(data))
    return f"annotations[id={ann['id']}].bbox"


def _truncated_detection_image(project: Path) -> str:
    bad = _truncated_jpeg(project / "data" / "user")
    return bad.name


@pytest.mark.parametrize("task", ["detection", "instance_segmentation"])
@pytest.mark.parametrize("breaks", [_box_outside_unannotated_size, _truncated_detection_image],
                         ids=["box-outside", "truncated-jpeg"])
def test_bad_coco_detection_data_is_named_before_anything_is_written(project, task, breaks):
    named = breaks(project)
    assert_rejected(project, [*SEARCH, "--task", task], named)


def test_instance_mask_that_cannot_be_decoded_is_named(project):
    path, data = _coco(project, "val")
    ann = data["annotations"][1]
    ann["segmentation"] = {"size": [16, 16], "counts": ann["segmentation"]["counts"]}  # not the 32x32 image
    path.write_text(json.dumps(data))
    assert_rejected(project, [*SEARCH, "--task", "instance_segmentation"], f"annotations[id={ann['id']}].segmentation")


# ------------------------------------------------------------------------------------------ COCO for segmentation
@pytest.fixture
def coco_project(project) -> Path:
    """The user data as a COCO-only folder (annotations/ + images/) for the segmentation reader."""
    user = project / "data" / "user"
    coco = project / "data" / "coco"
    (coco / "annotations").mkdir(parents=True)
    shutil.copytree(user / "JPEGImages", coco / "images")
    for split in ("train", "val"):
        shutil.copy(user / "annotations" / f"instances_{split}.json", coco / "annotations")
    return project


def _drop(section: str, key: str) -> Callable[[dict], str]:
    def change(data: dict) -> str:
        del data[section][0][key]
        return f"{section}[0]"
    return change


def _drop_image_id(data: dict) -> str:
    del data["annotations"][0]["image_id"]
    return f"annotations[id={data['annotations'][0]['id']}].image_id"


def _short_polygon(data: dict) -> str:
    data["annotations"][0]["segmentation"] = [[1.0, 2.0, 3.0, 4.0]]
    return f"annotations[id={data['annotations'][0]['id']}].segmentation"


def _text_in_polygon(data: dict) -> str:
    data["annotations"][0]["segmentation"] = [[1.0, 2.0, "x", 4.0, 5.0, 6.0]]
    return f"annotations[id={data['annotations'][0]['id']}].segmentation"


@pytest.mark.parametrize("breaks", [_drop("categories", "name"), _drop("images", "file_name"), _drop_image_id,
                                    _short_polygon, _text_in_polygon],
                         ids=["category-name", "image-file_name", "annotation-image_id", "short-polygon",
                              "text-in-polygon"])
def test_malformed_coco_for_segmentation_is_one_line(coco_project, breaks):
    path = coco_project / "data" / "coco" / "annotations" / "instances_train.json"
    data = json.loads(path.read_text())
    where = breaks(data)
    path.write_text(json.dumps(data))
    assert_rejected(coco_project, ["search", "--no-retrain", "--dataset", "data/coco"], "instances_train.json", where)


# ------------------------------------------------------------------------------------------ settings
@pytest.mark.parametrize("change, args, words", [
    (set_key("evolution.operator_set", "nope"), [], ["evolution.operator_set", "nope"]),
    (set_key("evolution.depth", 1000), [], ["evolution.depth", "1000"]),
    (set_key("proxy.device", "gpu7"), [], ["proxy.device", "gpu7"]),
    (set_key("proxy.model", {"name": "deeplabv3plus", "encoder": "resnet999", "input_size": 32}), [],
     ["proxy.model.encoder", "resnet999"]),
    (set_key("ppo.family", "spline"), ["--method", "ppo"], ["ppo", "spline"]),
    (set_key("tracking.uri", "bogus://x"), [], ["tracking.uri", "bogus://x"]),
    (set_key("evolution.seed_losses", ["missing_loss.json"]), [], ["evolution.seed_losses", "missing_loss.json"]),
    (set_key("evolution.seed_losses", ["ce"]), [], ["evolution.seed_losses", "'ce' is not a loss graph"]),
    (set_key("search.budget", True), [], ["search.budget", "True"]),
    (set_key("proxy.batch_size", True), [], ["proxy.batch_size", "True"]),
], ids=["operator_set", "depth", "device", "encoder", "ppo-family", "tracking-uri", "seed-missing", "seed-not-graph",
        "budget-true", "batch-true"])
def test_bad_setting_is_rejected_before_prepare_and_split(project, change, args, words):
    edit_params(project, change)
    assert_rejected(project, [*SEARCH, *args], *words)


@pytest.mark.parametrize("change, words", [
    (set_key("retrain.seeds", "12"), ["retrain.seeds", "'12'"]),
    (set_key("retrain.top_k", "two"), ["retrain.top_k", "'two'"]),
], ids=["seeds-string", "top_k-string"])
def test_retrain_settings_are_checked_before_the_search(project, change, words):
    """Read only by the re-training stage, after the whole search: checked first now."""
    edit_params(project, change)
    assert_rejected(project, ["search", "--dataset", "data/user"], *words)


def test_ray_runner_without_its_package_is_rejected_up_front(project):
    """prefect-ray is installed in this environment: the subprocess hides it (an import of it fails), as on a
    machine without it. The command must not start Prefect or write anything."""
    before = snapshot(project)
    code = "import sys; sys.modules['prefect_ray'] = None; from flows.cli import app; app()"
    done = subprocess.run([sys.executable, "-c", code, *SEARCH, "--runner", "ray"], cwd=project, capture_output=True,
                          text=True, timeout=300)
    lines = [line for line in done.stderr.splitlines() if line.strip()]
    assert done.returncode == 2 and len(lines) == 1, done.stderr[-3000:]
    assert lines[0].startswith("error: search.runner") and "prefect-ray" in lines[0]
    assert snapshot(project) == before


def test_empty_params_file_is_rejected(project):
    (project / "params.yaml").write_text("")
    assert_rejected(project, SEARCH, "params.yaml", "empty")


@pytest.mark.parametrize("make, words", [
    (lambda p: ["-p", str(p / "data")], ["data", "folder"]),
    (lambda p: (p / "latin1.yaml").write_bytes("profile: d\xe9mo\n".encode("latin-1")) and ["-p", "latin1.yaml"],
     ["latin1.yaml", "UTF-8"]),
    (lambda p: (p / "list.yaml").write_text("profile: [demo]\n") and ["-p", "list.yaml"], ["profile", "demo"]),
], ids=["params-is-a-folder", "params-not-utf8", "profile-is-a-list"])
def test_params_file_problems_are_one_line(project, make, words):
    extra = make(project)
    assert_rejected(project, [*SEARCH, *extra], *words)


# ------------------------------------------------------------------------------------------ loss and data tools
def test_loss_weight_with_5000_digits_is_one_line(project):
    loss = json.loads((Path(__file__).resolve().parents[1] / "examples/losses/autolosszero_seg_miou.json").read_text())
    text = json.dumps(loss).replace('"weight": 1.0', '"weight": ' + "9" * 5000)
    (project / "big.json").write_text(text)
    assert_rejected(project, ["loss", "show", "big.json"], "big.json", "4300 digits")
    (project / "big.json").write_text(text.replace("9" * 5000, "9" * 400))  # parses, but no float holds it
    assert_rejected(project, ["loss", "show", "big.json"], "big.json", "branches.seg.weight")


def test_loss_export_refuses_a_folder_and_its_own_input(project):
    example = Path(__file__).resolve().parents[1] / "examples/losses/autolosszero_seg_miou.json"
    shutil.copy(example, project / "X.json")
    assert_rejected(project, ["loss", "export", "X.json", "-o", "data"], "--out", "data", "folder")
    assert_rejected(project, ["loss", "export", "X.json", "-o", "X.json"], "--out", "X.json", "input")
    assert (project / "X.json").read_bytes() == example.read_bytes()


def test_data_split_refuses_an_existing_file_as_out(project):
    (project / "taken").write_text("not a folder\n")
    assert_rejected(project, ["data", "split", "--data", "data/user", "--out", "taken", "--eval-count", "2"],
                    "taken", "not a folder")


def test_a_single_images_masks_folder_is_split_three_ways(project):
    """The documented images/ + masks/ + classes.txt layout has no splits: the test set is held out as well."""
    user, pair = project / "data" / "user", project / "data" / "pair"
    shutil.copytree(user / "JPEGImages", pair / "images", ignore=shutil.ignore_patterns("val_*"))
    shutil.copytree(user / "SegmentationClass", pair / "masks", ignore=shutil.ignore_patterns("val_*"))
    shutil.copy(user / "classes.txt", pair / "classes.txt")
    done = CliRunner().invoke(app, ["data", "split", "--data", "data/pair", "--out", "pair_splits",
                                    "--eval-fraction", "0.25"])
    assert done.exit_code == 0, done.output
    parts = {n: (project / "pair_splits" / f"{n}.txt").read_text().split() for n in ("train", "eval", "test")}
    assert {n: len(ids) for n, ids in parts.items()} == {"train": 6, "eval": 3, "test": 3}
    assert sorted(parts["train"] + parts["eval"] + parts["test"]) == sorted(p.stem for p in (pair / "images").iterdir())


def test_the_untouched_project_passes_every_check(project):
    """Control: the same project without a broken file passes `Task.validate_data` and the run's checks, for the
    three tasks (the checks must not reject good data)."""
    from components.tasks.base import get_task
    from flows.run_config import check_inputs, resolve_params
    from flows.search_flow import STAGES

    for task in ("segmentation", "detection", "instance_segmentation"):
        assert len(get_task(task).validate_data("data/user", split="train")) == 12
        params = resolve_params("params.yaml", dataset="data/user", task=task)
        check_inputs(params, STAGES)
    assert (project / "data" / "splits" / "train.txt").read_text() == OLD_SPLITS["train.txt"]
