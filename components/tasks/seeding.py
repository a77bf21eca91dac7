"""Seeded model construction for trainings that run side by side in threads of one process.

Module constructors (``nn.Conv2d``, torchvision's heads, ...) draw their initial weights from torch's global
RNG and take no generator. ``seeded_init(seed)`` holds one process-wide lock, forks the global RNG
(``torch.random.fork_rng``: the caller's state is restored on exit), seeds it and yields, so the weights drawn
inside depend only on ``seed`` and the global RNG is left as it was for everyone else.

Decisions:
- One lock for every task, trainer and probe (``INIT_LOCK``), held only while a model is built (milliseconds),
  rather than re-initialising every parameter from a private generator: the modules' own init rules (kaiming,
  torchvision's normal_(0.01) for the RPN, ...) would have to be copied.
- That is exact only if no other thread draws from the global RNG meanwhile, so the training paths never do:
  batches, flips, anchor/proposal samplers and the detector's size choice draw from private generators, so do
  the evaluation loaders (``eval_loader_generator``: a DataLoader draws a base seed per iteration), and a
  member's dropout uses its own RNG state under this lock (``components/tasks/segmentation/trainer.py``).
  ``tests/test_reproducibility.py`` checks that a training leaves the global RNG untouched.
- Threads are not the only hazard: the intra-op thread count changes float reductions. It is set per training
  thread by the flows (OpenMP keeps it per thread), never changed while a training runs.
"""

from __future__ import annotations

import threading
from collections.abc import Iterator
from contextlib import contextmanager

import torch

INIT_LOCK = threading.RLock()
"""Held while torch's global RNG is seeded and drawn from (model builds, per-member dropout): one thread at a time."""


@contextmanager
def seeded_init(seed: int) -> Iterator[None]:
    """Draw from torch's global (CPU) RNG seeded with `seed`, alone, and restore its previous state on exit."""
    with INIT_LOCK, torch.random.fork_rng(devices=[]):
        torch.manual_seed(int(seed))
        yield


def eval_loader_generator(seed: int) -> torch.Generator:
    """A generator for a DataLoader that does not shuffle: without one, every iteration over the loader draws
    its workers' base seed from torch's global RNG (and could disturb another thread's seeded model build)."""
    return torch.Generator().manual_seed(int(seed))


__all__ = ["INIT_LOCK", "eval_loader_generator", "seeded_init"]
