# Strict schema for first-stage (autoencoder) configs: the architecture (`ddconfig` of the original
# release), the App. G loss, and the optimiser settings of the original `main.py` / AutoencoderKL / VQModel.
from __future__ import annotations

from dataclasses import dataclass, field
from enum import Enum
from typing import Any, List, Mapping, Optional, Union

from omegaconf import MISSING, DictConfig

from replication.utils.schema import ConfigError, check_range, merge_into_schema

from replication.models.ae_blocks import GROUPNORM_GROUPS, AttnType


class AEKind(str, Enum):
    """Regulariser of the first stage (paper Sec. 3.1): KL, VQ, or none at all (pixel-space LDM-1)."""

    kl = "kl"
    vq = "vq"
    identity = "identity"


@dataclass
class DDConfig:
    """Encoder/Decoder architecture; keys and meaning as `ddconfig` in the original configs."""

    ch: int = MISSING
    out_ch: int = MISSING
    ch_mult: List[int] = MISSING
    num_res_blocks: int = MISSING
    attn_resolutions: List[int] = MISSING
    dropout: float = 0.0
    in_channels: int = MISSING
    resolution: int = MISSING
    z_channels: int = MISSING
    double_z: bool = MISSING
    attn_type: AttnType = AttnType.vanilla


@dataclass
class AELossConfig:
    """AutoencoderLoss options. Defaults are the keyword defaults of the original LPIPSWithDiscriminator /
    VQLPIPSWithDiscriminator (ldm/modules/losses/*.py); the per-model yaml files set the released values."""

    disc_start: int = MISSING
    kl_weight: float = 1.0
    codebook_weight: float = 1.0
    disc_weight: float = 1.0
    disc_factor: float = 1.0
    perceptual_weight: float = 1.0
    disc_num_layers: int = 3
    disc_in_channels: int = 3
    logvar_init: float = 0.0
    # Local torchvision VGG16 state dict for LPIPS (nothing is downloaded; see losses.build_lpips).
    lpips_backbone_path: Optional[str] = None
    # Without a backbone file, use a seeded random VGG16 and label results "standin-random".
    allow_standin: bool = False
    standin_seed: int = 0


@dataclass
class AETrainConfig:
    steps: int = MISSING
    batch_size: int = MISSING
    # Original first-stage configs: base_learning_rate 4.5e-6, scaled by main.py to
    # accumulate_grad_batches * n_gpus * batch_size * base_lr when scale_lr is on (its default).
    base_lr: float = 4.5e-6
    scale_lr: bool = True
    accumulate_grad_batches: int = 1
    # Adam betas of both optimisers in AutoencoderKL/VQModel.configure_optimizers.
    adam_betas: List[float] = field(default_factory=lambda: [0.5, 0.9])
    # The original's generator optimiser omits loss.logvar, so the learned log-variance stays at its init.
    train_logvar: bool = False
    # Lightning runs training_step once per optimiser, so the release's discriminator judges a fresh forward pass
    # (a new posterior sample for KL) made after the generator's optimizer step. false: reuse the generator pass's
    # reconstruction (one forward fewer per step; not the release).
    disc_fresh_forward: bool = True
    log_every: int = 100
    ckpt_every: int = 5000


@dataclass
class AutoencoderConfig:
    name: str = MISSING
    kind: AEKind = MISSING
    embed_dim: int = MISSING
    n_embed: Optional[int] = None
    ddconfig: Optional[DDConfig] = None
    # loss and train are required for kl/vq and absent for the identity first stage.
    loss: Optional[AELossConfig] = None
    # Path to an original .ckpt or our safetensors; when set, training is skipped.
    pretrained: Optional[str] = None
    train: Optional[AETrainConfig] = None
    source: str = MISSING


def validate_autoencoder_cfg(cfg: Union[Mapping[str, Any], DictConfig, AutoencoderConfig],
                             inference_only: bool = False) -> AutoencoderConfig:
    """Merge `cfg` into the structured schema; unknown/missing/mistyped keys raise naming the full key.

    `inference_only`: only the network is wanted (building it, loading weights), so the `loss` and `train`
    sections may be absent; when present they are checked all the same."""
    result = merge_into_schema(AutoencoderConfig, cfg, "autoencoder")
    _check_consistency(result, inference_only)
    return result


def _check_consistency(cfg: AutoencoderConfig, inference_only: bool = False) -> None:
    def fail(msg: str) -> None:
        raise ConfigError(f"autoencoder config '{cfg.name}': {msg}")

    if cfg.kind is AEKind.identity:
        if cfg.ddconfig is not None:
            fail("kind 'identity' has no encoder/decoder; remove 'ddconfig'")
        if cfg.n_embed is not None:
            fail("kind 'identity' takes no 'n_embed'")
        if cfg.loss is not None or cfg.train is not None:
            fail("kind 'identity' has nothing to train; remove 'loss' and 'train'")
        return
    for section in ("ddconfig",) if inference_only else ("ddconfig", "loss", "train"):
        if getattr(cfg, section) is None:
            fail(f"kind '{cfg.kind.value}' needs '{section}'")
    train, loss = cfg.train, cfg.loss
    for key in ("steps", "batch_size", "accumulate_grad_batches", "log_every", "ckpt_every") if train else ():
        if getattr(train, key) < 1:
            fail(f"train.{key} must be >= 1, got {getattr(train, key)}")
    try:
        if train is not None:
            check_range(train.base_lr, "train.base_lr", low=0.0, low_open=True)
        check_range(cfg.ddconfig.dropout, "ddconfig.dropout", low=0.0, high=1.0, high_open=True)
        if loss is not None:
            check_range(loss.disc_start, "loss.disc_start", low=0)
            for key in ("kl_weight", "codebook_weight", "disc_weight", "disc_factor", "perceptual_weight"):
                check_range(getattr(loss, key), f"loss.{key}", low=0.0)
        for i, beta in enumerate(train.adam_betas if train is not None else ()):
            check_range(beta, f"train.adam_betas[{i}]", low=0.0, high=1.0, high_open=True)
    except ValueError as exc:
        fail(str(exc))
    dd = cfg.ddconfig
    if not dd.ch_mult:
        fail("'ddconfig.ch_mult' must not be empty")
    for mult in dd.ch_mult:
        if (dd.ch * mult) % GROUPNORM_GROUPS != 0:
            fail(f"ddconfig.ch * ch_mult entry = {dd.ch}*{mult} is not a multiple of {GROUPNORM_GROUPS} (GroupNorm groups)")
    if cfg.kind is AEKind.kl:
        if not dd.double_z:
            fail("kind 'kl' needs ddconfig.double_z: true (the encoder outputs mean and log-variance)")
        if cfg.n_embed is not None:
            fail(f"kind 'kl' takes no 'n_embed' (got {cfg.n_embed})")
    if cfg.kind is AEKind.vq:
        if dd.double_z:
            fail("kind 'vq' needs ddconfig.double_z: false")
        if cfg.n_embed is None or cfg.n_embed < 1:
            fail(f"kind 'vq' needs a positive 'n_embed' (got {cfg.n_embed})")
    if cfg.embed_dim < 1:
        fail(f"'embed_dim' must be positive (got {cfg.embed_dim})")
    if train is not None and len(train.adam_betas) != 2:
        fail(f"'train.adam_betas' must have two entries (got {train.adam_betas})")


def downsampling_factor(cfg: AutoencoderConfig) -> int:
    if cfg.kind is AEKind.identity:
        return 1
    return 2 ** (len(cfg.ddconfig.ch_mult) - 1)


def needs_training(cfg: AutoencoderConfig) -> bool:
    """False when weights come from `pretrained` or there is nothing to train (identity first stage)."""
    return cfg.pretrained is None and cfg.kind is not AEKind.identity


def learning_rate(train: AETrainConfig, num_devices: int = 1) -> float:
    """Learning rate as the original main.py sets it (`--scale_lr`, default on)."""
    if not train.scale_lr:
        return train.base_lr
    return train.accumulate_grad_batches * num_devices * train.batch_size * train.base_lr
