"""Image-shaped conditioning by channel concatenation: the release's `conditioning_key: concat`
(ldm/models/diffusion/ddpm.py DiffusionWrapper: `torch.cat([x] + c_concat, dim=1)`; paper Sec. 4.3-4.5).

Three tasks use it, each with its own conditioning encoder (PROTOCOL.md section 7):
- super-resolution (bsr_sr): the low-resolution image itself in [-1, 1] (`nn.Identity`); U-Net in_channels =
  latent channels + 3;
- inpainting (inpainting_big): the first stage's encoding of the masked image and the mask resized (nearest) to the
  latent, both built outside the network (`inpainting_condition`); in_channels = 2 * latent channels + 1;
- semantic synthesis: `SpatialRescaler` on the one-hot segmentation (two bilinear x0.5 stages, then a 1x1 conv).

The wrapper names its children as the release (`diffusion_model`, `cond_stage_model`), so checkpoints map one to one
and an EMA over it averages the U-Net alone, as LitEma does.
"""
from __future__ import annotations

from typing import Callable, Optional

import numpy as np
import torch
import torch.nn.functional as F
from torch import nn


class SpatialRescaler(nn.Module):
    """ldm/modules/encoders/modules.py SpatialRescaler: `n_stages` interpolations by `multiplier`, then an optional
    1x1 conv to `out_channels` (`channel_mapper`, no bias by default)."""

    def __init__(self, n_stages: int = 1, method: str = "bilinear", multiplier: float = 0.5, in_channels: int = 3,
                 out_channels: Optional[int] = None, bias: bool = False):
        super().__init__()
        if n_stages < 0:
            raise ValueError(f"n_stages must be >= 0, got {n_stages}")
        if method not in ("nearest", "linear", "bilinear", "bicubic", "trilinear", "area"):
            raise ValueError(f"interpolation method {method!r} is not one F.interpolate knows")
        self.n_stages, self.method, self.multiplier = n_stages, method, multiplier
        self.channel_mapper = nn.Conv2d(in_channels, out_channels, 1, bias=bias) if out_channels is not None else None

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        for _ in range(self.n_stages):
            x = F.interpolate(x, scale_factor=self.multiplier, mode=self.method)
        return self.channel_mapper(x) if self.channel_mapper is not None else x


class ConcatConditionalUNet(nn.Module):
    """eps(x, t, c) = unet(cat[x, cond_stage_model(c)], t): the concat conditioning of the SR, inpainting and
    semantic-synthesis LDMs. `cond_stage_model` defaults to the identity (SR, inpainting)."""

    def __init__(self, unet: nn.Module, cond_stage: Optional[nn.Module] = None):
        super().__init__()
        self.diffusion_model = unet
        self.cond_stage_model = cond_stage if cond_stage is not None else nn.Identity()

    float_condition = "c_concat"  # the keyword the training step passes a float condition as

    def forward(self, x: torch.Tensor, timesteps: torch.Tensor, c_concat: torch.Tensor) -> torch.Tensor:
        c = self.cond_stage_model(c_concat)
        if c.shape[0] != x.shape[0] or c.shape[2:] != x.shape[2:]:
            raise ValueError(f"the concatenated condition {tuple(c.shape)} must match the latent {tuple(x.shape)} in "
                             "batch and spatial size")
        return self.diffusion_model(torch.cat([x, c.to(x.dtype)], dim=1), timesteps)


def concat_in_channels(task: str, latent_channels: int, cond_channels: int = 3) -> int:
    """The U-Net's in_channels for a concat task (bsr_sr: 3 + 3 = 6; inpainting_big: 3 + 3 + 1 = 7)."""
    if task == "superres":
        return latent_channels + cond_channels
    if task == "inpainting":
        return 2 * latent_channels + 1
    if task == "semantic":
        return latent_channels + cond_channels
    raise ValueError(f"unknown concat task {task!r} (superres, inpainting, semantic)")


# ------------------------------------------------------------------------------------------------ inpainting
def inpainting_inputs(image: np.ndarray, mask: np.ndarray) -> dict[str, torch.Tensor]:
    """scripts/inpaint.py make_batch: image uint8 HxWx3 and mask (uint8 {0,1} or {0,255}, or float) -> tensors in
    [-1, 1]: `image`, `mask` (+1 = hole, -1 = known) and `masked_image` ((1 - m) * image in [0, 1], so the hole is
    -1 after scaling). A mask value >= 0.5 (of 1, or 128 of 255) marks the hole."""
    if image.dtype != np.uint8 or image.ndim != 3 or image.shape[2] != 3:
        raise ValueError(f"image must be uint8 HxWx3, got {image.dtype} {image.shape}")
    if mask.shape != image.shape[:2]:
        raise ValueError(f"mask of size {mask.shape[::-1]} does not match the image's {image.shape[1::-1]}")
    m = mask.astype(np.float32)
    if m.max(initial=0.0) > 1.0:
        m = m / 255.0
    m = (m >= 0.5).astype(np.float32)[None, None]
    x = torch.from_numpy(image.astype(np.float32) / 255.0).permute(2, 0, 1)[None]
    mt = torch.from_numpy(m)
    batch = {"image": x, "mask": mt, "masked_image": (1 - mt) * x}
    return {k: v * 2.0 - 1.0 for k, v in batch.items()}


def inpainting_condition(encode: Callable[[torch.Tensor], torch.Tensor], masked_image: torch.Tensor,
                         mask: torch.Tensor) -> torch.Tensor:
    """c = cat[encode(masked image), mask resized to the latent (nearest)], both in the release's [-1, 1] values.
    `encode` is the first stage's deterministic code, unscaled, as the release's get_learned_conditioning takes it
    (VQ: the pre-quantisation latent; KL: the posterior's mode)."""
    c = encode(masked_image)
    cc = F.interpolate(mask.to(c.dtype), size=c.shape[-2:])
    return torch.cat([c, cc], dim=1)


def composite(image: torch.Tensor, mask: torch.Tensor, predicted: torch.Tensor) -> torch.Tensor:
    """The inpainted image in [0, 1]: the input outside the hole, the model's pixels inside (scripts/inpaint.py).
    All three arguments in [-1, 1] as `inpainting_inputs` returns them."""
    def unit(v: torch.Tensor) -> torch.Tensor:
        return torch.clamp((v + 1.0) / 2.0, min=0.0, max=1.0)
    m = unit(mask)
    return (1 - m) * unit(image) + m * unit(predicted)
