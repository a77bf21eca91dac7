"""`lossforge loss ...` commands: show a loss JSON, screen it with the rejection protocol, export it.

Orchestration only: loading, screening, simplification and export live in components/.
"""

from __future__ import annotations

import os
import threading
from pathlib import Path
from typing import Optional

import typer
from rich.console import Console
from rich.progress import BarColumn, Progress, TextColumn, TimeElapsedColumn

from components.errors import LossforgeError
from flows.cli.common import user_errors

app = typer.Typer(no_args_is_help=True)
console = Console(highlight=False, soft_wrap=True)

PROBE_TRAIN_IMAGES = 40
PROBE_TEST_IMAGES = 10
PROBE_IMAGE_SIZE = 64


def _run_with_timeout(fn, seconds: float):
    """Run fn() in a daemon thread; (True, value) or (False, None) if it did not finish in time."""
    box: dict = {}

    def target():
        try:
            box["value"] = fn()
        except Exception as exc:  # noqa: BLE001 - reported as "could not simplify"
            box["error"] = exc

    thread = threading.Thread(target=target, daemon=True)
    thread.start()
    thread.join(seconds)
    if thread.is_alive():
        return False, None
    if "error" in box:
        return False, box["error"]
    return True, box["value"]


@app.command("show")
@user_errors
def show(
    file: Path = typer.Argument(..., help="Loss JSON file (lossforge.loss/1)."),
    simplify: bool = typer.Option(True, help="Also print the SymPy-simplified form and its LaTeX."),
    timeout: float = typer.Option(20.0, help="Seconds allowed for SymPy simplification."),
) -> None:
    """Print the loss as a readable formula, its simplified SymPy form and LaTeX."""
    from components.search.export import simplify as simplify_graph
    from components.search.export import to_latex
    from components.search.graph_json import load_graph

    graph = load_graph(file)
    console.print(f"[bold]{file}[/] task={graph.task} hash={graph.hash()}")
    for name, branch in graph.branches.items():
        tree = branch.tree
        console.print(f"  branch {name}: weight {branch.weight:g}, operator set {tree.operator_set}, "
                      f"depth {tree.depth}, {tree.size} nodes")
    console.print("[bold]formula:[/]", markup=True)
    console.print(graph.formula(), markup=False)
    console.print("[bold]canonical:[/]")
    console.print(graph.canonical(), markup=False)
    console.print("[bold]LaTeX:[/]")
    console.print(to_latex(graph), markup=False)
    if simplify:
        ok, value = _run_with_timeout(lambda: (simplify_graph(graph), to_latex(graph, simplified=True)), timeout)
        if ok:
            console.print("[bold]simplified (SymPy):[/]")
            console.print(str(value[0]), markup=False)
            console.print("[bold]simplified LaTeX:[/]")
            console.print(value[1], markup=False)
        elif value is not None:
            console.print(f"[yellow]simplified: not available ({type(value).__name__}: {value})[/]")
        else:
            console.print(f"[yellow]simplified: SymPy did not finish within {timeout:g} s (use --timeout)[/]")


def _default_probe_root() -> Path:
    """Where the embedded probe dataset lives: data/shapes if present, else the user cache."""
    local = Path("data/shapes")
    if (local / "ImageSets").is_dir():
        return local
    base = os.environ.get("LOSSFORGE_CACHE") or os.path.join(
        os.environ.get("XDG_CACHE_HOME") or os.path.expanduser("~/.cache"), "lossforge")
    return Path(base) / "shapes-probe"


def _open_probe_dataset(data: Optional[Path], task_name: str = "segmentation"):
    from components.tasks.base import get_task

    task = get_task(task_name)
    if data is not None:
        if not data.exists():
            raise LossforgeError(f"--data {data}: no such file or directory")
        return task.open_dataset(data, split="train"), str(data)
    root = _default_probe_root()
    if not (root / "ImageSets").is_dir():
        from components.tasks.segmentation.shapes import generate_shapes

        with console.status(f"generating the embedded shapes dataset into {root} ..."):
            generate_shapes(root, num_train=PROBE_TRAIN_IMAGES, num_test=PROBE_TEST_IMAGES,
                            image_size=PROBE_IMAGE_SIZE, seed=0)
    return task.open_dataset(root, split="train"), f"{root} (embedded shapes)"


@app.command("check")
@user_errors
def check(
    file: Path = typer.Argument(..., help="Loss JSON file (any task: the file names it)."),
    metric: Optional[str] = typer.Option(None, help="Target metric ξ (default: the task's; segmentation: gAcc, mAcc, "
                                                    "mIoU, FWIoU, BIoU or BF1; detection: mAP, AP50, AP75)."),
    data: Optional[Path] = typer.Option(None, help="Dataset of the loss's task (default: the embedded shapes dataset)."),
    steps: int = typer.Option(500, help="SGD steps on the predictions."),
    samples: int = typer.Option(5, help="Probe samples B."),
    size: int = typer.Option(64, help="Probe resolution (size × size)."),
    classes: Optional[int] = typer.Option(None, help="Number of classes (default: the dataset's)."),
    lr: float = typer.Option(1e-3, help="SGD learning rate."),
    momentum: float = typer.Option(0.9, help="SGD momentum."),
    threshold: float = typer.Option(0.6, help="Rejection threshold η."),
    gain: str = typer.Option("normalized", help="Acceptance rule: normalized (share of the headroom) or absolute (paper)."),
    seed: int = typer.Option(0, help="Seed for the probe samples and the random network."),
    model: str = typer.Option("lite", help="components.tasks.segmentation.models preset of the random network."),
) -> None:
    """Run the loss-rejection protocol on the probe of the loss's task; print g and the verdict."""
    from components.search.graph_json import load_graph
    from components.search.screening import ScreeningConfig, screen
    from components.tasks.base import get_task, task_names

    graph = load_graph(file)
    if graph.task not in task_names():
        raise LossforgeError(f"{file}: `loss check` screens losses of the tasks {', '.join(task_names())}; "
                             f"this one is for task {graph.task!r}")
    task_ = get_task(graph.task)
    metric = task_.canonical_metric(metric or task_.default_metric)
    config = ScreeningConfig(samples=samples, steps=steps, lr=lr, momentum=momentum, threshold=threshold, gain=gain)
    dataset, where = _open_probe_dataset(data, task_.name)
    with console.status("building the probe (random network predictions) ..."):
        if task_.name == "segmentation":  # the segmentation probe takes the network and the class count too
            from components.tasks.segmentation.probe import build_screening_problem

            problem = build_screening_problem(dataset, metric, num_classes=classes, samples=samples, size=size,
                                              seed=seed, model=model)
        else:
            problem = task_.screening_problem(dataset, metric, samples=samples, size=size, seed=seed)
    console.print(f"probe: {samples} samples of {where}, {size}x{size}, "
                  f"{getattr(dataset, 'num_classes', '?')} classes, metric {problem.metric_name or metric}")
    console.print(f"loss:  {graph.formula()}", markup=False)
    with Progress(TextColumn("screening"), BarColumn(), TextColumn("{task.completed}/{task.total} steps"),
                  TimeElapsedColumn(), console=console, transient=True) as bar:
        task = bar.add_task("screen", total=max(steps, 1))
        result = screen(graph, problem, config, progress=lambda done, total: bar.update(task, completed=done))
    verdict = "[bold green]accepted[/]" if result.accepted else "[bold red]rejected[/]"
    g = "n/a" if result.score is None else f"{result.score:.4f}"
    console.print(f"g = {g}  (threshold η = {threshold:g}, gain {gain})")
    reason = "" if result.accepted else f" ({result.reason})"
    console.print(f"verdict: {verdict}{reason}", markup=True)
    fp = "none" if result.fingerprint is None else ", ".join(f"{v:g}" for v in result.fingerprint)
    console.print(f"gradient fingerprint: {fp}; {result.steps_run} steps in {result.seconds:.1f} s")


@app.command("export")
@user_errors
def export(
    file: Path = typer.Argument(..., help="Loss JSON file."),
    out: Path = typer.Option(..., "-o", "--out", help="Output .py file."),
    class_name: str = typer.Option("SearchedLoss", help="Name of the nn.Module class."),
    format: str = typer.Option("py", "--format", help="py (standalone nn.Module), or an OpenMMLab config snippet "
                               "plus the loss JSON next to it: mmseg, mmdet, mmpose."),
    base: Optional[Path] = typer.Option(None, "--base", help="mmseg/mmdet/mmpose: the config the snippet inherits "
                                        "(_base_), whose losses it replaces."),
) -> None:
    """Write the loss as a standalone .py file defining an nn.Module (needs only torch), or as an OpenMMLab
    config snippet (--format mmseg|mmdet|mmpose)."""
    from components.search.export import write_module
    from components.search.graph_json import load_graph

    if not class_name.isidentifier():
        raise LossforgeError(f"--class-name {class_name!r} is not a Python identifier")
    if out.is_dir():
        raise LossforgeError(f"--out: {out} is a folder; give the .py file to write (e.g. {out / 'loss.py'})")
    if out.exists() and out.resolve() == file.resolve():
        raise LossforgeError(f"--out: {out} is the input loss file; give another path (e.g. {file.with_suffix('.py')})")
    if any(p.exists() and not p.is_dir() for p in out.parents):
        raise LossforgeError(f"--out: {out}: a parent of it is a file, not a folder")
    if format != "py":
        from components.openmmlab.snippets import export_snippet

        snippet, loss_copy = export_snippet(file, format, out, base=base)
        console.print(f"wrote {snippet} ({format} config) and {loss_copy}")
        return
    if base is not None:
        raise LossforgeError("--base is for --format mmseg|mmdet|mmpose")
    graph = load_graph(file)
    path = write_module(graph, out, class_name=class_name)
    console.print(f"wrote {path} (class {class_name}: forward(inputs_per_branch, valid=None))")
