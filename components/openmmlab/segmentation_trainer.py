"""The segmentation task's ``model.backend: openmmlab``: proxy trainings and re-training of an mmsegmentation model
(``model.config``, an mmseg config ``.py``) with each candidate loss as its decode head's loss.

Decisions:

* **The project's loop, not mmengine's Runner.** A Runner owns one model, one optimiser, its own data loader and
  hooks; the search needs M models side by side on the *same* batches, a NaN stop per model and failures isolated
  per model. So the segmentor is built through the mmseg MODELS registry and driven with the loops the native
  trainers use (``components.tasks.side_by_side.train_and_evaluate``, the segmentation ``training_batches`` and
  ``evaluate_models``): same images in the same order for every loss (seeded), a non-finite loss stops that member
  alone (``"nan"``), an exception marks it ``"failed"``.
* **Only the model comes from the config.** Schedule, optimiser (SGD/AdamW, backbone/head lr groups, poly decay),
  batch size, input size and device come from ``proxy:`` / ``retrain:`` as for the native backend, so the two
  backends are compared on equal terms; the config's ``optim_wrapper``, ``param_scheduler``, dataloaders and
  ``data_preprocessor`` are not used (the project's batches arrive already normalised with the ImageNet mean/std
  in RGB, what mmseg's ``SegDataPreProcessor`` makes of 0-255 BGR images). ``num_classes`` is the dataset's
  (decode and auxiliary heads); weights are random (``pretrained`` and ``Pretrained`` init configs are dropped:
  nothing is downloaded), drawn under ``seeded_init(seed)``.
* **The candidate is the decode head's ``loss_decode``** (``DecodeHeadLoss``): mmseg's ``loss_by_feat`` upsamples
  the head's logits to the label size and calls it, so it sees what the native loss sees (logits at the training
  size, labels with 255 = ignore) and returns the native value. Auxiliary heads keep the config's own losses (as
  in the papers' mmseg settings); the optimised total is mmseg's sum of every ``loss*`` term.
* **The project's metrics.** Prediction is ``EncoderDecoder.encode_decode`` (whole image at the training size,
  logits upsampled to each mask's size), scored by ``components.tasks.segmentation.metrics``, so the numbers are
  the native backend's for the same predictions.
* Dropout (DeepLabV3+ heads have it) draws from a private RNG state per member under ``seeding.INIT_LOCK``, as in
  the native trainer, so a member's result does not depend on the other members. On CPU oneDNN is turned off as
  for the native waves (``trainer.cpu_convolutions_without_onednn``: concurrent trainings in threads).
"""

from __future__ import annotations

from collections.abc import Iterator, Mapping
from pathlib import Path
from typing import Any

import torch
from torch import Tensor, nn

from components.errors import LossforgeError
from components.openmmlab import INSTALL_HINT, missing_packages
from components.tasks.base import ProxyResult

SEG_PACKAGES = ("mmengine", "mmcv", "mmseg")
LOSS_NAME = "loss_candidate"  # the decode head's loss key (mmseg logs it as ``decode.loss_candidate``)


def check_backend_installed(field: str = "model.backend") -> None:
    """One-line LossforgeError naming `field` when the packages of the openmmlab backend are missing."""
    missing = missing_packages(SEG_PACKAGES)
    if missing:
        raise LossforgeError(f"{field}: openmmlab needs {', '.join(missing)}, not installed; {INSTALL_HINT}")


def check_model_config(model: Any) -> None:
    """The segmentation task's check of `model.backend: openmmlab` (models.BACKENDS): the packages are installed
    and `model.config` is a usable mmseg config; one-line errors naming the field."""
    check_backend_installed("model.backend")
    load_segmentor_config(model.config, "model.config")


def load_segmentor_config(path: str | Path, field: str = "model.config") -> Any:
    """The mmengine Config of an mmseg config file, checked: it exists, loads, and its ``model`` is a registered
    mmseg segmentor with a registered ``decode_head``. Errors are one line naming `field` and the file."""
    check_backend_installed()
    from mmengine.config import Config
    from mmseg.registry import MODELS

    import components.openmmlab.registry  # noqa: F401 - the searched-loss modules a config may name

    if not str(path):
        raise LossforgeError(f"{field}: the openmmlab backend needs an mmseg config file (.py)")
    file = Path(path)
    if not file.is_file():
        raise LossforgeError(f"{field}: {path}: no such file")
    try:
        cfg = Config.fromfile(str(file))
    except Exception as exc:
        raise LossforgeError(f"{field}: {path}: cannot load it ({' '.join(f'{type(exc).__name__}: {exc}'.split())[:300]})") from None
    model = cfg.get("model")
    if not isinstance(model, Mapping) or not isinstance(model.get("decode_head"), Mapping):
        raise LossforgeError(f"{field}: {path}: needs model=dict(type=..., decode_head=dict(...)) (an mmseg segmentor)")
    for where, node in (("model", model), ("model.decode_head", model["decode_head"])):
        kind = node.get("type")
        if not isinstance(kind, str) or MODELS.get(kind) is None:
            raise LossforgeError(f"{field}: {path}: {where}.type {kind!r} is not an mmseg model")
    return cfg


def _random_init(node: Any) -> Any:
    """`node` without pretrained weights: ``pretrained`` keys set to None, ``init_cfg`` of type Pretrained dropped."""
    if isinstance(node, Mapping):
        out = {}
        for key, value in node.items():
            if key == "pretrained":
                out[key] = None
            elif key == "init_cfg" and isinstance(value, Mapping) and value.get("type") == "Pretrained":
                continue
            else:
                out[key] = _random_init(value)
        return out
    if isinstance(node, (list, tuple)):
        return type(node)(_random_init(v) for v in node)
    return node


def segmentor_model_config(path: str | Path, num_classes: int) -> dict[str, Any]:
    """The ``model`` dict of the config, ready to build: ``num_classes`` in every head, random init, no
    data preprocessor (the project's batches are already normalised)."""
    cfg = load_segmentor_config(path)
    model = _random_init(cfg.model.to_dict() if hasattr(cfg.model, "to_dict") else dict(cfg.model))
    model.pop("data_preprocessor", None)
    heads = [model["decode_head"]]
    aux = model.get("auxiliary_head")
    heads += list(aux) if isinstance(aux, (list, tuple)) else ([aux] if isinstance(aux, Mapping) else [])
    for head in heads:
        head["num_classes"] = int(num_classes)
        head.pop("out_channels", None)  # mmseg derives it from num_classes
    return model


class DecodeHeadLoss(nn.Module):
    """A project loss module as an mmseg ``loss_decode``: ``forward(seg_logits, seg_label, weight, ignore_index)``
    returns ``loss(seg_logits, seg_label)``, the native call; pixels of weight 0 (an OHEM sampler) are ignored."""

    def __init__(self, loss: nn.Module):
        super().__init__()
        self.loss = loss

    @property
    def loss_name(self) -> str:
        return LOSS_NAME

    def forward(self, seg_logits: Tensor, seg_label: Tensor, weight: Tensor | None = None, ignore_index: int = 255,
                **kwargs: Any) -> Tensor:
        from components.openmmlab.losses import _drop_unweighted

        return self.loss(seg_logits, _drop_unweighted(seg_label, weight, ignore_index))


class MMSegLogits(nn.Module):
    """An mmseg ``EncoderDecoder`` as the project's segmentation model: ``forward(images (N,3,S,S))`` -> logits
    ``(N,K,S,S)`` (``encode_decode``); ``losses(images, samples)`` -> mmseg's loss dict. ``backbone`` is the
    segmentor's backbone (the backbone lr group; neck and heads form the head group)."""

    def __init__(self, segmentor: nn.Module):
        super().__init__()
        self.segmentor = segmentor

    @property
    def backbone(self) -> nn.Module:
        return self.segmentor.backbone

    def set_loss(self, loss: nn.Module) -> None:
        self.segmentor.decode_head.loss_decode = DecodeHeadLoss(loss)

    def forward(self, images: Tensor) -> Tensor:
        shape = tuple(images.shape[-2:])
        metas = [dict(img_shape=shape, pad_shape=shape, ori_shape=shape) for _ in range(images.shape[0])]
        return self.segmentor.encode_decode(images, metas)

    def losses(self, images: Tensor, samples: list) -> dict[str, Tensor]:
        return self.segmentor.loss(images, samples)


def build_segmentor(path: str | Path, num_classes: int, seed: int) -> MMSegLogits:
    """The config's segmentor with `num_classes`, random weights drawn from `seed` only."""
    import logging
    import warnings

    from mmengine.logging import MMLogger
    from mmengine.registry import DefaultScope
    from mmseg.registry import MODELS

    from components.tasks.seeding import seeded_init

    model_cfg = segmentor_model_config(path, num_classes)
    logger = MMLogger.get_current_instance()
    level = logger.level
    logger.setLevel(logging.WARNING)  # init_weights logs every parameter's init at INFO
    try:
        with DefaultScope.overwrite_default_scope("mmseg"), seeded_init(seed), warnings.catch_warnings():
            warnings.simplefilter("ignore", UserWarning)  # mmseg's deprecation notes on its own loss builder
            segmentor = MODELS.build(model_cfg)
            segmentor.init_weights()
    finally:
        logger.setLevel(level)
    return MMSegLogits(segmentor)


def data_samples(masks: Tensor) -> list:
    """mmseg ``SegDataSample``s for masks ``(N,H,W)`` (the ground truth the decode head's loss reads)."""
    from mmengine.structures import PixelData
    from mmseg.structures import SegDataSample

    shape = tuple(masks.shape[-2:])
    out = []
    for mask in masks:
        sample = SegDataSample(metainfo=dict(img_shape=shape, pad_shape=shape, ori_shape=shape))
        sample.gt_sem_seg = PixelData(data=mask[None])
        out.append(sample)
    return out


def total_loss(losses: Mapping[str, Any]) -> Tensor:
    """mmseg's training objective: the sum of every term whose key contains ``loss`` (mmengine's parse_losses)."""
    terms = [v if isinstance(v, Tensor) else sum(v) for k, v in losses.items() if "loss" in k]
    if not terms:
        raise ValueError(f"the segmentor returned no loss terms (keys: {', '.join(losses)})")
    return sum(t.mean() for t in terms)


class _PrivateRNG:
    """Swap a member's own RNG state into torch's global generator (dropout) under ``INIT_LOCK``."""

    def __init__(self, states: dict[str, tuple], name: str, device: torch.device):
        self.states, self.name, self.device = states, name, device

    def __enter__(self):
        from components.tasks.seeding import INIT_LOCK

        self.lock = INIT_LOCK
        self.lock.acquire()
        self.fork = torch.random.fork_rng(devices=[self.device] if self.device.type == "cuda" else [])
        self.fork.__enter__()
        cpu, cuda = self.states[self.name]
        torch.set_rng_state(cpu)
        if cuda is not None:
            torch.cuda.set_rng_state(cuda, self.device)

    def __exit__(self, *exc):
        try:
            cuda = torch.cuda.get_rng_state(self.device) if self.device.type == "cuda" else None
            self.states[self.name] = (torch.get_rng_state(), cuda)
            self.fork.__exit__(*exc)
        finally:
            self.lock.release()
        return False


def train_proxy(losses: Mapping[str, nn.Module], train_ds: Any, eval_ds: Any, cfg: Any, target_metric: str = "mIoU",
                *, num_classes: int | None = None, on_progress: Any = None) -> dict[str, ProxyResult]:
    """Train one copy of ``cfg.model.config``'s segmentor per loss on the same batches and evaluate the
    survivors on ``eval_ds`` with the project's six metrics: name -> ProxyResult (the native trainer's contract;
    ``final_loss`` and the progress values are mmseg's total, the candidate alone without auxiliary heads)."""
    from components.tasks import side_by_side
    from components.tasks.segmentation import trainer as native
    from components.tasks.segmentation.metrics import METRIC_NAMES, canonical_metric_name
    from components.tasks.segmentation.models import resolve_device

    if not losses:
        raise LossforgeError("train_proxy: no losses given")
    target_metric = canonical_metric_name(target_metric)
    if target_metric not in METRIC_NAMES:
        raise LossforgeError(f"target metric {target_metric!r} unknown; known: {', '.join(METRIC_NAMES)}")
    n_classes = native._num_classes(train_ds, num_classes)
    if len(eval_ds) == 0:
        raise LossforgeError("evaluation set is empty")
    device = resolve_device(cfg.device)
    if device.type == "cpu":
        native.cpu_convolutions_without_onednn()
    template = build_segmentor(cfg.model.config, n_classes, cfg.seed)
    members = side_by_side.make_members(
        losses, template, target_metric, nn.Module, lambda model: native.make_optimizer(model, cfg), device,
        prepare=lambda model, loss: model.set_loss(loss))
    del template
    start = torch.Generator().manual_seed(cfg.seed + 2).get_state()  # every member's dropout stream: seed + 2
    start_cuda = (torch.Generator(device=device).manual_seed(cfg.seed + 2).get_state()
                  if device.type == "cuda" else None)
    rng = {m.name: (start.clone(), None if start_cuda is None else start_cuda.clone()) for m in members}

    def stream() -> Iterator[tuple[Tensor, Tensor, list]]:
        for images, masks in native.training_batches(train_ds, cfg, device):
            yield images, masks, data_samples(masks)

    def step(member: side_by_side.Member, batch: tuple, iteration: int) -> float | None:
        images, _, samples = batch

        def compute_loss(m: side_by_side.Member) -> Tensor:
            with _PrivateRNG(rng, m.name, device):
                return total_loss(m.model.losses(images, samples))

        return side_by_side.optimisation_step(  # backbone / head groups keep their own poly-decayed lr
            member, compute_loss, iteration,
            lambda group: native.poly_lr(group["initial_lr"], iteration - 1, cfg.iterations, cfg.poly_power, cfg.min_lr),
            what="segmentation loss")

    def evaluate(models: dict[str, nn.Module]) -> dict[str, Any]:
        return native.evaluate_models(models, eval_ds, cfg, n_classes, device)

    return side_by_side.train_and_evaluate(members, stream(), step, cfg.iterations, device, target_metric, evaluate,
                                           on_progress)


__all__ = ["DecodeHeadLoss", "MMSegLogits", "build_segmentor", "check_backend_installed", "check_model_config", "data_samples",
           "load_segmentor_config", "segmentor_model_config", "total_loss", "train_proxy"]
