"""Registers the searched-loss modules of ``components.openmmlab.losses`` in the MODELS registries of the
installed OpenMMLab packages (importing this module does it, so configs use
``custom_imports=dict(imports=['components.openmmlab.registry'], allow_failed_imports=False)``):

* mmsegmentation: ``SearchedLoss``, ``SurrogateLoss`` (``loss_decode``);
* mmdetection: ``SearchedClsLoss``, ``SearchedBBoxLoss``, ``SearchedMaskLoss`` (``loss_cls``, ``loss_bbox``,
  ``loss_mask`` of the RPN and R-CNN heads);
* mmpose: ``SearchedKeypointLoss`` (a heatmap head's ``loss``).

Registration uses ``force=True`` so importing again (or registering after a reload) is harmless. A package that is
not installed is skipped; without mmengine the import fails with the install command.
"""

from __future__ import annotations

import importlib

from components.errors import LossforgeError
from components.openmmlab import INSTALL_HINT, missing_packages
from components.openmmlab import losses

MODULES = {
    "mmseg": (losses.SearchedLoss, losses.SurrogateLoss),
    "mmdet": (losses.SearchedClsLoss, losses.SearchedBBoxLoss, losses.SearchedMaskLoss),
    "mmpose": (losses.SearchedKeypointLoss,),
}
"""OpenMMLab package -> the loss modules registered (under their class names) in its MODELS registry."""


def register_all() -> dict[str, list[str]]:
    """Register the modules in every installed package's MODELS registry; returns package -> names."""
    if missing_packages(("mmengine",)):
        raise LossforgeError(f"the OpenMMLab backend is not installed (no mmengine); {INSTALL_HINT}")
    done: dict[str, list[str]] = {}
    for package, classes in MODULES.items():
        if missing_packages((package,)):
            continue
        registry = importlib.import_module(f"{package}.registry").MODELS
        for cls in classes:
            registry.register_module(name=cls.__name__, module=cls, force=True)
        done[package] = [cls.__name__ for cls in classes]
    return done


REGISTERED = register_all()
