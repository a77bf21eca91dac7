"""Model-optimisation simulation of CSE-AutoLoss (slides: "simulate the optimization behavior of the loss candidates
with #class images"): a candidate that passed the convergence checks trains the detector briefly on a handful of
images per class; if its simulated training does not improve AP on those images, it is rejected before the
(expensive) proxy training.

Decisions:
- Reuse, not copy: the images are a `subset` of the search's S_train (the detection dataset), the training is
  `components.tasks.detection.trainer.train_proxy` (same seeded initial weights, seeded batches and samplers) on
  the `proxy` section's detector with a short schedule (`iterations`, `batch_size`, `lr`; no warm-up steps, no lr
  steps, no flips), and AP is the task's pycocotools box AP on the same images (it simulates optimisation, it
  does not estimate generalisation).
- Images: for each class, the first `images_per_class` images (in an order shuffled by `seed`) that contain it
  and were not already taken, so a class present in few images still gets its share.
- Two yardsticks, each computed once per search: the AP of the untrained detector (same seeded weights) on the
  same images, and the AP the reference loss (CE + GIoU, `published.PUBLISHED["ce_giou_cse"]`) reaches in the
  same simulation. A candidate is accepted when AP_after − AP_before > `min_gain` and AP_after ≥ `min_ratio` ×
  AP_reference (`min_ratio` 0: no reference run). Reasons: `simulation_diverged` (NaN/Inf stop or failure),
  `simulation_no_gain`, `simulation_below_reference`.
  Why the reference: measured with the `cse:` defaults (bench/screening.py --method cse), the untrained detector
  scores AP 0.0000 on the simulation images and 16 of 20 random trees that the convergence checks reject still
  reach some AP > 0 (the RPN trains with CE + GIoU whatever the head's loss is): "any gain" alone keeps almost
  everything. With the demo data CE + GIoU reached AP 0.243, CSE-AutoLoss-A 0.134 (0.55×), CSE-AutoLoss-B
  (a one-stage loss, here on the two-stage head) 0.015, an exponential loss 0.012, such random trees ~0.003.
- Deterministic for a seed: the training draws only from generators seeded by `seed` (tests/test_cse_simulation.py).
"""

from __future__ import annotations

import dataclasses
import random
import time
from dataclasses import dataclass
from typing import Any

from components.errors import LossforgeError

NO_GAIN = "simulation_no_gain"
BELOW_REFERENCE = "simulation_below_reference"
DIVERGED = "simulation_diverged"
REASONS = (NO_GAIN, BELOW_REFERENCE, DIVERGED)
REFERENCE = "ce_giou_cse"
"""Rejection reasons of the simulation (funnel counters `rejected_<reason>`)."""


@dataclass(frozen=True)
class SimulationResult:
    """Outcome of one simulated training."""

    accepted: bool
    reason: str
    ap: float | None
    initial_ap: float
    status: str  # the ProxyResult status: ok | nan | failed
    seconds: float
    message: str = ""
    reference_ap: float | None = None

    def to_dict(self) -> dict[str, Any]:
        return dataclasses.asdict(self)


def select_images(dataset: Any, count: int, seed: int) -> list[str]:
    """Ids of `count` images per class of a detection dataset (module docstring), in a seeded order."""
    order = list(range(len(dataset)))
    random.Random(seed).shuffle(order)
    labels = {i: set(dataset.target_boxes(dataset.samples[i])[1].tolist()) for i in order}
    chosen: list[int] = []
    for cls in range(1, int(dataset.num_classes)):
        have = sum(1 for i in chosen if cls in labels[i])
        for i in order:
            if have >= count:
                break
            if i not in chosen and cls in labels[i]:
                chosen.append(i)
                have += 1
    if not chosen:
        raise LossforgeError("cse simulation: the training set has no image with a box")
    return [dataset.samples[i].id for i in chosen]


class OptimizationSimulator:
    """Short training of the detector with a candidate loss on a few images per class (module docstring)."""

    def __init__(self, dataset: Any, proxy_config: Any, *, images_per_class: int = 2, iterations: int = 30,
                 batch_size: int = 2, lr: float = 0.02, min_gain: float = 0.0, min_ratio: float = 0.0, seed: int = 0,
                 metric: str = "mAP"):
        self.ids = select_images(dataset, images_per_class, seed)
        self.dataset = dataset.subset(self.ids)
        batch = min(batch_size, len(self.dataset))
        self.config = dataclasses.replace(
            proxy_config, iterations=iterations, batch_size=batch, lr=lr, warmup_iterations=0, lr_steps=(),
            hflip=False, seed=seed, num_workers=0, eval_batch_size=max(batch, 4))
        self.min_gain = float(min_gain)
        self.min_ratio = float(min_ratio)
        self.metric = metric
        self._initial_ap: float | None = None
        self._reference_ap: float | None = None

    @property
    def initial_ap(self) -> float:
        """AP of the untrained detector (the same seeded weights every candidate starts from) on the images."""
        if self._initial_ap is None:
            from components.tasks.detection.models import build_detector
            from components.tasks.detection.trainer import evaluate_models, resolve_device
            from components.tasks.seeding import seeded_init

            device = resolve_device(self.config.device)
            with seeded_init(self.config.seed):
                model = build_detector(self.config.model, int(self.dataset.num_classes)).to(device)
            outcome = evaluate_models({"initial": model}, self.dataset, self.config, device)["initial"]
            if isinstance(outcome, Exception):
                raise LossforgeError(f"cse simulation: evaluating the untrained detector failed: {outcome}")
            self._initial_ap = float(outcome[self.metric])
        return self._initial_ap

    @property
    def reference_ap(self) -> float:
        """AP the reference loss (CE + GIoU) reaches in this simulation."""
        if self._reference_ap is None:
            from components.cse.published import published_graph

            result = self._train(published_graph(REFERENCE))
            if result.status != "ok" or result.target is None:
                raise LossforgeError(f"cse simulation: the reference loss {REFERENCE} did not train ({result.status}: "
                                     f"{result.message}); check the proxy settings")
            self._reference_ap = float(result.target)
        return self._reference_ap

    def _train(self, graph: Any) -> Any:
        from components.cse.losses import CSEDetectionLoss
        from components.tasks.detection.trainer import train_proxy

        return train_proxy({"candidate": CSEDetectionLoss(graph)}, self.dataset, self.dataset, self.config,
                           self.metric)["candidate"]

    def simulate(self, graph: Any) -> SimulationResult:
        """Train the detector with the `detection_cse` graph `graph` and judge its AP (module docstring)."""
        before = self.initial_ap
        reference = self.reference_ap if self.min_ratio > 0 else None
        start = time.perf_counter()
        result = self._train(graph)
        seconds = time.perf_counter() - start
        if result.status != "ok" or result.target is None:
            return SimulationResult(False, DIVERGED, None, before, result.status, seconds, result.message, reference)
        ap = float(result.target)
        if not ap - before > self.min_gain:
            return SimulationResult(False, NO_GAIN, ap, before, "ok", seconds,
                                    f"AP {ap:.4f} after vs {before:.4f} before (needs a gain > {self.min_gain:g})",
                                    reference)
        if reference is not None and ap < self.min_ratio * reference:
            return SimulationResult(False, BELOW_REFERENCE, ap, before, "ok", seconds,
                                    f"AP {ap:.4f} < {self.min_ratio:g} x the reference's {reference:.4f}", reference)
        return SimulationResult(True, "", ap, before, "ok", seconds, reference_ap=reference)


__all__ = ["BELOW_REFERENCE", "DIVERGED", "NO_GAIN", "OptimizationSimulator", "REASONS", "SimulationResult",
           "select_images"]
