"""Faster R-CNN with FPN (torchvision), randomly initialised, whose four losses come from a DetectionLoss.

Presets (``MODEL_PRESETS``):

* ``"cpu"``: ResNet-18 body up to layer3 (strides 4/8/16) + FPN with 64 channels (three levels, as the
  paper's proxy uses three FPN levels; plus torchvision's max-pool level), anchors 16/32/64/128 px,
  images resized to 128 px (``min_size = max_size = 128``), a 256-d box head, 64 sampled anchors and
  64 sampled proposals per image, few proposals. Sized for the embedded 64-px shapes data (objects
  8–30 px, i.e. 16–60 px at 128) and for a few hundred CPU iterations.
* ``"paper_proxy"``: the paper's search proxy: R50-FPN with the last three FPN levels only and the box
  head halved (512-d).
* ``"paper"``: ResNet-50-FPN (layers 1–4, 256 channels), 800/1333 px, 1024-d box head, torchvision's
  default sampling (256 anchors, 512 proposals) — the AutoLoss-Zero detection network, for a GPU.

Decisions:
- Random init only (``weights=None``, ``weights_backbone=None``): nothing is downloaded. The paper starts
  from an ImageNet-pretrained backbone; here the presets match its architecture and resolution only.
- Normalisation in the backbone is GroupNorm (32 groups), not torchvision's FrozenBatchNorm: frozen
  statistics are the identity for an untrained network, and BatchNorm is noisy at batch 2–4; GroupNorm is
  the usual choice for detectors trained from scratch.
- The RPN and RoI heads are :class:`~components.tasks.detection.losses.BranchLossRPN` /
  :class:`~components.tasks.detection.losses.BranchLossRoIHeads` (subclasses, nothing is patched), so
  ``set_detection_loss(model, loss)`` decides what the four branches compute.
- The anchor/proposal samplers are :class:`SeededSampler`: torchvision's sampler, drawing from a private
  generator once ``seed_samplers(model, seed)`` is called (from torch's global RNG before, exactly as
  torchvision). So is the transform's random choice of the training size (``SeededTransform``: nothing is
  drawn for a single size; torchvision draws one number from the global RNG per image even then). Trainings
  that run in threads then neither race on the global RNG nor depend on each other, and a model build
  (``components.tasks.seeding.seeded_init``) cannot be disturbed by another thread's training.
"""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass
from typing import Any

import torch
from torch import nn
from torchvision.models import resnet18, resnet34, resnet50
from torchvision.models.detection._utils import BalancedPositiveNegativeSampler
from torchvision.models.detection.anchor_utils import AnchorGenerator
from torchvision.models.detection.backbone_utils import BackboneWithFPN
from torchvision.models.detection.faster_rcnn import FastRCNNPredictor, TwoMLPHead
from torchvision.models.detection.generalized_rcnn import GeneralizedRCNN
from torchvision.models.detection.rpn import RPNHead
from torchvision.models.detection.transform import GeneralizedRCNNTransform
from torchvision.ops import MultiScaleRoIAlign

from components.errors import LossforgeError
from components.tasks.detection.losses import BranchLossRoIHeads, BranchLossRPN, DetectionLoss
from components.tasks.seeding import INIT_LOCK  # noqa: F401 (re-exported: the probes use it)


BACKBONES = {"resnet18": (resnet18, (64, 128, 256, 512)), "resnet34": (resnet34, (64, 128, 256, 512)),
             "resnet50": (resnet50, (256, 512, 1024, 2048))}


@dataclass(frozen=True)
class DetectorConfig:
    """Architecture and sampling of a Faster R-CNN; the defaults are the ``"cpu"`` preset.

    Unknown keys are an error when params.yaml builds it (pydantic ``extra="forbid"``)."""

    __pydantic_config__ = {"extra": "forbid"}

    name: str = "cpu"
    backbone: str = "resnet18"
    returned_layers: tuple[int, ...] = (1, 2, 3)
    fpn_channels: int = 64
    anchor_sizes: tuple[int, ...] = (16, 32, 64, 128)  # one per FPN level (the returned layers + max-pool level)
    aspect_ratios: tuple[float, ...] = (0.5, 1.0, 2.0)
    min_size: int = 128
    max_size: int = 128
    representation_size: int = 256
    group_norm: int = 32  # groups of the backbone's GroupNorm; 0 = BatchNorm
    rpn_batch_size_per_image: int = 64
    rpn_pre_nms_top_n_train: int = 600
    rpn_post_nms_top_n_train: int = 300
    rpn_pre_nms_top_n_test: int = 300
    rpn_post_nms_top_n_test: int = 150
    box_batch_size_per_image: int = 64
    box_detections_per_img: int = 100
    box_score_thresh: float = 0.05

    def __post_init__(self) -> None:
        if self.backbone not in BACKBONES:
            raise LossforgeError(f"proxy.model.backbone: {self.backbone!r} unknown (known: {', '.join(BACKBONES)})")
        layers = tuple(self.returned_layers)
        if not layers or any(l not in (1, 2, 3, 4) for l in layers) or list(layers) != sorted(set(layers)):
            raise LossforgeError(f"proxy.model.returned_layers: increasing subset of 1..4 expected, got {layers}")
        object.__setattr__(self, "returned_layers", layers)
        object.__setattr__(self, "anchor_sizes", tuple(self.anchor_sizes))
        object.__setattr__(self, "aspect_ratios", tuple(self.aspect_ratios))
        if len(self.anchor_sizes) != len(layers) + 1:
            raise LossforgeError(f"proxy.model.anchor_sizes: one size per FPN level ({len(layers) + 1}) expected, "
                                 f"got {len(self.anchor_sizes)}")
        for field in ("fpn_channels", "min_size", "max_size", "representation_size", "rpn_batch_size_per_image",
                      "box_batch_size_per_image", "box_detections_per_img"):
            if not isinstance(getattr(self, field), int) or getattr(self, field) < 1:
                raise LossforgeError(f"proxy.model.{field}: must be a positive int, got {getattr(self, field)!r}")
        if not isinstance(self.group_norm, int) or self.group_norm < 0 or (self.group_norm and 64 % self.group_norm):
            raise LossforgeError(f"proxy.model.group_norm: 0 (BatchNorm) or a divisor of 64 expected, got {self.group_norm!r}")


MODEL_PRESETS: dict[str, DetectorConfig] = {
    "cpu": DetectorConfig(),
    "paper": DetectorConfig(
        name="paper", backbone="resnet50", returned_layers=(1, 2, 3, 4), fpn_channels=256,
        anchor_sizes=(32, 64, 128, 256, 512), min_size=800, max_size=1333, representation_size=1024,
        rpn_batch_size_per_image=256, rpn_pre_nms_top_n_train=2000, rpn_post_nms_top_n_train=2000,
        rpn_pre_nms_top_n_test=1000, rpn_post_nms_top_n_test=1000, box_batch_size_per_image=512,
    ),
    # A.2 proxy: "only the last three feature levels of FPN, and reducing the channels of the detection head by half"
    "paper_proxy": DetectorConfig(
        name="paper_proxy", backbone="resnet50", returned_layers=(2, 3, 4), fpn_channels=256,
        anchor_sizes=(64, 128, 256, 512), min_size=800, max_size=1333, representation_size=512,
        rpn_batch_size_per_image=256, rpn_pre_nms_top_n_train=2000, rpn_post_nms_top_n_train=2000,
        rpn_pre_nms_top_n_test=1000, rpn_post_nms_top_n_test=1000, box_batch_size_per_image=512,
    ),
}


def model_preset(name: str | DetectorConfig) -> DetectorConfig:
    """A preset by name (a DetectorConfig is returned as is)."""
    if isinstance(name, DetectorConfig):
        return name
    if name not in MODEL_PRESETS:
        raise LossforgeError(f"detection model preset {name!r} unknown (known: {', '.join(MODEL_PRESETS)})")
    return MODEL_PRESETS[name]


class SeededSampler(BalancedPositiveNegativeSampler):
    """torchvision's balanced positive/negative sampler with an optional private CPU generator (same draws
    as torchvision's when ``generator`` is None)."""

    generator: torch.Generator | None = None

    def __call__(self, matched_idxs: list[torch.Tensor]) -> tuple[list[torch.Tensor], list[torch.Tensor]]:
        if self.generator is None:
            return super().__call__(matched_idxs)
        pos_idx, neg_idx = [], []
        for matched in matched_idxs:
            positive = torch.where(matched >= 1)[0]
            negative = torch.where(matched == 0)[0]
            num_pos = min(positive.numel(), int(self.batch_size_per_image * self.positive_fraction))
            num_neg = min(negative.numel(), self.batch_size_per_image - num_pos)
            perm1 = torch.randperm(positive.numel(), generator=self.generator)[:num_pos].to(positive.device)
            perm2 = torch.randperm(negative.numel(), generator=self.generator)[:num_neg].to(negative.device)
            pos_mask = torch.zeros_like(matched, dtype=torch.uint8)
            neg_mask = torch.zeros_like(matched, dtype=torch.uint8)
            pos_mask[positive[perm1]] = 1
            neg_mask[negative[perm2]] = 1
            pos_idx.append(pos_mask)
            neg_idx.append(neg_mask)
        return pos_idx, neg_idx


class SeededTransform(GeneralizedRCNNTransform):
    """torchvision's transform whose random choice among several training sizes draws from a private generator
    (torchvision's global-RNG draw when ``generator`` is None and there are several); one size draws nothing."""

    generator: torch.Generator | None = None

    def torch_choice(self, k: list[int]) -> int:
        if len(k) == 1:
            return k[0]
        if self.generator is None:
            return super().torch_choice(k)
        return k[int(torch.randint(len(k), (1,), generator=self.generator))]


def seed_samplers(model: GeneralizedRCNN, seed: int) -> None:
    """Give the model's RPN and RoI samplers (and its transform's size choice) private generators seeded from
    `seed` (see module doc)."""
    model.rpn.fg_bg_sampler.generator = torch.Generator().manual_seed(int(seed))
    model.roi_heads.fg_bg_sampler.generator = torch.Generator().manual_seed(int(seed) + 1)
    if isinstance(model.transform, SeededTransform):
        model.transform.generator = torch.Generator().manual_seed(int(seed) + 2)


def _backbone(cfg: DetectorConfig) -> BackboneWithFPN:
    factory, channels = BACKBONES[cfg.backbone]
    norm = (lambda c: nn.GroupNorm(cfg.group_norm, c)) if cfg.group_norm else nn.BatchNorm2d
    body = factory(weights=None, norm_layer=norm)
    return_layers = {f"layer{l}": str(k) for k, l in enumerate(cfg.returned_layers)}
    return BackboneWithFPN(body, return_layers, [channels[l - 1] for l in cfg.returned_layers], cfg.fpn_channels)


def build_detector(cfg: DetectorConfig | str, num_classes: int, loss: DetectionLoss | None = None) -> GeneralizedRCNN:
    """A randomly initialised Faster R-CNN (FPN) for `num_classes` classes (background included) whose training
    losses come from `loss` (torchvision's when None). Draws its weights from torch's global RNG."""
    cfg = model_preset(cfg)
    if num_classes < 2:
        raise LossforgeError(f"detector: num_classes must be >= 2 (background + 1), got {num_classes}")
    backbone = _backbone(cfg)
    levels = len(cfg.returned_layers) + 1
    anchors = AnchorGenerator(tuple((s,) for s in cfg.anchor_sizes), (tuple(cfg.aspect_ratios),) * levels)
    rpn_head = RPNHead(cfg.fpn_channels, anchors.num_anchors_per_location()[0])
    rpn = BranchLossRPN(
        anchors, rpn_head, fg_iou_thresh=0.7, bg_iou_thresh=0.3, batch_size_per_image=cfg.rpn_batch_size_per_image,
        positive_fraction=0.5,
        pre_nms_top_n={"training": cfg.rpn_pre_nms_top_n_train, "testing": cfg.rpn_pre_nms_top_n_test},
        post_nms_top_n={"training": cfg.rpn_post_nms_top_n_train, "testing": cfg.rpn_post_nms_top_n_test},
        nms_thresh=0.7,
    )
    roi_pool = MultiScaleRoIAlign([str(k) for k in range(len(cfg.returned_layers))], output_size=7, sampling_ratio=2)
    box_head = TwoMLPHead(cfg.fpn_channels * 7 * 7, cfg.representation_size)
    predictor = FastRCNNPredictor(cfg.representation_size, num_classes)
    roi_heads = BranchLossRoIHeads(
        roi_pool, box_head, predictor, fg_iou_thresh=0.5, bg_iou_thresh=0.5,
        batch_size_per_image=cfg.box_batch_size_per_image, positive_fraction=0.25, bbox_reg_weights=None,
        score_thresh=cfg.box_score_thresh, nms_thresh=0.5, detections_per_img=cfg.box_detections_per_img,
    )
    for module, size, fraction in ((rpn, cfg.rpn_batch_size_per_image, 0.5), (roi_heads, cfg.box_batch_size_per_image, 0.25)):
        module.fg_bg_sampler = SeededSampler(size, fraction)
    transform = SeededTransform(cfg.min_size, cfg.max_size, [0.485, 0.456, 0.406], [0.229, 0.224, 0.225])
    model = GeneralizedRCNN(backbone, rpn, roi_heads, transform)
    set_detection_loss(model, loss)
    return model


def set_detection_loss(model: GeneralizedRCNN, loss: DetectionLoss | None) -> GeneralizedRCNN:
    """Make `model`'s four branches compute `loss` (None: torchvision's losses)."""
    if not isinstance(model.rpn, BranchLossRPN) or not isinstance(model.roi_heads, BranchLossRoIHeads):
        raise LossforgeError("set_detection_loss: the model was not built by build_detector")
    if loss is not None and not isinstance(loss, DetectionLoss):
        raise LossforgeError(f"detection loss must be a DetectionLoss, got {type(loss).__name__}")
    model.rpn.set_detection_loss(loss)
    model.roi_heads.set_detection_loss(loss)
    return model


def detector_config_dict(cfg: DetectorConfig) -> dict[str, Any]:
    """JSON-able form of a DetectorConfig."""
    return dataclasses.asdict(cfg)


__all__ = ["DetectorConfig", "MODEL_PRESETS", "SeededSampler", "SeededTransform", "build_detector", "model_preset", "seed_samplers",
           "set_detection_loss"]
