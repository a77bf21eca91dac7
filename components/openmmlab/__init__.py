"""OpenMMLab backend: searched losses as mmsegmentation / mmdetection / mmpose loss modules, their config
snippets, and the checks of the optional install.

The OpenMMLab packages are optional (``bash run.sh openmmlab-install``) and imported only inside this package:
``losses`` and ``snippets`` need only torch and the project; ``registry`` imports mmengine and the installed
OpenMMLab packages and registers the modules (a config loads it with
``custom_imports=dict(imports=['components.openmmlab.registry'])``).
"""

from __future__ import annotations

import importlib.util

PACKAGES = ("mmengine", "mmcv", "mmseg", "mmdet", "mmpose")
INSTALL_HINT = "install it with: bash run.sh openmmlab-install"


def missing_packages(names: tuple[str, ...] = PACKAGES) -> list[str]:
    """The OpenMMLab packages among `names` that are not importable here (without importing them)."""
    return [n for n in names if importlib.util.find_spec(n) is None]
