"""Segmentation task glue: GraphSegLoss (a loss graph as a training loss) and the screening probe."""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F

from components.errors import LossforgeError
from components.loss_graph import LossGraph, Node
from components.segmentation_task import GraphSegLoss, build_screening_problem, one_hot_target
from components.shapes_dataset import SHAPES_CLASSES

from screening_support import shapes_items

L, N = Node.leaf, Node.apply
CE = LossGraph.single("segmentation", "seg", N("neg", N("log", N("mul", L("y_hat"), L("y")))))


class ItemsDataset:
    """Minimal indexable dataset with .num_classes (what build_screening_problem needs)."""

    def __init__(self, items, num_classes=len(SHAPES_CLASSES)):
        self.items, self.num_classes = items, num_classes

    def __len__(self):
        return len(self.items)

    def __getitem__(self, i):
        return self.items[i]


@pytest.fixture(scope="module")
def dataset():
    return ItemsDataset(shapes_items(8, size=32))


@pytest.fixture(scope="module", autouse=True)
def one_thread():
    """One torch thread: on a small shared CPU, more threads only add contention."""
    before = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(before)


def test_graph_ce_equals_torch_cross_entropy():
    torch.manual_seed(0)
    logits = torch.randn(2, 4, 5, 6, dtype=torch.float64)
    target = torch.randint(0, 4, (2, 5, 6))
    loss = GraphSegLoss(CE)(logits, target)
    # Eq. 3: Σ_nchw (−y log p) / (N·H·W) = mean pixel cross-entropy (ε = 1e-12 inside the log)
    assert torch.allclose(loss, F.cross_entropy(logits, target), atol=1e-9)


def test_graph_loss_ignores_255_and_backpropagates():
    torch.manual_seed(1)
    logits = torch.randn(2, 3, 4, 4, dtype=torch.float64, requires_grad=True)
    target = torch.randint(0, 3, (2, 4, 4))
    target[0, 0, :] = 255
    target[1, 2, 1] = 255
    loss = GraphSegLoss(CE)(logits, target)
    assert torch.allclose(loss, F.cross_entropy(logits, target, ignore_index=255), atol=1e-9)
    loss.backward()
    assert torch.isfinite(logits.grad).all()
    assert torch.all(logits.grad[0, :, 0, :] == 0)  # ignored pixels get no gradient from a pixel-wise loss


def test_graph_loss_rejects_bad_shapes_and_labels():
    with pytest.raises(LossforgeError):
        GraphSegLoss(CE)(torch.randn(2, 3, 4), torch.zeros(2, 4, dtype=torch.long))
    with pytest.raises(LossforgeError, match="label 7"):
        GraphSegLoss(CE)(torch.randn(1, 3, 4, 4), torch.full((1, 4, 4), 7))


def test_one_hot_target_zeroes_ignored_pixels():
    target = torch.tensor([[[0, 2], [255, 1]]])
    y, valid = one_hot_target(target, 3)
    assert y.shape == (1, 3, 2, 2)
    assert y[0, :, 1, 0].sum() == 0 and valid[0, 0, 1, 0] == 0
    assert y[0, 2, 0, 1] == 1 and y.sum() == 3
    y2, valid2 = one_hot_target(torch.tensor([[[0, 1]]]), 2)
    assert valid2 is None and y2.sum() == 2


def test_probe_shapes_and_determinism(dataset):
    p1 = build_screening_problem(dataset, "mIoU", samples=3, size=16, seed=3)
    p2 = build_screening_problem(dataset, "mIoU", samples=3, size=16, seed=3)
    C = len(SHAPES_CLASSES)
    assert p1.init_predictions.shape == (3, 1, C, 16, 16)
    assert p1.targets.shape == (3, 1, 16, 16) and p1.targets.dtype == torch.long
    assert torch.equal(p1.init_predictions, p2.init_predictions) and p1.key == p2.key
    assert torch.isfinite(p1.init_predictions).all()
    # a real random network: predictions differ from pixel to pixel
    assert p1.init_predictions.std() > 0
    inputs = p1.build_inputs(p1.init_predictions, p1.targets)["seg"]
    assert torch.allclose(inputs["y_hat"].sum(dim=-3), torch.ones(3, 1, 16, 16))
    assert torch.equal(inputs["y"].argmax(dim=-3), p1.targets)


def test_probe_key_changes_with_metric_seed_and_classes(dataset):
    base = build_screening_problem(dataset, "mIoU", samples=2, size=16, seed=0)
    assert build_screening_problem(dataset, "BF1", samples=2, size=16, seed=0).key != base.key
    assert build_screening_problem(dataset, "mIoU", samples=2, size=16, seed=1).key != base.key
    assert build_screening_problem(dataset, "mIoU", num_classes=21, samples=2, size=16, seed=0).key != base.key
    assert build_screening_problem(dataset, "mIoU", samples=2, size=24, seed=0).key != base.key


def test_probe_metric_perfect_and_random(dataset):
    p = build_screening_problem(dataset, "mIoU", samples=3, size=16, seed=0)
    perfect = 10.0 * F.one_hot(p.targets, p.init_predictions.shape[-3]).movedim(-1, -3).float()
    assert torch.allclose(p.metric(perfect, p.targets), torch.ones(3, dtype=torch.float64))
    initial = p.metric(p.init_predictions, p.targets)
    assert initial.shape == (3,) and bool(((initial >= 0) & (initial < 1)).all())


def test_probe_metric_as_function(dataset):
    def pixel_accuracy(pred, targets):
        return (pred.argmax(dim=-3) == targets).double().flatten(1).mean(dim=1)

    p = build_screening_problem(dataset, pixel_accuracy, samples=2, size=16)
    assert p.metric is pixel_accuracy and p.metric_name == "pixel_accuracy"


def test_probe_bad_input(dataset):
    with pytest.raises(LossforgeError, match="needs 20"):
        build_screening_problem(dataset, "mIoU", samples=20, size=16)
    with pytest.raises(LossforgeError):
        build_screening_problem(dataset, "not_a_metric", samples=2, size=16)
    with pytest.raises(LossforgeError, match="num_classes"):
        build_screening_problem(dataset.items, "mIoU", samples=2, size=16)  # a plain list has no .num_classes
