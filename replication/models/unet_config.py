"""Strict config schema for `UNetModel` (experiments/unet/*.yaml, Hydra group `unet`).

The field names are the original release's `unet_config.params` keys; an unknown or mistyped key is an
error naming the key, never a silently ignored option.
"""
from __future__ import annotations

import dataclasses
from dataclasses import dataclass, field
from typing import Any, List, Mapping, Optional

from omegaconf import MISSING, DictConfig, OmegaConf
from omegaconf.errors import OmegaConfBaseException

from replication.utils.schema import ConfigError, check_finite, check_range


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
    if isinstance(cfg, UNetConfig):
        cfg = OmegaConf.structured(cfg)
    if isinstance(cfg, DictConfig):
        raw = OmegaConf.to_container(cfg, resolve=True)
    elif isinstance(cfg, Mapping):
        raw = dict(cfg)
    else:
        raise ConfigError(f"U-Net config must be a mapping, got {type(cfg).__name__}")
    unknown = sorted(set(raw) - set(UNET_CONFIG_KEYS))
    if unknown:
        raise ConfigError(f"unknown U-Net config key(s) {unknown}; allowed: {list(UNET_CONFIG_KEYS)}")
    schema = OmegaConf.structured(UNetConfig)
    try:
        merged = OmegaConf.merge(schema, raw)
        missing = sorted(k for k in UNET_CONFIG_KEYS if OmegaConf.is_missing(merged, k))
        if missing:
            raise ConfigError(f"U-Net config is missing required key(s) {missing}")
        result = OmegaConf.to_object(merged)
    except OmegaConfBaseException as exc:
        raise ConfigError(f"invalid U-Net config: {exc}") from exc
    check_finite(result, "unet", ConfigError)
    check_range(result.dropout, "unet.dropout", ConfigError, low=0.0, high=1.0, high_open=True)
    return result


def unet_kwargs(cfg: Mapping[str, Any] | DictConfig | UNetConfig) -> dict[str, Any]:
    """Validated keyword arguments for `UNetModel(**kwargs)`."""
    return dataclasses.asdict(validate_unet_cfg(cfg))


def build_unet(cfg: Mapping[str, Any] | DictConfig | UNetConfig):
    from .unet import UNetModel

    return UNetModel(**unet_kwargs(cfg))
