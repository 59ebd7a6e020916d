# A classifier p(y | z_t, t) on noisy latents, trained at every noise level, whose input gradient guides the
# sampler (paper Sec. 4.3 / App. D.4 and Tab. 10, LDM-8-G; classifier guidance of Dhariwal & Nichol 2021, Sec. 4).
"""Noisy-latent classifier for classifier guidance.

The paper does not give this classifier's architecture and the release has neither its code nor its checkpoint
(PROTOCOL §2, §7), so the architecture here is a choice: guided-diffusion's `EncoderUNetModel`, the classifier
Dhariwal & Nichol guide their ImageNet models with. It is the encoder half of the denoiser's U-Net - the
timestep embedding MLP, the input blocks and the middle block, with the same ResBlocks, downsampling and
self-attention - followed by a pooling head that maps the last feature map to class logits:

- `ClassifierPool.ATTENTION` (default, guided-diffusion's `pool="attention"` for its ImageNet classifiers): the
  spatial mean joins the feature tokens as an extra query token, a learned positional embedding is added, one
  multi-head self-attention layer runs, and the mean token's output, projected to `num_classes`, is the logits.
- `ClassifierPool.AVERAGE` (guided-diffusion's `pool="adaptive"`): GroupNorm, SiLU, global average pooling and a
  zero-initialised 1x1 projection.

The encoder is built by `UNetModel`'s own constructor, so it is exactly the denoiser's encoder for the same
sizes; its submodules keep the U-Net's (and guided-diffusion's classifier's) names `time_embed`,
`input_blocks`, `middle_block`. `NoisyClassifierConfig` defaults are sized for the 32x32x4 latent of LDM-8 on
ImageNet, after guided-diffusion's 64x64 classifier (its flags for that model: width 128, attention at 32, 16
and 8 px = ds 2, 4, 8, scale-shift norm, ResBlock down-sampling, attention pooling, 64 channels per head; depth 2
is its default). None of these sizes comes from the LDM paper.
"""
from __future__ import annotations

from dataclasses import dataclass, field
from enum import Enum
from typing import Any, List, Mapping

import torch
import torch.nn.functional as F
from omegaconf import DictConfig
from torch import nn

from replication.models.attention import QKVOrder, split_qkv
from replication.models.unet import UNetModel
from replication.models.unet_blocks import normalization, timestep_embedding, zero_module
from replication.utils.schema import ConfigError, check_range, merge_into_schema


class ClassifierPool(str, Enum):
    ATTENTION = "attention"  # guided-diffusion AttentionPool2d (its ImageNet classifiers)
    AVERAGE = "average"      # guided-diffusion pool="adaptive": global average pooling


@dataclass
class NoisyClassifierConfig:
    """Sizes of `NoisyLatentClassifier`. Field names follow `UNetConfig` where they mean the same."""

    image_size: int = 32            # latent side length (the attention pool's positional embedding needs it)
    in_channels: int = 4            # latent channels
    num_classes: int = 1000
    model_channels: int = 128
    num_res_blocks: int = 2
    attention_resolutions: List[int] = field(default_factory=lambda: [2, 4, 8])  # ds factors, as UNetConfig
    channel_mult: List[int] = field(default_factory=lambda: [1, 2, 3, 4])
    num_head_channels: int = 64
    use_scale_shift_norm: bool = True
    resblock_updown: bool = True
    dropout: float = 0.0
    pool: str = ClassifierPool.ATTENTION.value  # a ClassifierPool value

    @classmethod
    def tiny(cls, image_size: int = 8, in_channels: int = 4, num_classes: int = 2,
             pool: ClassifierPool | str = ClassifierPool.AVERAGE) -> "NoisyClassifierConfig":
        """A small classifier (about 0.4M parameters: 32 channels, one block per level) for tests and smoke runs."""
        return cls(image_size=image_size, in_channels=in_channels, num_classes=num_classes, model_channels=32,
                   num_res_blocks=1, attention_resolutions=[2], channel_mult=[1, 2], num_head_channels=32,
                   pool=ClassifierPool(pool).value)


def validate_noisy_classifier_cfg(cfg: Mapping[str, Any] | DictConfig | NoisyClassifierConfig) -> NoisyClassifierConfig:
    """Check keys, types and sizes against `NoisyClassifierConfig` (group name "classifier"); raises ConfigError."""
    result = merge_into_schema(NoisyClassifierConfig, cfg, "classifier")
    for key in ("image_size", "in_channels", "model_channels", "num_res_blocks", "num_head_channels"):
        check_range(getattr(result, key), f"classifier.{key}", low=1)
    check_range(result.num_classes, "classifier.num_classes", low=2)
    check_range(result.dropout, "classifier.dropout", low=0.0, high=1.0, high_open=True)
    if result.pool not in {p.value for p in ClassifierPool}:
        raise ConfigError(f"classifier.pool must be one of {[p.value for p in ClassifierPool]}, got {result.pool!r}")
    if not result.channel_mult or result.channel_mult[0] != 1:
        raise ConfigError(f"classifier.channel_mult must start with 1 (the U-Net's rule), got {result.channel_mult}")
    if result.image_size % final_downsampling(result):
        raise ConfigError(f"classifier.image_size {result.image_size} is not divisible by the encoder's "
                          f"downsampling {final_downsampling(result)} (channel_mult {result.channel_mult})")
    return result


def final_downsampling(cfg: NoisyClassifierConfig) -> int:
    """How much smaller the encoder's last feature map is than its input: 2 per level after the first."""
    return 2 ** (len(cfg.channel_mult) - 1)


class AttentionPool2d(nn.Module):
    """guided-diffusion's AttentionPool2d: [mean token, feature tokens] + positional embedding -> one multi-head
    self-attention (qkv in the new order, QKVAttention) -> the mean token, projected to `out_channels`."""

    def __init__(self, spatial: int, channels: int, num_head_channels: int, out_channels: int):
        super().__init__()
        if channels % num_head_channels:
            raise ValueError(f"attention pool: channels {channels} not divisible by num_head_channels "
                             f"{num_head_channels}")
        self.num_heads = channels // num_head_channels
        self.positional_embedding = nn.Parameter(torch.randn(channels, spatial * spatial + 1) / channels ** 0.5)
        self.qkv_proj = nn.Conv1d(channels, 3 * channels, 1)
        self.c_proj = nn.Conv1d(channels, out_channels, 1)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        b, c, *spatial = x.shape
        x = x.reshape(b, c, -1)
        if x.shape[-1] + 1 != self.positional_embedding.shape[1]:
            raise ValueError(f"attention pool built for {self.positional_embedding.shape[1] - 1} positions got a "
                             f"{'x'.join(map(str, spatial))} feature map; the classifier's image_size must equal "
                             f"the latent size")
        x = torch.cat([x.mean(dim=-1, keepdim=True), x], dim=-1) + self.positional_embedding[None].to(x.dtype)
        q, k, v = split_qkv(self.qkv_proj(x), self.num_heads, QKVOrder.NEW)
        h = F.scaled_dot_product_attention(q, k, v).transpose(-1, -2).reshape(b, c, -1)
        return self.c_proj(h)[:, :, 0]


class NoisyLatentClassifier(nn.Module):
    """logits = classifier(z_t, t): [B, num_classes] for noisy latents z_t [B, C, H, W] at timesteps t [B]."""

    def __init__(self, cfg: NoisyClassifierConfig):
        super().__init__()
        cfg = validate_noisy_classifier_cfg(cfg)
        self.cfg = cfg
        self.model_channels = cfg.model_channels
        unet = UNetModel(
            image_size=cfg.image_size, in_channels=cfg.in_channels, model_channels=cfg.model_channels,
            out_channels=cfg.in_channels, num_res_blocks=cfg.num_res_blocks,
            attention_resolutions=cfg.attention_resolutions, dropout=cfg.dropout, channel_mult=cfg.channel_mult,
            num_head_channels=cfg.num_head_channels, use_scale_shift_norm=cfg.use_scale_shift_norm,
            resblock_updown=cfg.resblock_updown, legacy=False,
        )
        # the encoder half is kept; the decoder half (output_blocks, out) is dropped with `unet`
        self.time_embed, self.input_blocks, self.middle_block = unet.time_embed, unet.input_blocks, unet.middle_block
        ch = cfg.model_channels * cfg.channel_mult[-1]
        if ClassifierPool(cfg.pool) is ClassifierPool.ATTENTION:
            pool: nn.Module = AttentionPool2d(cfg.image_size // final_downsampling(cfg), ch, cfg.num_head_channels,
                                              cfg.num_classes)
        else:
            pool = nn.Sequential(nn.AdaptiveAvgPool2d((1, 1)), zero_module(nn.Conv2d(ch, cfg.num_classes, 1)),
                                 nn.Flatten())
        self.out = nn.Sequential(normalization(ch), nn.SiLU(), pool)

    def forward(self, x: torch.Tensor, timesteps: torch.Tensor) -> torch.Tensor:
        if timesteps.shape != (x.shape[0],):
            raise ValueError(f"timesteps must be one per sample, shape ({x.shape[0]},); got {tuple(timesteps.shape)}")
        emb = self.time_embed(timestep_embedding(timesteps, self.model_channels))
        h = x
        for block in self.input_blocks:
            h = block(h, emb)
        h = self.middle_block(h, emb)
        return self.out(h).float()


def build_noisy_classifier(cfg: Mapping[str, Any] | DictConfig | NoisyClassifierConfig) -> NoisyLatentClassifier:
    return NoisyLatentClassifier(validate_noisy_classifier_cfg(cfg))

