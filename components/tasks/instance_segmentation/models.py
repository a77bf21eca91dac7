"""Mask R-CNN (torchvision, random init): the detection presets' Faster R-CNN plus a mask head.

Presets (``MODEL_PRESETS``, the detection presets of ``components.tasks.detection.models`` with a mask head):

* ``"cpu"``: the detection ``"cpu"`` detector (ResNet-18-FPN, 128 px) with a light mask head: RoIAlign 7×7,
  two 3×3 convolutions of 64 channels, masks predicted at 14×14.
* ``"paper_proxy"``: the detection search proxy (R50-FPN, three FPN levels, halved box head) with the mask head
  halved as well (four 128-channel convolutions; A.3: "the proxy task is the same as for object detection").
* ``"paper"``: Mask R-CNN R50-FPN as in torchvision / mmdetection: RoIAlign 14×14, four 256-channel
  convolutions, 28×28 masks.

Decisions:
- ``build_instance_segmenter`` calls the detection ``build_detector`` (same weights for the same seed: the
  backbone, RPN and box head are drawn first, the mask head after), then replaces the box RoI heads by a
  :class:`~components.tasks.instance_segmentation.losses.BranchLossMaskRoIHeads` holding the *same* box modules,
  matcher, box coder and seeded sampler, plus the mask head. Nothing is patched.
- The mask head has no normalisation (torchvision's and mmdetection's default).
"""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass

from torchvision.models.detection.generalized_rcnn import GeneralizedRCNN
from torchvision.models.detection.mask_rcnn import MaskRCNNHeads, MaskRCNNPredictor
from torchvision.ops import MultiScaleRoIAlign

from components.errors import LossforgeError
from components.tasks.detection.models import (INIT_LOCK, MODEL_PRESETS as DETECTION_PRESETS, DetectorConfig,
                                               build_detector, seed_samplers, set_detection_loss)
from components.tasks.instance_segmentation.losses import BranchLossMaskRoIHeads, InstanceSegmentationLoss


@dataclass(frozen=True)
class MaskRCNNConfig(DetectorConfig):
    """A DetectorConfig plus the mask head; the defaults are the ``"cpu"`` preset (unknown keys are an error)."""

    mask_pool_size: int = 7  # RoIAlign output; masks are predicted at twice this (the deconvolution)
    mask_head_layers: tuple[int, ...] = (64, 64)
    mask_dilation: int = 1

    def __post_init__(self) -> None:
        super().__post_init__()
        layers = tuple(self.mask_head_layers)
        if not layers or any(not isinstance(c, int) or c < 1 for c in layers):
            raise LossforgeError(f"proxy.model.mask_head_layers: positive ints expected, got {layers}")
        object.__setattr__(self, "mask_head_layers", layers)
        for field in ("mask_pool_size", "mask_dilation"):
            if not isinstance(getattr(self, field), int) or getattr(self, field) < 1:
                raise LossforgeError(f"proxy.model.{field}: must be a positive int, got {getattr(self, field)!r}")

    @property
    def mask_size(self) -> int:
        """Side M of the predicted (and target) RoI masks."""
        return 2 * self.mask_pool_size


def with_mask_head(cfg: DetectorConfig, **mask) -> MaskRCNNConfig:
    """`cfg` (a detection config) as a MaskRCNNConfig with the mask-head fields `mask` (defaults otherwise)."""
    fields = {f.name: getattr(cfg, f.name) for f in dataclasses.fields(DetectorConfig)}
    if isinstance(cfg, MaskRCNNConfig):
        fields.update({f: getattr(cfg, f) for f in ("mask_pool_size", "mask_head_layers", "mask_dilation")})
    return MaskRCNNConfig(**{**fields, **mask})


MODEL_PRESETS: dict[str, MaskRCNNConfig] = {
    "cpu": with_mask_head(DETECTION_PRESETS["cpu"]),
    "paper_proxy": with_mask_head(DETECTION_PRESETS["paper_proxy"], mask_pool_size=14, mask_head_layers=(128,) * 4),
    "paper": with_mask_head(DETECTION_PRESETS["paper"], mask_pool_size=14, mask_head_layers=(256,) * 4),
}


def model_preset(name: str | DetectorConfig) -> MaskRCNNConfig:
    """A preset by name; a MaskRCNNConfig as is; a plain DetectorConfig gets the default (CPU) mask head."""
    if isinstance(name, MaskRCNNConfig):
        return name
    if isinstance(name, DetectorConfig):
        return with_mask_head(name)
    if name not in MODEL_PRESETS:
        raise LossforgeError(f"instance segmentation model preset {name!r} unknown (known: {', '.join(MODEL_PRESETS)})")
    return MODEL_PRESETS[name]


def build_instance_segmenter(cfg: MaskRCNNConfig | DetectorConfig | str, num_classes: int,
                             loss: InstanceSegmentationLoss | None = None) -> GeneralizedRCNN:
    """A randomly initialised Mask R-CNN (FPN) for `num_classes` classes (background included) whose five
    training losses come from `loss` (torchvision's when None). Draws its weights from torch's global RNG."""
    cfg = model_preset(cfg)
    model = build_detector(cfg, num_classes)
    box = model.roi_heads
    levels = [str(k) for k in range(len(cfg.returned_layers))]
    mask_head = MaskRCNNHeads(cfg.fpn_channels, list(cfg.mask_head_layers), cfg.mask_dilation)
    heads = BranchLossMaskRoIHeads(
        box.box_roi_pool, box.box_head, box.box_predictor,
        fg_iou_thresh=box.proposal_matcher.high_threshold, bg_iou_thresh=box.proposal_matcher.low_threshold,
        batch_size_per_image=box.fg_bg_sampler.batch_size_per_image,
        positive_fraction=box.fg_bg_sampler.positive_fraction, bbox_reg_weights=box.box_coder.weights,
        score_thresh=box.score_thresh, nms_thresh=box.nms_thresh, detections_per_img=box.detections_per_img,
        mask_roi_pool=MultiScaleRoIAlign(levels, output_size=cfg.mask_pool_size, sampling_ratio=2),
        mask_head=mask_head,
        mask_predictor=MaskRCNNPredictor(cfg.mask_head_layers[-1], cfg.mask_head_layers[-1], num_classes),
    )
    heads.proposal_matcher, heads.fg_bg_sampler, heads.box_coder = box.proposal_matcher, box.fg_bg_sampler, box.box_coder
    model.roi_heads = heads
    set_instance_loss(model, loss)
    return model


def set_instance_loss(model: GeneralizedRCNN, loss: InstanceSegmentationLoss | None) -> GeneralizedRCNN:
    """Make `model`'s five branches compute `loss` (None: torchvision's losses)."""
    if not isinstance(getattr(model, "roi_heads", None), BranchLossMaskRoIHeads):
        raise LossforgeError("set_instance_loss: the model was not built by build_instance_segmenter")
    if loss is not None and not isinstance(loss, InstanceSegmentationLoss):
        raise LossforgeError(f"instance segmentation loss must be an InstanceSegmentationLoss, got {type(loss).__name__}")
    return set_detection_loss(model, loss)


__all__ = ["INIT_LOCK", "MODEL_PRESETS", "MaskRCNNConfig", "build_instance_segmenter", "model_preset",
           "seed_samplers", "set_instance_loss", "with_mask_head"]
