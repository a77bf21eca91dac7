"""`lossforge compare LOSS...`: re-train any set of losses on any dataset, mean ± std over seeds.

A LOSS is a baseline name (`ce`, `soft_iou`, ...), a searched loss (`lossforge.loss/1` JSON, e.g.
`losses/segmentation-mIoU/best.json` or `examples/losses/autolosszero_seg_miou.json`) or an Auto
Seg-Loss surrogate (`lossforge.surrogate/1` JSON). Everything is checked here, before Prefect starts
and before anything is written; the work itself is `flows.compare_flow.compare_flow`.
"""

from __future__ import annotations

import os
from pathlib import Path
from typing import Any, List, Optional

import typer

from components.errors import LossforgeError
from flows.cli.common import user_errors
from flows.cli.runtime import configure_prefect, console, progress_display
from flows.cli.search_cmd import PARAMS_OPT, PROFILE_OPT, check_choice

DEFAULT_OUT = "reports/compare"


def resolve_loss(arg: str, task_name: str = "segmentation") -> tuple[str, Any]:
    """(row name, build_loss spec) of one LOSS argument; a bad name or file is a one-line LossforgeError."""
    from components.atomic_io import read_json
    from components.search import graph_json as loss_json
    from components.surrogates import metric_surrogates
    from components.tasks.base import get_task

    task = get_task(task_name)
    path = Path(arg)
    if not (path.suffix.lower() == ".json" or os.sep in arg or path.exists()):
        known = task.known_baselines()
        if arg in known:
            return arg, arg
        raise LossforgeError(f"{arg}: unknown loss: not a file and not a baseline (known: {', '.join(known)}; "
                             f"task {task.name})")
    if not path.is_file():
        raise LossforgeError(f"{arg}: loss file not found")
    data = read_json(path)
    kind = data.get("format") if isinstance(data, dict) else None
    if kind == loss_json.FORMAT:
        graph = loss_json.load_graph(arg)  # whitelist rebuild
        if not task.trains_graph_task(graph.task):
            raise LossforgeError(f"{arg}: a {graph.task} loss, but the task is {task.name} (use --task {graph.task})")
        spec: dict[str, Any] = {"type": "graph", "path": str(path.resolve())}
    elif kind == metric_surrogates.FORMAT and task.name == "segmentation":
        metric_surrogates.load_surrogate(arg)
        spec = {"type": "surrogate", "path": str(path.resolve())}
    else:
        raise LossforgeError(f"{arg}: not a loss file (format {kind!r}; expected {loss_json.FORMAT!r} "
                             f"or {metric_surrogates.FORMAT!r})")
    return path.stem, spec


def resolve_losses(args: list[str], task_name: str = "segmentation") -> dict[str, Any]:
    """{row name: spec} for all LOSS arguments, in order; repeated names get a `-2`, `-3`, ... suffix."""
    out: dict[str, Any] = {}
    for arg in args:
        name, spec = resolve_loss(arg, task_name)
        unique, k = name, 1
        while unique in out:
            k += 1
            unique = f"{name}-{k}"
        out[unique] = spec
    return out


def resolve_seeds(params, seeds: Optional[int]) -> list[int]:
    """`--seeds N`: N seeds from the retrain seed on; default `retrain.seeds` (or just the retrain seed)."""
    base = int(params.config("retrain").seed)
    if seeds is not None:
        if seeds < 1:
            raise LossforgeError(f"--seeds: must be > 0 (got {seeds})")
        return list(range(base, base + seeds))
    listed = params.section_extra("retrain", "seeds")
    if listed is None:
        return [base]
    if (not isinstance(listed, list) or not listed
            or not all(isinstance(s, int) and not isinstance(s, bool) for s in listed)):
        raise LossforgeError(f"{params.source}: retrain.seeds: expected a non-empty list of integers (got {listed!r})")
    return [int(s) for s in listed]


def check_dataset(dataset: str, task_name: str = "segmentation") -> None:
    """A `--dataset` must open (train and val splits) and its val images must not be training images."""
    from components.tasks.base import get_task

    if not Path(dataset).exists():
        raise LossforgeError(f"--dataset: dataset not found: {dataset}")
    task = get_task(task_name)
    train = task.open_dataset(dataset, split="train")
    test = task.open_dataset(dataset, split="val")
    overlap = set(train.ids) & set(test.ids)
    if overlap:
        raise LossforgeError(f"--dataset: {dataset}: {len(overlap)} image(s) are in both the train and the val "
                             f"split, e.g. {sorted(overlap)[0]!r}; the comparison needs held-out test images")


@user_errors
def compare(
    losses: List[str] = typer.Argument(..., help="Baseline names (ce, soft_iou, ...), loss or surrogate JSON files."),
    dataset: Optional[str] = typer.Option(None, help="VOC/COCO/folder dataset (default: params.yaml's data)."),
    seeds: Optional[int] = typer.Option(None, help="Number of seeds (default: retrain.seeds of the profile)."),
    task: Optional[str] = typer.Option(None, help="Task of the losses: segmentation, detection, "
                                                  "instance_segmentation, pose (or a plug-in's)."),
    metric: Optional[str] = typer.Option(None, help="Metric marked in the table (default: the task's)."),
    iterations: Optional[int] = typer.Option(None, help="Training iterations (default: retrain.iterations)."),
    out: str = typer.Option(DEFAULT_OUT, "--out", "-o", help="Folder for comparison.md and comparison.json."),
    params_file: str = PARAMS_OPT,
    profile: Optional[str] = PROFILE_OPT,
    verbose: bool = typer.Option(False, "--verbose", "-v", help="Show Prefect's logs."),
) -> None:
    """Re-train the given losses (retrain schedule of params.yaml) and compare them on the test images."""
    from components.params import load_params
    from components.tasks.base import get_task, task_names
    from flows.run_config import resolve_params

    check_choice("--task", task, tuple(task_names()))
    if metric is not None:
        check_choice("--metric", metric, get_task(task or load_params(params_file, profile=profile).search.task).metrics)
    if iterations is not None and iterations < 1:
        raise LossforgeError(f"--iterations: must be > 0 (got {iterations})")
    params = resolve_params(params_file, profile, metric=metric, task=task)
    params.config("retrain", **({} if iterations is None else {"iterations": iterations}))
    seed_list = resolve_seeds(params, seeds)
    specs = resolve_losses(list(losses), params.search.task)
    if dataset is not None:
        check_dataset(dataset, params.search.task)
    elif not params.data.generate and not Path(params.data.path).exists():
        raise LossforgeError(f"data.path: dataset not found: {params.data.path}")
    if Path(out).exists() and not Path(out).is_dir():
        raise LossforgeError(f"--out: {out} exists and is not a folder")

    configure_prefect(verbose)
    from flows.compare_flow import compare_flow

    with progress_display(True):
        table = compare_flow.with_options(flow_run_name=f"compare {', '.join(specs)}")(
            params, specs, seed_list, params.search.metric, out, dataset=dataset, iterations=iterations)
    console.print(f"comparison ({params.search.metric}, seeds {', '.join(map(str, table['seeds']))}): "
                  f"{Path(out) / 'comparison.md'}, comparison.json")
