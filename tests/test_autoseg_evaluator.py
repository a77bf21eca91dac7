"""`evaluator="autoseg"` scores exactly as the Auto Seg-Loss evaluation code, checked against an independent
numpy/scipy re-implementation of that code's rules (written from its description, not copied):

- one-hot maps where a label outside [0, C) (the 255 void) belongs to no class — only the ground truth has
  such pixels, the prediction keeps its labels everywhere;
- edge of class c: a pixel of c whose 3x3 neighbourhood (inside the image) is not all c;
- dilation: a (2·tol+1)² maximum filter; counts summed over all images, then per class
  P = match_pred / (n_pred + 1e-8), R = match_gt / n_gt, F1 = 2PR / (P + R + 1e-8), NaN classes skipped;
- FWIoU = nanmean(freq · IoU) · C; BIoU over the ground-truth edges (classes >= 1 with drop_bg) dilated by 5.

and the three places where the default `lossforge` evaluator differs on purpose (module docstring)."""

from __future__ import annotations

import math

import numpy as np
import pytest
import torch
from scipy import ndimage

from components.errors import LossforgeError
from components.params import ParamsError, parse_params
from components.tasks.segmentation.metrics import METRIC_NAMES, SegmentationMetrics, per_sample_metric
from components.tasks.segmentation.trainer import ProxyConfig, evaluate_models

VOID = 255


def _edges(onehot: np.ndarray) -> np.ndarray:
    """(C, H, W) bool -> edges: a pixel of the class with a 3x3 in-image neighbour outside the class."""
    box = np.ones((3, 3))
    inside = ndimage.convolve(np.ones(onehot.shape[1:]), box, mode="constant", cval=0)
    out = np.zeros_like(onehot)
    for c in range(onehot.shape[0]):
        same = ndimage.convolve(onehot[c].astype(float), box, mode="constant", cval=0)
        out[c] = onehot[c] & (same < inside)
    return out


def _dilate(mask: np.ndarray, radius: int) -> np.ndarray:
    if radius == 0:
        return mask
    return np.stack([ndimage.maximum_filter(m, size=2 * radius + 1, mode="constant", cval=0) for m in mask])


def reference(preds: list[np.ndarray], gts: list[np.ndarray], num_classes: int, tol: int = 5,
              drop_bg: bool = False) -> dict[str, float]:
    conf = np.zeros((num_classes, num_classes), dtype=np.int64)
    band_conf = np.zeros_like(conf)
    n_pr, n_gt, m_pr, m_gt = (np.zeros(num_classes) for _ in range(4))
    for pred, gt in zip(preds, gts):
        valid = (gt >= 0) & (gt < num_classes)
        conf += np.bincount(num_classes * gt[valid] + pred[valid], minlength=num_classes ** 2).reshape(conf.shape)
        gt_oh = np.stack([gt == c for c in range(num_classes)])
        pr_oh = np.stack([pred == c for c in range(num_classes)])
        gt_edge, pr_edge = _edges(gt_oh), _edges(pr_oh)
        gt_dil, pr_dil = _dilate(gt_edge, tol), _dilate(pr_edge, tol)
        n_gt += gt_edge.sum((1, 2))
        n_pr += pr_edge.sum((1, 2))
        m_pr += (pr_edge & gt_dil).sum((1, 2))
        m_gt += (gt_edge & pr_dil).sum((1, 2))
        band = _dilate(gt_edge, tol)[1 if drop_bg else 0:].any(0) & valid
        band_conf += np.bincount(num_classes * gt[band] + pred[band], minlength=num_classes ** 2).reshape(conf.shape)
    with np.errstate(divide="ignore", invalid="ignore"):
        tp = np.diag(conf).astype(float)
        iou = tp / (conf.sum(0) + conf.sum(1) - tp)
        freq = conf.sum(1) / conf.sum()
        biou = np.diag(band_conf) / (band_conf.sum(0) + band_conf.sum(1) - np.diag(band_conf))
        p = m_pr / (n_pr + 1e-8)
        r = m_gt / n_gt
        f1 = 2 * p * r / (p + r + 1e-8)
        acc = tp / conf.sum(1)
    f1 = f1[1:] if drop_bg else f1
    return {"gAcc": tp.sum() / conf.sum(), "mAcc": np.nanmean(acc), "mIoU": np.nanmean(iou),
            "FWIoU": np.nanmean(freq * iou) * num_classes, "BIoU": np.nanmean(biou), "BF1": np.nanmean(f1)}


def scenes(seed: int = 0, n: int = 3, h: int = 40, w: int = 48, num_classes: int = 6):
    """Blobs of classes 0-3 (4 is only predicted, 5 is nowhere), a void band in the ground truth with
    predicted edges inside it, and a class missed entirely by the prediction."""
    rng = np.random.default_rng(seed)
    gts, preds = [], []
    for _ in range(n):
        gt = np.zeros((h, w), dtype=np.int64)
        for c in (1, 2, 3):
            y, x = rng.integers(0, h - 12), rng.integers(0, w - 12)
            gt[y:y + rng.integers(6, 14), x:x + rng.integers(6, 14)] = c
        pred = gt.copy()
        pred = np.roll(pred, shift=(int(rng.integers(-2, 3)), int(rng.integers(-2, 3))), axis=(0, 1))
        pred[rng.random((h, w)) < 0.03] = 1  # speckle: many small predicted edges
        pred[pred == 3] = 0  # class 3: ground-truth edges, no predicted edges (0 in both evaluators)
        y, x = rng.integers(0, h - 8), rng.integers(0, w - 8)
        pred[y:y + 6, x:x + 6] = 4  # class 4: predicted, never in the ground truth
        gt[:, w - 9:w - 4] = VOID
        pred[h // 3:h // 2, w - 8:w - 5] = 2  # a predicted block inside the void band
        gts.append(gt)
        preds.append(pred)
    return preds, gts, num_classes


def _metrics(preds, gts, num_classes, **kw) -> dict[str, float]:
    meter = SegmentationMetrics(num_classes, VOID, **kw)
    for pred, gt in zip(preds, gts):
        meter.update(torch.from_numpy(pred)[None], torch.from_numpy(gt)[None])
    return meter.compute()


@pytest.mark.parametrize("tol,drop_bg", [(5, False), (5, True), (2, False), (0, True)])
def test_autoseg_evaluator_matches_the_official_rules(tol, drop_bg):
    preds, gts, c = scenes(seed=tol + 10 * drop_bg)
    ref = reference(preds, gts, c, tol, drop_bg)
    got = _metrics(preds, gts, c, evaluator="autoseg", tolerance=tol, drop_background=drop_bg)
    for name in METRIC_NAMES:
        assert got[name] == pytest.approx(ref[name], rel=1e-9, abs=1e-12), name


def test_autoseg_defaults_are_the_official_ones():
    """tolerance "auto" = the fixed 5 px, background kept in BF1 (evaluate_fast's drop_bg=False)."""
    preds, gts, c = scenes(seed=3, h=64, w=64)
    got = _metrics(preds, gts, c, evaluator="autoseg")  # tolerance defaults to "auto"
    ref = reference(preds, gts, c, tol=5, drop_bg=False)
    assert got == pytest.approx(ref, rel=1e-9)
    batch = torch.from_numpy(np.stack(preds))[None], torch.from_numpy(np.stack(gts))[None]
    per_sample = per_sample_metric("BF1", *batch, c, evaluator="autoseg")
    assert float(per_sample[0]) == pytest.approx(ref["BF1"], rel=1e-9)


def test_the_documented_differences_from_the_lossforge_evaluator():
    preds, gts, c = scenes(seed=1)
    official = reference(preds, gts, c, tol=5, drop_bg=False)
    ours = _metrics(preds, gts, c, evaluator="lossforge", tolerance=5, drop_background=False)
    for name in ("gAcc", "mAcc", "mIoU", "BIoU"):  # the same under both
        assert ours[name] == pytest.approx(official[name], rel=1e-9), name
    assert ours["BF1"] < official["BF1"] - 0.01  # class 4 counts as 0 here, skipped there
    # FWIoU: class 5 is in neither map, so the official nanmean(freq·IoU)·C is larger by C / 5
    assert official["FWIoU"] == pytest.approx(ours["FWIoU"] * c / 5, rel=1e-9)

    # per class: class 3 (ground-truth edges, none predicted) is 0 in both; class 4 (predicted only) differs
    meter_l = SegmentationMetrics(c, VOID, tolerance=5, drop_background=False)
    meter_a = SegmentationMetrics(c, VOID, tolerance=5, evaluator="autoseg")
    for pred, gt in zip(preds, gts):
        for meter in (meter_l, meter_a):
            meter.update(torch.from_numpy(pred)[None], torch.from_numpy(gt)[None])
    bf1_l, bf1_a = meter_l.per_class()["BF1"], meter_a.per_class()["BF1"]
    assert bf1_l[3] == 0.0 and bf1_a[3] == 0.0
    assert bf1_l[4] == 0.0 and math.isnan(bf1_a[4])
    assert math.isnan(bf1_l[5]) and math.isnan(bf1_a[5])


def test_void_region_predictions_count_only_for_autoseg():
    """One image, prediction perfect on the valid pixels: lossforge gives BF1 1, the official code counts the
    edges predicted inside the void (unmatched when the void is wider than the tolerance)."""
    gt = np.zeros((30, 40), dtype=np.int64)
    gt[5:15, 5:15] = 1
    gt[:, 22:] = VOID
    pred = np.where(gt == VOID, 0, gt)
    pred[10:20, 30:36] = 1  # only inside the void
    ours = _metrics([pred], [gt], 2, tolerance=1, drop_background=False)
    official = _metrics([pred], [gt], 2, evaluator="autoseg", tolerance=1)
    assert ours["BF1"] == 1.0
    assert official["BF1"] == pytest.approx(reference([pred], [gt], 2, tol=1)["BF1"], rel=1e-9)
    assert official["BF1"] < 0.9


def test_autoseg_needs_the_official_edges():
    with pytest.raises(LossforgeError, match="boundary must be 'avgpool' and boundary_width 1"):
        SegmentationMetrics(3, evaluator="autoseg", boundary="minpool")
    with pytest.raises(LossforgeError, match="evaluator must be one of lossforge, autoseg"):
        SegmentationMetrics(3, evaluator="official")


def test_params_select_the_evaluator_up_front():
    ok = parse_params({"retrain": {"evaluator": "autoseg"}, "proxy": {"evaluator": "autoseg", "tolerance": 3}})
    assert ok.config("retrain").evaluator == "autoseg" and ok.config("proxy").evaluator == "autoseg"
    assert parse_params({}).config("retrain").evaluator == "lossforge"
    with pytest.raises(ParamsError, match=r"proxy.*evaluator: must be one of lossforge, autoseg, got 'official'"):
        parse_params({"proxy": {"evaluator": "official"}})
    with pytest.raises(ParamsError, match=r"retrain.*boundary must be 'avgpool'"):
        parse_params({"retrain": {"evaluator": "autoseg", "boundary_width": 2}})


class _Echo(torch.nn.Module):
    """A 'model' whose logits are its input image: the prediction is the argmax over the 3 image channels."""

    def forward(self, x):
        return x * 10.0


def test_training_evaluation_uses_the_configured_evaluator():
    preds, gts, _ = scenes(seed=5, n=2, h=32, w=32, num_classes=3)
    preds = [np.clip(p, 0, 2) for p in preds]
    gts = [np.where((g > 2) & (g != VOID), 2, g) for g in gts]
    images = [torch.nn.functional.one_hot(torch.from_numpy(p), 3).permute(2, 0, 1).float() for p in preds]
    dataset = list(zip(images, [torch.from_numpy(g) for g in gts]))
    cfg = ProxyConfig(evaluator="autoseg", device="cpu", eval_batch_size=2)
    assert cfg.model.input_size == 32
    out = evaluate_models({"echo": _Echo()}, dataset, cfg, 3, torch.device("cpu"))["echo"]
    assert out == pytest.approx(reference(preds, gts, 3, tol=5), rel=1e-9)
    default = evaluate_models({"echo": _Echo()}, dataset, ProxyConfig(device="cpu"), 3, torch.device("cpu"))["echo"]
    assert default["BF1"] != pytest.approx(out["BF1"], rel=1e-6)
