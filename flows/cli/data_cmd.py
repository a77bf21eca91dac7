"""`lossforge data ...` commands: generate the embedded shapes dataset, write the search splits.

Orchestration only: generation, reading and splitting live in components/ (tasks/segmentation/shapes.py,
the task's dataset readers, tasks/splits.py). Bad input is a one-line `error:` (exit status 2) raised before anything is written.
"""

from __future__ import annotations

from pathlib import Path
from typing import Optional

import typer
from rich.console import Console
from rich.progress import BarColumn, MofNCompleteColumn, Progress, TextColumn, TimeElapsedColumn

from flows.cli.common import user_errors

app = typer.Typer(no_args_is_help=True)
console = Console(highlight=False, soft_wrap=True)


@app.command("make-shapes")
@user_errors
def make_shapes(
    out: Path = typer.Option(Path("data/shapes"), "--out", help="Dataset folder to write (replaced if it holds an "
                             "earlier shapes dataset)."),
    num_train: int = typer.Option(400, "--num-train", help="Images in the train split."),
    num_test: int = typer.Option(100, "--num-test", help="Images in the val split (held out for re-training)."),
    size: int = typer.Option(128, "--size", help="Image side in pixels."),
    seed: int = typer.Option(0, "--seed", help="Random seed: same seed, byte-identical files."),
    ignore_band: int = typer.Option(0, "--ignore-band", help="Width in px of a VOC-style 255 band along "
                                    "occlusion boundaries (0 = off)."),
    image_format: str = typer.Option("jpg", "--format", help="Image file format: jpg (as VOC) or png (lossless)."),
) -> None:
    """Generate the embedded shapes dataset (VOC layout + COCO JSON)."""
    from components.tasks.segmentation.shapes import SHAPES_CLASSES, ShapesConfig, generate_shapes

    config = ShapesConfig(num_train=num_train, num_test=num_test, image_size=size, seed=seed,
                          image_format=image_format, ignore_band=ignore_band)
    config.validate()  # one-line error before the progress bar starts
    with Progress(TextColumn("generating"), BarColumn(), MofNCompleteColumn(), TimeElapsedColumn(),
                  console=console, transient=True, disable=not console.is_terminal) as bar:
        job = bar.add_task("images", total=num_train + num_test)
        root = generate_shapes(out, num_train=num_train, num_test=num_test, image_size=size, seed=seed,
                               image_format=image_format, ignore_band=ignore_band,
                               progress=lambda done, total: bar.update(job, completed=done, total=total))
    console.print(f"wrote {root}")
    console.print(f"  train: {num_train} images, val: {num_test} images, {size}x{size} px, seed {seed}")
    console.print(f"  classes ({len(SHAPES_CLASSES)}, 255 = ignore): {', '.join(SHAPES_CLASSES)}")
    console.print(f"  VOC layout: {root / 'JPEGImages'}, {root / 'SegmentationClass'}, "
                  f"{root / 'ImageSets' / 'Segmentation'}")
    console.print(f"  COCO JSON: {root / 'annotations'}")


@app.command("split")
@user_errors
def split(
    data: Path = typer.Option(Path("data/shapes"), "--data", help="Dataset: VOC folder, images/+masks/ folder(s) "
                              "or COCO layout."),
    out: Path = typer.Option(Path("data/splits"), "--out", help="Folder for train.txt, eval.txt and test.txt."),
    eval_count: Optional[int] = typer.Option(None, "--eval-count", help="Training images held out as S_eval."),
    eval_fraction: Optional[float] = typer.Option(None, "--eval-fraction",
                                                  help="Fraction of the training images held out as S_eval."),
    seed: int = typer.Option(0, "--seed", help="Random seed of the split."),
    train_split: str = typer.Option("train", "--train-split", help="The dataset's training list."),
    test_split: str = typer.Option("val", "--test-split", help="The dataset's held-out list (final re-training)."),
    task: str = typer.Option("segmentation", "--task", help="Task whose reader opens the dataset: segmentation, "
                             "detection, instance_segmentation, pose (or a plug-in's)."),
) -> None:
    """Carve S_eval out of the training images; write the S_train, S_eval and test manifests."""
    from components.tasks.base import get_task
    from components.tasks.splits import write_search_splits

    reader = get_task(task)
    train = reader.open_dataset(data, split=train_split)
    test = reader.open_dataset(data, split=test_split)
    paths = write_search_splits(train.ids, test.ids, out, eval_count=eval_count, eval_fraction=eval_fraction,
                                seed=seed)
    counts = {name: len(path.read_text(encoding="utf-8").split()) for name, path in paths.items()}
    console.print(f"split {data} ({len(train)} training images, seed {seed}):")
    for name, label in (("train", "S_train"), ("eval", "S_eval"), ("test", "test")):
        console.print(f"  {label:<8} {counts[name]:>6} ids  {paths[name]}")
