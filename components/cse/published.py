"""The published CSE-AutoLoss losses and the handcrafted losses they are compared with, as `detection_cse` trees.

Every loss here is a prefix string over the `cse` operator set, parsed through the operator whitelist
(`components.search.graph.parse_prefix`), so it runs through exactly the code a searched loss runs through.
Inputs (TASK_BRANCHES["detection_cse"]): classification on logits ``x``, one-hot label ``y`` and IoU weight
``w``; regression on intersection ``i``, union ``u`` and enclosing area ``e`` of predicted and target box.

* CSE-AutoLoss-A (Faster R-CNN R50, slides "Search on COCO"):
  cls ``−dot((1 + sin w) y, log softmax x)``, reg ``(1 − i/u) + (1 − (i + 2)/e)`` (the released code's prefix
  strings, which `examples/losses/cse_autoloss_a.json` stores too).
* CSE-AutoLoss-B (FCOS R50): cls ``−[wy(1 + erf(σ(1 − y))) log σ(x) + (gd(x) − wy)(σ(x) − wy) log(1 − σ(x))]``,
  reg ``(3eu + 12e + 3i + 3u + 18) / (−3eu + iu + u² − 15e + 5i + 5u)``, transcribed from the slides.
  Decision: ``1 − σ(x)`` is written ``sub(1, sigmoid(x))`` and ``u²`` as ``mul(u, u)``; no FCOS here, the
  B losses run on the Faster R-CNN head like the A losses (issue 11 makes FCOS optional).
* CE (softmax), focal (γ = 2, softmax form), CE + GIoU: the references the published losses are compared with.

Branch weights are the papers': classification 1, regression 10 (the GIoU weight the released code keeps).
"""

from __future__ import annotations

from components.search.graph import Branch, LossGraph, LossTree, branch_inputs, default_branch_weight, parse_prefix

TASK = "detection_cse"
OPERATOR_SET = "cse"

CE_CLS = "neg(dot(y,log(softmax(x))))"
FOCAL_CLS = "neg(dot(mul(y,mul(sub(1,softmax(x)),sub(1,softmax(x)))),log(softmax(x))))"
GIOU_REG = "sub(2,add(div(i,u),div(u,e)))"  # 1 − i/u + (e − u)/e
IOU_REG = "sub(1,div(i,u))"

CSE_A_CLS = "neg(dot(mul(y,add(1,sin(w))),log(softmax(x))))"
CSE_A_REG = "add(1,neg(add(div(i,u),neg(div(add(e,neg(add(i,2))),e)))))"

_WY = "mul(w,y)"
CSE_B_CLS = (f"neg(add(mul(mul({_WY},add(1,erf(sigmoid(sub(1,y))))),log(sigmoid(x))),"
             f"mul(mul(sub(gd(x),{_WY}),sub(sigmoid(x),{_WY})),log(sub(1,sigmoid(x))))))")
CSE_B_REG = ("div(add(add(add(add(mul(3,mul(e,u)),mul(3,mul(2,mul(2,e)))),mul(3,i)),mul(3,u)),mul(3,mul(2,3))),"
             "add(add(add(add(add(neg(mul(3,mul(e,u))),mul(i,u)),mul(u,u)),neg(mul(3,mul(add(2,3),e)))),"
             "mul(add(2,3),i)),mul(add(2,3),u)))")

PUBLISHED: dict[str, tuple[str | None, str | None]] = {
    "cse_autoloss_a": (CSE_A_CLS, CSE_A_REG),
    "cse_autoloss_b": (CSE_B_CLS, CSE_B_REG),
    "ce_giou_cse": (CE_CLS, GIOU_REG),
    "focal_giou_cse": (FOCAL_CLS, GIOU_REG),
}
"""name -> (classification tree, regression tree) of the graphs the `cse` method knows by name (seed losses,
baselines): the two published losses and the CE + GIoU / focal + GIoU references written in `cse` operators."""


def tree(text: str, branch: str) -> LossTree:
    """A `detection_cse` tree of `branch` ("cls" or "reg") from its prefix string."""
    return parse_prefix(text, OPERATOR_SET, branch_inputs(TASK, branch, OPERATOR_SET))


def graph(cls: str | None, reg: str | None) -> LossGraph:
    """The `detection_cse` graph of the given trees (either may be None), with the papers' branch weights."""
    branches = {name: Branch(tree(text, name), default_branch_weight(TASK, name))
                for name, text in (("cls", cls), ("reg", reg)) if text is not None}
    return LossGraph(TASK, branches)


def published_graph(name: str) -> LossGraph:
    """The graph registered under `name` in PUBLISHED (a KeyError for unknown names: callers word the error)."""
    return graph(*PUBLISHED[name])


__all__ = ["CE_CLS", "CSE_A_CLS", "CSE_A_REG", "CSE_B_CLS", "CSE_B_REG", "FOCAL_CLS", "GIOU_REG", "IOU_REG",
           "PUBLISHED", "graph", "published_graph", "tree"]
