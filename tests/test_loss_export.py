"""SymPy/LaTeX forms and the standalone .py export (imported from a temp dir, compared to graph.total)."""

import ast
import importlib.util
import math
import random
from pathlib import Path

import pytest
import sympy
import torch

from components.errors import LossforgeError
from components.search.generation import TreeGenerator
from components.search.export import (
    export_module_source,
    input_symbol,
    simplify,
    to_latex,
    to_sympy,
    tree_to_sympy,
    write_module,
)
from components.search.graph import TASK_BRANCHES, LossGraph, parse_prefix
from components.search.graph_json import load_graph

EXAMPLES = sorted((Path(__file__).resolve().parents[1] / "examples" / "losses").glob("*.json"))


def import_file(path: Path, name: str):
    spec = importlib.util.spec_from_file_location(name, path)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def make_inputs(task, gen: torch.Generator, batch=(), n=2, c=3, hw=(4, 5)):
    """Random inputs of the right kind per branch (softmax/one-hot, boxes, logits...)."""
    out = {}
    for branch, names in TASK_BRANCHES[task].items():
        shape = (*batch, n, c, *hw)
        if "i" in names:
            shape = (*batch, n, 1, 1, 1)
            a, b = torch.rand(shape, generator=gen) + 0.5, torch.rand(shape, generator=gen) + 0.5
            i = torch.minimum(a, b) * torch.rand(shape, generator=gen)
            u = a + b - i
            out[branch] = {"i": i, "u": u, "e": u + torch.rand(shape, generator=gen)}
            continue
        logits = torch.randn(shape, generator=gen)
        labels = torch.randint(0, c, (*batch, n, *hw), generator=gen)
        onehot = torch.nn.functional.one_hot(labels, c).movedim(-1, -3).float()
        if "x" in names:
            out[branch] = {"x": logits, "y": onehot, "w": torch.rand(shape, generator=gen)}
        else:
            out[branch] = {"y_hat": torch.softmax(logits, dim=-3), "y": onehot}
    return out


def check_export_equal(graph, tmp_path, name, valid=None, batch=()):
    path = write_module(graph, tmp_path / f"{name}.py", class_name="ExportedLoss")
    module = import_file(path, f"lf_export_{name}")
    gen = torch.Generator().manual_seed(0)
    inputs = make_inputs(graph.task, gen, batch)
    leaves = [t for b in inputs.values() for t in b.values()]
    for t in leaves:
        t.requires_grad_(True)
    expected = graph.total(inputs, valid)
    got = module.ExportedLoss()(inputs, valid)
    assert got.shape == expected.shape == torch.Size(batch)
    assert torch.equal(got, expected) or (torch.isnan(got).all() and torch.isnan(expected).all())
    if torch.isfinite(expected).all() and expected.requires_grad:
        ge = torch.autograd.grad(expected.sum(), leaves, allow_unused=True)
        gg = torch.autograd.grad(got.sum(), leaves, allow_unused=True)
        for a, b in zip(ge, gg):
            assert (a is None and b is None) or torch.equal(a, b) or torch.allclose(a, b, equal_nan=True)
    return path


def test_exported_source_imports_only_torch():
    graph = load_graph(EXAMPLES[0])
    tree = ast.parse(export_module_source(graph))
    imported = set()
    for node in ast.walk(tree):
        if isinstance(node, ast.Import):
            imported |= {a.name.split(".")[0] for a in node.names}
        elif isinstance(node, ast.ImportFrom):
            imported.add(node.module.split(".")[0])
    assert imported == {"torch", "collections"}
    assert "components" not in export_module_source(graph)


@pytest.mark.parametrize("path", EXAMPLES, ids=[p.stem for p in EXAMPLES])
def test_export_of_every_example_equals_total(tmp_path, path):
    check_export_equal(load_graph(path), tmp_path, path.stem)


@pytest.mark.parametrize("operator_set", ["autoloss_zero", "cse"])
def test_export_of_random_graphs_equals_total(tmp_path, operator_set):
    gen = TreeGenerator(operator_set, rng=random.Random(1), depth=3)
    tasks = ["segmentation", "detection"] if operator_set == "autoloss_zero" else ["segmentation", "detection_cse"]
    for k in range(6):
        task = tasks[k % 2]
        graph, _ = gen.offspring(gen.random_graph(task))
        check_export_equal(graph, tmp_path, f"{operator_set}_{k}")


def test_export_with_batch_dims_and_mask(tmp_path):
    graph = load_graph([p for p in EXAMPLES if p.stem == "autolosszero_seg_bf1"][0])  # pools and means
    valid = torch.rand(3, 2, 4, 5, generator=torch.Generator().manual_seed(1)) > 0.3
    check_export_equal(graph, tmp_path, "masked", valid=valid, batch=(3,))


def test_segmentation_from_logits(tmp_path):
    graph = LossGraph.single("segmentation", "seg", parse_prefix("neg(mul(y,log(y_hat)))").root)
    module = import_file(write_module(graph, tmp_path / "ce.py"), "lf_ce")
    torch.manual_seed(0)
    logits = torch.randn(2, 4, 5, 6)
    target = torch.randint(0, 4, (2, 5, 6))
    target[0, 0, :3] = 255
    loss = module.SearchedLoss().from_logits(logits, target)
    # this graph is cross-entropy (with the ε guard) over valid pixels
    ce = torch.nn.functional.cross_entropy(logits, target, ignore_index=255)
    assert loss.item() == pytest.approx(ce.item(), rel=1e-5)


@pytest.mark.parametrize("definition,width", [("avgpool", 1), ("minpool", 2)])
def test_boundary_target_export_equals_graph_seg_loss(tmp_path, definition, width):
    from components.tasks.segmentation.probe import GraphSegLoss

    graph = load_graph([p for p in EXAMPLES if p.stem == "autolosszero_seg_bf1"][0])
    path = write_module(graph, tmp_path / f"bf1_{definition}.py", target="boundary", boundary=definition,
                        boundary_width=width)
    module = import_file(path, f"lf_bf1_{definition}")
    assert module.SearchedLoss.TARGET == "boundary"
    torch.manual_seed(1)
    logits = torch.randn(2, 4, 16, 16)
    target = torch.zeros(2, 16, 16, dtype=torch.long)
    target[:, 2:10, 3:13] = 2
    target[1, 10:, :6] = 1
    target[0, 0, :4] = 255
    expected = GraphSegLoss(graph, target="boundary", boundary=definition, boundary_width=width)(logits, target)
    assert module.SearchedLoss().from_logits(logits, target).item() == pytest.approx(expected.item(), rel=1e-5)
    assert expected.item() != pytest.approx(GraphSegLoss(graph)(logits, target).item(), rel=1e-3)


def test_invalid_class_name():
    graph = load_graph(EXAMPLES[0])
    with pytest.raises(LossforgeError, match="not a valid Python identifier"):
        export_module_source(graph, "my loss")


def test_sympy_forms_and_simplification():
    t = parse_prefix("neg(log(mul(y_hat,y)))")
    y_hat, y = input_symbol("y_hat"), input_symbol("y")
    assert y_hat.is_positive and y.is_nonnegative
    expr = tree_to_sympy(t)
    assert str(expr) == "-SLog(y*y_hat)"
    g = LossGraph.single("segmentation", "seg", parse_prefix("abs(sqrt(square(add(y_hat,y_hat))))").root)
    assert sympy.simplify(simplify(g) - 2 * y_hat) == 0  # |sqrt((2ŷ)^2)| = 2ŷ for ŷ > 0
    g2 = LossGraph.single("segmentation", "seg", parse_prefix("log(mul(y_hat,inv(y_hat)))").root)
    assert simplify(g2) == 0
    det = load_graph([p for p in EXAMPLES if p.stem == "autolosszero_det_all_branches"][0])
    s = to_sympy(det)
    assert {f.func.__name__ for f in s.atoms(sympy.Function) if f.func.__name__.startswith("L_")} == {
        "L_cls_rpn", "L_reg_rpn", "L_cls_rcnn", "L_reg_rcnn"}


def test_sympy_value_matches_torch_value():
    """Independent check of each operator's SymPy form: numeric SymPy vs torch on random elementwise trees."""
    gen = TreeGenerator(rng=random.Random(3), depth=3)
    elementwise = {"add", "mul", "neg", "abs", "inv", "log", "exp", "tanh", "square", "sqrt"}
    checked = 0
    point = {"y_hat": 0.3, "y": 0.7}
    while checked < 60:
        tree = gen.random_tree()
        if any(not n.is_leaf and n.op not in elementwise for n in _nodes(tree.root)):
            continue
        value = tree.evaluate({k: torch.tensor([[[[v]]]], dtype=torch.float64) for k, v in point.items()}).item()
        if not math.isfinite(value) or abs(value) > 1e6:
            continue
        expr = tree_to_sympy(tree)
        sym = complex(expr.subs({input_symbol(k): sympy.Float(v) for k, v in point.items()}).evalf())
        assert sym.imag == pytest.approx(0, abs=1e-9)
        assert sym.real == pytest.approx(value, rel=1e-6, abs=1e-6), tree.canonical()
        checked += 1


def _nodes(node):
    yield node
    for c in node.children:
        yield from _nodes(c)


def test_latex():
    miou = load_graph([p for p in EXAMPLES if p.stem == "autolosszero_seg_miou"][0])
    raw = to_latex(miou)
    assert raw.startswith("-") and r"\tanh" in raw and r"\hat{y}" in raw
    assert raw.count("{") == raw.count("}") and raw.count(r"\left(") == raw.count(r"\right)")
    simp = to_latex(miou, simplified=True)
    assert r"\hat{y}" in simp and r"\frac" in simp
    det = load_graph([p for p in EXAMPLES if p.stem == "autolosszero_det_all_branches"][0])
    assert r"10 \cdot \mathcal{L}_{\mathrm{reg\_rpn}}" in to_latex(det)
    assert r"\mathcal{L}_{\mathrm{reg\_rpn}}" in to_latex(det, simplified=True)


def test_write_module_creates_parent_and_is_importable_twice(tmp_path):
    graph = load_graph(EXAMPLES[0])
    path = write_module(graph, tmp_path / "sub" / "loss.py")
    a = import_file(path, "lf_a")
    b = import_file(path, "lf_b")
    assert a.SearchedLoss.CANONICAL == b.SearchedLoss.CANONICAL == graph.canonical()
