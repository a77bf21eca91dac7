"""Random initialisation (Fig. 2), the three mutations (Fig. 3) and the offspring schedule (§3.2)."""

import collections
import json
import random

import pytest

from components.search.generation import MUTATIONS, TreeGenerator
from components.search.graph import (
    MAX_DEPTH,
    MAX_NODES,
    TASK_BRANCHES,
    Branch,
    LossGraph,
    LossTree,
    Node,
    branch_inputs,
    get_at,
    iter_paths,
    parse_prefix,
    replace_at,
)
from components.search.operators import OPERATOR_SETS

SEG = ("y_hat", "y", "1")


def gen(seed=0, operator_set="autoloss_zero", inputs=SEG, depth=3):
    return TreeGenerator(operator_set, inputs, depth=depth, rng=random.Random(seed))


def leaf_depths(node, d=0):
    if node.is_leaf:
        return [d]
    return [x for c in node.children for x in leaf_depths(c, d + 1)]


@pytest.mark.parametrize("operator_set,depth", [("autoloss_zero", 3), ("autoloss_zero", 1), ("cse", 4)])
def test_random_tree_has_depth_d_on_every_path(operator_set, depth):
    g = gen(1, operator_set, SEG, depth)
    ops = OPERATOR_SETS[operator_set]
    for _ in range(200):
        t = g.random_tree()
        assert set(leaf_depths(t.root)) == {depth}
        for _, n in iter_paths(t.root):
            if n.is_leaf:
                assert n.input in SEG
            else:
                assert len(n.children) == ops[n.op].arity


def test_random_tree_samples_operators_and_inputs_uniformly():
    g = gen(2, depth=1)
    ops = collections.Counter()
    leaves = collections.Counter()
    for _ in range(2800):
        t = g.random_tree()
        ops[t.root.op] += 1
        for c in t.root.children:
            leaves[c.input] += 1
    assert set(ops) == set(OPERATOR_SETS["autoloss_zero"])
    assert all(140 < v < 260 for v in ops.values()), ops  # expected 200 each
    total = sum(leaves.values())
    assert all(abs(v / total - 1 / 3) < 0.04 for v in leaves.values()), leaves


def test_generator_is_reproducible_from_rng_state():
    rng = random.Random(42)
    g = TreeGenerator(rng=rng)
    g.random_tree()
    state = json.loads(json.dumps(rng.getstate()))  # JSON-able
    first = [g.offspring(g.random_graph("segmentation"))[0].canonical() for _ in range(20)]
    rng.setstate((state[0], tuple(state[1]), state[2]))
    again = [g.offspring(g.random_graph("segmentation"))[0].canonical() for _ in range(20)]
    assert first == again
    assert [gen(7).random_tree().canonical() for _ in range(3)] == [gen(7).random_tree().canonical() for _ in range(3)]


def _is_insertion(old, new):
    """True iff `new` is `old` with one operator inserted above some node (other child an input)."""
    for path, node in iter_paths(new.root):
        if node.is_leaf:
            continue
        try:
            before = get_at(old.root, path)
        except IndexError:
            continue
        for i, child in enumerate(node.children):
            others = [c for j, c in enumerate(node.children) if j != i]
            if child == before and all(o.is_leaf for o in others) and replace_at(new.root, path, child) == old.root:
                return True
    return False


def _is_deletion(old, new):
    """True iff `new` is `old` with one operator node replaced by one of its children."""
    for path, node in iter_paths(old.root):
        if node.is_leaf:
            continue
        for child in node.children:
            if replace_at(old.root, path, child) == new.root:
                return True
    return False


def _is_subsequence(short, long):
    it = iter(long)
    return all(any(c == x for x in it) for c in short)


def _is_replacement(old, new, ops):
    """True iff exactly one operator node got an operator (maybe the same), keeping an ordered subset
    of its children when the new arity is smaller, else all of them followed by input leaves."""
    for path, node in iter_paths(old.root):
        if node.is_leaf:
            continue
        try:
            repl = get_at(new.root, path)
        except IndexError:
            continue
        if repl.is_leaf or replace_at(new.root, path, node) != old.root:
            continue
        if len(repl.children) != ops[repl.op].arity:
            continue
        n = len(node.children)
        if len(repl.children) <= n:
            if _is_subsequence(repl.children, node.children):
                return True
        elif repl.children[:n] == node.children and all(c.is_leaf for c in repl.children[n:]):
            return True
    return False


@pytest.mark.parametrize("operator_set", ["autoloss_zero", "cse"])
def test_mutations_have_their_structural_effect(operator_set):
    g = gen(3, operator_set)
    ops = OPERATOR_SETS[operator_set]
    for _ in range(150):
        t = g.random_tree()
        ins = g.insertion(t)
        assert ins.size - t.size in (1, 2) and _is_insertion(t, ins)
        dele = g.deletion(t)
        assert dele.size < t.size and _is_deletion(t, dele)
        rep = g.replacement(t)
        assert _is_replacement(t, rep, ops)
        # the checkers are not vacuous
        assert not _is_deletion(t, ins) and not _is_insertion(t, dele) and not _is_replacement(t, ins, ops)
        for m in (ins, dele, rep):
            assert m.operator_set == t.operator_set and m.inputs == t.inputs


def test_insertion_can_wrap_the_root_and_leaves():
    seen_root, seen_leaf = False, False
    g = gen(4)
    t = parse_prefix("neg(y)", "autoloss_zero", SEG)
    for _ in range(200):
        new = g.insertion(t)
        if new.root.op != "neg":
            seen_root = True
        elif not new.root.children[0].is_leaf:
            seen_leaf = True
    assert seen_root and seen_leaf


def test_deletion_of_root_only_when_an_operator_child_remains():
    g = gen(5)
    t = parse_prefix("neg(log(y))", "autoloss_zero", SEG)
    outcomes = {g.deletion(t).canonical() for _ in range(100)}
    assert outcomes == {"log(y)", "neg(y)"}
    t2 = parse_prefix("add(y,log(1))", "autoloss_zero", SEG)
    outcomes2 = {g.deletion(t2).canonical() for _ in range(100)}
    assert outcomes2 == {"log(1)", "add(y,1)"}  # root deletion must keep the operator child


def test_deletion_on_single_operator_tree_falls_back_to_replacement():
    g = gen(6)
    t = parse_prefix("add(y,1)", "autoloss_zero", SEG)
    assert not g.can_delete(t)
    for _ in range(50):
        new = g.deletion(t)
        assert isinstance(new, LossTree) and not new.root.is_leaf and new.depth == 1


def test_replacement_keeps_subset_or_adds_inputs():
    g = gen(7)
    t = parse_prefix("add(log(y),tanh(y_hat))", "autoloss_zero", SEG)
    seen = set()
    for _ in range(300):
        new = g.replacement(t)
        assert _is_replacement(t, new, OPERATOR_SETS["autoloss_zero"])
        if OPERATOR_SETS["autoloss_zero"][new.root.op].arity == 1:
            assert new.root.children[0] in t.root.children  # binary root -> unary: one child kept
            seen.add("shrink")
        for i, old_child in enumerate(t.root.children):
            now = new.root.children[i] if len(new.root.children) > i else None
            if now is not None and now.op in ("add", "mul") and new.root == Node(op=t.root.op, children=new.root.children):
                assert now.children[0] == old_child.children[0] and now.children[1].is_leaf
                seen.add("grow")
    assert seen == {"shrink", "grow"}


def test_mutations_respect_size_limits():
    g = gen(8)
    chain = Node.leaf("y")
    for _ in range(MAX_DEPTH):
        chain = Node.apply("neg", chain)
    t = LossTree(chain)
    for _ in range(30):
        assert g.insertion(t).depth <= MAX_DEPTH


def test_offspring_schedule_probabilities():
    g = gen(9)
    parent = g.random_graph("segmentation")
    kinds = collections.Counter()
    combos = set()
    n = 4000
    for _ in range(n):
        child, what = g.offspring(parent)
        kind = what.split(":")[0]
        kinds[kind] += 1
        if kind == "copy":
            assert child == parent
        if kind == "mutate":
            first, second = what.split(":")[1].split("+")
            assert first in MUTATIONS and second in MUTATIONS
            combos.add((first, second))
    assert abs(kinds["copy"] / n - 0.1) < 0.02
    assert abs(kinds["reinit"] / n - 0.45) < 0.03
    assert abs(kinds["mutate"] / n - 0.45) < 0.03
    assert len(combos) == 9


def test_random_graph_for_every_task():
    g = gen(10)
    for task, branches in TASK_BRANCHES.items():
        graph = g.random_graph(task)
        assert list(graph.branches) == list(branches)
        for name, b in graph.branches.items():
            assert b.tree.inputs == branch_inputs(task, name, "autoloss_zero")
            assert b.weight == (10.0 if name.startswith("reg") else 1.0)
            assert b.tree.depth == 3
    cse = gen(11, "cse").random_graph("detection_cse")
    assert cse.branches["cls"].tree.inputs == ("x", "y", "w", "1", "2", "3")


def test_multi_branch_offspring_mutates_each_branch_separately():
    g = gen(12)
    graph = g.random_graph("detection")
    child, what = g.offspring(graph)
    parts = dict(p.split("=") for p in what.split(","))
    assert list(parts) == list(TASK_BRANCHES["detection"])
    for name, kind in parts.items():
        if kind == "copy":
            assert child.branches[name] == graph.branches[name]
        assert child.branches[name].weight == graph.branches[name].weight


def test_long_evolution_chains_stay_valid():
    for operator_set, task in (("autoloss_zero", "segmentation"), ("cse", "detection_cse")):
        g = gen(13, operator_set)
        graph = g.random_graph(task)
        for _ in range(1500):
            graph, _ = g.offspring(graph)
            for b in graph.branches.values():
                assert 1 <= b.tree.depth <= MAX_DEPTH and b.tree.size <= MAX_NODES
                assert not b.tree.root.is_leaf
        assert isinstance(graph, LossGraph) and all(isinstance(b, Branch) for b in graph.branches.values())
