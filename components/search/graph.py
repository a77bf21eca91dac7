"""Loss functions as operator trees (AutoLoss-Zero §3.1): one tree per task branch, weighted sum of
branch losses (Eq. 4), each tree's output reduced by Eq. 3.

Conventions:

* A :class:`Node` is either a leaf (``input`` names a branch input such as ``"y_hat"`` or a constant
  ``"1"``) or an operator node (``op`` names an operator of the tree's operator set, with exactly
  ``arity`` children). The root of a :class:`LossTree` is always an operator node (the paper's output
  node, which has a single child, is implicit: our root is that child).
* ``depth`` is the largest number of operator nodes on a path from the root to a leaf; a random tree
  of depth D (paper §3.2) has exactly D operator nodes on every path. ``size`` counts all nodes.
* ``canonical()`` is the exact prefix form, e.g. ``neg(log(mul(y_hat,y)))``. Children of commutative
  operators are *not* reordered, so two trees have the same canonical string iff they are identical;
  mathematically equivalent trees are caught later by the gradient-equivalence check.
"""

from __future__ import annotations

import hashlib
import re
import math
from dataclasses import dataclass, field
from functools import cached_property
from typing import Iterator, Mapping, Sequence

import torch

from components.errors import LossforgeError
from components.search.operators import CONSTANT_VALUES, OPERATOR_SET_CONSTANTS, Operator, get_operator_set

MAX_DEPTH = 32
"""Largest allowed tree depth (operator nodes on a path)."""
MAX_NODES = 512
"""Largest allowed number of nodes in one tree."""

TASK_BRANCHES: dict[str, dict[str, tuple[str, ...]]] = {
    "segmentation": {"seg": ("y_hat", "y", "1")},
    "detection": {
        "cls_rpn": ("y_hat", "y", "1"),
        "reg_rpn": ("i", "u", "e", "1"),
        "cls_rcnn": ("y_hat", "y", "1"),
        "reg_rcnn": ("i", "u", "e", "1"),
    },
    "instance_segmentation": {
        "cls_rpn": ("y_hat", "y", "1"),
        "reg_rpn": ("i", "u", "e", "1"),
        "cls_rcnn": ("y_hat", "y", "1"),
        "reg_rcnn": ("i", "u", "e", "1"),
        "mask": ("y_hat", "y", "1"),
    },
    "pose": {"heatmap": ("y_hat", "y", "1")},
    "detection_cse": {
        "cls": ("x", "y", "w", "1"),
        "reg": ("i", "u", "e", "1"),
    },
}
"""Task -> branch -> input names of that branch's trees.

``y_hat``/``y``: prediction (softmax probabilities or heatmap) and target (one-hot or heatmap);
``i``/``u``/``e``: intersection, union and enclosing area of predicted and target boxes (paper [33]);
``x``/``w``: CSE-AutoLoss classification logits and IoU weight; ``"1"``: constant ones. Trees of the
``cse`` operator set may also use the constants ``"2"`` and ``"3"`` (see :func:`branch_inputs`).
All inputs of a branch share one shape ``(*batch, N, C, H, W)`` (H = W = 1 without spatial dims).
"""

TASK_BRANCH_WEIGHTS: dict[str, dict[str, float]] = {
    "detection": {"reg_rpn": 10.0, "reg_rcnn": 10.0},
    "instance_segmentation": {"reg_rpn": 10.0, "reg_rcnn": 10.0},
    "detection_cse": {"reg": 10.0},
}
"""Default branch weights where the papers use weights other than 1 (regression branches: 10)."""


class InvalidLossError(LossforgeError):
    """A loss graph (or its JSON) is malformed: unknown operator/input/branch, wrong arity, too big."""


def branch_inputs(task: str, branch: str, operator_set: str = "autoloss_zero") -> tuple[str, ...]:
    """Inputs a tree of `branch` may use: the task's branch inputs plus the operator set's constants."""
    if task not in TASK_BRANCHES:
        raise InvalidLossError(f"unknown task {task!r} (known: {', '.join(TASK_BRANCHES)})")
    branches = TASK_BRANCHES[task]
    if branch not in branches:
        raise InvalidLossError(
            f"unknown branch {branch!r} for task {task!r} (allowed: {', '.join(branches)})"
        )
    base = branches[branch]
    extra = tuple(c for c in OPERATOR_SET_CONSTANTS.get(operator_set, ()) if c not in base)
    return base + extra


def default_branch_weight(task: str, branch: str) -> float:
    """The papers' default weight of `branch` in `task` (1.0 unless TASK_BRANCH_WEIGHTS says otherwise)."""
    return TASK_BRANCH_WEIGHTS.get(task, {}).get(branch, 1.0)


@dataclass(frozen=True)
class Node:
    """A tree node: a leaf (``input`` set, no children) or an operator node (``op`` set)."""

    op: str | None = None
    input: str | None = None
    children: tuple["Node", ...] = ()

    def __post_init__(self) -> None:
        if (self.op is None) == (self.input is None):
            raise InvalidLossError("a node needs exactly one of 'op' and 'input'")
        if self.input is not None and self.children:
            raise InvalidLossError(f"input leaf {self.input!r} cannot have children")
        if not isinstance(self.children, tuple):
            object.__setattr__(self, "children", tuple(self.children))

    @property
    def is_leaf(self) -> bool:
        """True for input leaves."""
        return self.input is not None

    @staticmethod
    def leaf(name: str) -> "Node":
        """An input leaf."""
        return Node(input=name)

    @staticmethod
    def apply(op: str, *children: "Node") -> "Node":
        """An operator node over `children`."""
        return Node(op=op, children=tuple(children))

    @cached_property
    def depth(self) -> int:
        """Operator nodes on the longest path from this node down to a leaf."""
        if self.is_leaf:
            return 0
        return 1 + max(c.depth for c in self.children)

    @cached_property
    def size(self) -> int:
        """Number of nodes in this subtree."""
        return 1 + sum(c.size for c in self.children)

    def canonical(self) -> str:
        """Prefix form, e.g. ``neg(log(mul(y_hat,y)))``."""
        if self.is_leaf:
            return self.input  # type: ignore[return-value]
        return f"{self.op}({','.join(c.canonical() for c in self.children)})"


def iter_paths(node: Node, path: tuple[int, ...] = ()) -> Iterator[tuple[tuple[int, ...], Node]]:
    """Yield (path, node) for every node in pre-order; a path is the tuple of child indices from the root."""
    yield path, node
    for i, child in enumerate(node.children):
        yield from iter_paths(child, path + (i,))


def get_at(node: Node, path: tuple[int, ...]) -> Node:
    """The node at `path` below `node`."""
    for i in path:
        node = node.children[i]
    return node


def replace_at(node: Node, path: tuple[int, ...], new: Node) -> Node:
    """A copy of `node` with the subtree at `path` replaced by `new` (nodes are immutable)."""
    if not path:
        return new
    i = path[0]
    children = list(node.children)
    children[i] = replace_at(children[i], path[1:], new)
    return Node(op=node.op, children=tuple(children))


def _constant_or_input(name: str, inputs: Mapping[str, torch.Tensor], like: torch.Tensor | None):
    if name in inputs:
        return inputs[name]
    if name in CONSTANT_VALUES:
        if like is None:
            raise LossforgeError(f"constant input {name!r} needs at least one tensor input")
        return torch.full_like(like, CONSTANT_VALUES[name])
    raise LossforgeError(f"missing input {name!r} (given: {', '.join(inputs) or 'none'})")


@dataclass(frozen=True)
class LossTree:
    """One branch's loss: an operator tree over named inputs, using one operator set.

    Construction validates every node (operator known and in the set, arity, inputs allowed,
    depth ≤ MAX_DEPTH, size ≤ MAX_NODES) and raises InvalidLossError otherwise.
    """

    root: Node
    operator_set: str = "autoloss_zero"
    inputs: tuple[str, ...] = ("y_hat", "y", "1")

    def __post_init__(self) -> None:
        object.__setattr__(self, "inputs", tuple(self.inputs))
        try:
            ops = get_operator_set(self.operator_set)
        except LossforgeError as exc:
            raise InvalidLossError(str(exc)) from None
        if self.root.is_leaf:
            raise InvalidLossError("the root of a loss tree must be an operator, not an input")
        if self.root.size > MAX_NODES:
            raise InvalidLossError(f"tree has {self.root.size} nodes (limit {MAX_NODES})")
        if self.root.depth > MAX_DEPTH:
            raise InvalidLossError(f"tree has depth {self.root.depth} (limit {MAX_DEPTH})")
        allowed = set(self.inputs)
        for _, node in iter_paths(self.root):
            if node.is_leaf:
                if node.input not in allowed:
                    raise InvalidLossError(
                        f"unknown input {node.input!r} (allowed: {', '.join(self.inputs)})"
                    )
                continue
            op = ops.get(node.op)  # type: ignore[arg-type]
            if op is None:
                raise InvalidLossError(f"unknown operator {node.op!r} (allowed: {', '.join(ops)})")
            if len(node.children) != op.arity:
                raise InvalidLossError(
                    f"operator {node.op!r} takes {op.arity} children, got {len(node.children)}"
                )

    @property
    def operators(self) -> dict[str, Operator]:
        """The operator set this tree draws from."""
        return get_operator_set(self.operator_set)

    @property
    def depth(self) -> int:
        """Operator nodes on the longest root-to-leaf path."""
        return self.root.depth

    @property
    def size(self) -> int:
        """Number of nodes (operators and leaves)."""
        return self.root.size

    def evaluate(self, inputs: Mapping[str, torch.Tensor]) -> torch.Tensor:
        """Raw output o of the tree (same shape as the inputs).

        Constant leaves ("1", "2", "3") are ``full_like`` the first tensor input of the branch.
        """
        like = None
        for name in self.inputs:
            if name not in CONSTANT_VALUES and name in inputs:
                like = inputs[name]
                break
        if like is None and inputs:
            like = next(iter(inputs.values()))
        ops = self.operators
        cache: dict[str, torch.Tensor] = {}

        def run(node: Node) -> torch.Tensor:
            if node.is_leaf:
                name = node.input
                if name not in cache:
                    cache[name] = _constant_or_input(name, inputs, like)  # type: ignore[arg-type]
                return cache[name]  # type: ignore[index]
            op = ops[node.op]  # type: ignore[index]
            return op.fn(*(run(c) for c in node.children))

        return run(self.root)

    def canonical(self) -> str:
        """Exact prefix form of the tree, e.g. ``neg(log(mul(y_hat,y)))``."""
        return self.root.canonical()

    def formula(self) -> str:
        """Readable infix formula, e.g. ``-log(y_hat * y)``."""
        return _format_text(self.root, self.operators)

    def latex(self) -> str:
        """LaTeX of the tree as it is (no simplification)."""
        return _format_latex(self.root, self.operators)


def _format_text(node: Node, ops: Mapping[str, Operator]) -> str:
    return _text_with_prec(node, ops)[0]


def _text_with_prec(node: Node, ops: Mapping[str, Operator]) -> tuple[str, int]:
    if node.is_leaf:
        return node.input, 100  # type: ignore[return-value]
    op = ops[node.op]  # type: ignore[index]
    parts = [_text_with_prec(c, ops) for c in node.children]
    p = op.precedence
    rendered = []
    for i, (text, cp) in enumerate(parts):
        if p >= 100:
            need = False
        elif op.arity == 1:
            need = cp < 100
        elif i == 0:
            need = cp < p
        else:
            need = cp < p or (cp == p and not op.commutative)
        rendered.append(f"({text})" if need else text)
    return op.text.format(*rendered), p


_LATEX_NAMES = {"y_hat": r"\hat{y}"}


def _format_latex(node: Node, ops: Mapping[str, Operator]) -> str:
    return _latex_with_prec(node, ops)[0]


def _latex_with_prec(node: Node, ops: Mapping[str, Operator]) -> tuple[str, int]:
    if node.is_leaf:
        return _LATEX_NAMES.get(node.input, node.input), 101  # type: ignore[arg-type]
    op = ops[node.op]  # type: ignore[index]
    parts = [_latex_with_prec(c, ops) for c in node.children]
    p = op.precedence
    rendered = []
    for i, (text, cp) in enumerate(parts):
        if op.name == "square":
            need = cp < 101  # only bare symbols take a superscript without brackets
        elif p >= 100 or op.name in ("inv", "div"):
            need = False  # function call, fraction or radical: the template delimits
        elif op.arity == 1:
            need = cp < 100
        elif i == 0:
            need = cp < p
        else:
            need = cp < p or (cp == p and not op.commutative)
        rendered.append(rf"\left({text}\right)" if need else text)
    return op.latex.format(*rendered), p


def reduce_eq3(o, valid=None):
    """Eq. 3: sum of o over (N, C, H, W) divided by N·H·W; returns shape ``(*batch)``.

    With a validity mask (``(*batch, N, H, W)`` or ``(*batch, N, 1, H, W)``, bool or 0/1), invalid
    positions contribute 0 and the sum is divided by the number of valid (n, h, w) positions.
    """
    if valid is None:
        n, _, h, w = o.shape[-4:]
        return o.sum(dim=(-4, -3, -2, -1)) / (n * h * w)
    mask = valid
    if mask.dim() == o.dim() - 1:
        mask = mask.unsqueeze(-3)
    mask = mask.to(torch.bool)
    kept = torch.where(mask, o, torch.zeros((), dtype=o.dtype, device=o.device))
    count = mask.sum(dim=(-4, -3, -2, -1)).clamp(min=1).to(o.dtype)
    return kept.sum(dim=(-4, -3, -2, -1)) / count


@dataclass(frozen=True)
class Branch:
    """One branch of a loss graph: its tree and its weight in Eq. 4."""

    tree: LossTree
    weight: float = 1.0

    def __post_init__(self) -> None:
        if isinstance(self.weight, bool) or not isinstance(self.weight, (int, float)):
            raise InvalidLossError(f"branch weight must be a number, got {self.weight!r}")
        if not math.isfinite(self.weight):
            raise InvalidLossError(f"branch weight must be finite, got {self.weight!r}")
        object.__setattr__(self, "weight", float(self.weight))


@dataclass(frozen=True)
class LossGraph:
    """A task's loss: one tree per branch, total = Σ weight · Eq.3(tree output) (Eq. 4).

    A graph may hold any non-empty subset of the task's branches (e.g. a single published branch
    loss); each tree's inputs must be allowed for its branch (see :func:`branch_inputs`).
    """

    task: str
    branches: Mapping[str, Branch] = field(default_factory=dict)

    def __post_init__(self) -> None:
        if self.task not in TASK_BRANCHES:
            raise InvalidLossError(f"unknown task {self.task!r} (known: {', '.join(TASK_BRANCHES)})")
        if not self.branches:
            raise InvalidLossError(f"a loss graph for task {self.task!r} needs at least one branch")
        order = list(TASK_BRANCHES[self.task])
        for name, branch in self.branches.items():
            allowed = branch_inputs(self.task, name, branch.tree.operator_set)
            bad = [i for i in branch.tree.inputs if i not in allowed]
            if bad:
                raise InvalidLossError(
                    f"branch {name!r}: input {bad[0]!r} not allowed (allowed: {', '.join(allowed)})"
                )
        ordered = {n: self.branches[n] for n in order if n in self.branches}
        object.__setattr__(self, "branches", ordered)

    def __hash__(self) -> int:
        return hash(self.canonical())

    def branch_loss(self, name: str, inputs: Mapping[str, torch.Tensor], valid=None) -> torch.Tensor:
        """Unweighted Eq. 3 loss of branch `name`, shape ``(*batch)``."""
        if name not in self.branches:
            raise LossforgeError(f"loss graph has no branch {name!r} (has: {', '.join(self.branches)})")
        return reduce_eq3(self.branches[name].tree.evaluate(inputs), valid)

    def total(self, inputs_per_branch: Mapping[str, Mapping[str, torch.Tensor]], valid=None) -> torch.Tensor:
        """Eq. 4: Σ_branch weight · branch_loss. `valid` is None, one mask for all branches, or a
        mapping branch -> mask (or None)."""
        total = None
        for name, branch in self.branches.items():
            if name not in inputs_per_branch:
                raise LossforgeError(f"no inputs given for branch {name!r}")
            mask = valid.get(name) if isinstance(valid, Mapping) else valid
            term = branch.weight * self.branch_loss(name, inputs_per_branch[name], mask)
            total = term if total is None else total + term
        return total  # type: ignore[return-value]

    def canonical(self) -> str:
        """Deterministic string: task, then per branch (task order) name, operator set, weight, tree."""
        parts = [
            f"{name}[{b.tree.operator_set}]*{b.weight!r}={b.tree.canonical()}"
            for name, b in self.branches.items()
        ]
        return f"{self.task}:" + ";".join(parts)

    def hash(self) -> str:
        """First 16 hex chars of the sha256 of :meth:`canonical`."""
        return hashlib.sha256(self.canonical().encode("utf-8")).hexdigest()[:16]

    def formula(self) -> str:
        """Readable formula; multi-branch (or weighted) graphs list ``name: weight * (formula)``."""
        items = list(self.branches.items())
        if len(items) == 1 and items[0][1].weight == 1.0:
            return items[0][1].tree.formula()
        lines = []
        for name, b in items:
            text, prec = _text_with_prec(b.tree.root, b.tree.operators)
            if b.weight != 1.0:
                text = f"{b.weight:g} * " + (f"({text})" if prec < 20 else text)
            lines.append(f"{name}: {text}")
        return "\n".join(lines)

    @staticmethod
    def single(task: str, branch: str, root: Node, operator_set: str = "autoloss_zero",
               weight: float | None = None) -> "LossGraph":
        """Convenience: a graph with one branch whose inputs are the branch's allowed inputs."""
        tree = LossTree(root, operator_set, branch_inputs(task, branch, operator_set))
        w = default_branch_weight(task, branch) if weight is None else weight
        return LossGraph(task, {branch: Branch(tree, w)})


_TOKEN = re.compile(r"\s*(?:([A-Za-z_][A-Za-z0-9_]*|[0-9]+)|(.))")


def parse_prefix(
    text: str,
    operator_set: str = "autoloss_zero",
    inputs: Sequence[str] = ("y_hat", "y", "1"),
    aliases: Mapping[str, str] | None = None,
) -> LossTree:
    """Parse the prefix form of :meth:`LossTree.canonical` (e.g. ``neg(log(mul(y_hat,y)))``) into a
    validated tree, through the operator whitelist only (no eval).

    Operator names are matched case-insensitively (so CSE-AutoLoss strings like ``Neg(Log(X))``
    parse); `aliases` renames input leaves (e.g. ``{"X": "x", "Z": "w"}``).
    """
    ops = get_operator_set(operator_set)
    lower = {name.lower(): name for name in ops}
    aliases = dict(aliases or {})
    tokens: list[str] = []
    for m in _TOKEN.finditer(text):
        word, other = m.group(1), m.group(2)
        if word is not None:
            tokens.append(word)
        elif other is not None and other.strip():
            if other not in "(),":
                raise InvalidLossError(f"unexpected character {other!r} in {text!r}")
            tokens.append(other)
    pos = 0

    def peek() -> str | None:
        return tokens[pos] if pos < len(tokens) else None

    def take(expected: str | None = None) -> str:
        nonlocal pos
        tok = peek()
        if tok is None or (expected is not None and tok != expected):
            raise InvalidLossError(f"expected {expected or 'a name'!r} at token {pos} of {text!r}, got {tok!r}")
        pos += 1
        return tok

    def node(depth: int) -> Node:
        if depth > MAX_DEPTH + 1:
            raise InvalidLossError(f"expression nested deeper than {MAX_DEPTH}: {text[:60]!r}...")
        word = take()
        if word in "(),":
            raise InvalidLossError(f"unexpected {word!r} at token {pos - 1} of {text!r}")
        if peek() == "(":
            take("(")
            name = lower.get(word.lower())
            if name is None:
                raise InvalidLossError(f"unknown operator {word!r} (allowed: {', '.join(ops)})")
            children = [node(depth + 1)]
            while peek() == ",":
                take(",")
                children.append(node(depth + 1))
            take(")")
            return Node(op=name, children=tuple(children))
        return Node.leaf(aliases.get(word, word))

    root = node(0)
    if pos != len(tokens):
        raise InvalidLossError(f"trailing text after position {pos} in {text!r}")
    return LossTree(root, operator_set, tuple(inputs))
