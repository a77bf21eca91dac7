"""Random loss trees and their mutations (AutoLoss-Zero §3.2, Fig. 2 and 3, appendix A).

All randomness comes from the ``random.Random`` given to :class:`TreeGenerator`, so saving its
``getstate()`` and restoring it reproduces the same stream of trees. Operators are sampled uniformly
from the tree's operator set, inputs uniformly (with replacement) from the tree's inputs.

In the paper the root is an output node with a single child; in :class:`~components.search.graph.LossTree`
that child is the root. Hence the paper's "non-root nodes" are all our nodes, and:

* insertion picks any node (operator or input leaf) and puts a new operator between it and its
  parent (the output node if it is our root); a binary operator takes a random input as its other
  child, on a random side (the side matters for non-commutative ``cse`` operators);
* deletion picks an operator node and splices one of its children, picked at random, into its place;
  deleting our root is allowed only if the picked child is an operator (a tree is never a bare input):
  the root is a candidate when it has an operator child, and then the child is drawn among those.
  A tree whose only operator is the root cannot shrink, so deletion falls back to a replacement;
* replacement picks an operator node and gives it a random operator (possibly the same one, as in
  the paper); extra children are dropped by keeping a random subset (in order), missing ones are
  random inputs.

Mutations never produce a tree beyond ``MAX_DEPTH``/``MAX_NODES``: an insertion that would is
replaced by a deletion.
"""

from __future__ import annotations

import random
from typing import Sequence

from components.search.graph import (
    MAX_DEPTH,
    MAX_NODES,
    TASK_BRANCHES,
    Branch,
    LossGraph,
    LossTree,
    Node,
    branch_inputs,
    default_branch_weight,
    get_at,
    iter_paths,
    replace_at,
)
from components.search.operators import get_operator_set

MUTATIONS = ("insertion", "deletion", "replacement")
COPY_PROBABILITY = 0.1
REINIT_PROBABILITY = 0.5


class TreeGenerator:
    """Generates random trees (depth D) and mutates trees, drawing every choice from `rng`.

    `operator_set` and `inputs` are used for :meth:`random_tree` (and :meth:`random_graph` takes the
    inputs of each branch of the task); mutations use the mutated tree's own operator set and inputs.
    """

    def __init__(
        self,
        operator_set: str = "autoloss_zero",
        inputs: Sequence[str] = ("y_hat", "y", "1"),
        depth: int = 3,
        rng: random.Random | None = None,
    ) -> None:
        get_operator_set(operator_set)  # validates the name
        if depth < 1:
            raise ValueError(f"depth must be >= 1, got {depth}")
        self.operator_set = operator_set
        self.inputs = tuple(inputs)
        self.depth = depth
        self.rng = rng if rng is not None else random.Random(0)

    # ------------------------------------------------------------------ sampling helpers
    def _op_names(self, operator_set: str) -> list[str]:
        return list(get_operator_set(operator_set))

    def _sample_op(self, operator_set: str) -> str:
        return self.rng.choice(self._op_names(operator_set))

    def _sample_input(self, inputs: Sequence[str]) -> Node:
        return Node.leaf(self.rng.choice(list(inputs)))

    def _grow(self, operator_set: str, inputs: Sequence[str], remaining: int) -> Node:
        """An operator node with `remaining` operator levels below (inclusive) -- full tree."""
        name = self._sample_op(operator_set)
        arity = get_operator_set(operator_set)[name].arity
        if remaining == 1:
            children = tuple(self._sample_input(inputs) for _ in range(arity))
        else:
            children = tuple(self._grow(operator_set, inputs, remaining - 1) for _ in range(arity))
        return Node(op=name, children=children)

    # ------------------------------------------------------------------ public API
    def random_tree(self, inputs: Sequence[str] | None = None, operator_set: str | None = None) -> LossTree:
        """A random tree with exactly `depth` operators on every root-to-leaf path (Fig. 2)."""
        ops = operator_set or self.operator_set
        ins = tuple(inputs) if inputs is not None else self.inputs
        return LossTree(self._grow(ops, ins, self.depth), ops, ins)

    def insertion(self, tree: LossTree) -> LossTree:
        """Insert a random operator between a random node and its parent (Fig. 3, Insertion)."""
        nodes = list(iter_paths(tree.root))
        path, target = self.rng.choice(nodes)
        name = self._sample_op(tree.operator_set)
        arity = tree.operators[name].arity
        if arity == 1:
            new = Node(op=name, children=(target,))
        else:
            extra = self._sample_input(tree.inputs)
            side = self.rng.randrange(2)
            new = Node(op=name, children=(target, extra) if side == 0 else (extra, target))
        root = replace_at(tree.root, path, new)
        if root.depth > MAX_DEPTH or root.size > MAX_NODES:
            return self.deletion(tree)
        return LossTree(root, tree.operator_set, tree.inputs)

    def _deletion_candidates(self, tree: LossTree) -> list[tuple[tuple[int, ...], Node]]:
        out = []
        for path, node in iter_paths(tree.root):
            if node.is_leaf:
                continue
            if not path and not any(not c.is_leaf for c in node.children):
                continue  # removing the root would leave a bare input
            out.append((path, node))
        return out

    def can_delete(self, tree: LossTree) -> bool:
        """Whether a deletion is possible (the tree has more than one operator node)."""
        return bool(self._deletion_candidates(tree))

    def deletion(self, tree: LossTree) -> LossTree:
        """Remove a random operator node, a random child of it takes its place (Fig. 3, Deletion).

        Falls back to :meth:`replacement` when the root is the tree's only operator.
        """
        candidates = self._deletion_candidates(tree)
        if not candidates:
            return self.replacement(tree)
        path, node = self.rng.choice(candidates)
        if path:
            child = self.rng.choice(list(node.children))
        else:
            child = self.rng.choice([c for c in node.children if not c.is_leaf])
        return LossTree(replace_at(tree.root, path, child), tree.operator_set, tree.inputs)

    def replacement(self, tree: LossTree) -> LossTree:
        """Give a random operator node a random operator, fixing up its children (Fig. 3, Replacement)."""
        ops_nodes = [(p, n) for p, n in iter_paths(tree.root) if not n.is_leaf]
        path, node = self.rng.choice(ops_nodes)
        name = self._sample_op(tree.operator_set)
        arity = tree.operators[name].arity
        children = list(node.children)
        if len(children) > arity:
            keep = sorted(self.rng.sample(range(len(children)), arity))
            children = [children[i] for i in keep]
        while len(children) < arity:
            children.append(self._sample_input(tree.inputs))
        root = replace_at(tree.root, path, Node(op=name, children=tuple(children)))
        return LossTree(root, tree.operator_set, tree.inputs)

    def mutate(self, tree: LossTree, mutation: str) -> LossTree:
        """Apply the named mutation (``insertion``, ``deletion`` or ``replacement``)."""
        if mutation not in MUTATIONS:
            raise ValueError(f"unknown mutation {mutation!r} (known: {', '.join(MUTATIONS)})")
        return getattr(self, mutation)(tree)

    def offspring_tree(self, tree: LossTree) -> tuple[LossTree, str]:
        """Paper's offspring schedule for one tree: copy (p=0.1), else re-initialise (p=0.5), else
        two mutations drawn uniformly from {insertion, deletion, replacement}.

        Returns the child and ``"copy"``, ``"reinit"`` or ``"mutate:<m1>+<m2>"``.
        """
        if self.rng.random() < COPY_PROBABILITY:
            return tree, "copy"
        if self.rng.random() < REINIT_PROBABILITY:
            return self.random_tree(tree.inputs, tree.operator_set), "reinit"
        first, second = self.rng.choice(MUTATIONS), self.rng.choice(MUTATIONS)
        child = self.mutate(self.mutate(tree, first), second)
        return child, f"mutate:{first}+{second}"

    def offspring(self, graph: LossGraph) -> tuple[LossGraph, str]:
        """Offspring of a graph: the schedule of :meth:`offspring_tree` applied to every branch
        separately (paper A.2). The description is the branch's one for single-branch graphs, else
        ``"<branch>=<what>,..."`` in branch order."""
        branches = {}
        described = []
        for name, branch in graph.branches.items():
            child, what = self.offspring_tree(branch.tree)
            branches[name] = Branch(child, branch.weight)
            described.append((name, what))
        if len(described) == 1:
            text = described[0][1]
        else:
            text = ",".join(f"{n}={w}" for n, w in described)
        return LossGraph(graph.task, branches), text

    def random_graph(self, task: str) -> LossGraph:
        """A random graph for `task`: one random tree per branch of TASK_BRANCHES[task], each using
        the branch's inputs (plus the operator set's constants) and the papers' branch weights."""
        if task not in TASK_BRANCHES:
            branch_inputs(task, "")  # raises the standard unknown-task error
        branches = {}
        for name in TASK_BRANCHES[task]:
            inputs = branch_inputs(task, name, self.operator_set)
            branches[name] = Branch(self.random_tree(inputs), default_branch_weight(task, name))
        return LossGraph(task, branches)


__all__ = ["TreeGenerator", "MUTATIONS", "COPY_PROBABILITY", "REINIT_PROBABILITY", "get_at"]
