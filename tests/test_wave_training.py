"""Waves: M candidate losses trained as one grouped UNet equal each loss trained alone; NaN/failure isolation;
the CPU proxy learns the embedded data far beyond the all-background predictor."""

import math

import numpy as np
import pytest
import torch
from torch import nn
from torch.utils.data import Dataset

from components.tasks.loss_registry import build_loss
from components.tasks.segmentation.trainer import ProxyConfig, train_proxy
from components.tasks.segmentation.models import build_model, build_wave_model, model_preset
from components.tasks.segmentation.metrics import SegmentationMetrics
from components.tasks.segmentation.shapes import SHAPES_CLASSES, render_scene
from components.tasks.segmentation.wave_unet import WaveUNet

WAVE = ProxyConfig(model=model_preset("cpu_unet", widths=(8, 16)), iterations=6, batch_size=2, eval_batch_size=4,
                   lr=0.01, optimizer="adamw", weight_decay=1e-4, device="cpu", seed=3)


class Scenes(Dataset):
    """Embedded shapes scenes (class colours) rendered in memory: (image (3,H,W) float, mask (H,W) long)."""

    def __init__(self, n: int, size: int, seed: int):
        rng = np.random.default_rng(seed)
        scenes = [render_scene(rng, size, colours="class") for _ in range(n)]
        self.images = [torch.from_numpy(s.image).permute(2, 0, 1).float() / 255 for s in scenes]
        self.masks = [torch.from_numpy(s.labels.astype(np.int64)) for s in scenes]
        self.num_classes = len(SHAPES_CLASSES)

    def __len__(self):
        return len(self.images)

    def __getitem__(self, i):
        return self.images[i], self.masks[i]


@pytest.fixture(scope="module")
def scenes():
    return Scenes(12, 32, 0), Scenes(6, 32, 1)


class Recorder:
    """on_progress callback keeping every member's loss per iteration."""

    def __init__(self):
        self.values: dict[str, list[float]] = {}

    def __call__(self, iteration, total, values):
        for name, v in values.items():
            self.values.setdefault(name, []).append(v)


class NaNAt(nn.Module):
    """CE until iteration `at`, then NaN."""

    def __init__(self, at: int):
        super().__init__()
        self.at, self.calls = at, 0

    def forward(self, logits, target):
        self.calls += 1
        loss = nn.functional.cross_entropy(logits, target, ignore_index=255)
        return loss * float("nan") if self.calls >= self.at else loss


class Raises(nn.Module):
    def forward(self, logits, target):
        raise RuntimeError("broken candidate")


def test_members_start_identical_and_compute_like_the_single_network():
    torch.manual_seed(0)
    single = WaveUNet(5, 1, (8, 16, 32))
    wave = WaveUNet(5, 4, (8, 16, 32)).tile_from(single)
    x = torch.randn(2, 3, 32, 32)
    single.eval(), wave.eval()
    out_single, out_wave = single(x), wave(x)
    assert out_wave.shape == (2, 4, 5, 32, 32)
    for m in range(4):
        torch.testing.assert_close(out_wave[:, m], out_single[:, 0], rtol=1e-5, atol=1e-5)
        restored = WaveUNet(5, 1, (8, 16, 32))
        restored.load_state_dict(wave.member_state(m))
        restored.eval()
        torch.testing.assert_close(restored(x), out_single, rtol=1e-5, atol=1e-5)


def test_build_model_unet_equals_member_of_a_wave_from_the_same_seed():
    cfg = model_preset("cpu_unet", widths=(8, 16))
    torch.manual_seed(7)
    single = build_model(cfg, 3).eval()
    torch.manual_seed(7)
    wave = build_wave_model(cfg, 3, 3).eval()
    x = torch.randn(1, 3, 32, 32)
    torch.testing.assert_close(wave(x)[:, 2], single(x))


def test_a_members_gradient_comes_only_from_its_own_loss():
    torch.manual_seed(0)
    wave = WaveUNet(3, 3, (4, 8))
    out = wave(torch.randn(2, 3, 16, 16))
    out[:, 1].square().mean().backward()
    w = wave.encoder[0].conv1.weight.grad  # (3 members * 4, 3, 3, 3)
    assert w[:4].abs().sum() == 0 and w[8:].abs().sum() == 0 and w[4:8].abs().sum() > 0


def test_wave_equals_each_loss_trained_alone(scenes):
    train, evaluation = scenes
    names = ["ce", "soft_iou", "dice", "focal"]
    rec = Recorder()
    together = train_proxy({n: build_loss(n) for n in names}, train, evaluation, WAVE, "mIoU", on_progress=rec)
    assert set(together) == set(names)
    for n in names:
        alone_rec = Recorder()
        alone = train_proxy({n: build_loss(n)}, train, evaluation, WAVE, "mIoU", on_progress=alone_rec)[n]
        assert together[n].status == alone.status == "ok"
        assert len(rec.values[n]) == WAVE.iterations
        np.testing.assert_allclose(rec.values[n], alone_rec.values[n], rtol=1e-4, atol=1e-6)
        for metric, value in alone.metrics.items():
            assert together[n].metrics[metric] == pytest.approx(value, abs=1e-3), (n, metric)
    # different losses really train differently (the comparison above is not vacuous)
    assert rec.values["ce"][-1] != pytest.approx(rec.values["dice"][-1])


def test_a_nan_member_stops_alone_and_the_others_are_unchanged(scenes):
    train, evaluation = scenes
    rec_ref, rec = Recorder(), Recorder()
    ref = train_proxy({"ce": build_loss("ce"), "dice": build_loss("dice")}, train, evaluation, WAVE, "mIoU",
                      on_progress=rec_ref)
    out = train_proxy({"ce": build_loss("ce"), "bad": NaNAt(3), "boom": Raises(), "dice": build_loss("dice")},
                      train, evaluation, WAVE, "mIoU", on_progress=rec)
    assert out["bad"].status == "nan" and out["bad"].iterations == 3 and out["bad"].target is None
    assert out["boom"].status == "failed" and "broken candidate" in out["boom"].message
    for n in ("ce", "dice"):
        assert out[n].status == "ok" and math.isfinite(out[n].target)
        np.testing.assert_allclose(rec.values[n], rec_ref.values[n], rtol=1e-4, atol=1e-6)
        assert out[n].target == pytest.approx(ref[n].target, abs=1e-3)


def test_wave_training_is_deterministic(scenes):
    train, evaluation = scenes
    a = train_proxy({"ce": build_loss("ce")}, train, evaluation, WAVE, "mIoU")["ce"]
    b = train_proxy({"ce": build_loss("ce")}, train, evaluation, WAVE, "mIoU")["ce"]
    assert a.final_loss == b.final_loss and a.metrics == b.metrics


def _all_background_miou(dataset) -> float:
    meter = SegmentationMetrics(dataset.num_classes)
    for _, mask in dataset:
        meter.update(torch.zeros_like(mask)[None], mask[None])
    return meter.compute()["mIoU"]


@pytest.mark.slow
def test_cpu_proxy_learns_far_beyond_all_background():
    """The default CPU proxy (ProxyConfig()) with CE, on embedded-style data: the signal the search needs."""
    train, evaluation = Scenes(160, 64, 10), Scenes(40, 64, 11)
    cfg = ProxyConfig(iterations=200)
    torch.set_num_threads(1)
    result = train_proxy({"ce": build_loss("ce")}, train, evaluation, cfg, "mIoU")["ce"]
    floor = _all_background_miou(evaluation)
    assert result.status == "ok"
    assert result.metrics["mIoU"] > floor + 0.2, (result.metrics, floor)


def test_concurrent_waves_in_threads_equal_sequential_ones(scenes):
    """The threads runner trains several waves at once in one process: results must not depend on it."""
    from concurrent.futures import ThreadPoolExecutor
    import dataclasses

    train, evaluation = scenes
    cfg = dataclasses.replace(WAVE, iterations=12)

    def run(seed):
        out = train_proxy({"ce": build_loss("ce"), "dice": build_loss("dice")}, train, evaluation,
                          dataclasses.replace(cfg, seed=seed), "mIoU")
        return {n: (r.final_loss, r.metrics) for n, r in out.items()}

    sequential = [run(s) for s in (0, 1, 2, 3)]
    with ThreadPoolExecutor(2) as pool:
        concurrent = list(pool.map(run, (0, 1, 2, 3)))
    # a race (shared RNG while drawing the initial weights, oneDNN) moves the losses by ~1e-3 and the metrics
    # by points; float summation order alone stays far below these tolerances
    for seq, con in zip(sequential, concurrent):
        for name in seq:
            assert con[name][0] == pytest.approx(seq[name][0], rel=1e-5)
            assert con[name][1] == pytest.approx(seq[name][1], abs=1e-3)
