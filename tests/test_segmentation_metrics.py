"""Tests for components/tasks/segmentation/metrics.py: hand-worked examples and a slow loop reference."""

from __future__ import annotations

import math

import numpy as np
import pytest
import torch

from components.errors import LossforgeError
from components.tasks.segmentation.metrics import (
    METRIC_NAMES,
    SegmentationMetrics,
    canonical_metric_name,
    class_boundaries,
    compute_metric,
    dilate,
    label_boundaries,
    metric_function,
    per_sample_metric,
)

IGN = 255


# ----------------------------------------------------------------------------- slow reference


def _ref_edges(lab: np.ndarray, valid: np.ndarray, c: int, width: int, definition: str) -> np.ndarray:
    """Literal per-pixel boundary of class c: avgpool = belongs to c and differs from the window average
    (in-image pixels only); minpool = y XOR min over the window (in-image pixels only)."""
    h, w = lab.shape
    y = ((lab == c) & valid).astype(float)
    out = np.zeros((h, w), dtype=bool)
    for i in range(h):
        for j in range(w):
            win = y[max(0, i - width): i + width + 1, max(0, j - width): j + width + 1]
            if definition == "avgpool":
                out[i, j] = y[i, j] == 1.0 and abs(win.sum() / win.size - y[i, j]) > 1e-9
            else:
                out[i, j] = bool(y[i, j]) != bool(win.min())
    return out


def _ref_dilate(mask: np.ndarray, r: int) -> np.ndarray:
    h, w = mask.shape
    out = np.zeros_like(mask)
    for i in range(h):
        for j in range(w):
            out[i, j] = mask[max(0, i - r): i + r + 1, max(0, j - r): j + r + 1].any()
    return out


def _ratio(a: float, b: float) -> float:
    return a / b if b else math.nan


def _mean_skip_nan(xs: list[float]) -> float:
    xs = [x for x in xs if not math.isnan(x)]
    return sum(xs) / len(xs) if xs else math.nan


def reference_metrics(preds, targets, C, definition="avgpool", width=1, tol=5, drop_bg=None) -> dict[str, float]:
    """All six metrics accumulated over the images with plain Python loops."""
    if drop_bg is None:
        drop_bg = definition == "avgpool"
    conf = np.zeros((C, C), dtype=np.int64)
    bconf = np.zeros((C, C), dtype=np.int64)
    n_pr = np.zeros(C)
    n_gt = np.zeros(C)
    m_pr = np.zeros(C)
    m_gt = np.zeros(C)
    for p, t in zip(np.asarray(preds), np.asarray(targets)):
        valid = t != IGN
        gt_e = [_ref_edges(t, valid, c, width, definition) for c in range(C)]
        pr_e = [_ref_edges(p, valid, c, width, definition) for c in range(C)]
        band = np.zeros(t.shape, dtype=bool)
        for c in range(1 if drop_bg else 0, C):
            band |= gt_e[c]
        if definition == "avgpool":
            band = _ref_dilate(band, tol)
        for i in range(t.shape[0]):
            for j in range(t.shape[1]):
                if valid[i, j]:
                    conf[t[i, j], p[i, j]] += 1
                    if band[i, j]:
                        bconf[t[i, j], p[i, j]] += 1
        for c in range(C):
            n_pr[c] += pr_e[c].sum()
            n_gt[c] += gt_e[c].sum()
            m_pr[c] += (pr_e[c] & _ref_dilate(gt_e[c], tol)).sum()
            m_gt[c] += (gt_e[c] & _ref_dilate(pr_e[c], tol)).sum()

    def ious(m):
        return [_ratio(m[c, c], m[c, :].sum() + m[:, c].sum() - m[c, c]) for c in range(C)]

    total = conf.sum()
    iou = ious(conf)
    fw = sum(conf[c, :].sum() / total * iou[c] for c in range(C) if conf[c, :].sum() > 0) if total else math.nan
    f1 = []
    for c in range(1 if drop_bg and C > 1 else 0, C):
        if n_pr[c] == 0 and n_gt[c] == 0:
            f1.append(math.nan)
        elif n_pr[c] == 0 or n_gt[c] == 0:
            f1.append(0.0)
        else:
            P, R = m_pr[c] / n_pr[c], m_gt[c] / n_gt[c]
            f1.append(2 * P * R / (P + R) if P + R > 0 else 0.0)
    return {
        "gAcc": _ratio(np.trace(conf), total),
        "mAcc": _mean_skip_nan([_ratio(conf[c, c], conf[c, :].sum()) for c in range(C)]),
        "mIoU": _mean_skip_nan(iou),
        "FWIoU": fw,
        "BIoU": _mean_skip_nan(ious(bconf)),
        "BF1": _mean_skip_nan(f1),
    }


def blocky_pair(seed: int, n: int = 3, size: int = 12, C: int = 4):
    """Piecewise-constant targets (so boundaries are sparse) with ignore blocks, and corrupted predictions."""
    g = torch.Generator().manual_seed(seed)
    low = torch.randint(0, C, (n, size // 3, size // 3), generator=g)
    target = low.repeat_interleave(3, 1).repeat_interleave(3, 2)
    pred = target.clone()
    flip = torch.rand(n, size // 2, size // 2, generator=g) < 0.3
    noise = torch.randint(0, C, (n, size // 2, size // 2), generator=g)
    flip = flip.repeat_interleave(2, 1).repeat_interleave(2, 2)
    noise = noise.repeat_interleave(2, 1).repeat_interleave(2, 2)
    pred = torch.where(flip, noise, pred)
    pred[:, :, -1] = torch.randint(0, C, (n, size), generator=g)  # a ragged column
    ign = torch.rand(n, size, size, generator=g) < 0.08
    target = torch.where(ign, torch.full_like(target, IGN), target)
    target[0, :2, :2] = IGN
    return pred, target


def _assert_close(got: dict, want: dict, tol=1e-9):
    for k in METRIC_NAMES:
        if math.isnan(want[k]):
            assert math.isnan(got[k]), (k, got[k])
        else:
            assert got[k] == pytest.approx(want[k], abs=tol), (k, got[k], want[k])


# ----------------------------------------------------------------------------- hand-worked examples


def test_region_metrics_hand_example():
    # target          pred            valid pairs (t, p): (0,0) (0,1) (1,1) (1,1) (2,0); last pixel ignored
    # 0 0 1           0 1 1           confusion rows=t: t0 -> p0:1 p1:1 ; t1 -> p1:2 ; t2 -> p0:1
    # 1 2 255         1 0 2
    t = torch.tensor([[[0, 0, 1], [1, 2, IGN]]])
    p = torch.tensor([[[0, 1, 1], [1, 0, 2]]])
    m = SegmentationMetrics(3)
    m.update(p, t)
    r = m.compute()
    assert r["gAcc"] == pytest.approx(3 / 5)  # 3 correct of 5 valid pixels
    assert r["mAcc"] == pytest.approx((1 / 2 + 2 / 2 + 0 / 1) / 3)  # = 0.5
    # IoU0 = 1/(2+2-1) = 1/3 ; IoU1 = 2/(2+3-2) = 2/3 ; IoU2 = 0/(1+0-0) = 0
    assert r["mIoU"] == pytest.approx((1 / 3 + 2 / 3 + 0) / 3)
    # FWIoU = 2/5 * 1/3 + 2/5 * 2/3 + 1/5 * 0 = 0.4
    assert r["FWIoU"] == pytest.approx(0.4)
    assert m.per_class()["IoU"] == pytest.approx([1 / 3, 2 / 3, 0.0])


def test_absent_class_skipped_but_predicted_only_class_counts():
    t = torch.tensor([[[0, 0, 1], [1, 2, IGN]]])
    p = torch.tensor([[[0, 1, 1], [1, 0, 2]]])
    # class 3 absent from both prediction and target: skipped, mIoU unchanged
    assert compute_metric("mIoU", p, t, 4) == pytest.approx(1 / 3)
    assert compute_metric("mAcc", p, t, 4) == pytest.approx(0.5)
    # predict class 3 on a pixel of class 0: IoU3 = 0 counts, IoU0 = 0/(2+1-0) = 0, IoU1 = 2/3, IoU2 = 0
    p2 = p.clone()
    p2[0, 0, 0] = 3
    assert compute_metric("mIoU", p2, t, 4) == pytest.approx((0 + 2 / 3 + 0 + 0) / 4)
    # mAcc skips class 3 (no ground truth): (0/2 + 2/2 + 0/1) / 3
    assert compute_metric("mAcc", p2, t, 4) == pytest.approx(1 / 3)


def _square_example():
    # 6x6 image, class-1 2x2 square at rows 2-3, cols 2-3 in the target; the prediction shifts it right by one.
    t = torch.zeros(1, 6, 6, dtype=torch.long)
    t[0, 2:4, 2:4] = 1
    p = torch.zeros(1, 6, 6, dtype=torch.long)
    p[0, 2:4, 3:5] = 1
    return p, t


def test_boundaries_hand_example():
    p, t = _square_example()
    valid = torch.ones_like(t, dtype=torch.bool)
    for definition in ("avgpool", "minpool"):
        e = class_boundaries(t, valid, 2, 1, definition)[0]
        # every square pixel touches background; background edges = the 4x4 ring rows 1-4, cols 1-4 minus the square
        assert e[1].sum() == 4 and bool(e[1, 2:4, 2:4].all())
        ring = torch.zeros(6, 6, dtype=torch.bool)
        ring[1:5, 1:5] = True
        ring[2:4, 2:4] = False
        assert torch.equal(e[0], ring)
    # a uniform image has no boundary (the image border is not one)
    assert not class_boundaries(torch.zeros(1, 5, 5, dtype=torch.long), torch.ones(1, 5, 5, dtype=torch.bool), 2).any()


def test_bf1_hand_example():
    p, t = _square_example()
    # tolerance 0: class 1 pred edges {(2,3),(2,4),(3,3),(3,4)} vs GT edges {(2,2),(2,3),(3,2),(3,3)}:
    # 2 matches each way -> P = R = 1/2 -> F1 = 1/2. Background rings (12 px each) overlap in
    # rows1-4 x cols2-4 (12 px) minus both squares' union there (6 px) = 6 -> P = R = 6/12 -> F1 = 1/2.
    assert compute_metric("BF1", p, t, 2, tolerance=0) == pytest.approx(0.5)
    assert compute_metric("BF1", p, t, 2, tolerance=0, drop_background=False) == pytest.approx(0.5)
    # tolerance 1: every class-1 edge is within one pixel of an edge of the other map -> F1 = 1
    assert compute_metric("BF1", p, t, 2, tolerance=1) == pytest.approx(1.0)
    # prediction without any class-1 pixel: class 1 has GT edges but no predicted edges -> F1_1 = 0
    assert compute_metric("BF1", torch.zeros_like(t), t, 2, tolerance=1) == pytest.approx(0.0)


def test_biou_hand_example():
    p, t = _square_example()
    # minpool (Eq. 5), background kept: region = union of GT boundaries = 4x4 block rows 1-4, cols 1-4.
    # Inside: GT1 (4 px) predicted 1 at (2,3),(3,3), 0 at (2,2),(3,2); GT0 ring (12 px) predicted 1 at (2,4),(3,4).
    # confusion t0: p0=10 p1=2 ; t1: p0=2 p1=2 -> IoU0 = 10/14, IoU1 = 2/6 -> BIoU = (5/7 + 1/3)/2 = 11/21
    assert compute_metric("BIoU", p, t, 2, boundary="minpool") == pytest.approx(11 / 21)
    # minpool, background edges dropped: region = the GT square only. t1: p0=2 p1=2 ->
    # IoU1 = 2/(4+2-2) = 1/2, IoU0 = 0/(0+2-0) = 0 -> BIoU = 1/4
    assert compute_metric("BIoU", p, t, 2, boundary="minpool", drop_background=True) == pytest.approx(0.25)
    # avgpool (official): band = GT class-1 edges (the square) dilated by radius 1 = the same 4x4 block -> 11/21
    assert compute_metric("BIoU", p, t, 2, boundary="avgpool", tolerance=1) == pytest.approx(11 / 21)


# ----------------------------------------------------------------------------- against the reference


@pytest.mark.parametrize("seed", [0, 1, 2])
@pytest.mark.parametrize(
    "definition,width,tol,drop_bg",
    [("avgpool", 1, 2, None), ("minpool", 1, 1, None), ("avgpool", 2, 1, False), ("minpool", 1, 0, True)],
)
def test_matches_slow_reference(seed, definition, width, tol, drop_bg):
    p, t = blocky_pair(seed)
    m = SegmentationMetrics(4, boundary=definition, boundary_width=width, tolerance=tol, drop_background=drop_bg)
    m.update(p, t)
    want = reference_metrics(p.numpy(), t.numpy(), 4, definition, width, tol, drop_bg)
    _assert_close(m.compute(), want)
    # each sample on its own
    kw = dict(boundary=definition, boundary_width=width, tolerance=tol, drop_background=drop_bg)
    for name in METRIC_NAMES:
        got = per_sample_metric(name, p, t, 4, **kw)
        assert got.shape == (p.shape[0],)
        for b in range(p.shape[0]):
            w = reference_metrics(p[b : b + 1].numpy(), t[b : b + 1].numpy(), 4, definition, width, tol, drop_bg)[name]
            assert (math.isnan(w) and math.isnan(got[b])) or float(got[b]) == pytest.approx(w, abs=1e-9)


def test_per_sample_groups_equal_accumulated_sets():
    p, t = blocky_pair(5, n=4)
    # (B, N, H, W): sample b = images 2b, 2b+1 accumulated together
    pg, tg = p.view(2, 2, *p.shape[1:]), t.view(2, 2, *t.shape[1:])
    for name in METRIC_NAMES:
        got = per_sample_metric(name, pg, tg, 4, tolerance=2)
        for b in range(2):
            assert float(got[b]) == pytest.approx(compute_metric(name, pg[b], tg[b], 4, tolerance=2))


def test_accumulation_equals_one_big_update():
    p, t = blocky_pair(3, n=5)
    whole = SegmentationMetrics(4, tolerance=2)
    whole.update(p, t)
    parts = SegmentationMetrics(4, tolerance=2)
    for lo, hi in ((0, 1), (1, 3), (3, 5)):
        parts.update(p[lo:hi], t[lo:hi])
    assert torch.equal(whole.confusion, parts.confusion)
    _assert_close(parts.compute(), whole.compute(), tol=1e-12)
    parts.reset()
    assert parts.confusion.sum() == 0 and parts.images == 0


@pytest.mark.parametrize("definition", ["avgpool", "minpool"])
def test_perfect_prediction_scores_one(definition):
    _, t = blocky_pair(4)
    pred = torch.where(t == IGN, torch.randint(0, 4, t.shape), t)
    m = SegmentationMetrics(4, boundary=definition)
    m.update(pred, t)
    assert all(v == pytest.approx(1.0) for v in m.compute().values()), m.compute()
    for name in METRIC_NAMES:
        assert torch.allclose(per_sample_metric(name, pred, t, 4, boundary=definition), torch.ones(t.shape[0], dtype=torch.float64))


def test_predictions_on_ignored_pixels_do_not_matter():
    p, t = blocky_pair(6)
    p2 = torch.where(t == IGN, (p + 1) % 4, p)
    a, b = SegmentationMetrics(4, tolerance=1), SegmentationMetrics(4, tolerance=1)
    a.update(p, t)
    b.update(p2, t)
    _assert_close(a.compute(), b.compute(), tol=0)


def test_metrics_are_fractions_and_worse_prediction_scores_lower():
    p, t = blocky_pair(7)
    good, bad = SegmentationMetrics(4, tolerance=1), SegmentationMetrics(4, tolerance=1)
    good.update(torch.where(t == IGN, 0, t), t)
    bad.update(p, t)
    for k, v in bad.compute().items():
        assert 0.0 <= v <= 1.0
        assert v < good.compute()[k], k


def test_avgpool_and_minpool_edges_coincide_with_the_label_map_path():
    # the literal one-hot definitions agree on label maps, and the fast label-map path used by the
    # metrics gives the same edges (class of an edge pixel = its label)
    for seed in (8, 9):
        p, t = blocky_pair(seed)
        valid = t != IGN
        for labels in (p, t):
            for width in (1, 2):
                avg = class_boundaries(labels, valid, 4, width, "avgpool")
                assert torch.equal(avg, class_boundaries(labels, valid, 4, width, "minpool"))
                fast = label_boundaries(labels, valid, 4, width)
                assert torch.equal(avg.any(1), fast)
                assert torch.equal(avg, fast.unsqueeze(1) & (labels.unsqueeze(1) == torch.arange(4).view(1, 4, 1, 1)))


def test_dilate_is_a_square_max_pool():
    g = torch.Generator().manual_seed(0)
    mask = torch.rand(3, 2, 9, 7, generator=g) < 0.1
    for r in (0, 1, 3, 12):
        want = torch.nn.functional.max_pool2d(mask.float().view(-1, 1, 9, 7), 2 * r + 1, 1, r).view(mask.shape) > 0
        assert torch.equal(dilate(mask, r), want)


# ----------------------------------------------------------------------------- names, errors, description


def test_aliases_and_unknown_names():
    assert canonical_metric_name("miou") == "mIoU"
    assert canonical_metric_name("BF1-score") == "BF1"
    assert canonical_metric_name("fw_iou") == "FWIoU"
    assert [canonical_metric_name(n.lower()) for n in METRIC_NAMES] == list(METRIC_NAMES)
    with pytest.raises(LossforgeError, match="valid names: gAcc, mAcc, mIoU, FWIoU, BIoU, BF1"):
        canonical_metric_name("dice")
    with pytest.raises(LossforgeError, match="unknown segmentation metric"):
        per_sample_metric("accuracy@5", torch.zeros(1, 2, 2, dtype=torch.long), torch.zeros(1, 2, 2, dtype=torch.long), 2)
    f = metric_function("biou", 2, tolerance=1)
    p, t = _square_example()
    assert float(f(p, t)[0]) == pytest.approx(compute_metric("BIoU", p, t, 2, tolerance=1))


def test_bad_inputs_raise_clear_errors():
    t = torch.zeros(1, 4, 4, dtype=torch.long)
    m = SegmentationMetrics(3)
    with pytest.raises(LossforgeError, match="label 7 outside"):
        m.update(t, torch.full_like(t, 7))
    with pytest.raises(LossforgeError, match="pred_labels holds label 3"):
        m.update(torch.full_like(t, 3), t)
    with pytest.raises(LossforgeError, match="shape"):
        m.update(t[:, :2], t)
    with pytest.raises(LossforgeError, match="integer class labels"):
        m.update(t.float(), t)
    with pytest.raises(LossforgeError, match="boundary definition"):
        SegmentationMetrics(3, boundary="sobel")
    with pytest.raises(LossforgeError, match="tolerance"):
        SegmentationMetrics(3, tolerance=-1)
    with pytest.raises(LossforgeError, match="num_classes"):
        SegmentationMetrics(0)
    with pytest.raises(LossforgeError, match="drop_background"):
        SegmentationMetrics(3, drop_background="yes")
    with pytest.raises(LossforgeError, match="label maps must be"):
        per_sample_metric("mIoU", t[0, 0], t[0, 0], 3)


def test_describe_names_the_boundary_definition():
    d = SegmentationMetrics(21, tolerance=3).describe()
    assert "avgpool" in d and "radius 3" in d and "background dropped" in d
    d = SegmentationMetrics(21, boundary="minpool", boundary_width=2).describe()
    assert "minpool" in d and "5x5" in d and "background kept" in d


def test_many_classes_match_a_relabelled_small_problem():
    # classes 0..3 renamed to 0, 61, 62, 69 of a 70-class problem (crossing the 62-class packing of the
    # boundary matching): the other 66 classes are absent from both maps and skipped, so nothing changes
    p, t = blocky_pair(10)
    lut = torch.tensor([0, 61, 62, 69])
    relabel = lambda x: torch.where(x == IGN, x, lut[x.clamp(0, 3)])  # noqa: E731
    small, big = SegmentationMetrics(4, tolerance=2), SegmentationMetrics(70, tolerance=2)
    small.update(p, t)
    big.update(relabel(p), relabel(t))
    _assert_close(big.compute(), small.compute(), tol=1e-12)
