"""Shared by the screening tests: in-memory scenes of the embedded shapes dataset and a one-branch graph."""

from __future__ import annotations

import numpy as np
import torch

from components.loss_graph import LossGraph, Node
from components.shapes_dataset import render_scene


def seg(root: Node) -> LossGraph:
    """A segmentation loss graph with the single branch `seg`."""
    return LossGraph.single("segmentation", "seg", root)


def shapes_items(n: int, size: int = 32, seed: int = 0) -> list[tuple[torch.Tensor, torch.Tensor]]:
    """Scenes of the embedded shapes dataset, in memory: (image float (3,H,W) in [0,1], mask long (H,W))."""
    rng = np.random.default_rng(seed)
    items = []
    for _ in range(n):
        scene = render_scene(rng, image_size=size)
        image = torch.from_numpy(scene.image).permute(2, 0, 1).float() / 255.0
        items.append((image, torch.from_numpy(scene.labels.astype(np.int64))))
    return items
