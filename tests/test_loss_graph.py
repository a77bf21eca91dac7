"""Trees, graphs, Eq. 3/4, canonical strings, hashes, formulas and the prefix parser."""

import hashlib
import math
import random

import pytest
import torch

from components.errors import LossforgeError
from components.search.generation import TreeGenerator
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
    get_at,
    iter_paths,
    parse_prefix,
    reduce_eq3,
    replace_at,
)

L = Node.leaf
A = Node.apply


def seg_tree(text):
    return parse_prefix(text, "autoloss_zero", ("y_hat", "y", "1"))


def test_task_branches_contract():
    assert TASK_BRANCHES["segmentation"] == {"seg": ("y_hat", "y", "1")}
    assert set(TASK_BRANCHES["detection"]) == {"cls_rpn", "reg_rpn", "cls_rcnn", "reg_rcnn"}
    assert TASK_BRANCHES["detection"]["reg_rcnn"] == ("i", "u", "e", "1")
    assert set(TASK_BRANCHES["instance_segmentation"]) == set(TASK_BRANCHES["detection"]) | {"mask"}
    assert TASK_BRANCHES["pose"] == {"heatmap": ("y_hat", "y", "1")}
    assert branch_inputs("detection_cse", "cls", "cse") == ("x", "y", "w", "1", "2", "3")
    assert branch_inputs("segmentation", "seg", "autoloss_zero") == ("y_hat", "y", "1")
    with pytest.raises(InvalidLossError, match="unknown branch 'foo'"):
        branch_inputs("segmentation", "foo")


def test_node_validation():
    with pytest.raises(InvalidLossError):
        Node(op="neg", input="y")
    with pytest.raises(InvalidLossError):
        Node()
    with pytest.raises(InvalidLossError, match="cannot have children"):
        Node(input="y", children=(L("y"),))
    n = A("add", L("y"), A("neg", L("1")))
    assert n.depth == 2 and n.size == 4 and not n.is_leaf and L("y").is_leaf


def test_tree_validation_errors():
    with pytest.raises(InvalidLossError, match="unknown operator 'sin'"):
        LossTree(A("sin", L("y")))  # sin is in cse, not in autoloss_zero
    with pytest.raises(InvalidLossError, match="takes 2 children, got 1"):
        LossTree(A("add", L("y")))
    with pytest.raises(InvalidLossError, match="unknown input 'i'"):
        LossTree(A("neg", L("i")))
    with pytest.raises(InvalidLossError, match="root"):
        LossTree(L("y"))
    deep = L("y")
    for _ in range(MAX_DEPTH + 1):
        deep = A("neg", deep)
    with pytest.raises(InvalidLossError, match="depth 33"):
        LossTree(deep)

    def full(d):
        return L("y") if d == 0 else A("add", full(d - 1), full(d - 1))

    assert full(8).size == 511 and LossTree(full(8)).size == 511
    with pytest.raises(InvalidLossError, match=f"1023 nodes \\(limit {MAX_NODES}\\)"):
        LossTree(full(9))


def test_evaluate_by_hand_and_constants():
    y_hat = torch.tensor([[[[0.5, 0.25]]]], dtype=torch.float64)
    y = torch.tensor([[[[1.0, 0.0]]]], dtype=torch.float64)
    o = seg_tree("neg(log(add(mul(y_hat,y),1)))").evaluate({"y_hat": y_hat, "y": y})
    assert o.shape == y_hat.shape
    assert o[0, 0, 0, 0] == pytest.approx(-math.log(1.5))
    assert o[0, 0, 0, 1] == pytest.approx(-1e-12, rel=1e-3)  # -log(1 + ε)
    cse = parse_prefix("add(2,mul(3,x))", "cse", branch_inputs("detection_cse", "cls", "cse"))
    out = cse.evaluate({"x": torch.tensor([[[[1.0]]]]), "y": torch.zeros(1, 1, 1, 1), "w": torch.zeros(1, 1, 1, 1)})
    assert out.item() == 5.0
    with pytest.raises(LossforgeError, match="missing input 'y'"):
        seg_tree("neg(y)").evaluate({"y_hat": y_hat})


def test_reduce_eq3_by_hand():
    o = torch.tensor([[[[1.0, 2.0]], [[3.0, 4.0]]], [[[5.0, 6.0]], [[7.0, 8.0]]]])  # N=2, C=2, H=1, W=2
    assert reduce_eq3(o).item() == pytest.approx(36 / 4)  # Σ / (N·H·W), no division by C
    valid = torch.tensor([[[True, False]], [[True, True]]])  # (N, H, W)
    # kept: n0 w0 (1+3), n1 (5+6+7+8) -> 30 over 3 valid positions
    assert reduce_eq3(o, valid).item() == pytest.approx(30 / 3)
    assert reduce_eq3(o, valid.unsqueeze(1)).item() == pytest.approx(10.0)
    # invalid positions holding NaN do not poison the result
    o_nan = o.clone()
    o_nan[0, :, 0, 1] = float("nan")
    assert reduce_eq3(o_nan, valid).item() == pytest.approx(10.0)
    batched = torch.stack([o, 2 * o])  # (B, N, C, H, W)
    assert torch.allclose(reduce_eq3(batched), torch.tensor([9.0, 18.0]))
    assert torch.equal(reduce_eq3(torch.zeros(1, 1, 2, 2), torch.zeros(1, 2, 2, dtype=torch.bool)), torch.tensor(0.0))


def test_graph_total_is_weighted_sum_of_branch_losses():
    cls = LossTree(A("neg", L("y_hat")), "autoloss_zero", branch_inputs("detection", "cls_rcnn"))
    reg = LossTree(A("mul", L("i"), L("e")), "autoloss_zero", branch_inputs("detection", "reg_rcnn"))
    g = LossGraph("detection", {"reg_rcnn": Branch(reg, 10.0), "cls_rcnn": Branch(cls, 1.0)})
    assert list(g.branches) == ["cls_rcnn", "reg_rcnn"]  # task order
    y_hat = torch.tensor([0.2, 0.8]).reshape(1, 2, 1, 1)  # one box, two classes
    i, e = torch.tensor([[[[2.0]]], [[[1.0]]]]), torch.tensor([[[[3.0]]], [[[4.0]]]])  # two boxes
    inputs = {"cls_rcnn": {"y_hat": y_hat, "y": y_hat}, "reg_rcnn": {"i": i, "u": i, "e": e}}
    # cls: -(0.2 + 0.8) / 1 = -1 ; reg: (6 + 4) / 2 = 5 -> total -1 + 10 * 5
    assert g.branch_loss("cls_rcnn", inputs["cls_rcnn"]).item() == pytest.approx(-1.0)
    assert g.total(inputs).item() == pytest.approx(49.0)
    masks = {"reg_rcnn": torch.tensor([[[True]], [[False]]])}
    assert g.total(inputs, masks).item() == pytest.approx(-1 + 10 * 6)
    with pytest.raises(LossforgeError, match="no inputs given for branch 'reg_rcnn'"):
        g.total({"cls_rcnn": inputs["cls_rcnn"]})


def test_graph_validation():
    tree = seg_tree("neg(y)")
    with pytest.raises(InvalidLossError, match="unknown task"):
        LossGraph("classification", {"seg": Branch(tree)})
    with pytest.raises(InvalidLossError, match="at least one branch"):
        LossGraph("segmentation", {})
    with pytest.raises(InvalidLossError, match="unknown branch 'cls'"):
        LossGraph("segmentation", {"cls": Branch(tree)})
    reg_inputs = LossTree(A("neg", L("i")), "autoloss_zero", ("i", "u", "e", "1"))
    with pytest.raises(InvalidLossError, match="input 'i' not allowed"):
        LossGraph("segmentation", {"seg": Branch(reg_inputs)})
    for bad in (float("nan"), float("inf"), "1", True):
        with pytest.raises(InvalidLossError, match="weight"):
            Branch(tree, bad)


def test_canonical_and_hash():
    g = LossGraph.single("segmentation", "seg", A("neg", A("log", A("mul", L("y_hat"), L("y")))))
    assert g.branches["seg"].tree.canonical() == "neg(log(mul(y_hat,y)))"
    assert g.canonical() == "segmentation:seg[autoloss_zero]*1.0=neg(log(mul(y_hat,y)))"
    assert g.hash() == hashlib.sha256(g.canonical().encode()).hexdigest()[:16]
    same = LossGraph.single("segmentation", "seg", A("neg", A("log", A("mul", L("y_hat"), L("y")))))
    assert same.hash() == g.hash() and same == g
    assert len({g, same}) == 1  # graphs are hashable (by canonical string)
    others = [
        LossGraph.single("segmentation", "seg", A("neg", A("log", A("mul", L("y"), L("y_hat"))))),
        LossGraph.single("segmentation", "seg", A("neg", A("log", A("mul", L("y_hat"), L("y")))), weight=2.0),
        LossGraph.single("pose", "heatmap", A("neg", A("log", A("mul", L("y_hat"), L("y"))))),
        LossGraph.single("segmentation", "seg", A("neg", A("log", A("mul", L("y_hat"), L("y")))), "cse"),
    ]
    hashes = {g.hash()} | {o.hash() for o in others}
    assert len(hashes) == 5


def test_hash_distinguishes_many_random_trees():
    gen = TreeGenerator(rng=random.Random(0))
    graphs = [gen.random_graph("segmentation") for _ in range(400)]
    by_hash = {}
    for gr in graphs:
        by_hash.setdefault(gr.hash(), set()).add(gr.canonical())
    assert all(len(c) == 1 for c in by_hash.values())
    assert len(by_hash) == len({gr.canonical() for gr in graphs})


def test_formula_brackets_by_precedence():
    assert seg_tree("neg(log(mul(y_hat,y)))").formula() == "-log(y_hat * y)"
    assert seg_tree("add(mul(y_hat,y),1)").formula() == "y_hat * y + 1"
    assert seg_tree("mul(add(y_hat,y),1)").formula() == "(y_hat + y) * 1"
    assert seg_tree("square(add(y,1))").formula() == "(y + 1)^2"
    assert seg_tree("inv(mul(y,y))").formula() == "1/(y * y)"
    assert seg_tree("mean_nhw(max_pool3(abs(y)))").formula() == "Mean_nhw(MaxPool3(|y|))"
    cse = branch_inputs("detection_cse", "cls", "cse")
    assert parse_prefix("sub(x,sub(y,w))", "cse", cse).formula() == "x - (y - w)"
    assert parse_prefix("sub(sub(x,y),w)", "cse", cse).formula() == "x - y - w"
    assert parse_prefix("div(x,mul(y,w))", "cse", cse).formula() == "x / (y * w)"
    g = LossGraph("detection", {
        "cls_rpn": Branch(LossTree(A("neg", L("y")), "autoloss_zero", ("y_hat", "y", "1"))),
        "reg_rpn": Branch(LossTree(A("add", L("i"), L("e")), "autoloss_zero", ("i", "u", "e", "1")), 10.0),
    })
    assert g.formula() == "cls_rpn: -y\nreg_rpn: 10 * (i + e)"


def test_tree_latex():
    assert seg_tree("neg(log(mul(y_hat,y)))").latex() == r"-\log\left(\hat{y} \cdot y\right)"
    assert seg_tree("square(add(y,1))").latex() == r"\left(y + 1\right)^{2}"
    assert seg_tree("inv(sqrt(y))").latex() == r"\frac{1}{\sqrt{y}}"


def test_parse_prefix_round_trip_and_errors():
    gen = TreeGenerator("cse", branch_inputs("detection_cse", "cls", "cse"), depth=4, rng=random.Random(5))
    for _ in range(100):
        t = gen.random_tree()
        assert parse_prefix(t.canonical(), "cse", t.inputs) == t
    with pytest.raises(InvalidLossError, match="unknown operator 'foo'"):
        seg_tree("foo(y)")
    with pytest.raises(InvalidLossError, match="trailing"):
        seg_tree("neg(y) y")
    with pytest.raises(InvalidLossError, match="unexpected character"):
        seg_tree("neg(y); import os")
    with pytest.raises(InvalidLossError, match="nested deeper"):
        seg_tree("neg(" * 40 + "y" + ")" * 40)


def test_path_helpers():
    root = seg_tree("add(neg(y),mul(y_hat,1))").root
    paths = dict(iter_paths(root))
    assert set(paths) == {(), (0,), (0, 0), (1,), (1, 0), (1, 1)}
    assert get_at(root, (1, 1)) == L("1")
    new = replace_at(root, (1, 0), L("y"))
    assert new.canonical() == "add(neg(y),mul(y,1))" and root.canonical() == "add(neg(y),mul(y_hat,1))"
