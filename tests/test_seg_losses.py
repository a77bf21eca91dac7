"""Tests for components/tasks/segmentation/baselines.py: behaviour, hand computations and brute-force Lovász extension."""

from __future__ import annotations

import itertools
import math

import pytest
import torch

from components.errors import LossforgeError
from components.tasks.segmentation.baselines import (
    BASELINE_LOSSES,
    BinarySoftIoULoss,
    CrossEntropyLoss,
    DiceLoss,
    FocalLoss,
    LovaszSoftmaxLoss,
    SoftIoULoss,
    WeightedCrossEntropyLoss,
    build_baseline,
    class_histogram,
    class_weights_from_histogram,
)

IGN = 255
NAMES = sorted(BASELINE_LOSSES)
LOG4 = math.log(4.0)


def _batch(seed=0, n=2, c=4, size=8):
    g = torch.Generator().manual_seed(seed)
    logits = torch.randn(n, c, size, size, generator=g)
    target = torch.randint(0, c, (n, size, size), generator=g)
    target[0, :2] = IGN
    return logits, target


def _confident(target, c, scale=30.0):
    onehot = torch.nn.functional.one_hot(target.clamp(0, c - 1), c).permute(0, 3, 1, 2).float()
    return scale * (2 * onehot - 1)


# ----------------------------------------------------------------------------- behaviour of every baseline


def test_registry_names():
    assert set(BASELINE_LOSSES) == {"ce", "weighted_ce", "dice", "lovasz", "focal", "soft_iou", "soft_iou_binary"}
    for name, cls in BASELINE_LOSSES.items():
        loss = cls()
        assert isinstance(loss, torch.nn.Module) and cls.__doc__
        assert isinstance(loss.describe(), str) and loss.describe()
        assert type(build_baseline(name)) is cls


@pytest.mark.parametrize("name", NAMES)
def test_finite_nonnegative_with_finite_gradients(name):
    logits, target = _batch(1)
    logits.requires_grad_(True)
    loss = BASELINE_LOSSES[name]()(logits, target)
    assert loss.dim() == 0 and torch.isfinite(loss) and float(loss.detach()) >= 0
    loss.backward()
    assert torch.isfinite(logits.grad).all() and logits.grad.abs().sum() > 0


@pytest.mark.parametrize("name", NAMES)
def test_perfect_prediction_minimal_and_wrong_prediction_larger(name):
    _, target = _batch(2)
    c = 4
    loss = BASELINE_LOSSES[name]()
    perfect = float(loss(_confident(target, c), target))
    wrong = float(loss(_confident((target + 1) % c, c), target))
    random = float(loss(_batch(3)[0], target))
    assert perfect < 1e-4, perfect
    assert wrong > random > perfect


@pytest.mark.parametrize("name", NAMES)
def test_ignored_pixels_do_not_affect_value_or_gradient(name):
    logits, target = _batch(4)
    target[:, :, 5:] = IGN  # columns 5.. ignored everywhere
    loss = BASELINE_LOSSES[name]()
    x = logits.clone().requires_grad_(True)
    value = loss(x, target)
    value.backward()
    # same value when the ignored pixels' logits change wildly
    changed = logits.clone()
    changed[:, :, :, 5:] = 100 * torch.randn_like(changed[:, :, :, 5:])
    assert float(loss(changed, target)) == pytest.approx(float(value.detach()), rel=1e-6, abs=1e-7)
    # same value as on the crop without them, and no gradient reaches them
    assert float(loss(logits[..., :5], target[..., :5])) == pytest.approx(float(value.detach()), rel=1e-6, abs=1e-7)
    assert x.grad[..., 5:].abs().max() == 0


@pytest.mark.parametrize("name", NAMES)
def test_all_ignored_batch_gives_differentiable_zero(name):
    logits = torch.randn(1, 3, 4, 4, requires_grad=True)
    loss = BASELINE_LOSSES[name]()(logits, torch.full((1, 4, 4), IGN))
    loss.backward()
    assert float(loss.detach()) == 0.0 and torch.equal(logits.grad, torch.zeros_like(logits))


@pytest.mark.parametrize("name", NAMES)
def test_bad_inputs_raise_clear_errors(name):
    loss = BASELINE_LOSSES[name]()
    logits = torch.randn(1, 3, 4, 4)
    with pytest.raises(LossforgeError, match="target label 7 outside"):
        loss(logits, torch.full((1, 4, 4), 7))
    with pytest.raises(LossforgeError, match="does not match logits"):
        loss(logits, torch.zeros(1, 4, 5, dtype=torch.long))
    with pytest.raises(LossforgeError, match="integer class labels"):
        loss(logits, torch.zeros(1, 4, 4))


def test_build_baseline_errors():
    with pytest.raises(LossforgeError, match="unknown baseline loss 'tversky'"):
        build_baseline("tversky")
    with pytest.raises(LossforgeError, match="bad options"):
        build_baseline("focal", gama=2)
    with pytest.raises(LossforgeError, match="scheme"):
        WeightedCrossEntropyLoss(scheme="log")
    with pytest.raises(LossforgeError, match="classes"):
        DiceLoss(classes="some")
    with pytest.raises(LossforgeError, match="3 class weights for 4 classes"):
        WeightedCrossEntropyLoss(weights=[1, 2, 3])(*_batch(0))


# ----------------------------------------------------------------------------- hand computations

# Two pixels, C = 2. Logits [0, log 4] give softmax (0.2, 0.8); logits [0, 0] give (0.5, 0.5).
# Pixel A: p = (0.2, 0.8), y = 1.  Pixel B: p = (0.5, 0.5), y = 0.  A third pixel is ignored.
HAND_LOGITS = torch.tensor([[[[0.0, 0.0, 9.0]], [[LOG4, 0.0, -9.0]]]])  # (1, 2, 1, 3)
HAND_TARGET = torch.tensor([[[1, 0, IGN]]])


def test_soft_iou_multiclass_hand():
    # class 0: I = 0.2*0 + 0.5*1 = 0.5 ; U = (0.2+0-0) + (0.5+1-0.5) = 1.2 -> 1 - 0.5/1.2 = 7/12
    # class 1: I = 0.8 ; U = (0.8+1-0.8) + (0.5+0-0) = 1.5 -> 1 - 0.8/1.5 = 7/15 ; mean = 21/40
    assert float(SoftIoULoss()(HAND_LOGITS, HAND_TARGET)) == pytest.approx(21 / 40, rel=1e-6)


def test_soft_iou_binary_hand():
    # C = 2, foreground = not background: p_fg = (0.8, 0.5), y = (1, 0): I = 0.8, U = 1 + 0.5 -> 7/15
    assert float(BinarySoftIoULoss()(HAND_LOGITS, HAND_TARGET)) == pytest.approx(7 / 15, rel=1e-6)
    # explicit foreground class 0: p = (0.2, 0.5), y = (0, 1): I = 0.5, U = 0.2 + 1 -> 1 - 0.5/1.2 = 7/12
    assert float(BinarySoftIoULoss(foreground_class=0)(HAND_LOGITS, HAND_TARGET)) == pytest.approx(7 / 12, rel=1e-6)
    # one sigmoid channel, the blog's form: logits (0, log 4, -log 4) -> p = (0.5, 0.8, 0.2), y = (1, 1, 0)
    # I = 0.5 + 0.8 = 1.3 ; U = 1 + 1 + 0.2 = 2.2 -> 1 - 1.3/2.2 = 9/22
    x = torch.tensor([[[[0.0, LOG4, -LOG4, 5.0]]]])
    y = torch.tensor([[[1, 1, 0, IGN]]])
    assert float(BinarySoftIoULoss()(x, y)) == pytest.approx(9 / 22, rel=1e-6)


def test_dice_hand():
    # class 0: 2*0.5 / (0.7 + 1) ; class 1: 2*0.8 / (1.3 + 1) ; loss = 1 - mean
    want = 1 - (1 / 1.7 + 1.6 / 2.3) / 2
    assert float(DiceLoss()(HAND_LOGITS, HAND_TARGET)) == pytest.approx(want, rel=1e-6)
    # with smoothing s = 1: (2I + 1)/(Σp + Σy + 1)
    want = 1 - ((1 + 1) / 2.7 + (1.6 + 1) / 3.3) / 2
    assert float(DiceLoss(smooth=1.0)(HAND_LOGITS, HAND_TARGET)) == pytest.approx(want, rel=1e-6)


def test_focal_hand_and_gamma_zero_is_ce():
    # pixel A: p_t = 0.8 -> (1-0.8)^2 * -log 0.8 ; pixel B: p_t = 0.5 -> 0.5^2 * -log 0.5 ; mean of the two
    a, b = 0.04 * -math.log(0.8), 0.25 * -math.log(0.5)
    assert float(FocalLoss(gamma=2)(HAND_LOGITS, HAND_TARGET)) == pytest.approx((a + b) / 2, rel=1e-6)
    # per-class alpha (0.25 for class 0, 0.75 for class 1): A (class 1) x 0.75, B (class 0) x 0.25
    got = float(FocalLoss(gamma=2, alpha=[0.25, 0.75])(HAND_LOGITS, HAND_TARGET))
    assert got == pytest.approx((0.75 * a + 0.25 * b) / 2, rel=1e-6)
    logits, target = _batch(5)
    assert float(FocalLoss(gamma=0)(logits, target)) == pytest.approx(float(CrossEntropyLoss()(logits, target)), rel=1e-6)


def test_class_weights_hand():
    hist = [6, 2, 0, 4]  # total 12, frequencies (1/2, 1/6, 0, 1/3)
    # inverse frequency: total / (C * n_c) = 12/24, 12/8, -, 12/16 ; absent class -> 0
    assert class_weights_from_histogram(hist, "inverse_frequency").tolist() == pytest.approx([0.5, 1.5, 0.0, 0.75])
    # median frequency over present classes = median(1/2, 1/6, 1/3) = 1/3 -> (2/3, 2, 0, 1)
    assert class_weights_from_histogram(hist, "median_frequency").tolist() == pytest.approx([2 / 3, 2.0, 0.0, 1.0])
    masks = [torch.tensor([[0, 0, 0], [1, 3, IGN]]), torch.tensor([[0, 0, 0], [1, 3, 3]]), torch.tensor([[3, IGN]])]
    assert class_histogram(masks, 4).tolist() == hist
    with pytest.raises(LossforgeError, match="histogram"):
        class_weights_from_histogram([0, 0])


def test_weighted_ce_hand():
    # weights (w0, w1) = (1, 3): loss = (3 * -log 0.8 + 1 * -log 0.5) / (3 + 1)
    want = (3 * -math.log(0.8) + -math.log(0.5)) / 4
    assert float(WeightedCrossEntropyLoss(weights=[1.0, 3.0])(HAND_LOGITS, HAND_TARGET)) == pytest.approx(want, rel=1e-6)
    # histogram (3, 1) with inverse frequency -> weights (4/6, 4/2) = (2/3, 2) -> same ratio 1:3
    got = float(WeightedCrossEntropyLoss(histogram=[3, 1], scheme="inverse_frequency")(HAND_LOGITS, HAND_TARGET))
    assert got == pytest.approx(want, rel=1e-6)
    # per-batch weights: one pixel of each class -> equal weights -> plain CE
    assert float(WeightedCrossEntropyLoss()(HAND_LOGITS, HAND_TARGET)) == pytest.approx(
        float(CrossEntropyLoss()(HAND_LOGITS, HAND_TARGET)), rel=1e-6
    )


# ----------------------------------------------------------------------------- Lovász: brute force


def _jaccard_set_loss(mistakes: frozenset, fg: frozenset) -> float:
    """Δ_J(M) = |M| / |fg ∪ M| (0 for the empty set): the Jaccard loss when the pixels in M are wrong."""
    return len(mistakes) / len(fg | mistakes) if mistakes else 0.0


def _lovasz_by_permutations(errors: list[float], fg: frozenset) -> float:
    """Brute force: for a submodular Δ the Lovász extension is the max over ALL orderings of
    Σ_i m_σ(i) (Δ(S_i) − Δ(S_{i−1})) (Edmonds' greedy theorem), here enumerated exhaustively."""
    best = -math.inf
    for perm in itertools.permutations(range(len(errors))):
        total, prev, s = 0.0, 0.0, set()
        for i in perm:
            s.add(i)
            cur = _jaccard_set_loss(frozenset(s), fg)
            total += errors[i] * (cur - prev)
            prev = cur
        best = max(best, total)
    return best


def _lovasz_by_thresholds(errors: list[float], fg: frozenset) -> float:
    """Lovász extension as the integral ∫_0^1 Δ({i : m_i ≥ t}) dt, evaluated exactly on the breakpoints."""
    levels = sorted(set(errors) | {0.0}, reverse=True)
    total = 0.0
    for hi, lo in zip(levels, levels[1:]):
        total += (hi - lo) * _jaccard_set_loss(frozenset(i for i, m in enumerate(errors) if m >= hi), fg)
    return total


@pytest.mark.parametrize("seed", [0, 1, 2])
def test_lovasz_matches_brute_force_extension(seed):
    g = torch.Generator().manual_seed(seed)
    c = 3
    logits = 2 * torch.randn(1, c, 2, 4, generator=g)
    target = torch.tensor([[[0, 1, 1, 2], [2, 1, IGN, 0]]])
    probs = logits.softmax(1)[0].reshape(c, -1)
    labels = target.reshape(-1).tolist()
    keep = [i for i, lab in enumerate(labels) if lab != IGN]  # 7 valid pixels
    per_class_perm, per_class_thr = [], []
    for k in range(c):
        fg = frozenset(j for j, i in enumerate(keep) if labels[i] == k)
        errors = [abs((1.0 if labels[i] == k else 0.0) - float(probs[k, i])) for i in keep]
        per_class_perm.append(_lovasz_by_permutations(errors, fg))
        per_class_thr.append(_lovasz_by_thresholds(errors, fg))
    assert per_class_perm == pytest.approx(per_class_thr, abs=1e-9)  # the two brute forces agree
    got = float(LovaszSoftmaxLoss()(logits, target))
    assert got == pytest.approx(sum(per_class_perm) / c, rel=1e-5)


def test_lovasz_at_hard_predictions_is_one_minus_iou():
    # with one-hot probabilities the extension equals the set function: mean over present classes of 1 - IoU_c
    target = torch.tensor([[[0, 0, 1, 1, 2, 2]]])
    pred = torch.tensor([[[0, 1, 1, 1, 2, 0]]])
    onehot = torch.nn.functional.one_hot(pred, 3).permute(0, 3, 1, 2).float()
    logits = torch.log(onehot.clamp_min(1e-30))  # softmax gives exactly the one-hot (up to 1e-30)
    # IoU0 = 1/3 (pixel 0 right; pixels 1, 5 wrong), IoU1 = 2/3, IoU2 = 1/2
    want = ((1 - 1 / 3) + (1 - 2 / 3) + (1 - 1 / 2)) / 3
    assert float(LovaszSoftmaxLoss()(logits, target)) == pytest.approx(want, abs=1e-6)


def test_lovasz_matches_segmentation_models_pytorch():
    smp = pytest.importorskip("segmentation_models_pytorch")
    logits, target = _batch(7, c=5)
    ours = LovaszSoftmaxLoss()(logits, target)
    theirs = smp.losses.LovaszLoss("multiclass", ignore_index=IGN)(logits, target)
    assert float(ours) == pytest.approx(float(theirs), rel=1e-5)
    ours = LovaszSoftmaxLoss(per_image=True)(logits, target)
    theirs = smp.losses.LovaszLoss("multiclass", per_image=True, ignore_index=IGN)(logits, target)
    assert float(ours) == pytest.approx(float(theirs), rel=1e-5)


def test_present_versus_all_classes():
    # class 2 absent from the target: "all" counts it (soft IoU of an absent class is 1), "present" does not
    logits = torch.randn(1, 3, 4, 4, generator=torch.Generator().manual_seed(0))
    target = torch.randint(0, 2, (1, 4, 4), generator=torch.Generator().manual_seed(1))
    present = float(SoftIoULoss(classes="present")(logits, target))
    every = float(SoftIoULoss(classes="all")(logits, target))
    assert every == pytest.approx((2 * present + 1.0) / 3, rel=1e-6)
