"""Strict config schema for `UNetModel` (experiments/unet/*.yaml, Hydra group `unet`).

The field names are the original release's `unet_config.params` keys; an unknown or mistyped key is an
error naming the key, never a silently ignored option.
"""
from __future__ import annotations

import dataclasses
from dataclasses import dataclass, field
from typing import Any, List, Mapping, Optional

from omegaconf import MISSING, DictConfig

from replication.utils.schema import ConfigError, check_range, merge_into_schema


@dataclass
class UNetConfig:
    image_size: int = MISSING  # latent side length (informational in the original too)
    in_channels: int = MISSING
    model_channels: int = MISSING
    out_channels: int = MISSING
    num_res_blocks: int = MISSING
    attention_resolutions: List[int] = MISSING  # downsampling factors ds where attention is applied
    dropout: float = 0.0
    channel_mult: List[int] = field(default_factory=lambda: [1, 2, 4, 8])
    conv_resample: bool = True
    num_classes: Optional[int] = None
    num_heads: int = -1
    num_head_channels: int = -1  # -1: use num_heads
    num_heads_upsample: int = -1  # -1: same as num_heads
    use_scale_shift_norm: bool = False
    resblock_updown: bool = False
    use_new_attention_order: bool = False  # False = ADM QKVAttentionLegacy, as every released LDM
    use_spatial_transformer: bool = False
    transformer_depth: int = 1
    context_dim: Optional[int] = None
    legacy: bool = True
    gradient_checkpointing: bool = False  # memory only; results identical


UNET_CONFIG_KEYS = tuple(f.name for f in dataclasses.fields(UNetConfig))


def validate_unet_cfg(cfg: Mapping[str, Any] | DictConfig | UNetConfig) -> UNetConfig:
    """Check keys and types against `UNetConfig`; return the typed object. Raises ConfigError."""
    result = merge_into_schema(UNetConfig, cfg, "unet")
    check_range(result.dropout, "unet.dropout", low=0.0, high=1.0, high_open=True)
    return result


def unet_kwargs(cfg: Mapping[str, Any] | DictConfig | UNetConfig) -> dict[str, Any]:
    """Validated keyword arguments for `UNetModel(**kwargs)`."""
    return dataclasses.asdict(validate_unet_cfg(cfg))


def build_unet(cfg: Mapping[str, Any] | DictConfig | UNetConfig):
    from .unet import UNetModel

    return UNetModel(**unet_kwargs(cfg))
