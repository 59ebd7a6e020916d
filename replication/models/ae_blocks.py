# Building blocks of the first-stage encoder/decoder (paper App. G; original release
# ldm/modules/diffusionmodules/model.py). Parameter names equal the original's so its checkpoints load.
from __future__ import annotations

from enum import Enum

import torch
import torch.nn.functional as F
from torch import nn

# GroupNorm settings of the original `Normalize`: 32 groups, eps 1e-6, affine.
GROUPNORM_GROUPS = 32
GROUPNORM_EPS = 1e-6


class AttnType(str, Enum):
    """Self-attention inside the autoencoder; `none` is the attention-free (dagger) first stage of Tab. 8."""

    vanilla = "vanilla"
    none = "none"


def swish(x: torch.Tensor) -> torch.Tensor:
    return x * torch.sigmoid(x)


def group_norm(channels: int) -> nn.GroupNorm:
    if channels % GROUPNORM_GROUPS != 0:
        raise ValueError(
            f"GroupNorm({GROUPNORM_GROUPS}) needs a channel count divisible by {GROUPNORM_GROUPS}; got {channels} "
            "(ch * ch_mult[i] must be a multiple of 32)"
        )
    return nn.GroupNorm(num_groups=GROUPNORM_GROUPS, num_channels=channels, eps=GROUPNORM_EPS, affine=True)


class ResnetBlock(nn.Module):
    """norm-swish-conv twice, with a 1x1 `nin_shortcut` when the width changes (no timestep input here)."""

    def __init__(self, in_channels: int, out_channels: int, dropout: float):
        super().__init__()
        self.in_channels = in_channels
        self.out_channels = out_channels
        self.norm1 = group_norm(in_channels)
        self.conv1 = nn.Conv2d(in_channels, out_channels, kernel_size=3, stride=1, padding=1)
        self.norm2 = group_norm(out_channels)
        self.dropout = nn.Dropout(dropout)
        self.conv2 = nn.Conv2d(out_channels, out_channels, kernel_size=3, stride=1, padding=1)
        if in_channels != out_channels:
            self.nin_shortcut = nn.Conv2d(in_channels, out_channels, kernel_size=1, stride=1, padding=0)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        h = self.conv1(swish(self.norm1(x)))
        h = self.conv2(self.dropout(swish(self.norm2(h))))
        if self.in_channels != self.out_channels:
            x = self.nin_shortcut(x)
        return x + h


class AttnBlock(nn.Module):
    """Single-head spatial self-attention; q, k, v, proj_out are 1x1 convs as in the original."""

    def __init__(self, channels: int):
        super().__init__()
        self.norm = group_norm(channels)
        self.q = nn.Conv2d(channels, channels, kernel_size=1)
        self.k = nn.Conv2d(channels, channels, kernel_size=1)
        self.v = nn.Conv2d(channels, channels, kernel_size=1)
        self.proj_out = nn.Conv2d(channels, channels, kernel_size=1)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        b, c, hgt, wid = x.shape
        h = self.norm(x)

        def tokens(t: torch.Tensor) -> torch.Tensor:  # [B, C, H, W] -> [B, 1, HW, C]
            return t.reshape(b, c, hgt * wid).transpose(1, 2).unsqueeze(1)

        # Default SDPA scale is 1/sqrt(C), the original's `int(c)**(-0.5)`.
        out = F.scaled_dot_product_attention(tokens(self.q(h)), tokens(self.k(h)), tokens(self.v(h)))
        out = out.squeeze(1).transpose(1, 2).reshape(b, c, hgt, wid)
        return x + self.proj_out(out)


def make_attn(channels: int, attn_type: AttnType | str) -> nn.Module:
    attn_type = AttnType(attn_type.value if isinstance(attn_type, Enum) else attn_type)
    if attn_type is AttnType.vanilla:
        return AttnBlock(channels)
    return nn.Identity()


class Downsample(nn.Module):
    """Stride-2 3x3 conv after a zero pad of one pixel right and bottom only (the original's asymmetric pad)."""

    def __init__(self, channels: int):
        super().__init__()
        self.conv = nn.Conv2d(channels, channels, kernel_size=3, stride=2, padding=0)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.conv(F.pad(x, (0, 1, 0, 1), mode="constant", value=0.0))


class Upsample(nn.Module):
    """Nearest-neighbour x2 followed by a 3x3 conv."""

    def __init__(self, channels: int):
        super().__init__()
        self.conv = nn.Conv2d(channels, channels, kernel_size=3, stride=1, padding=1)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.conv(F.interpolate(x, scale_factor=2.0, mode="nearest"))
