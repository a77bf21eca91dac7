"""CSE-AutoLoss's model-optimisation simulation (components/cse/simulation.py): real tiny Faster R-CNN trainings on
a few images per class of the embedded shapes data."""

from __future__ import annotations

import pytest

from components.cse import published as P
from components.cse.simulation import BELOW_REFERENCE, DIVERGED, NO_GAIN, OptimizationSimulator, select_images
from components.tasks.detection.datasets import open_detection_dataset
from components.tasks.detection.models import DetectorConfig
from components.tasks.detection.trainer import ProxyConfig
from components.tasks.segmentation.shapes import ensure_shapes

TINY = DetectorConfig(name="tiny", min_size=64, max_size=64, rpn_batch_size_per_image=32, box_batch_size_per_image=32)
CFG = ProxyConfig(model=TINY, device="cpu")


@pytest.fixture(scope="module")
def train_set(tmp_path_factory):
    root = ensure_shapes(tmp_path_factory.mktemp("cse") / "shapes", num_train=16, num_test=2, image_size=64, seed=3)
    return open_detection_dataset(root, split="train")


def _simulator(dataset, seed=0, **kw):
    return OptimizationSimulator(dataset, CFG, images_per_class=1, iterations=12, batch_size=2, seed=seed, **kw)


def test_images_cover_every_class_present(train_set):
    ids = select_images(train_set, 1, seed=0)
    assert len(set(ids)) == len(ids) <= train_set.num_classes - 1
    present = set()
    for sample in train_set.samples:
        present |= set(train_set.target_boxes(sample)[1].tolist())
    chosen = set()
    for sample in train_set.subset(ids).samples:
        chosen |= set(train_set.target_boxes(sample)[1].tolist())
    assert chosen == present
    assert select_images(train_set, 1, seed=0) == ids and select_images(train_set, 2, seed=0) != ids


def test_simulation_is_deterministic_for_a_seed_and_judges_the_ap_gain(train_set):
    graph = P.graph(P.CE_CLS, P.GIOU_REG)
    first = _simulator(train_set).simulate(graph)
    again = _simulator(train_set).simulate(graph)  # a fresh simulator: same images, weights, batches
    assert first.status == "ok" and first.ap is not None
    assert (first.ap, first.initial_ap, first.accepted) == (again.ap, again.initial_ap, again.accepted)
    assert first.accepted and first.ap > first.initial_ap  # CE + GIoU learns something in 12 steps
    # a loss that never moves the target logit towards its optimum: the AP does not improve
    junk = _simulator(train_set).simulate(P.graph("neg(dot(y,x))", P.GIOU_REG))
    assert not junk.accepted and junk.reason in (NO_GAIN, DIVERGED)
    # the bar is AP_after − AP_before > min_gain
    strict = _simulator(train_set, min_gain=first.ap - first.initial_ap).simulate(graph)
    assert not strict.accepted and strict.reason == NO_GAIN and strict.ap == first.ap


def test_simulation_against_the_reference_loss(train_set):
    """min_ratio: AP_after must reach that share of CE + GIoU's AP in the same simulation (CE + GIoU is the
    reference itself here, so its AP equals the reference AP exactly)."""
    graph = P.published_graph("ce_giou_cse")
    level = _simulator(train_set, min_ratio=1.0).simulate(graph)
    assert level.accepted and level.reference_ap == level.ap > level.initial_ap
    above = _simulator(train_set, min_ratio=1.01).simulate(graph)
    assert not above.accepted and above.reason == BELOW_REFERENCE and above.ap == level.ap
    assert _simulator(train_set).simulate(graph).reference_ap is None  # min_ratio 0: no reference run
