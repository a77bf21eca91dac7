"""OpenMMLab config snippets for a searched loss: ``lossforge loss export FILE --format mmseg|mmdet|mmpose``.

An export writes two files: the snippet ``NAME.py`` (an mmengine config) and ``NAME.json``, a copy of the loss
file (metadata kept), which the snippet names as ``'{{ fileDirname }}/NAME.json'`` (mmengine replaces
``{{ fileDirname }}`` with the snippet's folder, so the pair can move together and the path does not depend on
the working directory of the training).

The snippet loads the modules with ``custom_imports`` (``components.openmmlab.registry``), defines the loss
dicts as top-level variables (to copy into any config) and ``model = dict(...)`` overrides that put them in
the model:

* mmseg: ``decode_head.loss_decode`` (a loss graph: ``SearchedLoss``; an Auto Seg-Loss surrogate file:
  ``SurrogateLoss``);
* mmdet: for each branch in the graph, ``rpn_head`` / ``roi_head.bbox_head`` ``loss_cls`` / ``loss_bbox`` and
  ``roi_head.mask_head.loss_mask``, with ``reg_decoded_bbox=True`` on heads whose regression loss is searched
  (the trees take decoded boxes); branches the graph lacks keep the config's own losses;
* mmpose: ``head.loss``.

With ``base`` (``--base CONFIG``) the snippet is a full child config: ``_base_ = [CONFIG]`` (relative to the
snippet) and every replaced loss dict carries ``_delete_=True``, so none of the base's loss arguments
(``use_mask``, ``avg_non_ignore``, ...) leak into the searched loss. Without it, the ``model`` overrides are plain
dicts, to merge by hand. ``loss_weight`` is written out: the graph's branch weight (10 for regression).
"""

from __future__ import annotations

import os
import shutil
from pathlib import Path
from typing import Any

from components.atomic_io import read_json, write_text_atomic
from components.errors import LossforgeError

FORMATS = ("mmseg", "mmdet", "mmpose")
REGISTRY_MODULE = "components.openmmlab.registry"
_DETECTION_HEADS = {  # branch -> (path of the head in model, loss key, module type)
    "cls_rpn": (("rpn_head",), "loss_cls", "SearchedClsLoss"),
    "reg_rpn": (("rpn_head",), "loss_bbox", "SearchedBBoxLoss"),
    "cls_rcnn": (("roi_head", "bbox_head"), "loss_cls", "SearchedClsLoss"),
    "reg_rcnn": (("roi_head", "bbox_head"), "loss_bbox", "SearchedBBoxLoss"),
    "mask": (("roi_head", "mask_head"), "loss_mask", "SearchedMaskLoss"),
}


def _loss_dicts(fmt: str, data: dict[str, Any], json_ref: str,
                source: str) -> list[tuple[tuple[str, ...], str, dict[str, Any]]]:
    """(head path, loss key, loss dict) of every loss the snippet replaces; errors name `source`."""
    from components.search.graph_json import graph_from_dict
    from components.surrogates.metric_surrogates import SurrogateSpec

    kind = data.get("format")
    if kind == "lossforge.surrogate/1":
        if fmt != "mmseg":
            raise LossforgeError(f"--format {fmt}: an Auto Seg-Loss surrogate is a segmentation loss; use --format mmseg")
        SurrogateSpec.from_dict(data, source=source)
        return [(("decode_head",), "loss_decode", {"type": "SurrogateLoss", "path": json_ref, "loss_weight": 1.0})]
    graph = graph_from_dict(data, source)
    if fmt == "mmseg":
        if graph.task != "segmentation":
            raise LossforgeError(f"--format mmseg needs a segmentation loss, got task {graph.task!r}")
        return [(("decode_head",), "loss_decode", {"type": "SearchedLoss", "path": json_ref, "loss_weight": 1.0})]
    if fmt == "mmpose":
        if graph.task != "pose":
            raise LossforgeError(f"--format mmpose needs a pose loss, got task {graph.task!r}")
        weight = graph.branches["heatmap"].weight
        return [(("head",), "loss", {"type": "SearchedKeypointLoss", "path": json_ref, "use_target_weight": True,
                                     "loss_weight": weight})]
    if graph.task not in ("detection", "instance_segmentation"):
        raise LossforgeError(f"--format mmdet needs a detection or instance_segmentation loss, got task {graph.task!r}")
    out = []
    for branch, b in graph.branches.items():
        head, key, kind_ = _DETECTION_HEADS[branch]
        loss: dict[str, Any] = {"type": kind_, "path": json_ref}
        if branch != "mask":
            loss["branch"] = branch
        if branch == "cls_rpn":
            loss["use_sigmoid"] = True
        loss["loss_weight"] = b.weight
        out.append((head, key, loss))
    return out


def _literal(value: Any) -> str:
    if isinstance(value, dict):
        return "dict(" + ", ".join(f"{k}={_literal(v)}" for k, v in value.items()) + ")"
    return repr(value)


def snippet_source(fmt: str, data: dict[str, Any], json_name: str, base: str | None = None,
                   source: str = "") -> str:
    """The config snippet text for the loss file content `data`, which will be saved as `json_name` next to it."""
    if fmt not in FORMATS:
        raise LossforgeError(f"--format must be one of py, {', '.join(FORMATS)}, got {fmt!r}")
    ref = "{{ fileDirname }}/" + json_name
    losses = _loss_dicts(fmt, data, ref, source or json_name)
    lines = [
        f"# Lossforge searched loss as {fmt} config{' (from ' + Path(source).name + ')' if source else ''}.",
        f"# Loss file: {json_name} (same folder). Needs the lossforge package on the Python path",
        "# (its .venv after `bash run.sh openmmlab-install`).",
    ]
    if data.get("formula"):
        lines += [f"# {line}" for line in str(data["formula"]).splitlines()]
    if base is not None:
        lines.append(f"_base_ = [{base!r}]")
    else:
        lines.append("# to put it on top of a config, export with --base CONFIG (a child config that replaces its losses)")
    lines.append(f"custom_imports = dict(imports=[{REGISTRY_MODULE!r}], allow_failed_imports=False)")
    names = []
    for head, key, loss in losses:
        name = "searched_" + "_".join(head[-1:]) + "_" + key
        names.append(name)
        lines.append(f"{name} = {_literal(loss)}")
    tree: dict[str, Any] = {}
    for (head, key, loss), name in zip(losses, names):
        node = tree
        for part in head:
            node = node.setdefault(part, {})
        node[key] = name
        if loss["type"] == "SearchedBBoxLoss":
            node["reg_decoded_bbox"] = True
    lines.append("model = " + _model_literal(tree, delete=base is not None))
    return "\n".join(lines) + "\n"


def _model_literal(tree: dict[str, Any], delete: bool, indent: int = 1) -> str:
    pad = "    " * indent
    parts = []
    for key, value in tree.items():
        if isinstance(value, dict):
            parts.append(f"{pad}{key}={_model_literal(value, delete, indent + 1)}")
        elif isinstance(value, str) and value.startswith("searched_"):
            parts.append(f"{pad}{key}=dict(_delete_=True, **{value})" if delete else f"{pad}{key}={value}")
        else:
            parts.append(f"{pad}{key}={value!r}")
    return "dict(\n" + ",\n".join(parts) + ")"


def export_snippet(loss_file: str | os.PathLike, fmt: str, out: str | os.PathLike,
                   base: str | os.PathLike | None = None) -> tuple[Path, Path]:
    """Write the snippet `out` (.py) and the loss file copy next to it (same stem, .json); returns both paths.
    Everything is checked before anything is written."""
    loss_file, out = Path(loss_file), Path(out)
    if out.suffix != ".py":
        raise LossforgeError(f"--out: {out} must be a .py file (the config snippet)")
    json_out = out.with_suffix(".json")
    data = read_json(loss_file)
    if not isinstance(data, dict):
        raise LossforgeError(f"{loss_file}: not a loss file (a JSON object expected)")
    base_ref = None
    if base is not None:
        base = Path(base)
        if not base.is_file():
            raise LossforgeError(f"--base: {base}: file not found")
        base_ref = os.path.relpath(base.resolve(), out.parent.resolve())
    text = snippet_source(fmt, data, json_out.name, base_ref, source=str(loss_file))
    out.parent.mkdir(parents=True, exist_ok=True)
    if not (json_out.exists() and json_out.resolve() == loss_file.resolve()):
        tmp = json_out.with_name(json_out.name + ".tmp")
        shutil.copyfile(loss_file, tmp)
        os.replace(tmp, json_out)
    write_text_atomic(out, text)
    return out, json_out
