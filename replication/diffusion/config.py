"""Strict schemas of the `diffusion` and `sampler` config groups (experiments/diffusion/*.yaml,
experiments/sampler/*.yaml). An unknown key, a missing required key, a wrongly typed value or an unknown enum
value is an error naming the key (and the allowed values), never a silent default."""
from __future__ import annotations

from dataclasses import dataclass, field
from enum import Enum
from typing import Any, Mapping, Optional

from omegaconf import MISSING, DictConfig

from replication.diffusion.ddim import (DDIMSpacing, NoiseSource, SampleResult, StepCallback, TablePrecision, ddim_loop,
                                        ddim_timesteps)
from replication.diffusion.ddpm import ddpm_loop
from replication.diffusion.guidance import ImageGuidanceLoss, ImageGuidanceTarget
from replication.diffusion.lr_schedule import LRWarmupKind, make_lr_multiplier
from replication.diffusion.objective import LossType, Parameterization
from replication.diffusion.plms import plms_loop
from replication.diffusion.schedule import Schedule, ScheduleKind, parse_enum
from replication.utils.schema import ConfigError, merge_into_schema


class SamplerKind(str, Enum):
    DDIM = "ddim"  # ddim.py
    PLMS = "plms"  # plms.py
    DDPM = "ddpm"  # ddpm.py


@dataclass
class LRWarmupConfig:
    kind: str = LRWarmupKind.CONSTANT.value
    warmup_steps: int = 0
    f_start: float = 1.0
    f_max: float = 1.0
    f_min: float = 1.0
    cycle_length: Optional[int] = None  # required for linear/cosine (original cycle_lengths / max_decay_steps)


@dataclass
class DiffusionConfig:
    timesteps: int = MISSING
    beta_schedule: str = MISSING
    linear_start: float = MISSING
    linear_end: float = MISSING
    cosine_s: float = 8e-3  # original make_beta_schedule default (Nichol & Dhariwal's s); used by "cosine" only
    parameterization: str = Parameterization.EPS.value
    loss_type: str = MISSING
    scale_by_std: bool = False
    scale_factor: float = 1.0
    cond_drop_prob: float = 0.0
    null_class: Optional[int] = None
    lr_warmup: LRWarmupConfig = field(default_factory=LRWarmupConfig)
    source: str = MISSING

    def make_schedule(self) -> Schedule:
        return Schedule.make(self.beta_schedule, self.timesteps, self.linear_start, self.linear_end, self.cosine_s)

    def loss(self) -> LossType:
        return parse_enum(LossType, self.loss_type, "loss_type")

    def prediction(self) -> Parameterization:
        return parse_enum(Parameterization, self.parameterization, "parameterization")

    def lr_multiplier(self):
        w = self.lr_warmup
        return make_lr_multiplier(w.kind, w.warmup_steps, w.f_start, w.f_max, w.f_min,
                                  w.cycle_length if w.cycle_length is not None else w.warmup_steps + 1)


@dataclass
class SamplerConfig:
    kind: str = MISSING
    steps: int = MISSING
    eta: float = MISSING
    spacing: str = DDIMSpacing.ORIGINAL.value
    # float32: the sampler tables come from the float32 alphas_cumprod buffer, as the release's
    # DDIMSampler.make_schedule (`alphas_cumprod = self.model.alphas_cumprod`); float64: from the float64 schedule
    table_precision: str = TablePrecision.FLOAT32.value
    guidance_scale: float = 1.0  # 1 = no guidance (original ddim.py convention)
    # image guiding (paper App. C; the "guiding" rows of Tab. 5/11), super-resolution only: 0 = off. The paper
    # gives no scale; the loss is the guider's (guidance.ImageGuidanceLoss), the target what it compares
    # (guidance.ImageGuidanceTarget, our choice: the paper does not say)
    image_guidance_scale: float = 0.0
    image_guidance_loss: str = ImageGuidanceLoss.LPIPS.value
    image_guidance_target: str = ImageGuidanceTarget.LOWRES.value
    # classifier guidance (LDM-8-G, Tab. 10: scale 10) with the classifier of the `classifier` group: 0 = off
    classifier_scale: float = 0.0
    num_samples: int = MISSING
    batch_size: int = MISSING
    seed: int = 0  # sample i uses seed + i (StackedRandomGenerator)
    source: str = MISSING


def _enum(enum_cls, value, key: str):
    try:
        return parse_enum(enum_cls, value, key)
    except ValueError as e:
        raise ConfigError(str(e)) from None


def validate_diffusion_cfg(cfg: Mapping[str, Any] | DictConfig, path: str = "diffusion") -> DiffusionConfig:
    """Check the `diffusion` group and return it as a typed DiffusionConfig."""
    c = merge_into_schema(DiffusionConfig, cfg, path, key_prefix=f"{path}.")
    _enum(ScheduleKind, c.beta_schedule, f"{path}.beta_schedule")
    _enum(LossType, c.loss_type, f"{path}.loss_type")
    _enum(Parameterization, c.parameterization, f"{path}.parameterization")
    _enum(LRWarmupKind, c.lr_warmup.kind, f"{path}.lr_warmup.kind")
    try:
        c.make_schedule()
    except ValueError as e:
        raise ConfigError(f"{path}: {e}") from None
    if not 0.0 <= c.cond_drop_prob <= 1.0:
        raise ConfigError(f"{path}.cond_drop_prob must be in [0, 1], got {c.cond_drop_prob}")
    if not c.scale_factor > 0.0:
        raise ConfigError(f"{path}.scale_factor must be > 0, got {c.scale_factor}")
    if c.scale_by_std and c.scale_factor != 1.0:
        # original LatentDiffusion.on_train_batch_start asserts this ("rather not use custom rescaling and
        # std-rescaling simultaneously")
        raise ConfigError(f"{path}.scale_by_std is true, so {path}.scale_factor must be 1.0 (got {c.scale_factor})")
    if c.null_class is not None and c.null_class < 0:
        raise ConfigError(f"{path}.null_class must be >= 0 or null, got {c.null_class}")
    w = c.lr_warmup
    if parse_enum(LRWarmupKind, w.kind, "lr_warmup.kind") is not LRWarmupKind.CONSTANT:
        if w.cycle_length is None:
            raise ConfigError(f"{path}.lr_warmup.cycle_length is required for kind {w.kind!r}")
        try:
            make_lr_multiplier(w.kind, w.warmup_steps, w.f_start, w.f_max, w.f_min, w.cycle_length)
        except ValueError as e:
            raise ConfigError(f"{path}: {e}") from None
    return c


def validate_sampler_cfg(cfg: Mapping[str, Any] | DictConfig, num_timesteps: int = 1000,
                         path: str = "sampler") -> SamplerConfig:
    """Check the `sampler` group against the schedule length and return it as a typed SamplerConfig."""
    c = merge_into_schema(SamplerConfig, cfg, path, key_prefix=f"{path}.")
    _enum(DDIMSpacing, c.spacing, f"{path}.spacing")
    _enum(TablePrecision, c.table_precision, f"{path}.table_precision")
    if not 0.0 <= c.eta <= 1.0:  # above 1, DDIM's sqrt(1 - a_prev - sigma^2) can go negative (NaN images)
        raise ConfigError(f"{path}.eta must be in [0, 1], got {c.eta}")
    kind = _enum(SamplerKind, c.kind, f"{path}.kind")
    if kind is SamplerKind.PLMS and c.eta != 0.0:
        raise ConfigError(f"{path}.eta must be 0 for kind 'plms', got {c.eta}")
    if kind is SamplerKind.DDPM and c.eta != 1.0:
        raise ConfigError(f"{path}.eta must be 1.0 for kind 'ddpm' (ancestral = DDIM eta 1 variance), got {c.eta}")
    try:
        if kind is SamplerKind.DDPM:
            if not 1 <= c.steps <= num_timesteps:
                raise ValueError(f"steps must be in [1, {num_timesteps}], got {c.steps}")
        else:
            ddim_timesteps(c.steps, num_timesteps, c.spacing)
    except ValueError as e:
        raise ConfigError(f"{path}.steps: {e}") from None
    if not c.guidance_scale >= 0.0:
        raise ConfigError(f"{path}.guidance_scale must be >= 0, got {c.guidance_scale}")
    if not c.image_guidance_scale >= 0.0:
        raise ConfigError(f"{path}.image_guidance_scale must be >= 0 (0: no image guidance), got "
                          f"{c.image_guidance_scale}")
    if not c.classifier_scale >= 0.0:
        raise ConfigError(f"{path}.classifier_scale must be >= 0 (0: no classifier guidance), got {c.classifier_scale}")
    _enum(ImageGuidanceLoss, c.image_guidance_loss, f"{path}.image_guidance_loss")
    _enum(ImageGuidanceTarget, c.image_guidance_target, f"{path}.image_guidance_target")
    for key in ("num_samples", "batch_size"):
        if getattr(c, key) < 1:
            raise ConfigError(f"{path}.{key} must be >= 1, got {getattr(c, key)}")
    if c.seed < 0:
        raise ConfigError(f"{path}.seed must be >= 0, got {c.seed}")
    return c


def run_sampler(cfg: SamplerConfig, denoiser, x_T, schedule: Schedule, rng: Optional[NoiseSource] = None,
                progress: bool = False, callback: Optional[StepCallback] = None) -> SampleResult:
    """Dispatch to the sampler named by cfg.kind. Guidance is applied by wrapping `denoiser` beforehand
    (guidance.classifier_free, guidance.classifier_guided, guidance.image_guided)."""
    kind = _enum(SamplerKind, cfg.kind, "sampler.kind")
    precision = _enum(TablePrecision, cfg.table_precision, "sampler.table_precision")
    if kind is SamplerKind.DDIM:
        return ddim_loop(denoiser, x_T, schedule, cfg.steps, cfg.eta, rng, cfg.spacing, progress, callback,
                         precision=precision)
    if kind is SamplerKind.PLMS:
        return plms_loop(denoiser, x_T, schedule, cfg.steps, cfg.eta, cfg.spacing, progress, callback,
                         precision=precision)
    if kind is SamplerKind.DDPM:
        return ddpm_loop(denoiser, x_T, schedule, cfg.steps, rng, cfg.spacing, progress, callback, precision)
    raise ConfigError(f"unknown sampler kind {cfg.kind!r}; allowed values: {[k.value for k in SamplerKind]}")
