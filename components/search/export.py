"""Loss graphs as mathematics and as code: SymPy expressions, simplification, LaTeX, and a standalone
``.py`` file defining an ``nn.Module`` that needs only torch.

SymPy forms follow the paper's Table 8 conventions: ε guards are left out; Table 1's sign-preserving
Log/Sqrt are ``SLog``/``SSqrt``, which become plain log/sqrt once the argument is known to be positive.
Input symbols carry the assumptions of their meaning (softmax probabilities ``y_hat`` > 0 except for
pose heatmaps, targets ``y`` ≥ 0, areas ``i`` ≥ 0, ``u``, ``e`` > 0, IoU ``w`` ≥ 0, logits ``x`` real),
which is what lets simplification remove e.g. ``|y_hat|``.

The exported module copies the operators' torch source verbatim (``Operator.torch_src``) and the
Eq. 3 reduction, and evaluates the trees in the same order as :meth:`LossGraph.total`, so its output
equals the in-process loss exactly.
"""

from __future__ import annotations

import inspect
import keyword
import os
from pathlib import Path

import sympy

from components.errors import LossforgeError
from components.search.graph import LossGraph, LossTree, Node, reduce_eq3
from components.search.operators import CONSTANT_VALUES, CSE_EPS, CSE_EXP_MAX, EPS

_LATEX_SYMBOLS = {"y_hat": r"\hat{y}"}


def input_symbol(name: str, task: str = "segmentation") -> sympy.Expr:
    """SymPy symbol (or integer, for constants) standing for the input `name` of `task`."""
    if name in CONSTANT_VALUES:
        return sympy.Integer(int(CONSTANT_VALUES[name]))
    if name == "y_hat":
        assumptions = {"real": True} if task == "pose" else {"positive": True}
    elif name in ("y", "w", "i"):
        assumptions = {"nonnegative": True}
    elif name in ("u", "e"):
        assumptions = {"positive": True}
    else:
        assumptions = {"real": True}
    return sympy.Symbol(name, **assumptions)


def tree_to_sympy(tree: LossTree, task: str = "segmentation") -> sympy.Expr:
    """SymPy expression of one tree's pointwise output o."""
    ops = tree.operators
    memo: dict[Node, sympy.Expr] = {}

    def build(node: Node) -> sympy.Expr:
        if node in memo:
            return memo[node]
        if node.is_leaf:
            expr = input_symbol(node.input, task)  # type: ignore[arg-type]
        else:
            expr = ops[node.op].sympy_fn(*(build(c) for c in node.children))  # type: ignore[index]
        memo[node] = expr
        return expr

    return build(tree.root)


def branch_expressions(graph: LossGraph) -> dict[str, sympy.Expr]:
    """SymPy expression of every branch's tree output, by branch name."""
    return {name: tree_to_sympy(b.tree, graph.task) for name, b in graph.branches.items()}


class _BranchLoss(sympy.Function):
    """Stands for the Eq. 3 reduction of one branch's output (printed L_<branch>)."""

    nargs = 1
    branch = ""

    def _latex(self, printer):
        label = self.branch.replace("_", r"\_")
        return rf"\mathcal{{L}}_{{\mathrm{{{label}}}}}\left({printer._print(self.args[0])}\right)"


_BRANCH_FUNCTIONS: dict[str, type] = {}


def _branch_function(name: str) -> type:
    if name not in _BRANCH_FUNCTIONS:
        _BRANCH_FUNCTIONS[name] = type(f"L_{name}", (_BranchLoss,), {"branch": name})
    return _BRANCH_FUNCTIONS[name]


def _combine(graph: LossGraph, exprs: dict[str, sympy.Expr]) -> sympy.Expr:
    items = list(graph.branches.items())
    if len(items) == 1 and items[0][1].weight == 1.0:
        return exprs[items[0][0]]
    total = sympy.Integer(0)
    for name, b in items:
        wrapped = _branch_function(name)(exprs[name])
        total += sympy.nsimplify(b.weight) * wrapped
    return total


def to_sympy(graph: LossGraph) -> sympy.Expr:
    """SymPy form of the graph: the tree output o for a single unweighted branch, otherwise
    ``Σ weight · L_<branch>(o_branch)`` (L_<branch> stands for the Eq. 3 reduction of that branch)."""
    return _combine(graph, branch_expressions(graph))


def simplify(graph: LossGraph) -> sympy.Expr:
    """``sympy.simplify`` of each branch expression, combined as in :func:`to_sympy`."""
    return _combine(graph, {n: sympy.simplify(e) for n, e in branch_expressions(graph).items()})


def _latex_expr(expr: sympy.Expr) -> str:
    names = {s: _LATEX_SYMBOLS[s.name] for s in expr.free_symbols if s.name in _LATEX_SYMBOLS}
    return sympy.latex(expr, symbol_names=names)


def to_latex(graph: LossGraph, simplified: bool = False) -> str:
    """LaTeX of the graph: as built (default, operator by operator) or after :func:`simplify`."""
    if simplified:
        return _latex_expr(simplify(graph))
    items = list(graph.branches.items())
    if len(items) == 1 and items[0][1].weight == 1.0:
        return items[0][1].tree.latex()
    terms = []
    for name, b in items:
        label = name.replace("_", r"\_")
        w = f"{b.weight:g} \\cdot " if b.weight != 1.0 else ""
        terms.append(rf"{w}\mathcal{{L}}_{{\mathrm{{{label}}}}}\left({b.tree.latex()}\right)")
    return " + ".join(terms)


# ------------------------------------------------------------------------------------------------
# Standalone .py export
# ------------------------------------------------------------------------------------------------


def _var(name: str) -> str:
    return f"c_{name}" if name in CONSTANT_VALUES else f"in_{name}"


def _branch_method(name: str, tree: LossTree) -> list[str]:
    lines = [f"    def branch_{name}(self, inputs):", f'        """Tree output o of branch {name!r}: {tree.formula()}"""']
    used = []
    for node in _postorder(tree.root):
        if node.is_leaf and node.input not in used:
            used.append(node.input)
    data_inputs = [n for n in tree.inputs if n not in CONSTANT_VALUES]
    for n in used:
        if n not in CONSTANT_VALUES:
            lines.append(f"        {_var(n)} = _get(inputs, {n!r})")
    if any(n in CONSTANT_VALUES for n in used):
        lines.append(f"        like = _like(inputs, {tuple(data_inputs)!r})")
        for n in used:
            if n in CONSTANT_VALUES:
                lines.append(f"        {_var(n)} = torch.full_like(like, {CONSTANT_VALUES[n]!r})")
    ops = tree.operators
    counter = 0

    def emit(node: Node) -> str:
        nonlocal counter
        if node.is_leaf:
            return _var(node.input)  # type: ignore[arg-type]
        args = [emit(c) for c in node.children]
        var = f"t{counter}"
        counter += 1
        lines.append(f"        {var} = {ops[node.op].fn_name}({', '.join(args)})")  # type: ignore[index]
        return var

    result = emit(tree.root)
    lines.append(f"        return {result}")
    return lines


def _postorder(node: Node):
    for c in node.children:
        yield from _postorder(c)
    yield node


_HELPERS = '''
def _get(inputs, name):
    if name not in inputs:
        raise KeyError(f"missing input {name!r} (given: {', '.join(inputs) or 'none'})")
    return inputs[name]


def _like(inputs, names):
    for name in names:
        if name in inputs:
            return inputs[name]
    return next(iter(inputs.values()))
'''

_SEGMENTATION_METHOD = '''
    def from_logits(self, logits, target, ignore_index=255):
        """Segmentation convenience: logits (N, C, H, W), target labels (N, H, W) with `ignore_index`
        pixels ignored -> scalar loss (y_hat = softmax over C, y = one-hot target, or its per-class
        boundary maps when TARGET is "boundary").

        An ignored pixel has y = 0 in every class (no class, as in Lossforge's own loss): trees that pool
        or average over pixels must not see it as background next to the valid pixels."""
        valid = target != ignore_index
        labels = torch.where(valid, target, torch.zeros_like(target))
        y_hat = torch.softmax(logits, dim=1)
        y = torch.nn.functional.one_hot(labels, logits.shape[1]).permute(0, 3, 1, 2).to(logits.dtype)
        y = y * valid.unsqueeze(1).to(y.dtype)
        if self.TARGET == "boundary":
            y = boundary_maps(y, self.BOUNDARY, self.BOUNDARY_WIDTH)
        return self.forward({"seg": {"y_hat": y_hat, "y": y}}, valid=valid)
'''

_BOUNDARY_HELPER = '''
def boundary_maps(y, definition="avgpool", width=1):
    """Per-class edge maps of a one-hot (N, C, H, W) target (0 where no class), as Lossforge's metrics
    define them; the image border is never an edge."""
    k = 2 * width + 1
    if definition == "avgpool":
        avg = torch.nn.functional.avg_pool2d(y, k, stride=1, padding=width, count_include_pad=False)
        return y * (avg < 1.0 - 0.5 / (k * k)).to(y.dtype)
    low = -torch.nn.functional.max_pool2d(-y, k, stride=1, padding=width)
    return ((y > 0.5) ^ (low > 0.5)).to(y.dtype)
'''


def export_module_source(graph: LossGraph, class_name: str = "SearchedLoss", target: str = "label",
                         boundary: str = "avgpool", boundary_width: int = 1) -> str:
    """Source of a standalone module (imports only torch) defining ``class_name(nn.Module)`` whose
    ``forward(inputs_per_branch, valid=None)`` equals ``graph.total``.

    `target` ("label" | "boundary", with `boundary`/`boundary_width`) is recorded as ``TARGET`` and used by
    the segmentation ``from_logits`` (boundary: y = per-class edge maps, as ``GraphSegLoss(target=...)``).
    """
    if not class_name.isidentifier() or keyword.iskeyword(class_name):
        raise LossforgeError(f"class name {class_name!r} is not a valid Python identifier")
    if target not in ("label", "boundary"):
        raise LossforgeError(f"export: target must be 'label' or 'boundary', got {target!r}")
    if boundary not in ("avgpool", "minpool") or not isinstance(boundary_width, int) or boundary_width < 1:
        raise LossforgeError(f"export: bad boundary definition {boundary!r} / width {boundary_width!r}")
    used_ops = {}
    for b in graph.branches.values():
        ops = b.tree.operators
        for node in _postorder(b.tree.root):
            if not node.is_leaf:
                op = ops[node.op]  # type: ignore[index]
                used_ops[op.fn_name] = op.torch_src
    formula = "\n".join("    " + line for line in graph.formula().splitlines())
    out = [
        f'"""{class_name}: loss function exported by Lossforge (needs only torch).',
        "",
        f"task: {graph.task}",
        "formula:",
        formula.replace('"""', "'''").replace("\\", "\\\\"),
        f"canonical: {graph.canonical()}",
        f"hash: {graph.hash()}",
        "",
        "Usage:",
        f"    loss_fn = {class_name}()",
        "    loss = loss_fn({branch: {input name: tensor (N, C, H, W)}}, valid=None)",
        '"""',
        "",
        "from collections.abc import Mapping",
        "",
        "import torch",
        "",
        f"EPS = {EPS!r}",
        f"CSE_EPS = {CSE_EPS!r}",
        f"CSE_EXP_MAX = {CSE_EXP_MAX!r}",
        "",
    ]
    for src in used_ops.values():
        out.append("")
        out.append(src.rstrip())
        out.append("")
    out.append("")
    out.append(inspect.getsource(reduce_eq3).rstrip())
    out.append("")
    out.append(_HELPERS.rstrip())
    segmentation = graph.task == "segmentation" and set(graph.branches) == {"seg"}
    if segmentation:
        out.append("")
        out.append(_BOUNDARY_HELPER.rstrip())
    out.append("")
    out.append("")
    weights = {name: b.weight for name, b in graph.branches.items()}
    out += [
        f"class {class_name}(torch.nn.Module):",
        f'    """Exported Lossforge loss for task {graph.task!r}: Σ_branch weight · Eq.3(tree output)."""',
        "",
        f"    TASK = {graph.task!r}",
        f"    WEIGHTS = {weights!r}",
        f"    CANONICAL = {graph.canonical()!r}",
        f"    TARGET = {target!r}",
        f"    BOUNDARY = {boundary!r}",
        f"    BOUNDARY_WIDTH = {boundary_width!r}",
        "",
        "    def forward(self, inputs_per_branch, valid=None):",
        '        """Weighted sum of branch losses; `valid` is None, one mask, or a dict branch -> mask."""',
        "        total = None",
        "        for name, weight in self.WEIGHTS.items():",
        "            if name not in inputs_per_branch:",
        '                raise KeyError(f"no inputs given for branch {name!r}")',
        "            mask = valid.get(name) if isinstance(valid, Mapping) else valid",
        '            term = weight * reduce_eq3(getattr(self, "branch_" + name)(inputs_per_branch[name]), mask)',
        "            total = term if total is None else total + term",
        "        return total",
    ]
    if segmentation:
        out.append(_SEGMENTATION_METHOD.rstrip("\n"))
    for name, b in graph.branches.items():
        out.append("")
        out += _branch_method(name, b.tree)
    out.append("")
    return "\n".join(out)


def write_module(graph: LossGraph, path: str | os.PathLike, class_name: str = "SearchedLoss", target: str = "label",
                 boundary: str = "avgpool", boundary_width: int = 1) -> Path:
    """Write :func:`export_module_source` to `path` atomically; returns the path."""
    from components.atomic_io import write_text_atomic

    return write_text_atomic(path, export_module_source(graph, class_name, target, boundary, boundary_width))
