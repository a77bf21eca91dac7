"""SimpleBaseline pose networks [58]: a torchvision ResNet (random init) + deconvolutions → K heatmaps.

The head: ``deconv_layers`` transposed convolutions (4x4, stride 2, BN, ReLU) take the stride-32 features to
stride 4, then a 1x1 convolution gives one raw heatmap per keypoint slot (no sigmoid: SimpleBaseline and MMPose
regress the Gaussian targets with the raw output, and the paper's searched loss regularises "too large
prediction values", i.e. an unbounded ŷ). Head init as SimpleBaseline: deconvolutions and final conv N(0, 0.001),
biases 0. Presets (``MODEL_PRESETS``): ``cpu`` (ResNet-18, 64x64 crops, 16x16 heatmaps, 64-channel head) and
``paper`` (ResNet-50, 256x192 crops, 64x48 heatmaps, three 256-channel deconvolutions: A.4).
"""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass
from typing import Any, Mapping

import torch
from torch import nn

from components.errors import LossforgeError

BACKBONES = ("resnet18", "resnet34", "resnet50", "resnet101")


@dataclass(frozen=True)
class PoseModelConfig:
    """A SimpleBaseline network: backbone, input (H, W), head width and depth (heatmaps at input / 4)."""

    backbone: str = "resnet18"
    input_size: tuple[int, int] = (64, 64)
    deconv_channels: int = 64
    deconv_layers: int = 3

    def __post_init__(self) -> None:
        if self.backbone not in BACKBONES:
            raise LossforgeError(f"proxy.model.backbone: must be one of {', '.join(BACKBONES)}, got {self.backbone!r}")
        size = tuple(self.input_size) if isinstance(self.input_size, (list, tuple)) else (self.input_size,) * 2
        if len(size) != 2 or any(not isinstance(v, int) or isinstance(v, bool) or v < 32 or v % 32 for v in size):
            raise LossforgeError(f"proxy.model.input_size: [H, W] multiples of 32 expected, got {self.input_size!r}")
        object.__setattr__(self, "input_size", size)
        for name in ("deconv_channels", "deconv_layers"):
            value = getattr(self, name)
            if not isinstance(value, int) or isinstance(value, bool) or value < 1:
                raise LossforgeError(f"proxy.model.{name}: must be a positive int, got {value!r}")

    @property
    def heatmap_size(self) -> tuple[int, int]:
        """(h, w) of the output heatmaps: input / 32 · 2^deconv_layers."""
        factor = 2 ** self.deconv_layers / 32
        return int(self.input_size[0] * factor), int(self.input_size[1] * factor)


MODEL_PRESETS: dict[str, PoseModelConfig] = {
    "cpu": PoseModelConfig("resnet18", (64, 64), 64, 3),
    "paper": PoseModelConfig("resnet50", (256, 192), 256, 3),
}


def model_preset(model: Any) -> PoseModelConfig:
    """A PoseModelConfig from a config, a preset name, or a dict of its fields (params.yaml)."""
    if isinstance(model, PoseModelConfig):
        return model
    if isinstance(model, str):
        if model not in MODEL_PRESETS:
            raise LossforgeError(f"proxy.model: unknown preset {model!r} (known: {', '.join(MODEL_PRESETS)})")
        return MODEL_PRESETS[model]
    if isinstance(model, Mapping):
        fields = {f.name for f in dataclasses.fields(PoseModelConfig)}
        unknown = [k for k in model if k not in fields]
        if unknown:
            raise LossforgeError(f"proxy.model: unknown key(s) {', '.join(map(str, unknown))} (accepted: {', '.join(sorted(fields))})")
        return PoseModelConfig(**{k: (tuple(v) if isinstance(v, list) else v) for k, v in model.items()})
    raise LossforgeError(f"proxy.model: a preset name or a mapping expected, got {type(model).__name__}")


class SimpleBaseline(nn.Module):
    """ResNet features → deconvolutions → 1x1 conv: raw heatmaps (N, K, h, w) of crops (N, 3, H, W)."""

    def __init__(self, cfg: PoseModelConfig, num_keypoints: int):
        super().__init__()
        import torchvision

        resnet = getattr(torchvision.models, cfg.backbone)(weights=None)
        self.backbone = nn.Sequential(resnet.conv1, resnet.bn1, resnet.relu, resnet.maxpool,
                                      resnet.layer1, resnet.layer2, resnet.layer3, resnet.layer4)
        channels = resnet.fc.in_features
        layers: list[nn.Module] = []
        for _ in range(cfg.deconv_layers):
            layers += [nn.ConvTranspose2d(channels, cfg.deconv_channels, 4, stride=2, padding=1, bias=False),
                       nn.BatchNorm2d(cfg.deconv_channels), nn.ReLU(inplace=True)]
            channels = cfg.deconv_channels
        self.head = nn.Sequential(*layers)
        self.final = nn.Conv2d(channels, num_keypoints, 1)
        for m in self.head.modules():
            if isinstance(m, nn.ConvTranspose2d):
                nn.init.normal_(m.weight, std=0.001)
        nn.init.normal_(self.final.weight, std=0.001)
        nn.init.zeros_(self.final.bias)
        self.register_buffer("mean", torch.tensor([0.485, 0.456, 0.406]).view(1, 3, 1, 1), persistent=False)
        self.register_buffer("std", torch.tensor([0.229, 0.224, 0.225]).view(1, 3, 1, 1), persistent=False)

    def forward(self, images: torch.Tensor) -> torch.Tensor:
        return self.final(self.head(self.backbone((images - self.mean) / self.std)))


def build_pose_model(cfg: PoseModelConfig | str, num_keypoints: int) -> SimpleBaseline:
    """A randomly initialised SimpleBaseline with `num_keypoints` heatmap channels."""
    if num_keypoints < 1:
        raise LossforgeError(f"pose model: num_keypoints must be >= 1, got {num_keypoints}")
    return SimpleBaseline(model_preset(cfg), int(num_keypoints))


__all__ = ["BACKBONES", "MODEL_PRESETS", "PoseModelConfig", "SimpleBaseline", "build_pose_model", "model_preset"]
