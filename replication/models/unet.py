"""The LDM denoiser eps_theta(z_t, t, tau(y)): the ADM "ablated U-Net" with optional cross-attention (paper Sec. 3.3, Eq. 2-3).

Keyword arguments, layout and every parameter name follow `UNetModel` of CompVis/latent-diffusion
(`ldm/modules/diffusionmodules/openaimodel.py`), so the `model.diffusion_model.*` tensors of the released
checkpoints load unchanged (tests/test_unet.py checks all of them against tests/reference/compvis_modules).
"""
from __future__ import annotations

from typing import Sequence

import torch
from torch import nn
from torch.utils.checkpoint import checkpoint

from .attention import AttentionBlock, QKVOrder, SpatialTransformer
from .unet_blocks import (
    Downsample,
    ResBlock,
    TimestepEmbedSequential,
    Upsample,
    normalization,
    timestep_embedding,
    zero_module,
)

# Width of the timestep-embedding MLP relative to model_channels (ADM: time_embed_dim = 4 * model_channels).
TIME_EMBED_MULT = 4


def attention_heads(ch: int, num_heads: int, num_head_channels: int, legacy: bool, spatial: bool) -> tuple[int, int]:
    """(heads, dim_head) exactly as the original computes them before building an attention layer.

    `num_head_channels=-1` means "use num_heads". With `legacy=True` the original passes
    `dim_head = ch // heads` to a SpatialTransformer but the raw `num_head_channels` (possibly -1) to an
    AttentionBlock; both rules are kept so released checkpoints get their original head layout.
    """
    if num_head_channels == -1:
        heads, dim_head = num_heads, ch // num_heads
    else:
        heads, dim_head = ch // num_head_channels, num_head_channels
    if legacy:
        dim_head = ch // heads if spatial else num_head_channels
    return heads, dim_head


class UNetModel(nn.Module):
    """eps-prediction U-Net; forward(x, timesteps, context=None, y=None) -> tensor shaped like x (out_channels)."""

    def __init__(
        self,
        image_size: int,
        in_channels: int,
        model_channels: int,
        out_channels: int,
        num_res_blocks: int,
        attention_resolutions: Sequence[int],
        dropout: float = 0.0,
        channel_mult: Sequence[int] = (1, 2, 4, 8),
        conv_resample: bool = True,
        num_classes: int | None = None,
        num_heads: int = -1,
        num_head_channels: int = -1,
        num_heads_upsample: int = -1,
        use_scale_shift_norm: bool = False,
        resblock_updown: bool = False,
        use_new_attention_order: bool = False,
        use_spatial_transformer: bool = False,
        transformer_depth: int = 1,
        context_dim: int | None = None,
        legacy: bool = True,
        gradient_checkpointing: bool = False,
    ):
        super().__init__()
        if use_spatial_transformer and context_dim is None:
            raise ValueError("use_spatial_transformer=True needs context_dim (the width of tau_theta(y))")
        if context_dim is not None and not use_spatial_transformer:
            raise ValueError(f"context_dim={context_dim} given but use_spatial_transformer=False")
        if num_heads == -1 and num_head_channels == -1:
            raise ValueError("set num_heads or num_head_channels (both are -1)")
        if num_heads_upsample == -1:
            num_heads_upsample = num_heads
        if channel_mult[0] != 1:
            raise ValueError(f"channel_mult must start with 1 (the output conv reads model_channels), got {list(channel_mult)}")
        if num_classes is not None and (not isinstance(num_classes, int) or num_classes < 1):
            raise ValueError(f"num_classes must be a positive int or None, got {num_classes!r}")

        self.image_size = image_size
        self.in_channels = in_channels
        self.model_channels = model_channels
        self.out_channels = out_channels
        self.num_classes = num_classes
        self.gradient_checkpointing = gradient_checkpointing
        attention_resolutions = set(int(a) for a in attention_resolutions)
        order = QKVOrder.NEW if use_new_attention_order else QKVOrder.LEGACY

        def attention(ch: int, up: bool) -> nn.Module:
            heads, dim_head = attention_heads(ch, num_heads, num_head_channels, legacy, use_spatial_transformer)
            if use_spatial_transformer:
                return SpatialTransformer(ch, heads, dim_head, depth=transformer_depth, dropout=0.0, context_dim=context_dim)
            return AttentionBlock(ch, num_heads=num_heads_upsample if up else heads, num_head_channels=dim_head, order=order)

        def resblock(ch: int, out: int, **kw) -> ResBlock:
            return ResBlock(ch, time_embed_dim, dropout, out_channels=out, use_scale_shift_norm=use_scale_shift_norm, **kw)

        time_embed_dim = model_channels * TIME_EMBED_MULT
        self.time_embed = nn.Sequential(
            nn.Linear(model_channels, time_embed_dim), nn.SiLU(), nn.Linear(time_embed_dim, time_embed_dim)
        )
        if num_classes is not None:
            self.label_emb = nn.Embedding(num_classes, time_embed_dim)

        self.input_blocks = nn.ModuleList([TimestepEmbedSequential(nn.Conv2d(in_channels, model_channels, 3, padding=1))])
        skip_chans = [model_channels]
        ch, ds = model_channels, 1
        for level, mult in enumerate(channel_mult):
            for _ in range(num_res_blocks):
                layers: list[nn.Module] = [resblock(ch, mult * model_channels)]
                ch = mult * model_channels
                if ds in attention_resolutions:
                    layers.append(attention(ch, up=False))
                self.input_blocks.append(TimestepEmbedSequential(*layers))
                skip_chans.append(ch)
            if level != len(channel_mult) - 1:
                down = resblock(ch, ch, down=True) if resblock_updown else Downsample(ch, conv_resample, out_channels=ch)
                self.input_blocks.append(TimestepEmbedSequential(down))
                skip_chans.append(ch)
                ds *= 2

        # The middle block always attends, whatever attention_resolutions says (original code).
        self.middle_block = TimestepEmbedSequential(resblock(ch, ch), attention(ch, up=False), resblock(ch, ch))

        self.output_blocks = nn.ModuleList()
        for level, mult in reversed(list(enumerate(channel_mult))):
            for i in range(num_res_blocks + 1):
                layers = [resblock(ch + skip_chans.pop(), model_channels * mult)]
                ch = model_channels * mult
                if ds in attention_resolutions:
                    layers.append(attention(ch, up=True))
                if level and i == num_res_blocks:
                    layers.append(resblock(ch, ch, up=True) if resblock_updown else Upsample(ch, conv_resample, out_channels=ch))
                    ds //= 2
                self.output_blocks.append(TimestepEmbedSequential(*layers))

        self.out = nn.Sequential(
            normalization(ch), nn.SiLU(), zero_module(nn.Conv2d(model_channels, out_channels, 3, padding=1))
        )

    def _run(self, block: nn.Module, h: torch.Tensor, emb: torch.Tensor, context: torch.Tensor | None) -> torch.Tensor:
        if self.gradient_checkpointing and self.training and torch.is_grad_enabled():
            return checkpoint(block, h, emb, context, use_reentrant=False)
        return block(h, emb, context)

    def forward(
        self,
        x: torch.Tensor,
        timesteps: torch.Tensor,
        context: torch.Tensor | None = None,
        y: torch.Tensor | None = None,
    ) -> torch.Tensor:
        if (y is not None) != (self.num_classes is not None):
            raise ValueError(
                f"class labels y must be given iff the model is class-conditional (num_classes={self.num_classes}, "
                f"y {'given' if y is not None else 'missing'})"
            )
        timesteps = torch.as_tensor(timesteps, device=x.device)
        if timesteps.ndim == 0:
            timesteps = timesteps.expand(x.shape[0])
        if timesteps.shape != (x.shape[0],):
            raise ValueError(f"timesteps shape {tuple(timesteps.shape)} does not match batch size {x.shape[0]}")
        emb = self.time_embed(timestep_embedding(timesteps, self.model_channels))
        if y is not None:
            emb = emb + self.label_emb(y)

        h = x
        skips = []
        for block in self.input_blocks:
            h = self._run(block, h, emb, context)
            skips.append(h)
        h = self._run(self.middle_block, h, emb, context)
        for block in self.output_blocks:
            h = self._run(block, torch.cat([h, skips.pop()], dim=1), emb, context)
        return self.out(h)
