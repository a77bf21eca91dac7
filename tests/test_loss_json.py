"""JSON round trip and every kind of invalid loss file (one-line error naming file and JSON path)."""

import copy
import json
import random

import pytest

from components.errors import LossforgeError
from components.search.generation import TreeGenerator
from components.search.graph import TASK_BRANCHES
from components.search.graph_json import (
    FORMAT,
    InvalidLossError,
    graph_from_dict,
    graph_to_dict,
    load_graph,
    save_graph,
)


def leaf(name):
    return {"input": name}


def op(name, *children):
    return {"op": name, "children": list(children)}


def seg_doc(tree, **branch):
    return {"format": FORMAT, "task": "segmentation", "branches": {"seg": {"tree": tree, **branch}}}


GOOD = seg_doc(op("neg", op("log", op("mul", leaf("y_hat"), leaf("y")))))


def test_invalid_loss_error_is_a_lossforge_error():
    assert issubclass(InvalidLossError, LossforgeError)


@pytest.mark.parametrize("operator_set", ["autoloss_zero", "cse"])
def test_round_trip_every_task(tmp_path, operator_set):
    gen = TreeGenerator(operator_set, rng=random.Random(0), depth=4)
    for task in TASK_BRANCHES:
        for k in range(5):
            g = gen.random_graph(task)
            g, _ = gen.offspring(g)
            assert graph_from_dict(graph_to_dict(g)) == g
            path = save_graph(g, tmp_path / f"{task}_{k}.json", name="x", metadata={"seed": 0})
            data = json.loads(path.read_text())
            assert data["format"] == "lossforge.loss/1" and data["hash"] == g.hash()
            loaded = load_graph(path)
            assert loaded == g and loaded.canonical() == g.canonical()


def test_defaults_for_operator_set_and_weight():
    g = graph_from_dict(GOOD)
    assert g.branches["seg"].tree.operator_set == "autoloss_zero" and g.branches["seg"].weight == 1.0
    det = {"format": FORMAT, "task": "detection",
           "branches": {"reg_rcnn": {"tree": op("neg", leaf("i"))}}}
    assert graph_from_dict(det).branches["reg_rcnn"].weight == 10.0


def bad(mutate):
    doc = copy.deepcopy(GOOD)
    mutate(doc)
    return doc


def tree_of(doc):
    return doc["branches"]["seg"]["tree"]


def deep(n):
    node = leaf("y")
    for _ in range(n):
        node = op("neg", node)
    return node


def wide(d):
    return leaf("y") if d == 0 else op("add", wide(d - 1), wide(d - 1))


CASES = [
    ("not an object", [1, 2], r"expected a JSON object"),
    ("wrong format", bad(lambda d: d.update(format="lossforge.loss/2")), r"format: expected 'lossforge.loss/1'"),
    ("unknown top key", bad(lambda d: d.update(evil=1)), r"evil: unknown key"),
    ("unknown task", bad(lambda d: d.update(task="nlp")), r"task: unknown task 'nlp'"),
    ("no branches", bad(lambda d: d.update(branches={})), r"branches: expected a non-empty object"),
    ("unknown branch", bad(lambda d: d["branches"].update(cls=d["branches"].pop("seg"))),
     r"branches.cls: unknown branch 'cls' for task 'segmentation' \(allowed: seg\)"),
    ("unknown operator", bad(lambda d: tree_of(d)["children"].__setitem__(0, op("foo", leaf("y")))),
     r"branches.seg.tree.children\[0\]: unknown operator 'foo' in set 'autoloss_zero' \(allowed: add, mul, "),
    ("operator of another set", bad(lambda d: d["branches"]["seg"].update(tree=op("sin", leaf("y")))),
     r"branches.seg.tree: unknown operator 'sin'"),
    ("code as operator", bad(lambda d: d["branches"]["seg"].update(tree=op("__import__('os')", leaf("y")))),
     r"unknown operator"),
    ("wrong arity", bad(lambda d: d["branches"]["seg"].update(tree=op("add", leaf("y")))),
     r"branches.seg.tree: operator 'add' takes 2 children, got 1"),
    ("unknown input", bad(lambda d: tree_of(d)["children"][0]["children"][0].update(children=[leaf("y"), leaf("z")])),
     r"branches.seg.tree.children\[0\].children\[0\].children\[1\]: unknown input 'z' \(allowed: y_hat, y, 1\)"),
    ("input of another branch", bad(lambda d: d["branches"]["seg"].update(tree=op("neg", leaf("i")))),
     r"branches.seg.tree.children\[0\]: unknown input 'i'"),
    ("cse constant in autoloss_zero", bad(lambda d: d["branches"]["seg"].update(tree=op("neg", leaf("2")))),
     r"unknown input '2'"),
    ("unknown operator set", bad(lambda d: d["branches"]["seg"].update(operator_set="mine")),
     r"branches.seg.operator_set: unknown operator set 'mine'"),
    ("leaf root", bad(lambda d: d["branches"]["seg"].update(tree=leaf("y"))), r"branches.seg.tree: the root must be an operator"),
    ("too deep", bad(lambda d: d["branches"]["seg"].update(tree=deep(33))), r"tree too deep \(more than 32"),
    ("too big", bad(lambda d: d["branches"]["seg"].update(tree=wide(9))), r"tree too big \(more than 512 nodes\)"),
    ("NaN weight", bad(lambda d: d["branches"]["seg"].update(weight=float("nan"))), r"branches.seg.weight: expected a finite number"),
    ("string weight", bad(lambda d: d["branches"]["seg"].update(weight="1")), r"branches.seg.weight: expected a finite number"),
    ("bool weight", bad(lambda d: d["branches"]["seg"].update(weight=True)), r"branches.seg.weight"),
    ("missing tree", bad(lambda d: d["branches"]["seg"].pop("tree")), r"branches.seg: missing 'tree'"),
    ("unknown branch key", bad(lambda d: d["branches"]["seg"].update(code="x")), r"branches.seg.code: unknown key"),
    ("node without op", bad(lambda d: d["branches"]["seg"].update(tree={"children": []})), r"needs 'op'"),
    ("leaf with children", bad(lambda d: d["branches"]["seg"].update(tree=op("neg", {"input": "y", "children": []}))),
     r"an input leaf has only 'input'"),
    ("children not a list", bad(lambda d: d["branches"]["seg"].update(tree={"op": "neg", "children": {"a": 1}})),
     r"needs a 'children' list"),
    ("node not an object", bad(lambda d: d["branches"]["seg"].update(tree=op("neg", "y"))), r"children\[0\]: expected a node object"),
    ("branch not an object", bad(lambda d: d["branches"].update(seg=[1])), r"branches.seg: expected an object"),
]


@pytest.mark.parametrize("name,doc,pattern", CASES, ids=[c[0] for c in CASES])
def test_invalid_documents_are_clear_one_line_errors(tmp_path, name, doc, pattern):
    path = tmp_path / "loss.json"
    path.write_text(json.dumps(doc))
    with pytest.raises(InvalidLossError) as info:
        load_graph(path)
    message = str(info.value)
    assert message.startswith(f"{path}: ")
    assert "\n" not in message
    assert __import__("re").search(pattern, message), message
    with pytest.raises(InvalidLossError, match=r"^loss.json: "):
        graph_from_dict(doc, "loss.json")


def test_file_level_errors(tmp_path):
    with pytest.raises(InvalidLossError, match="missing.json: file not found"):
        load_graph(tmp_path / "missing.json")
    broken = tmp_path / "broken.json"
    broken.write_text('{"format": ')
    with pytest.raises(InvalidLossError, match=r"broken.json: invalid JSON"):
        load_graph(broken)
    nested = tmp_path / "nested.json"
    nested.write_text("[" * 200000 + "]" * 200000)
    with pytest.raises(InvalidLossError, match="nested.json: (JSON nested too deeply|file too large)"):
        load_graph(nested)
    huge = tmp_path / "huge.json"
    huge.write_text(json.dumps({**GOOD, "description": "x" * (2 << 20)}))
    with pytest.raises(InvalidLossError, match=r"huge.json: file too large"):
        load_graph(huge)
    deep_json = tmp_path / "deep.json"
    deep_json.write_text("[" * 5000 + "]" * 5000)
    with pytest.raises(InvalidLossError, match="deep.json: (JSON nested too deeply|expected a JSON object)"):
        load_graph(deep_json)


def test_informational_fields_are_ignored_on_load():
    doc = copy.deepcopy(GOOD)
    doc.update(formula="something else", canonical="x", hash="0", name="n", description="d", metadata={"a": 1})
    assert graph_from_dict(doc) == graph_from_dict(GOOD)
