"""Find a segmentation loss by name from configuration (mmsegmentation-style registry).

A loss is an ``nn.Module`` class ``forward(logits (N,C,H,W), target (N,H,W)) -> scalar`` registered under a
name. ``build_loss`` accepts

- a name: ``"ce"``;
- a dict with ``"type"`` and keyword arguments: ``{"type": "focal", "gamma": 2}``;
- a searched loss graph: ``{"type": "graph", "path": "loss.json"}`` (or ``"graph": <dict>``), rebuilt
  through the operator whitelist by ``components.search.graph_json`` and wrapped in ``GraphSegLoss``; optional
  ``"target": "label" | "boundary"`` (the loss input ``y``; boundary = the per-class edge maps that
  BIoU/BF1 searches train on, AutoLoss-Zero A.1) with ``"boundary"``/``"boundary_width"``. Without
  ``"target"``, the loss JSON's ``metadata.target`` (written by the search) is used, else "label";
- an Auto Seg-Loss surrogate: ``{"type": "surrogate", "path": "surrogate.json"}`` (needs ``num_classes``).

The handcrafted baselines of ``components.tasks.segmentation.baselines.BASELINE_LOSSES`` are registered on first use.
"""

from __future__ import annotations

import inspect
from collections.abc import Callable, Mapping
from typing import Any

from torch import nn

from components.errors import LossforgeError

SPECIAL_TYPES = ("graph", "surrogate")


class LossRegistry:
    """Name → loss class. ``register(name)`` is a class decorator; lookups of unknown names list the known ones."""

    def __init__(self) -> None:
        self._classes: dict[str, type[nn.Module]] = {}
        self._baselines_loaded = False

    def register(self, name: str, cls: type[nn.Module] | None = None) -> Callable[[type[nn.Module]], type[nn.Module]]:
        """Register ``cls`` under ``name`` (usable as ``@LOSSES.register("name")``); a name taken by another class is an error."""

        def add(klass: type[nn.Module]) -> type[nn.Module]:
            if not (isinstance(klass, type) and issubclass(klass, nn.Module)):
                raise LossforgeError(f"loss {name!r}: only nn.Module classes can be registered, got {klass!r}")
            if name in SPECIAL_TYPES:
                raise LossforgeError(f"loss name {name!r} is reserved")
            existing = self._classes.get(name)
            if existing is not None and existing is not klass:
                raise LossforgeError(f"loss {name!r} is already registered ({existing.__module__}.{existing.__qualname__})")
            self._classes[name] = klass
            return klass

        return add(cls) if cls is not None else add

    def _load_baselines(self) -> None:
        if self._baselines_loaded:
            return
        from components.tasks.segmentation.baselines import BASELINE_LOSSES

        for name, klass in BASELINE_LOSSES.items():
            if name not in self._classes:
                self.register(name, klass)
        self._baselines_loaded = True

    def get(self, name: str) -> type[nn.Module]:
        """The class registered under ``name``; an unknown name is a LossforgeError listing the known types."""
        self._load_baselines()
        try:
            return self._classes[name]
        except KeyError:
            raise LossforgeError(f"loss type {name!r} unknown; known types: {', '.join(self.names())}") from None

    def names(self) -> list[str]:
        """All loss types ``build_loss`` accepts (registered names and the special 'graph'/'surrogate')."""
        self._load_baselines()
        return sorted(self._classes) + list(SPECIAL_TYPES)

    def __contains__(self, name: object) -> bool:
        self._load_baselines()
        return name in self._classes or name in SPECIAL_TYPES


LOSSES = LossRegistry()


def register_loss(name: str) -> Callable[[type[nn.Module]], type[nn.Module]]:
    """Class decorator: make a loss module buildable by ``build_loss(name)``."""
    return LOSSES.register(name)


def _instantiate(name: str, klass: type[nn.Module], kwargs: dict[str, Any], num_classes: int | None) -> nn.Module:
    params = inspect.signature(klass).parameters
    accepts_any = any(p.kind is inspect.Parameter.VAR_KEYWORD for p in params.values())
    if num_classes is not None and "num_classes" in params and "num_classes" not in kwargs:
        kwargs = {**kwargs, "num_classes": num_classes}
    unknown = [k for k in kwargs if k not in params and not accepts_any]
    if unknown:
        known = [p for p in params if p not in ("self", "args", "kwargs")]
        raise LossforgeError(f"loss {name!r}: unknown argument(s) {', '.join(unknown)} (accepted: {', '.join(known) or 'none'})")
    try:
        return klass(**kwargs)
    except (TypeError, ValueError) as exc:
        raise LossforgeError(f"loss {name!r}: bad arguments {kwargs!r} ({exc})") from None


GRAPH_KEYS = ("type", "graph", "path", "target", "boundary", "boundary_width", "num_classes")


def _build_graph(spec: Mapping[str, Any]) -> nn.Module:
    from components.search import graph_json as loss_json
    from components.atomic_io import read_json
    from components.tasks.segmentation.probe import TRAINING_TARGETS, GraphSegLoss

    unknown = [k for k in spec if k not in GRAPH_KEYS]
    if unknown:
        raise LossforgeError(f"loss type 'graph': unknown key(s) {', '.join(map(str, unknown))} "
                             f"(accepted: {', '.join(GRAPH_KEYS[1:-1])})")
    metadata: Any = {}
    if "graph" in spec:
        data = spec["graph"]
        graph = data if not isinstance(data, Mapping) else loss_json.graph_from_dict(data)
        metadata = data.get("metadata") if isinstance(data, Mapping) else {}
    elif "path" in spec:
        graph = loss_json.load_graph(spec["path"])
        metadata = read_json(spec["path"]).get("metadata")  # already validated as a loss file
    else:
        raise LossforgeError("loss type 'graph': give 'path' (a lossforge.loss/1 JSON file) or 'graph'")
    metadata = metadata if isinstance(metadata, Mapping) else {}
    target = spec.get("target", metadata.get("target", "label"))
    if target not in TRAINING_TARGETS:
        raise LossforgeError(f"loss type 'graph': target must be one of {', '.join(TRAINING_TARGETS)}, got {target!r}")
    return GraphSegLoss(graph, target=target, boundary=spec.get("boundary", metadata.get("boundary", "avgpool")),
                        boundary_width=spec.get("boundary_width", metadata.get("boundary_width", 1)))


def _build_surrogate(spec: Mapping[str, Any], num_classes: int | None) -> nn.Module:
    from components.surrogates import metric_surrogates

    n = spec.get("num_classes", num_classes)
    if n is None:
        raise LossforgeError("loss type 'surrogate': num_classes is needed (give it in the spec or to build_loss)")
    if "spec" in spec:
        surrogate = spec["spec"]
    elif "path" in spec:
        surrogate = metric_surrogates.load_surrogate(spec["path"])
    else:
        raise LossforgeError("loss type 'surrogate': give 'path' (a lossforge.surrogate/1 JSON file)")
    return metric_surrogates.SurrogateLoss(surrogate, int(n))


def build_loss(spec: str | Mapping[str, Any], num_classes: int | None = None) -> nn.Module:
    """Build a loss module from a name or a ``{"type": ..., **kwargs}`` dict (see the module docstring).

    ``num_classes`` is passed to losses whose constructor takes it (e.g. surrogates) unless the spec sets it.
    """
    if isinstance(spec, str):
        spec = {"type": spec}
    if not isinstance(spec, Mapping):
        raise LossforgeError(f"loss spec must be a name or a dict with 'type', got {type(spec).__name__}")
    if "type" not in spec:
        raise LossforgeError(f"loss spec {dict(spec)!r} has no 'type'; known types: {', '.join(LOSSES.names())}")
    kind = spec["type"]
    if not isinstance(kind, str):
        raise LossforgeError(f"loss spec 'type' must be a string, got {kind!r}")
    if kind == "graph":
        return _build_graph(spec)
    if kind == "surrogate":
        return _build_surrogate(spec, num_classes)
    klass = LOSSES.get(kind)
    kwargs = {k: v for k, v in spec.items() if k != "type"}
    return _instantiate(kind, klass, kwargs, num_classes)


def loss_name(spec: str | Mapping[str, Any]) -> str:
    """A short display name for a spec: the name itself, the type, or the file stem for graph/surrogate files."""
    if isinstance(spec, str):
        return spec
    kind = str(spec.get("type", "?"))
    if kind in SPECIAL_TYPES and "path" in spec:
        from pathlib import Path

        return f"{kind}:{Path(str(spec['path'])).stem}"
    extra = ",".join(f"{k}={v}" for k, v in spec.items() if k not in ("type", "num_classes"))
    return f"{kind}({extra})" if extra else kind
