"""Shared by the screening tests: in-memory scenes of the embedded shapes dataset and a one-branch graph."""

from __future__ import annotations

import numpy as np
import torch

from components.search.graph import LossGraph, Node
from components.tasks.segmentation.shapes import render_scene


def seg(root: Node) -> LossGraph:
    """A segmentation loss graph with the single branch `seg`."""
    return LossGraph.single("segmentation", "seg", root)


def shapes_items(n: int, size: int = 32, seed: int = 0, num_classes: int = 8,
                 ignore_band: int = 0) -> list[tuple[torch.Tensor, torch.Tensor]]:
    """Scenes of the embedded shapes dataset, in memory: (image float (3,H,W) in [0,1], mask long (H,W)).

    num_classes 8 keeps the shapes classes; 2 merges the shapes into one foreground class; 21 (VOC-like)
    gives each object one of 20 foreground classes from its shape and instance number. 255 stays ignored.
    """
    rng = np.random.default_rng(seed)
    items = []
    for _ in range(n):
        scene = render_scene(rng, image_size=size, ignore_band=ignore_band)
        image = torch.from_numpy(scene.image).permute(2, 0, 1).float() / 255.0
        labels = scene.labels.astype(np.int64)
        ignored = labels == 255
        if num_classes == 2:
            labels = np.where(labels > 0, 1, 0)
        elif num_classes == 21:
            labels = np.where(labels > 0, 1 + ((labels - 1) * 3 + np.maximum(scene.instances, 0)) % 20, 0)
        elif num_classes != 8:
            raise ValueError(f"shapes_items: num_classes must be 2, 8 or 21, got {num_classes}")
        labels[ignored] = 255
        items.append((image, torch.from_numpy(labels)))
    return items
