"""Versioned JSON (de)serialisation of loss graphs, rebuilt only through the operator whitelist.

Format ``lossforge.loss/1``::

    {
      "format": "lossforge.loss/1",
      "task": "segmentation",
      "name": "optional label", "description": "optional", "metadata": {...optional...},
      "formula": "informational, ignored on load", "canonical": "...", "hash": "...",
      "branches": {
        "seg": {"operator_set": "autoloss_zero", "weight": 1.0,
                "tree": {"op": "neg", "children": [{"op": "log", "children": [{"input": "y_hat"}]}]}}
      }
    }

``operator_set`` defaults to ``autoloss_zero`` and ``weight`` to the task's default branch weight.
Every node is checked (known operator of the branch's set, arity, input allowed for the branch, depth
≤ 32, ≤ 512 nodes); any problem raises :class:`InvalidLossError` with one line naming the file and
the JSON path of the bad value. No eval, no pickle.
"""

from __future__ import annotations

import json
import math
import os
from pathlib import Path
from typing import Any

from components.atomic_io import write_json_atomic
from components.search.graph import (
    MAX_DEPTH,
    MAX_NODES,
    TASK_BRANCHES,
    Branch,
    InvalidLossError,
    LossGraph,
    LossTree,
    Node,
    branch_inputs,
    default_branch_weight,
)
from components.search.operators import OPERATOR_SETS

FORMAT = "lossforge.loss/1"
MAX_FILE_BYTES = 1 << 20
"""Loss files larger than this (1 MiB) are refused before parsing."""

_TOP_KEYS = {"format", "task", "branches", "name", "description", "metadata", "formula", "canonical", "hash"}
_BRANCH_KEYS = {"tree", "weight", "operator_set"}

__all__ = ["FORMAT", "InvalidLossError", "graph_to_dict", "graph_from_dict", "save_graph", "load_graph",
           "node_to_dict"]


def node_to_dict(node: Node) -> dict[str, Any]:
    """JSON form of a node: ``{"input": name}`` or ``{"op": name, "children": [...]}``."""
    if node.is_leaf:
        return {"input": node.input}
    return {"op": node.op, "children": [node_to_dict(c) for c in node.children]}


def graph_to_dict(graph: LossGraph, name: str | None = None, metadata: dict | None = None) -> dict[str, Any]:
    """JSON-able dict of `graph` (with its formula, canonical string and hash for readers)."""
    out: dict[str, Any] = {"format": FORMAT, "task": graph.task}
    if name is not None:
        out["name"] = name
    out["formula"] = graph.formula()
    out["canonical"] = graph.canonical()
    out["hash"] = graph.hash()
    if metadata:
        out["metadata"] = metadata
    out["branches"] = {
        bname: {
            "operator_set": b.tree.operator_set,
            "weight": b.weight,
            "tree": node_to_dict(b.tree.root),
        }
        for bname, b in graph.branches.items()
    }
    return out


def _finite_float(value: int | float) -> bool:
    """True if `value` is a finite float (an int with hundreds of digits overflows float: not a weight)."""
    try:
        return math.isfinite(float(value))
    except OverflowError:
        return False


class _Reader:
    def __init__(self, source: str) -> None:
        self.source = source

    def fail(self, where: str, message: str) -> InvalidLossError:
        prefix = f"{self.source}: {where}: " if where else f"{self.source}: "
        return InvalidLossError(prefix + message)

    def graph(self, data: Any) -> LossGraph:
        if not isinstance(data, dict):
            raise self.fail("", f"expected a JSON object, got {type(data).__name__}")
        unknown = sorted(set(data) - _TOP_KEYS)
        if unknown:
            raise self.fail(unknown[0], f"unknown key (allowed: {', '.join(sorted(_TOP_KEYS))})")
        fmt = data.get("format")
        if fmt != FORMAT:
            raise self.fail("format", f"expected {FORMAT!r}, got {fmt!r}")
        task = data.get("task")
        if not isinstance(task, str) or task not in TASK_BRANCHES:
            raise self.fail("task", f"unknown task {task!r} (known: {', '.join(TASK_BRANCHES)})")
        branches = data.get("branches")
        if not isinstance(branches, dict) or not branches:
            raise self.fail("branches", "expected a non-empty object of branch name -> branch")
        built: dict[str, Branch] = {}
        for bname, bdata in branches.items():
            where = f"branches.{bname}"
            if bname not in TASK_BRANCHES[task]:
                raise self.fail(
                    where, f"unknown branch {bname!r} for task {task!r} (allowed: {', '.join(TASK_BRANCHES[task])})"
                )
            built[bname] = self.branch(task, bname, bdata, where)
        try:
            return LossGraph(task, built)
        except InvalidLossError as exc:  # pragma: no cover - every check above comes first
            raise self.fail("branches", str(exc)) from None

    def branch(self, task: str, bname: str, data: Any, where: str) -> Branch:
        if not isinstance(data, dict):
            raise self.fail(where, f"expected an object with 'tree', got {type(data).__name__}")
        unknown = sorted(set(data) - _BRANCH_KEYS)
        if unknown:
            raise self.fail(f"{where}.{unknown[0]}", f"unknown key (allowed: {', '.join(sorted(_BRANCH_KEYS))})")
        opset = data.get("operator_set", "autoloss_zero")
        if not isinstance(opset, str) or opset not in OPERATOR_SETS:
            raise self.fail(
                f"{where}.operator_set", f"unknown operator set {opset!r} (known: {', '.join(OPERATOR_SETS)})"
            )
        weight = data.get("weight", default_branch_weight(task, bname))
        if isinstance(weight, bool) or not isinstance(weight, (int, float)) or not _finite_float(weight):
            text = repr(weight)
            shown = text if len(text) <= 40 else f"{text[:20]}... ({len(text)} characters)"
            raise self.fail(f"{where}.weight", f"expected a finite number, got {shown}")
        if "tree" not in data:
            raise self.fail(where, "missing 'tree'")
        inputs = branch_inputs(task, bname, opset)
        counter = [0]
        root = self.node(data["tree"], f"{where}.tree", OPERATOR_SETS[opset], opset, inputs, 0, counter)
        if root.is_leaf:
            raise self.fail(f"{where}.tree", "the root must be an operator, not an input")
        return Branch(LossTree(root, opset, inputs), float(weight))

    def node(self, data: Any, where: str, ops: dict, opset: str, inputs: tuple[str, ...],
             depth: int, counter: list[int]) -> Node:
        counter[0] += 1
        if counter[0] > MAX_NODES:
            raise self.fail(where, f"tree too big (more than {MAX_NODES} nodes)")
        if not isinstance(data, dict):
            raise self.fail(where, f"expected a node object, got {type(data).__name__}")
        if "input" in data:
            if set(data) != {"input"}:
                extra = sorted(set(data) - {"input"})[0]
                raise self.fail(where, f"an input leaf has only 'input', found {extra!r}")
            name = data["input"]
            if not isinstance(name, str) or name not in inputs:
                raise self.fail(where, f"unknown input {name!r} (allowed: {', '.join(inputs)})")
            return Node.leaf(name)
        if "op" not in data:
            raise self.fail(where, "a node needs 'op' (with 'children') or 'input'")
        extra = sorted(set(data) - {"op", "children"})
        if extra:
            raise self.fail(where, f"unknown key {extra[0]!r} in operator node (allowed: op, children)")
        name = data["op"]
        if not isinstance(name, str) or name not in ops:
            raise self.fail(where, f"unknown operator {name!r} in set {opset!r} (allowed: {', '.join(ops)})")
        if depth + 1 > MAX_DEPTH:
            raise self.fail(where, f"tree too deep (more than {MAX_DEPTH} operators on a path)")
        children = data.get("children")
        if not isinstance(children, list):
            raise self.fail(where, f"operator {name!r} needs a 'children' list")
        arity = ops[name].arity
        if len(children) != arity:
            raise self.fail(where, f"operator {name!r} takes {arity} children, got {len(children)}")
        kids = tuple(
            self.node(c, f"{where}.children[{i}]", ops, opset, inputs, depth + 1, counter)
            for i, c in enumerate(children)
        )
        return Node(op=name, children=kids)


def graph_from_dict(data: Any, source: str = "<loss>") -> LossGraph:
    """Rebuild a LossGraph from its JSON dict, validating everything; errors name `source` and the path."""
    return _Reader(source).graph(data)


def save_graph(graph: LossGraph, path: str | os.PathLike, name: str | None = None,
               metadata: dict | None = None) -> Path:
    """Write `graph` as ``lossforge.loss/1`` JSON atomically; returns the path."""
    return write_json_atomic(path, graph_to_dict(graph, name=name, metadata=metadata))


def load_graph(path: str | os.PathLike) -> LossGraph:
    """Read and validate a loss JSON file; any problem is an InvalidLossError naming the file."""
    path = Path(path)
    source = str(path)
    try:
        size = path.stat().st_size
    except FileNotFoundError:
        raise InvalidLossError(f"{source}: file not found") from None
    except OSError as exc:
        raise InvalidLossError(f"{source}: cannot read ({exc.strerror})") from None
    if size > MAX_FILE_BYTES:
        raise InvalidLossError(f"{source}: file too large ({size} bytes, limit {MAX_FILE_BYTES})")
    try:
        text = path.read_text(encoding="utf-8")
    except (OSError, UnicodeDecodeError) as exc:
        raise InvalidLossError(f"{source}: cannot read ({exc})") from None
    try:
        data = json.loads(text)
    except json.JSONDecodeError as exc:
        raise InvalidLossError(f"{source}: invalid JSON ({exc.msg} at line {exc.lineno})") from None
    except ValueError as exc:  # e.g. an integer over Python's 4300-digit conversion limit
        raise InvalidLossError(f"{source}: invalid JSON ({str(exc).split(':')[0][:120]})") from None
    except RecursionError:
        raise InvalidLossError(f"{source}: JSON nested too deeply") from None
    return graph_from_dict(data, source)
