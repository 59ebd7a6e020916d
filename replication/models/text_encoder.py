"""The transformer conditioning encoder tau_theta of the text-to-image and layout-to-image LDMs (paper Sec. 4.3.1,
Tab. 2 and 9): the release's `BERTEmbedder` (ldm/modules/encoders/modules.py).

Despite its name, `BERTEmbedder` is no pretrained BERT: it is a transformer encoder trained jointly with the
U-Net from scratch, built from the release's copy of lucidrains' x-transformers (ldm/modules/x_transformer.py):
`TransformerWrapper(num_tokens=vocab_size, max_seq_len, attn_layers=Encoder(dim=n_embed, depth=n_layer))`.
Only the token ids come from BERT (the bert-base-uncased WordPiece vocabulary, `replication.data.tokenizer`); the
layout model feeds bounding-box tokens instead (`replication.data.layout`, vocabulary 8192, 92 tokens).

What the modules here reproduce of x-transformers, with the release's parameter names (so `TextEmbedder`'s state
dict equals the released `cond_stage_model.*` tensors with that prefix removed):
- `transformer.token_emb` and the absolute position embedding `transformer.pos_emb.emb`, both initialised
  N(0, 0.02) as x-transformers does (every other layer keeps PyTorch's default initialisation);
- `transformer.attn_layers.layers.{i}`: `depth` pairs of pre-norm residual blocks, attention at even i and
  feed-forward at odd i, each `[LayerNorm, block]` (the release's third entry, the parameterless Residual, is the
  addition in `Encoder.forward`); attention has 8 heads of 64 channels whatever the width (x-transformers'
  defaults), to_q/to_k/to_v without bias, to_out with bias; the feed-forward is Linear-GELU-Linear, 4x wide;
- the final `transformer.norm`, whose output (B, L, n_embed) is the cross-attention context (the release calls
  the wrapper with return_embeddings=True);
- `transformer.to_logits`, the language-model head the release builds but never calls. It is kept so released
  checkpoints load one to one, and frozen (requires_grad False): it never receives a gradient, so the optimizer
  leaves it unchanged as in the release, and DDP does not wait for its gradient.
No padding mask is used (the release passes none), so padded positions attend and are attended to.
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import Any, Mapping

import torch
import torch.nn.functional as F
from omegaconf import MISSING, DictConfig
from torch import nn

from replication.utils.schema import check_range, merge_into_schema

from .attention import _sdpa
from .conditioning import check_ids

# x-transformers' Attention defaults: heads=8, DEFAULT_DIM_HEAD=64 (inner width 512 for every released encoder)
HEADS = 8
DIM_HEAD = 64
# x-transformers' FeedForward(mult=4)
FF_MULT = 4
# TransformerWrapper.init_ / AbsolutePositionalEmbedding.init_: normal(std=0.02)
EMBEDDING_INIT_STD = 0.02


@dataclass
class TextEncoderConfig:
    """The release's `BERTEmbedder` params (cond_stage_config.params); the tokenizer switch is not a network key."""

    n_embed: int = MISSING
    n_layer: int = MISSING
    vocab_size: int = 30522  # bert-base-uncased WordPiece
    max_seq_len: int = 77
    embedding_dropout: float = 0.0


# The released encoders (their configs' cond_stage_config.params; the parameter dumps in
# tests/reference/compvis_modules/cond-*.json hold their tensors' names and shapes).
RELEASED_TEXT_ENCODERS: dict[str, TextEncoderConfig] = {
    "txt2img-1p4B": TextEncoderConfig(n_embed=1280, n_layer=32),
    "text2img256": TextEncoderConfig(n_embed=640, n_layer=32),
    "layout2img-openimages256": TextEncoderConfig(n_embed=512, n_layer=16, vocab_size=8192, max_seq_len=92),
}


def validate_text_encoder_cfg(cfg: Mapping[str, Any] | DictConfig | TextEncoderConfig,
                              group: str = "text_encoder") -> TextEncoderConfig:
    """Check keys, types and ranges against `TextEncoderConfig`; a bad key or value is a ConfigError naming it."""
    result = merge_into_schema(TextEncoderConfig, cfg, group)
    for key in ("n_embed", "n_layer", "vocab_size", "max_seq_len"):
        check_range(getattr(result, key), f"{group}.{key}", low=1)
    check_range(result.embedding_dropout, f"{group}.embedding_dropout", low=0.0, high=1.0, high_open=True)
    return result


class AbsolutePositionalEmbedding(nn.Module):
    """A learned vector per position (`pos_emb.emb`), added to the token embeddings."""

    def __init__(self, dim: int, max_seq_len: int):
        super().__init__()
        self.emb = nn.Embedding(max_seq_len, dim)
        nn.init.normal_(self.emb.weight, std=EMBEDDING_INIT_STD)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.emb(torch.arange(x.shape[1], device=x.device))[None]


class Attention(nn.Module):
    """x-transformers' self-attention: softmax(q k^T / sqrt(dim_head)) v over `heads` heads, no mask."""

    def __init__(self, dim: int, heads: int = HEADS, dim_head: int = DIM_HEAD):
        super().__init__()
        inner_dim = heads * dim_head
        self.heads, self.dim_head = heads, dim_head
        self.to_q = nn.Linear(dim, inner_dim, bias=False)
        self.to_k = nn.Linear(dim, inner_dim, bias=False)
        self.to_v = nn.Linear(dim, inner_dim, bias=False)
        self.to_out = nn.Linear(inner_dim, dim)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        b, n, _ = x.shape
        q, k, v = (proj(x).reshape(b, n, self.heads, self.dim_head).transpose(1, 2)
                   for proj in (self.to_q, self.to_k, self.to_v))
        out = _sdpa(q, k, v).transpose(1, 2).reshape(b, n, self.heads * self.dim_head)
        return self.to_out(out)


class FeedForward(nn.Module):
    """x-transformers' FeedForward without GLU: `net` = [Sequential(Linear, GELU), Dropout, Linear]."""

    def __init__(self, dim: int, mult: int = FF_MULT, dropout: float = 0.0):
        super().__init__()
        inner_dim = dim * mult
        self.net = nn.Sequential(nn.Sequential(nn.Linear(dim, inner_dim), nn.GELU()), nn.Dropout(dropout),
                                 nn.Linear(inner_dim, dim))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.net(x)


class Encoder(nn.Module):
    """x-transformers' Encoder (AttentionLayers, pre_norm): `depth` times x += attn(LN(x)); x += ff(LN(x))."""

    def __init__(self, dim: int, depth: int):
        super().__init__()
        self.dim = dim
        self.layers = nn.ModuleList()
        for _ in range(depth):
            self.layers.append(nn.ModuleList([nn.LayerNorm(dim), Attention(dim)]))
            self.layers.append(nn.ModuleList([nn.LayerNorm(dim), FeedForward(dim)]))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        for norm, block in self.layers:
            x = x + block(norm(x))
        return x


class TransformerWrapper(nn.Module):
    """Token ids (B, L) -> final-norm hidden states (B, L, dim), x-transformers' `return_embeddings=True` path."""

    def __init__(self, num_tokens: int, max_seq_len: int, dim: int, depth: int, emb_dropout: float = 0.0):
        super().__init__()
        self.num_tokens, self.max_seq_len = num_tokens, max_seq_len
        self.token_emb = nn.Embedding(num_tokens, dim)
        nn.init.normal_(self.token_emb.weight, std=EMBEDDING_INIT_STD)
        self.pos_emb = AbsolutePositionalEmbedding(dim, max_seq_len)
        self.emb_dropout = nn.Dropout(emb_dropout)
        self.attn_layers = Encoder(dim, depth)
        self.norm = nn.LayerNorm(dim)
        self.to_logits = nn.Linear(dim, num_tokens).requires_grad_(False)

    def forward(self, tokens: torch.Tensor) -> torch.Tensor:
        x = self.token_emb(tokens)
        x = self.emb_dropout(x + self.pos_emb(x))
        return self.norm(self.attn_layers(x))


class TextEmbedder(nn.Module):
    """tau_theta: token ids (B, L <= max_seq_len) int64 -> context (B, L, n_embed) for the U-Net's cross-attention.

    The release's tokenizer pads every caption to max_seq_len (77), so the context of a caption batch is
    (B, 77, n_embed); layouts are always 92 tokens. Tokenization happens outside (data loader or sampler), as for
    the release's layout model (use_tokenizer False), so this module sees only tensors.
    """

    def __init__(self, n_embed: int, n_layer: int, vocab_size: int = 30522, max_seq_len: int = 77,
                 embedding_dropout: float = 0.0):
        super().__init__()
        self.transformer = TransformerWrapper(vocab_size, max_seq_len, n_embed, n_layer, emb_dropout=embedding_dropout)

    @property
    def embed_dim(self) -> int:
        return self.transformer.norm.normalized_shape[0]

    @property
    def vocab_size(self) -> int:
        return self.transformer.num_tokens

    @property
    def max_seq_len(self) -> int:
        return self.transformer.max_seq_len

    def forward(self, tokens: torch.Tensor) -> torch.Tensor:
        check_ids(tokens, "token id", ("B", "L"), self.vocab_size)
        if tokens.shape[1] > self.max_seq_len:
            raise ValueError(f"{tokens.shape[1]} tokens exceed this encoder's max_seq_len {self.max_seq_len}")
        return self.transformer(tokens.long())


def build_text_embedder(cfg: Mapping[str, Any] | DictConfig | TextEncoderConfig) -> TextEmbedder:
    """A `TextEmbedder` from its config (validated first)."""
    c = validate_text_encoder_cfg(cfg)
    return TextEmbedder(c.n_embed, c.n_layer, vocab_size=c.vocab_size, max_seq_len=c.max_seq_len,
                        embedding_dropout=c.embedding_dropout)


class TextConditionalUNet(nn.Module):
    """eps(x, t, tokens) of the text- and layout-conditional LDMs: context = tau(tokens) (release conditioning_key
    crossattn, cond_stage_trainable). Children named as the release (`diffusion_model`, `cond_stage_model`), so
    checkpoints map one to one and `replication.models.conditioning.ema_scope` keeps the encoder out of the EMA."""

    # the keyword an integer condition (token ids) is passed as by the training step and the sampler
    integer_condition = "tokens"

    def __init__(self, unet: nn.Module, embedder: TextEmbedder):
        super().__init__()
        self.diffusion_model = unet
        self.cond_stage_model = embedder

    def forward(self, x: torch.Tensor, timesteps: torch.Tensor, tokens: torch.Tensor) -> torch.Tensor:
        return self.diffusion_model(x, timesteps, context=self.cond_stage_model(tokens))
