"""Segmentation task glue: GraphSegLoss (a loss graph as a training loss) and the screening probe."""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F

from components.errors import LossforgeError
from components.search.graph import LossGraph, Node
from components.tasks.segmentation.probe import GraphSegLoss, build_screening_problem, one_hot_target
from components.tasks.segmentation.shapes import SHAPES_CLASSES

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


# ----------------------------------------------------------------------------- boundary targets (A.1)


def _square_mask():
    """7×7 background with a 3×3 square of class 1 in the middle (rows/cols 2..4)."""
    mask = torch.zeros(1, 7, 7, dtype=torch.long)
    mask[0, 2:5, 2:5] = 1
    return mask


def test_boundary_target_of_a_hand_made_mask_is_its_edge_pixels():
    from components.tasks.segmentation.probe import boundary_target

    y, valid = one_hot_target(_square_mask(), 3)
    edges = boundary_target(y, valid)
    ring = torch.zeros(7, 7)
    ring[2:5, 2:5] = 1
    ring[3, 3] = 0  # the square's centre has no other class within radius 1
    outer = torch.zeros(7, 7)
    outer[1:6, 1:6] = 1
    outer[2:5, 2:5] = 0  # background pixels touching the square; the image border is never an edge
    assert edges.shape == y.shape and edges.dtype == y.dtype
    assert torch.equal(edges[0, 1], ring) and torch.equal(edges[0, 0], outer)
    assert not edges[0, 2].any()  # class 2 is absent
    # ignore pixels belong to no class: they are 0 in every map and make their neighbours edges
    mask = torch.zeros(1, 7, 7, dtype=torch.long)
    mask[0, 0, 6] = 255
    y, valid = one_hot_target(mask, 2)
    edges = boundary_target(y, valid)
    expected = torch.zeros(7, 7)
    expected[0, 5] = expected[1, 5] = expected[1, 6] = 1
    assert torch.equal(edges[0, 0], expected) and edges[0, :, 0, 6].sum() == 0


def test_boundary_target_follows_the_metric_definition():
    from components.tasks.segmentation.metrics import class_boundaries
    from components.tasks.segmentation.probe import boundary_target

    items = shapes_items(2, size=24, seed=4, ignore_band=1)
    labels = torch.stack([m for _, m in items])
    y, valid = one_hot_target(labels, 8)
    for definition, width in (("avgpool", 1), ("minpool", 2)):
        keep = labels != 255
        expected = class_boundaries(torch.where(keep, labels, 0), keep, 8, width, definition)
        assert torch.equal(boundary_target(y, valid, definition=definition, width=width).bool(), expected)


def test_training_target_for_metric():
    from components.tasks.segmentation.probe import training_target_for_metric

    assert [training_target_for_metric(m) for m in ("BIoU", "bf1", "mIoU", "gacc")] == \
        ["boundary", "boundary", "label", "label"]
    with pytest.raises(LossforgeError, match="unknown segmentation metric"):
        training_target_for_metric("dice")


def test_boundary_metric_probe_feeds_boundary_targets(dataset):
    from components.tasks.segmentation.probe import boundary_target

    bf1 = build_screening_problem(dataset, "BF1", samples=3, size=16, seed=0)
    as_labels = build_screening_problem(dataset, "BF1", samples=3, size=16, seed=0, target="label")
    miou = build_screening_problem(dataset, "mIoU", samples=3, size=16, seed=0)
    y, valid = one_hot_target(bf1.targets, 8)
    got = bf1.build_inputs(bf1.init_predictions, bf1.targets)["seg"]["y"]
    assert torch.equal(got, boundary_target(y, valid)) and not torch.equal(got, y)
    assert torch.equal(miou.build_inputs(miou.init_predictions, miou.targets)["seg"]["y"], y)
    assert torch.equal(as_labels.build_inputs(as_labels.init_predictions, as_labels.targets)["seg"]["y"], y)
    assert bf1.key != as_labels.key  # the training target is part of the problem key
    # the perfect prediction of a boundary probe: the labels on the edges, the initial prediction elsewhere
    on_edge = got.amax(dim=-3) > 0
    perfect = bf1.perfect_predictions.argmax(dim=-3)
    assert torch.equal(perfect[on_edge], bf1.targets[on_edge])
    assert torch.equal(perfect[~on_edge], bf1.init_predictions.argmax(dim=-3)[~on_edge])
    with pytest.raises(LossforgeError, match="target must be one of label, boundary"):
        build_screening_problem(dataset, "BF1", samples=3, size=16, target="edges")


def test_graph_loss_with_boundary_target_ignores_255():
    torch.manual_seed(0)
    target = _square_mask().repeat(2, 1, 1)
    target[1, 0, :3] = 255
    logits = torch.randn(2, 3, 7, 7, requires_grad=True)
    boundary = GraphSegLoss(CE, target="boundary")
    label = GraphSegLoss(CE)
    value = boundary(logits, target)
    assert not torch.isclose(value, label(logits, target))
    value.backward()
    assert logits.grad[1, :, 0, :3].abs().sum() == 0  # ignored pixels get no gradient
    moved = logits.detach().clone()
    moved[1, :, 0, :3] += 5.0
    assert torch.isclose(boundary(moved, target), value.detach())
    assert "target=boundary" in repr(boundary)
    with pytest.raises(LossforgeError, match="target must be one of"):
        GraphSegLoss(CE, target="edges")
