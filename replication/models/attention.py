"""Attention layers of the LDM U-Net: ADM self-attention and the cross-attention SpatialTransformer (paper Sec. 3.3, Eq. 3-4).

Parameter names follow CompVis/latent-diffusion (`openaimodel.py` AttentionBlock: `norm`, `qkv`,
`proj_out`; `attention.py` SpatialTransformer: `norm`, `proj_in`, `transformer_blocks.N.{attn1,attn2,
ff,norm1,norm2,norm3}`, `proj_out`). Every softmax(QK^T/sqrt(d))V goes through
`torch.nn.functional.scaled_dot_product_attention`.
"""
from __future__ import annotations

import enum

import torch
import torch.nn.functional as F
from torch import nn

from .unet_blocks import ContextBlock, normalization, zero_module

# SpatialTransformer GroupNorm: 32 groups, eps 1e-6 (ldm `Normalize`), unlike the ADM GroupNorm32 (eps 1e-5).
SPATIAL_NORM_GROUPS = 32
SPATIAL_NORM_EPS = 1e-6
# Hidden width multiplier of the GEGLU feed-forward (ldm `FeedForward(mult=4)`).
FF_MULT = 4


class QKVOrder(enum.Enum):
    """How the fused qkv 1x1-conv output is split into heads.

    LEGACY: per head [q|k|v] blocks (ADM `QKVAttentionLegacy`, used by every released LDM);
    NEW: [all q | all k | all v], then heads (ADM `QKVAttention`, `use_new_attention_order=True`).
    """

    LEGACY = "legacy"
    NEW = "new"


def _sdpa(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor) -> torch.Tensor:
    """q,k,v: (B, heads, L, d) -> (B, heads, L, d); common dtype so autocast mixes cannot trip the kernel."""
    dtype = torch.promote_types(torch.promote_types(q.dtype, k.dtype), v.dtype)
    if torch.is_autocast_enabled(q.device.type):
        dtype = torch.get_autocast_dtype(q.device.type)
    return F.scaled_dot_product_attention(q.to(dtype), k.to(dtype), v.to(dtype))


def split_qkv(qkv: torch.Tensor, num_heads: int, order: QKVOrder) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """(B, 3*C, L) fused projection -> q, k, v each (B, heads, L, C/heads)."""
    b, width, length = qkv.shape
    if width % (3 * num_heads):
        raise ValueError(f"qkv width {width} is not divisible by 3*num_heads={3 * num_heads}")
    ch = width // (3 * num_heads)
    if order is QKVOrder.LEGACY:
        q, k, v = qkv.reshape(b, num_heads, 3 * ch, length).split(ch, dim=2)
    else:
        q, k, v = (t.reshape(b, num_heads, ch, length) for t in qkv.chunk(3, dim=1))
    # contiguous (B, heads, L, d): fused SDPA kernels want a unit-stride last dimension
    return tuple(t.transpose(-1, -2).contiguous() for t in (q, k, v))  # type: ignore[return-value]


class AttentionBlock(nn.Module):
    """ADM spatial self-attention: GN, 1x1 conv1d to qkv, multi-head attention, zero-init 1x1 projection, residual."""

    def __init__(self, channels: int, num_heads: int = 1, num_head_channels: int = -1, order: QKVOrder = QKVOrder.LEGACY):
        super().__init__()
        if num_head_channels == -1:
            if num_heads < 1 or channels % num_heads:
                raise ValueError(f"channels {channels} not divisible by num_heads {num_heads}")
            self.num_heads = num_heads
        else:
            if channels % num_head_channels:
                raise ValueError(f"channels {channels} not divisible by num_head_channels {num_head_channels}")
            self.num_heads = channels // num_head_channels
        self.channels = channels
        self.order = order
        self.norm = normalization(channels)
        self.qkv = nn.Conv1d(channels, channels * 3, 1)
        self.proj_out = zero_module(nn.Conv1d(channels, channels, 1))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        b, c, *spatial = x.shape
        x = x.reshape(b, c, -1)
        q, k, v = split_qkv(self.qkv(self.norm(x)), self.num_heads, self.order)
        h = _sdpa(q, k, v)  # (b, heads, L, d)
        h = h.transpose(-1, -2).reshape(b, c, -1)
        h = self.proj_out(h)
        return (x + h).reshape(b, c, *spatial)


class CrossAttention(nn.Module):
    """Multi-head attention Q=W_q x, K=W_k c, V=W_v c (paper Eq. 4); self-attention when context is None."""

    def __init__(self, query_dim: int, context_dim: int | None = None, heads: int = 8, dim_head: int = 64, dropout: float = 0.0):
        super().__init__()
        inner_dim = heads * dim_head
        context_dim = query_dim if context_dim is None else context_dim
        self.heads = heads
        self.dim_head = dim_head
        self.to_q = nn.Linear(query_dim, inner_dim, bias=False)
        self.to_k = nn.Linear(context_dim, inner_dim, bias=False)
        self.to_v = nn.Linear(context_dim, inner_dim, bias=False)
        self.to_out = nn.Sequential(nn.Linear(inner_dim, query_dim), nn.Dropout(dropout))

    def _heads(self, t: torch.Tensor) -> torch.Tensor:
        b, n, _ = t.shape
        return t.reshape(b, n, self.heads, self.dim_head).transpose(1, 2)

    def forward(self, x: torch.Tensor, context: torch.Tensor | None = None) -> torch.Tensor:
        context = x if context is None else context
        if context.shape[0] != x.shape[0]:
            raise ValueError(f"context batch {context.shape[0]} != feature batch {x.shape[0]}")
        q, k, v = self._heads(self.to_q(x)), self._heads(self.to_k(context)), self._heads(self.to_v(context))
        out = _sdpa(q, k, v)
        b, _, n, _ = out.shape
        return self.to_out(out.transpose(1, 2).reshape(b, n, self.heads * self.dim_head))


class GEGLU(nn.Module):
    """GELU-gated linear unit (Shazeer 2020): a * gelu(g) with [a|g] = W x + b (ldm `GEGLU`, param `proj`)."""

    def __init__(self, dim_in: int, dim_out: int):
        super().__init__()
        self.proj = nn.Linear(dim_in, dim_out * 2)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        a, gate = self.proj(x).chunk(2, dim=-1)
        return a * F.gelu(gate)


class FeedForward(nn.Module):
    """GEGLU MLP of the transformer block (names `net.0.proj`, `net.2`)."""

    def __init__(self, dim: int, mult: int = FF_MULT, dropout: float = 0.0):
        super().__init__()
        inner = dim * mult
        self.net = nn.Sequential(GEGLU(dim, inner), nn.Dropout(dropout), nn.Linear(inner, dim))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.net(x)


class BasicTransformerBlock(nn.Module):
    """Code order of the release: x += SelfAttn(LN x); x += CrossAttn(LN x, c); x += GEGLU-FF(LN x) (PROTOCOL.md §3).

    The paper's Tab. 16 lists SelfAttn, MLP, CrossAttn; the released code (replicated here) differs.
    """

    def __init__(self, dim: int, n_heads: int, d_head: int, dropout: float = 0.0, context_dim: int | None = None):
        super().__init__()
        self.attn1 = CrossAttention(dim, None, n_heads, d_head, dropout)
        self.ff = FeedForward(dim, dropout=dropout)
        self.attn2 = CrossAttention(dim, context_dim, n_heads, d_head, dropout)
        self.norm1 = nn.LayerNorm(dim)
        self.norm2 = nn.LayerNorm(dim)
        self.norm3 = nn.LayerNorm(dim)

    def forward(self, x: torch.Tensor, context: torch.Tensor | None = None) -> torch.Tensor:
        x = self.attn1(self.norm1(x)) + x
        x = self.attn2(self.norm2(x), context) + x
        return self.ff(self.norm3(x)) + x


class SpatialTransformer(ContextBlock):
    """Cross-attention conditioning block tau_theta(y) -> U-Net features (paper Sec. 3.3, Fig. 3).

    GN, 1x1 conv proj_in, `depth` BasicTransformerBlocks on the (h*w) token sequence, zero-init 1x1 conv proj_out,
    residual. Without a context (unconditional call) attn2 attends to the features themselves, as the original.
    """

    def __init__(self, in_channels: int, n_heads: int, d_head: int, depth: int = 1, dropout: float = 0.0, context_dim: int | None = None):
        super().__init__()
        inner_dim = n_heads * d_head
        self.in_channels = in_channels
        self.context_dim = context_dim
        self.norm = nn.GroupNorm(SPATIAL_NORM_GROUPS, in_channels, eps=SPATIAL_NORM_EPS)
        self.proj_in = nn.Conv2d(in_channels, inner_dim, 1)
        self.transformer_blocks = nn.ModuleList(
            BasicTransformerBlock(inner_dim, n_heads, d_head, dropout=dropout, context_dim=context_dim) for _ in range(depth)
        )
        self.proj_out = zero_module(nn.Conv2d(inner_dim, in_channels, 1))

    def forward(self, x: torch.Tensor, context: torch.Tensor | None = None) -> torch.Tensor:
        if context is not None and self.context_dim is not None and context.shape[-1] != self.context_dim:
            raise ValueError(f"context last dim {context.shape[-1]} != context_dim {self.context_dim}")
        b, c, h, w = x.shape
        x_in = x
        x = self.proj_in(self.norm(x))
        x = x.flatten(2).transpose(1, 2)  # b (h w) c
        for block in self.transformer_blocks:
            x = block(x, context)
        x = x.transpose(1, 2).reshape(b, x.shape[-1], h, w)
        return self.proj_out(x) + x_in
