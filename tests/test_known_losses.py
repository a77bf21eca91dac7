"""Published losses as test vectors: AutoLoss-Zero Table 8 and CSE-AutoLoss-A.

Each example JSON must load, print back its formula, evaluate to finite values on random inputs of
the right shape, and agree with an independent torch implementation of the paper's formula written
here by hand (with Table 1's ε guards: log/sqrt sign-preserving with ε, divisions 1/(x+ε)).
"""

import math
from pathlib import Path

import pytest
import torch

from components.search.graph import parse_prefix, reduce_eq3
from components.search.graph_json import load_graph

EXAMPLES_DIR = Path(__file__).resolve().parents[1] / "examples" / "losses"
EPS = 1e-12


def slog(x):
    return torch.sign(x) * torch.log(x.abs() + EPS)


def ssqrt(x):
    return torch.sign(x) * torch.sqrt(x.abs() + EPS)


def div(a, b):
    return a * (1.0 / (b + EPS))


def maxpool(x):
    n, c, h, w = x.shape
    padded = torch.nn.functional.pad(x, (1, 1, 1, 1), value=float("-inf"))
    windows = padded.unfold(2, 3, 1).unfold(3, 3, 1)  # (n, c, h, w, 3, 3)
    return windows.amax(dim=(-1, -2))


def minpool(x):
    return -maxpool(-x)


def mean_nhw(x):
    return x.mean(dim=(0, 2, 3), keepdim=True).expand_as(x)


# name -> (paper formula as printed in Table 8, reference o(y_hat, y) or o(i, u, e))
SEG = {
    "autolosszero_seg_miou": lambda p, y: -0.5 * slog(torch.tanh(div(y, 1 + y) * ssqrt(p)) * (p**2 + y)),
    "autolosszero_seg_fwiou": lambda p, y: slog(y * slog(y + div(y + p, p))),
    "autolosszero_seg_gacc": lambda p, y: torch.exp((y - ssqrt(p)) ** 2),
    "autolosszero_seg_macc": lambda p, y: torch.tanh(ssqrt(mean_nhw(-slog(p) * ssqrt(maxpool(ssqrt(2 * y)))))),
    "autolosszero_seg_biou": lambda p, y: -slog(
        p**3 * y * ssqrt(-minpool(-p)) * torch.exp((p * torch.exp(p)) ** 2)
    ),
    "autolosszero_seg_bf1": lambda p, y: torch.exp(
        mean_nhw(-maxpool(y) * slog(maxpool(p))) + torch.tanh(mean_nhw(2 * p + 1))
    ),
}
CLS = {
    "autolosszero_det_cls_rpn": ("detection", "cls_rpn", lambda p, y: div(torch.exp(torch.tanh(y)), p)),
    "autolosszero_det_cls_rcnn": ("detection", "cls_rcnn", lambda p, y: -y * slog(p)),
    "autolosszero_ins_cls_rpn": ("instance_segmentation", "cls_rpn", lambda p, y: -div(y * p, torch.tanh(p))),
    "autolosszero_ins_cls_rcnn": ("instance_segmentation", "cls_rcnn", lambda p, y: -y * slog(p)),
    "autolosszero_ins_mask": ("instance_segmentation", "mask", lambda p, y: slog(y * p).abs()),
    "autolosszero_pose": ("pose", "heatmap", lambda p, y: (p - 16 * y**4) ** 2 + p**4),
}
REG = {
    "autolosszero_det_reg_rpn": ("detection", "reg_rpn", lambda i, u, e: div(e, i + u)),
    "autolosszero_det_reg_rcnn": ("detection", "reg_rcnn", lambda i, u, e: -slog(div(i, e))),
    "autolosszero_ins_reg_rpn": ("instance_segmentation", "reg_rpn", lambda i, u, e: div(e, i + u)),
    "autolosszero_ins_reg_rcnn": ("instance_segmentation", "reg_rcnn", lambda i, u, e: -div(ssqrt(i), ssqrt(e))),
}
ALL_BRANCHES = ["autolosszero_det_all_branches", "autolosszero_ins_all_branches"]
CSE = ["cse_autoloss_a_cls", "cse_autoloss_a_reg", "cse_autoloss_a"]


def seg_inputs(seed, n=2, c=5, h=6, w=7):
    g = torch.Generator().manual_seed(seed)
    p = torch.softmax(torch.randn(n, c, h, w, generator=g, dtype=torch.float64), dim=1)
    labels = torch.randint(0, c, (n, h, w), generator=g)
    y = torch.nn.functional.one_hot(labels, c).permute(0, 3, 1, 2).to(torch.float64)
    return p, y


def box_inputs(seed, n=8):
    """i, u, e of random predicted/target boxes (x1, y1, x2, y2), shape (n, 1, 1, 1)."""
    g = torch.Generator().manual_seed(seed)
    a = torch.rand(n, 2, generator=g, dtype=torch.float64)
    pred = torch.cat([a, a + 0.2 + torch.rand(n, 2, generator=g, dtype=torch.float64)], 1)
    b = a + 0.3 * torch.rand(n, 2, generator=g, dtype=torch.float64)
    gt = torch.cat([b, b + 0.2 + torch.rand(n, 2, generator=g, dtype=torch.float64)], 1)

    def area(bx):
        return (bx[:, 2] - bx[:, 0]).clamp(min=0) * (bx[:, 3] - bx[:, 1]).clamp(min=0)

    lt, rb = torch.maximum(pred[:, :2], gt[:, :2]), torch.minimum(pred[:, 2:], gt[:, 2:])
    inter = area(torch.cat([lt, rb], 1))
    union = area(pred) + area(gt) - inter
    enclose = area(torch.cat([torch.minimum(pred[:, :2], gt[:, :2]), torch.maximum(pred[:, 2:], gt[:, 2:])], 1))
    shape = (n, 1, 1, 1)
    return inter.reshape(shape), union.reshape(shape), enclose.reshape(shape)


def test_every_table8_loss_and_cse_loss_has_an_example():
    names = {p.stem for p in EXAMPLES_DIR.glob("*.json")}
    expected = set(SEG) | set(CLS) | set(REG) | set(ALL_BRANCHES) | set(CSE)
    assert names == expected
    assert len(SEG) + len(CLS) + len(REG) == 16  # 6 seg + 4 det + 5 ins + 1 pose rows of Table 8


@pytest.mark.parametrize("name", sorted(SEG))
def test_segmentation_losses_match_the_paper(name):
    graph = load_graph(EXAMPLES_DIR / f"{name}.json")
    assert graph.task == "segmentation" and list(graph.branches) == ["seg"]
    for seed in range(3):
        p, y = seg_inputs(seed)
        o = graph.branches["seg"].tree.evaluate({"y_hat": p, "y": y})
        assert torch.isfinite(o).all()
        assert torch.allclose(o, SEG[name](p, y), rtol=1e-9, atol=1e-9)
        total = graph.total({"seg": {"y_hat": p, "y": y}})
        assert torch.isfinite(total) and total == pytest.approx(reduce_eq3(SEG[name](p, y)).item(), rel=1e-9)


@pytest.mark.parametrize("name", sorted(CLS))
def test_classification_mask_and_pose_losses_match_the_paper(name):
    task, branch, ref = CLS[name]
    graph = load_graph(EXAMPLES_DIR / f"{name}.json")
    assert graph.task == task and list(graph.branches) == [branch]
    if task == "pose":  # regressed heatmaps (any sign) against Gaussian targets
        g = torch.Generator().manual_seed(0)
        p = torch.randn(4, 17, 8, 6, generator=g, dtype=torch.float64)
        yy, xx = torch.meshgrid(torch.arange(8.0), torch.arange(6.0), indexing="ij")
        y = torch.exp(-((yy - 4) ** 2 + (xx - 3) ** 2) / 4).expand(4, 17, 8, 6).to(torch.float64)
    else:  # (N boxes, C classes, 1, 1); mask: (RoIs, 2, 7, 7)
        p, y = seg_inputs(1, 6, 2, 7, 7) if branch == "mask" else seg_inputs(1, 6, 81, 1, 1)
    o = graph.branches[branch].tree.evaluate({"y_hat": p, "y": y})
    assert torch.isfinite(o).all()
    assert torch.allclose(o, ref(p, y), rtol=1e-9, atol=1e-9)
    assert torch.isfinite(graph.total({branch: {"y_hat": p, "y": y}}))


@pytest.mark.parametrize("name", sorted(REG))
def test_box_regression_losses_match_the_paper(name):
    task, branch, ref = REG[name]
    graph = load_graph(EXAMPLES_DIR / f"{name}.json")
    i, u, e = box_inputs(0)
    o = graph.branches[branch].tree.evaluate({"i": i, "u": u, "e": e})
    assert torch.isfinite(o).all()
    assert torch.allclose(o, ref(i, u, e), rtol=1e-9, atol=1e-9)
    assert graph.branches[branch].weight == 10.0  # paper A.2: regression branches weighted 10
    assert graph.total({branch: {"i": i, "u": u, "e": e}}).item() == pytest.approx(
        10 * ref(i, u, e).sum().item() / i.shape[0], rel=1e-9)


@pytest.mark.parametrize("name", ALL_BRANCHES)
def test_all_branch_graphs_sum_the_single_branch_losses(name):
    graph = load_graph(EXAMPLES_DIR / f"{name}.json")
    abbr = "det" if graph.task == "detection" else "ins"
    p, y = seg_inputs(2, 6, 81, 1, 1)
    pm, ym = seg_inputs(3, 6, 2, 7, 7)
    i, u, e = box_inputs(2)
    inputs = {}
    expected = 0.0
    for branch in graph.branches:
        inputs[branch] = {"i": i, "u": u, "e": e} if branch.startswith("reg") else (
            {"y_hat": pm, "y": ym} if branch == "mask" else {"y_hat": p, "y": y})
        single = load_graph(EXAMPLES_DIR / f"autolosszero_{abbr}_{branch}.json")
        expected += single.total({branch: inputs[branch]}).item()
    assert graph.total(inputs).item() == pytest.approx(expected, rel=1e-12)


def cse_inputs(seed, n=6, c=4):
    g = torch.Generator().manual_seed(seed)
    x = torch.randn(n, c, 1, 1, generator=g, dtype=torch.float64)
    labels = torch.randint(0, c, (n,), generator=g)
    y = torch.nn.functional.one_hot(labels, c).to(torch.float64).reshape(n, c, 1, 1)
    w = torch.rand(n, 1, 1, 1, generator=g, dtype=torch.float64).expand(n, c, 1, 1)
    return x, y, w, labels


def test_cse_autoloss_a_classification():
    graph = load_graph(EXAMPLES_DIR / "cse_autoloss_a_cls.json")
    tree = graph.branches["cls"].tree
    assert tree.operator_set == "cse"
    assert graph.formula() == "-dot(y * (1 + sin(w)), log(softmax(x)))"
    # the peer string parses to the same tree once Z (the IoU weight) is named w
    peer = parse_prefix("Neg(Dot(Mul(Y,Add(1,Sin(Z))),Log(Softmax(X))))", "cse", tree.inputs,
                        {"X": "x", "Y": "y", "Z": "w"})
    assert peer == tree
    x, y, w, labels = cse_inputs(0)
    o = tree.evaluate({"x": x, "y": y, "w": w})
    assert torch.isfinite(o).all()
    # slides: -dot((1 + sin(w)) y, log(softmax(x))) = (1 + sin w) · CE per box
    ce = torch.nn.functional.cross_entropy(x.reshape(6, 4), labels, reduction="none")
    per_box = (1 + torch.sin(w[:, 0, 0, 0])) * ce
    assert torch.allclose(o[:, 0, 0, 0], per_box, rtol=1e-9)
    # dot is broadcast back over the C channels, so Eq. 3 counts each box C times
    assert graph.total({"cls": {"x": x, "y": y, "w": w}}).item() == pytest.approx(4 * per_box.mean().item(), rel=1e-9)


def test_cse_autoloss_a_regression():
    graph = load_graph(EXAMPLES_DIR / "cse_autoloss_a_reg.json")
    tree = graph.branches["reg"].tree
    peer = parse_prefix("Add(1,Neg(Add(Div(I,U),Neg(Div(Add(E,Neg(Add(I,2))),E)))))", "cse", tree.inputs,
                        {"I": "i", "U": "u", "E": "e"})
    assert peer == tree
    i, u, e = box_inputs(1)
    o = tree.evaluate({"i": i, "u": u, "e": e})
    slides = (1 - i / u) + (1 - (i + 2) / e)  # CSE-AutoLoss-A_reg as printed on the slides
    assert torch.isfinite(o).all() and torch.allclose(o, slides, rtol=1e-9)
    assert graph.branches["reg"].weight == 10.0


@pytest.mark.parametrize("path", sorted(EXAMPLES_DIR.glob("*.json")), ids=lambda p: p.stem)
def test_every_example_prints_back(path):
    graph = load_graph(path)
    text = graph.formula()
    assert text and "None" not in text
    for b in graph.branches.values():
        assert parse_prefix(b.tree.canonical(), b.tree.operator_set, b.tree.inputs) == b.tree
    import json

    stored = json.loads(path.read_text())
    assert stored["formula"] == text and stored["hash"] == graph.hash() and stored["canonical"] == graph.canonical()


def test_batched_evaluation_of_an_example_matches_per_sample():
    """Screening stacks B problems as (B, 1, C, H, W): each must equal the unbatched loss."""
    graph = load_graph(EXAMPLES_DIR / "autolosszero_seg_bf1.json")
    samples = [seg_inputs(s, 1) for s in range(3)]
    p = torch.stack([s[0] for s in samples])
    y = torch.stack([s[1] for s in samples])
    batched = graph.total({"seg": {"y_hat": p, "y": y}})
    assert batched.shape == (3,)
    for b, (pb, yb) in enumerate(samples):
        assert batched[b].item() == pytest.approx(graph.total({"seg": {"y_hat": pb, "y": yb}}).item(), rel=1e-12)
    assert math.isfinite(batched.sum().item())
