"""Segmentation models built from well-kept libraries, randomly initialised, never downloading weights.

Models (``ModelConfig.name``):

- ``"deeplabv3plus"``: DeepLabV3+ from segmentation-models-pytorch (the papers' model). ``encoder`` is any
  smp encoder (``resnet18/34/50/101``, ...) or a timm encoder written ``"tu-<timm name>"``;
  ``decoder_channels`` is the width of the ASPP/decoder head; ``output_stride`` 8 or 16.
- ``"deeplabv3"``: torchvision's DeepLabV3 (``encoder`` resnet50, resnet101 or mobilenet_v3_large; the
  torchvision head has a fixed width of 256).
- ``"unet"``: the small grouped UNet of ``components.tasks.segmentation.wave_unet`` (``widths`` channels per level), the CPU
  proxy: it trains a wave of M candidate losses as one network, and from scratch it learns the embedded
  data within a few hundred AdamW steps at 32² (``encoder``/``decoder_channels``/``output_stride`` unused).

The lightest model (preset ``"lite"``, used by CPU tests and the demo) is still a real DeepLabV3+: smp's
ASPP + decoder (32 channels) on timm's MobileNetV3-Small-0.5 encoder (0.34 M parameters in all).
Presets ``"paper_proxy"`` (R50, 128²) and ``"paper_retrain"`` (R101, 512²) are the AutoLoss-Zero /
Auto Seg-Loss settings.
"""

from __future__ import annotations

import importlib
from dataclasses import dataclass, replace
from typing import Any

import torch
from torch import nn

from components.errors import LossforgeError

MODEL_NAMES = ("deeplabv3plus", "deeplabv3", "unet")
BACKENDS: dict[str, str] = {
    "native": "components.tasks.segmentation.trainer",
    "openmmlab": "components.openmmlab.segmentation_trainer",
}
"""`model.backend` -> the module with its `train_proxy` (and, other than native, `check_model_config(model)`).
Found by name and imported on use, like the search methods' registry: the OpenMMLab adapter depends on this
task package, not the other way round, and its packages are optional."""


def backend_module(name: str) -> Any:
    """The trainer module of backend `name` (imported now)."""
    return importlib.import_module(BACKENDS[name])
TORCHVISION_ENCODERS = ("resnet50", "resnet101", "mobilenet_v3_large")
BACKBONE_ATTRIBUTES = ("encoder", "backbone")  # parameters under these modules form the backbone group


@dataclass(frozen=True)
class ModelConfig:
    """Which segmentation network to build and at which input resolution.

    ``input_size`` is the square side images are resized to for training (proxy: 128, re-training: 512);
    evaluation predicts at that size and upsamples the logits to each mask's own size.

    ``backend``: ``"native"`` (the models below) or ``"openmmlab"``: the segmentor of ``config``, an mmseg config
    file (``components.openmmlab.segmentation_trainer``; then ``name``/``encoder``/... are unused). The config is
    loaded and checked here, so a bad one is an error before anything runs.
    """

    name: str = "deeplabv3plus"
    encoder: str = "resnet18"
    decoder_channels: int = 256
    output_stride: int = 16
    input_size: int = 128
    widths: tuple[int, ...] = (16, 32, 64)
    backend: str = "native"
    config: str = ""

    def __post_init__(self) -> None:
        if isinstance(self.widths, list):
            object.__setattr__(self, "widths", tuple(self.widths))
        if not (isinstance(self.widths, tuple) and len(self.widths) >= 2
                and all(isinstance(w, int) and w >= 1 for w in self.widths)):
            raise LossforgeError(f"model.widths: need >= 2 positive ints, got {self.widths!r}")
        if self.name not in MODEL_NAMES:
            raise LossforgeError(f"model.name: unknown model {self.name!r}; known: {', '.join(MODEL_NAMES)}")
        if self.output_stride not in (8, 16):
            raise LossforgeError(f"model.output_stride: must be 8 or 16, got {self.output_stride!r}")
        if not isinstance(self.input_size, int) or self.input_size < 32 or self.input_size % 32:
            raise LossforgeError(f"model.input_size: must be a multiple of 32 (>= 32), got {self.input_size!r}")
        if not isinstance(self.decoder_channels, int) or self.decoder_channels < 1:
            raise LossforgeError(f"model.decoder_channels: must be a positive int, got {self.decoder_channels!r}")
        if self.name == "deeplabv3":
            if self.encoder not in TORCHVISION_ENCODERS:
                raise LossforgeError(
                    f"model.encoder: torchvision deeplabv3 supports {', '.join(TORCHVISION_ENCODERS)}, got {self.encoder!r}"
                )
            if self.decoder_channels != 256:
                raise LossforgeError("model.decoder_channels: torchvision deeplabv3 has a fixed head width of 256")
        if self.backend not in BACKENDS:
            raise LossforgeError(f"model.backend: must be one of {', '.join(BACKENDS)}, got {self.backend!r}")
        if self.backend != "native":
            backend_module(self.backend).check_model_config(self)
        elif self.config:
            raise LossforgeError("model.config: only used with model.backend: openmmlab")


MODEL_PRESETS: dict[str, ModelConfig] = {
    # Lightest real model, for CPU tests and the demo (about 40 ms per 8×64² training step on 2 CPU cores).
    "lite": ModelConfig(encoder="tu-mobilenetv3_small_050", decoder_channels=32, output_stride=16, input_size=64),
    # The CPU proxy: a 3-level grouped UNet (16-32-64 channels) at 32², trained as waves of candidates.
    "cpu_unet": ModelConfig(name="unet", encoder="none", decoder_channels=64, input_size=32, widths=(16, 32, 64)),
    # A small ResNet DeepLabV3+ for CPU runs that want a ResNet backbone.
    "cpu_r18": ModelConfig(encoder="resnet18", decoder_channels=64, input_size=64),
    # AutoLoss-Zero appendix A.1 / Auto Seg-Loss: proxy = R50-DeepLabV3+ on 128², re-training = R101 on 512².
    "paper_proxy": ModelConfig(encoder="resnet50", decoder_channels=256, output_stride=16, input_size=128),
    "paper_retrain": ModelConfig(encoder="resnet101", decoder_channels=256, output_stride=16, input_size=512),
}


def model_preset(name: str, **overrides) -> ModelConfig:
    """A named ModelConfig (see MODEL_PRESETS), optionally with some fields replaced."""
    if name not in MODEL_PRESETS:
        raise LossforgeError(f"model preset {name!r} unknown; known: {', '.join(MODEL_PRESETS)}")
    return replace(MODEL_PRESETS[name], **overrides)


class _TorchvisionLogits(nn.Module):
    """Adapts a torchvision segmentation model (dict output) to return the logits tensor."""

    def __init__(self, model: nn.Module):
        super().__init__()
        self.model = model

    @property
    def backbone(self) -> nn.Module:
        return self.model.backbone

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.model(x)["out"]


class _SingleUNet(nn.Module):
    """A one-member WaveUNet with the usual ``(N, K, H, W)`` output (re-training, probes, export)."""

    def __init__(self, net: nn.Module):
        super().__init__()
        self.net = net

    @property
    def backbone(self) -> nn.Module:
        return self.net.encoder

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.net(x)[:, 0]


def build_wave_model(cfg: ModelConfig, num_classes: int, members: int) -> nn.Module:
    """``members`` identical copies of the ``"unet"`` model as one grouped network (output (N, M, K, H, W)).

    The single-member network is built first from torch's current seed and tiled, so every member starts
    from the weights ``build_model`` would give under the same seed.
    """
    from components.tasks.segmentation.wave_unet import WaveUNet

    if cfg.name != "unet":
        raise LossforgeError(f"model.name: waves need the 'unet' model, got {cfg.name!r}")
    single = WaveUNet(num_classes, 1, cfg.widths)
    return single if members == 1 else WaveUNet(num_classes, members, cfg.widths).tile_from(single)


def build_model(cfg: ModelConfig, num_classes: int) -> nn.Module:
    """Build the configured network, randomly initialised (no weights are ever downloaded).

    The model maps images ``(N, 3, H, W)`` to logits ``(N, num_classes, H, W)``.
    """
    if not isinstance(num_classes, int) or num_classes < 2:
        raise LossforgeError(f"num_classes: must be an int >= 2, got {num_classes!r}")
    if cfg.name == "unet":
        return _SingleUNet(build_wave_model(cfg, num_classes, 1))
    if cfg.name == "deeplabv3plus":
        import segmentation_models_pytorch as smp

        try:
            return smp.DeepLabV3Plus(
                encoder_name=cfg.encoder,
                encoder_weights=None,
                encoder_output_stride=cfg.output_stride,
                decoder_channels=cfg.decoder_channels,
                classes=num_classes,
            )
        except (KeyError, ValueError, RuntimeError) as exc:
            raise LossforgeError(f"model.encoder: cannot build DeepLabV3+ with encoder {cfg.encoder!r} ({exc})") from None
    from torchvision.models import segmentation as tvseg

    factory = getattr(tvseg, f"deeplabv3_{cfg.encoder}")
    model = factory(weights=None, weights_backbone=None, num_classes=num_classes, aux_loss=False)
    return _TorchvisionLogits(model)


def split_parameters(model: nn.Module) -> tuple[list[nn.Parameter], list[nn.Parameter]]:
    """(backbone, head) parameters: the backbone is the ``encoder``/``backbone`` sub-module, the head the rest."""
    backbone_ids: set[int] = set()
    for attr in BACKBONE_ATTRIBUTES:
        sub = getattr(model, attr, None)
        if isinstance(sub, nn.Module):
            backbone_ids.update(id(p) for p in sub.parameters())
    if not backbone_ids:
        raise LossforgeError(f"model {type(model).__name__} has no 'encoder' or 'backbone' sub-module")
    params = [p for p in model.parameters() if p.requires_grad]
    return [p for p in params if id(p) in backbone_ids], [p for p in params if id(p) not in backbone_ids]


def param_groups(model: nn.Module, lr: float, head_lr_mult: float = 10.0) -> list[dict]:
    """SGD parameter groups: the backbone at ``lr``, the head (decoder + classifier) at ``lr * head_lr_mult``.

    Each group carries ``initial_lr`` so a poly schedule can rescale it.
    """
    backbone, head = split_parameters(model)
    return [
        {"params": backbone, "lr": lr, "initial_lr": lr, "name": "backbone"},
        {"params": head, "lr": lr * head_lr_mult, "initial_lr": lr * head_lr_mult, "name": "head"},
    ]


def resolve_device(device: str) -> torch.device:
    """``"cpu"``, ``"cuda"`` (or ``"cuda:N"``) or ``"auto"`` (CUDA when available) → torch.device."""
    if device == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    if device == "cpu":
        return torch.device("cpu")
    if device.startswith("cuda"):
        if not torch.cuda.is_available():
            raise LossforgeError(f"device: {device!r} requested but CUDA is not available")
        return torch.device(device)
    raise LossforgeError(f"device: must be 'cpu', 'cuda' or 'auto', got {device!r}")
