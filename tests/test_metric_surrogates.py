"""Auto Seg-Loss surrogates: truth table (= exact metrics at one-hot inputs), naive relaxation at identity θ,
finite gradients, ignore label, JSON round trip and the standalone nn.Module export."""

import ast
import importlib.util
import json
import random
import zlib

import pytest
import torch
import torch.nn.functional as F

from components.surrogates import bezier
from components.errors import LossforgeError
from components.surrogates.metric_surrogates import (
    METRIC_CURVES,
    SurrogateLoss,
    SurrogateSpec,
    export_surrogate_module_source,
    load_surrogate,
    save_surrogate,
    write_surrogate_module,
)
from components.tasks.segmentation.metrics import METRIC_NAMES, compute_metric

torch.set_num_threads(1)  # small tensors: threads only cost time on a shared CPU
C = 4
ALL = {m: 1.0 for m in METRIC_NAMES}


def blocky_labels(gen, n, size, cells, ignore=True):
    """Random piecewise-constant label maps (so boundaries are sparse, like real masks), with an ignore patch."""
    low = torch.randint(0, C, (n, 1, cells, cells), generator=gen).float()
    lab = F.interpolate(low, size=(size, size), mode="nearest").long()[:, 0]
    if ignore:
        lab[0, 1:4, 2:9] = 255
    return lab


def random_spec(metrics, rng, family="bezier", pieces=2, extreme=False, **kw):
    spec = SurrogateSpec(dict(metrics), family=family, pieces=pieces, **kw)
    choices = [0.0, 1.0, 1e-9, rng.random()]
    flat = [rng.choice(choices) if extreme else rng.random() for _ in range(spec.dim)]
    return spec.with_flat_theta(flat)


# ----------------------------------------------------------------------------- truth table


@pytest.mark.parametrize("boundary,drop_bg", [("avgpool", None), ("minpool", None), ("avgpool", False), ("minpool", True)])
@pytest.mark.parametrize("family", ["bezier", "linear"])
def test_one_hot_inputs_give_the_exact_metrics(boundary, drop_bg, family):
    gen = torch.Generator().manual_seed(zlib.crc32(f"{boundary}{drop_bg}{family}".encode()))
    rng = random.Random(1)
    for trial in range(6):
        target = blocky_labels(gen, 2, 24, 6)
        pred = blocky_labels(gen, 2, 24, 8, ignore=False)
        if trial == 0:
            pred = torch.where(target == 255, pred, target)  # perfect prediction
        tol = 2 if trial % 2 else 5
        spec = random_spec(ALL, rng, family=family, pieces=2 + trial % 2, extreme=trial >= 3, boundary=boundary,
                           tolerance=tol, drop_background=drop_bg)
        loss = SurrogateLoss(spec, C)
        logits = F.one_hot(pred, C).permute(0, 3, 1, 2).float() * 200.0  # softmax is exactly one-hot
        scores = loss.scores(logits, target)
        for name in METRIC_NAMES:
            exact = compute_metric(name, pred, target, C, boundary=boundary, tolerance=tol, drop_background=drop_bg)
            assert abs(float(scores[name]) - exact) < 1e-5, (name, trial, float(scores[name]), exact)
        total = sum(1 - compute_metric(m, pred, target, C, boundary=boundary, tolerance=tol, drop_background=drop_bg)
                    for m in METRIC_NAMES)
        assert abs(float(loss(logits, target)) - total) < 1e-4


def test_perfect_prediction_has_zero_loss():
    gen = torch.Generator().manual_seed(0)
    target = blocky_labels(gen, 2, 16, 4)
    logits = F.one_hot(target.clamp(max=C - 1), C).permute(0, 3, 1, 2).float() * 200.0
    spec = random_spec(ALL, random.Random(0))
    assert abs(float(SurrogateLoss(spec, C)(logits, target))) < 1e-5


# ----------------------------------------------------------------------------- naive relaxation (independent)


def _pool(x, r, mode):
    """Min/max over the (2r+1)² window of in-image pixels, by explicit shifting (no max_pool)."""
    n, c, h, w = x.shape
    fill = float("inf") if mode == "min" else float("-inf")
    pad = torch.full((n, c, h + 2 * r, w + 2 * r), fill, dtype=x.dtype)
    pad[:, :, r:r + h, r:r + w] = x
    views = [pad[:, :, i:i + h, j:j + w] for i in range(2 * r + 1) for j in range(2 * r + 1)]
    stack = torch.stack(views)
    return stack.min(0).values if mode == "min" else stack.max(0).values


def naive_scores(probs, target, boundary="avgpool", tol=5, drop_bg=True, width=1):
    """Eq. 8 relaxation (AND = a·b, OR = a + b − a·b, XOR = OR − AND) written per class, float64."""
    probs = probs.double()
    valid = (target != 255).unsqueeze(1).double()
    y = F.one_hot(torch.where(target == 255, 0, target), C).permute(0, 3, 1, 2).double() * valid
    x = probs * valid
    hard = F.one_hot(probs.argmax(1), C).permute(0, 3, 1, 2).double() * valid
    out = {}
    inter = [(x[:, c] * y[:, c]).sum() for c in range(C)]
    gt = [y[:, c].sum() for c in range(C)]
    union = [(x[:, c] + y[:, c] - x[:, c] * y[:, c]).sum() for c in range(C)]
    out["gAcc"] = sum(inter) / sum(gt)
    acc = [inter[c] / gt[c] for c in range(C) if gt[c] > 0]
    out["mAcc"] = sum(acc) / len(acc)
    ious = [inter[c] / union[c] for c in range(C) if gt[c] > 0 or hard[:, c].sum() > 0]
    out["mIoU"] = sum(ious) / len(ious)
    out["FWIoU"] = sum(gt[c] / sum(gt) * inter[c] / union[c] for c in range(C) if gt[c] > 0)
    y_edge = y - _pool(y, width, "min")
    first = 1 if drop_bg else 0
    band = (y_edge[:, first:].sum(1, keepdim=True) > 0).double()
    if boundary == "avgpool":
        band = _pool(band, tol, "max")
    bious = []
    for c in range(C):
        bi = (x[:, c] * y[:, c] * band[:, 0]).sum()
        bu = ((x[:, c] + y[:, c] - x[:, c] * y[:, c]) * band[:, 0]).sum()
        if (y[:, c] * band[:, 0]).sum() > 0 or (hard[:, c] * band[:, 0]).sum() > 0:
            bious.append(bi / bu)
    out["BIoU"] = sum(bious) / len(bious)
    e = _pool(x, width, "min")
    x_edge = (x + e - x * e) - x * e
    hard_edge = hard - _pool(hard, width, "min")
    f1s = []
    for c in range(first, C):
        if y_edge[:, c].sum() == 0 and hard_edge[:, c].sum() == 0:
            continue
        p = (x_edge[:, c] * _pool(y_edge, tol, "max")[:, c]).sum() / x_edge[:, c].sum()
        r = (_pool(x_edge, tol, "max")[:, c] * y_edge[:, c]).sum() / y_edge[:, c].sum().clamp_min(1e-300)
        f1s.append(2 * p * r / (p + r))
    out["BF1"] = sum(f1s) / len(f1s)
    return out


@pytest.mark.parametrize("boundary", ["avgpool", "minpool"])
@pytest.mark.parametrize("family,pieces", [("bezier", 2), ("bezier", 3), ("linear", 2)])
def test_identity_theta_is_the_naive_relaxation(boundary, family, pieces):
    gen = torch.Generator().manual_seed(7)
    target = blocky_labels(gen, 2, 20, 5)
    logits = torch.randn(2, C, 20, 20, generator=gen) * 2.0
    spec = SurrogateSpec(ALL, family=family, pieces=pieces, boundary=boundary, tolerance=3)
    assert spec.flat_theta() == bezier.identity_theta(family, pieces) * len(spec.curve_names())
    scores = SurrogateLoss(spec, C).scores(logits, target)
    ref = naive_scores(torch.softmax(logits, 1), target, boundary, tol=3, drop_bg=spec.drop_background)
    for name in METRIC_NAMES:
        assert abs(float(scores[name]) - float(ref[name])) < 2e-5, (name, float(scores[name]), float(ref[name]))


def test_non_identity_theta_changes_the_surrogate():
    gen = torch.Generator().manual_seed(1)
    target = blocky_labels(gen, 1, 16, 4)
    logits = torch.randn(1, C, 16, 16, generator=gen)
    base = SurrogateLoss(SurrogateSpec({"mIoU": 1.0}), C)(logits, target)
    bent = SurrogateSpec({"mIoU": 1.0}, theta={"mIoU.and": [0.9, 0.1, 0.5, 0.5, 0.5, 0.5]})
    assert abs(float(SurrogateLoss(bent, C)(logits, target)) - float(base)) > 1e-3


# ----------------------------------------------------------------------------- gradients, ignore, training signal


@pytest.mark.parametrize("family", ["bezier", "linear"])
def test_gradients_finite_including_saturated_probabilities(family):
    gen = torch.Generator().manual_seed(3)
    rng = random.Random(3)
    target = blocky_labels(gen, 2, 16, 4)
    for scale in (1.0, 60.0, 1e4):  # 1e4: probabilities exactly 0 and 1 in float32
        for extreme in (False, True):
            logits = (torch.randn(2, C, 16, 16, generator=gen) * scale).requires_grad_()
            loss = SurrogateLoss(random_spec(ALL, rng, family=family, extreme=extreme), C)(logits, target)
            loss.backward()
            assert torch.isfinite(loss) and torch.isfinite(logits.grad).all(), (scale, extreme)


def test_ignore_pixels_do_not_count():
    gen = torch.Generator().manual_seed(4)
    target = blocky_labels(gen, 2, 16, 4)
    logits = torch.randn(2, C, 16, 16, generator=gen).requires_grad_()
    loss_fn = SurrogateLoss(random_spec(ALL, random.Random(4)), C)
    loss_fn(logits, target).backward()
    ignore = (target == 255).unsqueeze(1).expand_as(logits)
    assert float(logits.grad[ignore].abs().max()) == 0.0
    other = logits.detach().clone()
    other[ignore] = torch.randn(int(ignore.sum()), generator=gen) * 5
    assert float(loss_fn(other, target)) == pytest.approx(float(loss_fn(logits.detach(), target)), abs=1e-6)


@pytest.mark.parametrize("metric", ["mIoU", "BF1"])
def test_minimising_the_surrogate_improves_the_metric(metric):
    """Optimise free logits against the surrogate (random interior θ): the exact metric goes up."""
    gen = torch.Generator().manual_seed(5)
    target = blocky_labels(gen, 2, 24, 4)
    logits = (torch.randn(2, C, 24, 24, generator=gen) * 0.5).requires_grad_()
    spec = random_spec({metric: 1.0}, random.Random(5), tolerance=1)  # tolerance 5 is lax on 24-px maps
    loss_fn = SurrogateLoss(spec, C)
    before = compute_metric(metric, logits.argmax(1), target, C, tolerance=1)
    opt = torch.optim.Adam([logits], lr=0.1)
    for _ in range(60):
        opt.zero_grad()
        loss_fn(logits, target).backward()
        opt.step()
    after = compute_metric(metric, logits.argmax(1), target, C, tolerance=1)
    assert after > before + 0.2, (before, after)


def test_combined_loss_is_the_weighted_sum():
    gen = torch.Generator().manual_seed(6)
    target = blocky_labels(gen, 2, 16, 4)
    logits = torch.randn(2, C, 16, 16, generator=gen)
    rng = random.Random(6)
    spec = random_spec({"mIoU": 1.0, "BF1": 0.5}, rng)
    scores = SurrogateLoss(spec, C).scores(logits, target)
    assert set(scores) == {"mIoU", "BF1"}
    expected = (1 - scores["mIoU"]) + 0.5 * (1 - scores["BF1"])
    assert float(SurrogateLoss(spec, C)(logits, target)) == pytest.approx(float(expected), abs=1e-6)
    assert spec.curve_names() == ["mIoU.and", "mIoU.or", "BF1.xor_and", "BF1.xor_or", "BF1.prec_and", "BF1.recall_and"]
    assert spec.dim == 6 * 6


def test_bad_inputs_are_clear_errors():
    loss_fn = SurrogateLoss(SurrogateSpec({"miou": 1}), C)
    assert list(loss_fn.spec.metrics) == ["mIoU"]  # aliases are canonicalised
    with pytest.raises(LossforgeError, match="label 7"):
        loss_fn(torch.zeros(1, C, 4, 4), torch.full((1, 4, 4), 7))
    with pytest.raises(LossforgeError, match="logits must be"):
        loss_fn(torch.zeros(1, C + 1, 4, 4), torch.zeros(1, 4, 4, dtype=torch.long))
    with pytest.raises(LossforgeError, match="unknown segmentation metric"):
        SurrogateSpec({"dice": 1.0})
    with pytest.raises(LossforgeError, match="weight"):
        SurrogateSpec({"mIoU": -1.0})
    with pytest.raises(LossforgeError, match="unknown curve 'mIoU.xor'"):
        SurrogateSpec({"mIoU": 1.0}, theta={"mIoU.xor": [0.5] * 6})
    with pytest.raises(LossforgeError, match=r"theta\[mIoU.and\]"):
        SurrogateSpec({"mIoU": 1.0}, theta={"mIoU.and": [0.5] * 4})


# ----------------------------------------------------------------------------- persistence and export


def test_json_round_trip_and_errors(tmp_path):
    spec = random_spec({"mIoU": 1.0, "BF1": 2.0}, random.Random(8), boundary="minpool", tolerance=3)
    path = save_surrogate(spec, tmp_path / "s.json", meta={"reward": 0.5})
    data = json.loads(path.read_text())
    assert data["format"] == "lossforge.surrogate/1" and data["meta"] == {"reward": 0.5}
    assert data["control_points"]["mIoU.and"][0] == [0.0, 0.0] and len(data["control_points"]["BF1.prec_and"]) == 5
    again = load_surrogate(path)
    assert again == spec
    bad = dict(data, theta=dict(data["theta"], **{"mIoU.or": [0.2] * 6}))
    (tmp_path / "b.json").write_text(json.dumps(bad))
    with pytest.raises(LossforgeError, match="b.json: control_points do not match"):
        load_surrogate(tmp_path / "b.json")
    (tmp_path / "c.json").write_text(json.dumps(dict(data, format="lossforge.loss/1")))
    with pytest.raises(LossforgeError, match="c.json: format"):
        load_surrogate(tmp_path / "c.json")
    (tmp_path / "d.json").write_text("{not json")
    with pytest.raises(LossforgeError, match="d.json"):
        load_surrogate(tmp_path / "d.json")
    (tmp_path / "e.json").write_text(json.dumps({"format": "lossforge.surrogate/1", "metrics": {"mIoU": 1}, "family": "cubic"}))
    with pytest.raises(LossforgeError, match="e.json: curve family"):
        load_surrogate(tmp_path / "e.json")


@pytest.mark.parametrize("family", ["bezier", "linear"])
def test_standalone_export_equals_surrogate_loss(tmp_path, family):
    spec = random_spec({"mIoU": 1.0, "BF1": 1.0, "mAcc": 0.3, "BIoU": 1.0}, random.Random(9), family=family,
                       pieces=3 if family == "linear" else 2)
    source = export_surrogate_module_source(spec, "MyLoss")
    imports = {a.name.split(".")[0] for node in ast.walk(ast.parse(source)) if isinstance(node, (ast.Import, ast.ImportFrom))
               for a in (node.names if isinstance(node, ast.Import) else [ast.alias(node.module)])}
    assert imports == {"torch"}
    path = write_surrogate_module(spec, tmp_path / "my_loss.py", "MyLoss")
    mod_spec = importlib.util.spec_from_file_location("my_loss", path)
    module = importlib.util.module_from_spec(mod_spec)
    mod_spec.loader.exec_module(module)
    exported, reference = module.MyLoss(), SurrogateLoss(spec, C)
    gen = torch.Generator().manual_seed(10)
    for _ in range(3):
        target = blocky_labels(gen, 2, 16, 4)
        logits = (torch.randn(2, C, 16, 16, generator=gen) * 3).requires_grad_()
        a, b = exported(logits, target), reference(logits, target)
        assert float(a.detach()) == float(b.detach())
        ga, = torch.autograd.grad(a, logits)
        gb, = torch.autograd.grad(b, logits)
        torch.testing.assert_close(ga, gb, atol=0, rtol=0)


def test_loss_registry_builds_a_saved_surrogate(tmp_path):
    from components.tasks.loss_registry import build_loss

    spec = random_spec({"FWIoU": 1.0}, random.Random(11))
    path = save_surrogate(spec, tmp_path / "fw.json")
    loss = build_loss({"type": "surrogate", "path": str(path)}, num_classes=C)
    gen = torch.Generator().manual_seed(12)
    target, logits = blocky_labels(gen, 1, 12, 3), torch.randn(1, C, 12, 12, generator=gen)
    assert float(loss(logits, target)) == float(SurrogateLoss(spec, C)(logits, target))
