"""A small UNet that holds M independent members as one network (grouped convolutions), for waves of proxy trainings.

Why a grouped network: a wave trains M candidate losses on the same batches from the same initial
weights. Stacking the M models into one network whose every convolution has ``groups=M`` (and whose
BatchNorm runs over the M·C channels, i.e. M independent BatchNorms) makes one forward/backward pass
compute all M models, while member m's parameters only ever see member m's activations and member m's
loss: the gradient of Σ_m L_m with respect to member m is ∇L_m, so training the wave equals training each
member alone (within float tolerance; tested). ``torch.func.vmap`` over stacked parameters was measured
slower on CPU (0.74× a loop) and cannot update BatchNorm running statistics; grouped convolutions are a
single ATen call per layer on CPU and GPU alike. No library ships such a network, hence this file; the
papers' profiles keep smp's DeepLabV3+.

Layout: ``levels`` resolution levels of two 3×3 conv-BN-ReLU blocks each, 2×2 max-pool down, nearest
up-sampling + skip concatenation up, a 1×1 classifier. ``forward(x (N,3,H,W)) -> (N, M, K, H, W)`` logits of
the M members (M = 1: use ``member_logits`` / a plain ``(N,K,H,W)`` via ``squeeze_members``). Members are
initialised identically (``tile_from``) from one seeded single-member build.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from components.errors import LossforgeError


class _GroupedBlock(nn.Module):
    """conv3×3 (groups=M) → BN(M·C_out) → ReLU, twice."""

    def __init__(self, members: int, c_in: int, c_out: int):
        super().__init__()
        m = members
        self.conv1 = nn.Conv2d(m * c_in, m * c_out, 3, padding=1, groups=m, bias=False)
        self.bn1 = nn.BatchNorm2d(m * c_out)
        self.conv2 = nn.Conv2d(m * c_out, m * c_out, 3, padding=1, groups=m, bias=False)
        self.bn2 = nn.BatchNorm2d(m * c_out)

    def forward(self, x: Tensor) -> Tensor:
        x = F.relu(self.bn1(self.conv1(x)), inplace=True)
        return F.relu(self.bn2(self.conv2(x)), inplace=True)


def _cat_members(a: Tensor, b: Tensor, members: int) -> Tensor:
    """Concatenate two (N, M·Ca, H, W) and (N, M·Cb, H, W) maps per member → (N, M·(Ca+Cb), H, W)."""
    n, _, h, w = a.shape
    out = torch.cat([a.reshape(n, members, -1, h, w), b.reshape(n, members, -1, h, w)], dim=2)
    return out.reshape(n, -1, h, w)


class WaveUNet(nn.Module):
    """M independent small UNets computed as one grouped network (see module docstring)."""

    def __init__(self, num_classes: int, members: int = 1, widths: tuple[int, ...] = (16, 32, 64), in_channels: int = 3):
        super().__init__()
        if not isinstance(num_classes, int) or num_classes < 2:
            raise LossforgeError(f"num_classes: must be an int >= 2, got {num_classes!r}")
        if not isinstance(members, int) or members < 1:
            raise LossforgeError(f"members: must be a positive int, got {members!r}")
        widths = tuple(int(w) for w in widths)
        if len(widths) < 2 or any(w < 1 for w in widths):
            raise LossforgeError(f"model.widths: need >= 2 positive channel counts, got {widths!r}")
        self.members, self.num_classes, self.widths, self.in_channels = members, num_classes, widths, in_channels
        m = members
        self.encoder = nn.ModuleList()
        c_prev = in_channels
        for w in widths:
            self.encoder.append(_GroupedBlock(m, c_prev, w))
            c_prev = w
        self.decoder = nn.ModuleList()
        for w_skip in reversed(widths[:-1]):
            self.decoder.append(_GroupedBlock(m, c_prev + w_skip, w_skip))
            c_prev = w_skip
        self.classifier = nn.Conv2d(m * c_prev, m * num_classes, 1, groups=m)

    @property
    def backbone(self) -> nn.Module:
        """The encoder (the 'backbone' parameter group of the optimiser)."""
        return self.encoder

    def forward(self, x: Tensor) -> Tensor:
        n, _, h, w = x.shape
        if h % 2 ** (len(self.widths) - 1) or w % 2 ** (len(self.widths) - 1):
            raise LossforgeError(f"WaveUNet: input {h}x{w} must be divisible by {2 ** (len(self.widths) - 1)}")
        m = self.members
        x = x.repeat(1, m, 1, 1) if m > 1 else x
        skips = []
        for k, block in enumerate(self.encoder):
            if k:
                x = F.max_pool2d(x, 2)
            x = block(x)
            skips.append(x)
        for block, skip in zip(self.decoder, reversed(skips[:-1])):
            x = F.interpolate(x, scale_factor=2, mode="nearest")
            x = block(_cat_members(x, skip, m))
        return self.classifier(x).reshape(n, m, self.num_classes, h, w)

    # -------------------------------------------------------------------------------- members
    @torch.no_grad()
    def tile_from(self, single: "WaveUNet") -> "WaveUNet":
        """Copy a one-member network's parameters and buffers into every member of this one."""
        if single.members != 1 or single.widths != self.widths or single.num_classes != self.num_classes:
            raise LossforgeError("tile_from: needs a one-member WaveUNet of the same shape")
        mine = dict(self.named_parameters()) | dict(self.named_buffers())
        for name, src in list(single.named_parameters()) + list(single.named_buffers()):
            dst = mine[name]
            if src.dim() == 0:
                dst.copy_(src)
            else:
                dst.copy_(src.repeat(self.members, *([1] * (src.dim() - 1))))
        return self

    @torch.no_grad()
    def member_state(self, index: int) -> dict[str, Tensor]:
        """State dict of member ``index`` as a one-member network (for export and equivalence checks)."""
        if not 0 <= index < self.members:
            raise LossforgeError(f"member index {index} outside [0, {self.members})")
        out = {}
        for name, t in self.state_dict().items():
            if t.dim() == 0:
                out[name] = t.clone()
            else:
                chunk = t.shape[0] // self.members
                out[name] = t[index * chunk:(index + 1) * chunk].clone()
        return out


def squeeze_members(logits: Tensor) -> Tensor:
    """(N, 1, K, H, W) logits of a one-member network → (N, K, H, W)."""
    return logits[:, 0]


__all__ = ["WaveUNet", "squeeze_members"]
