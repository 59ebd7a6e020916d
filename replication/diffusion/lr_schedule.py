# Learning-rate rules of the original release (not in the paper; PROTOCOL §3): main.py's --scale_lr rule and the
# ldm/lr_scheduler.py multipliers (LambdaLinearScheduler for Churches, LambdaWarmUpCosineScheduler for inpainting).
"""LR = effective_lr(...) * multiplier(step), as the original's LambdaLR(opt, lr_lambda=scheduler.schedule)
stepped once per optimizer step. Each multiplier is a plain function step -> float."""
from __future__ import annotations

import math
from enum import Enum
from functools import partial
from typing import Callable

from replication.diffusion.schedule import parse_enum


class LRWarmupKind(str, Enum):
    CONSTANT = "constant"  # no scheduler_config (every config except those below)
    LINEAR = "linear"      # LambdaLinearScheduler, one cycle (lsun_churches-ldm-kl-8.yaml)
    COSINE = "cosine"      # LambdaWarmUpCosineScheduler (inpainting_big config)


def effective_lr(base_lr: float, batch_size: int, ngpu: int = 1, accumulate: int = 1, scale_lr: bool = True) -> float:
    """main.py: lr = accumulate_grad_batches * ngpu * batch_size * base_lr if --scale_lr (default True), else
    base_lr. E.g. CelebA-HQ 2e-6 x 48 = 9.6e-5 (paper Tab. 12)."""
    for name, v in (("batch_size", batch_size), ("ngpu", ngpu), ("accumulate", accumulate)):
        if int(v) != v or v < 1:
            raise ValueError(f"{name} must be a positive integer, got {v!r}")
    if not base_lr > 0.0:
        raise ValueError(f"base_lr must be > 0, got {base_lr!r}")
    return float(accumulate * ngpu * batch_size * base_lr) if scale_lr else float(base_lr)


def constant_multiplier(step: int) -> float:
    return 1.0


def linear_warmup_multiplier(step: int, warmup_steps: int, f_start: float, f_max: float, f_min: float,
                             cycle_length: int) -> float:
    """LambdaLinearScheduler (single cycle): linear f_start -> f_max over warmup_steps, then linear from f_max
    (at step 0 of the cycle's formula) towards f_min at step cycle_length: f_min + (f_max-f_min)(L-n)/L."""
    if step < 0:
        raise ValueError(f"step must be >= 0, got {step}")
    if step > cycle_length:
        raise ValueError(f"step {step} is past cycle_length {cycle_length} (the original has no cycle there)")
    if step < warmup_steps:
        return (f_max - f_start) / warmup_steps * step + f_start
    return f_min + (f_max - f_min) * (cycle_length - step) / cycle_length


def warmup_cosine_multiplier(step: int, warmup_steps: int, f_start: float, f_max: float, f_min: float,
                             cycle_length: int) -> float:
    """LambdaWarmUpCosineScheduler: linear f_start -> f_max over warmup_steps, then half a cosine from f_max to
    f_min reached at cycle_length (the original's max_decay_steps) and held after."""
    if step < 0:
        raise ValueError(f"step must be >= 0, got {step}")
    if step < warmup_steps:
        return (f_max - f_start) / warmup_steps * step + f_start
    frac = min((step - warmup_steps) / (cycle_length - warmup_steps), 1.0)
    return f_min + 0.5 * (f_max - f_min) * (1.0 + math.cos(frac * math.pi))


def make_lr_multiplier(kind: LRWarmupKind | str, warmup_steps: int = 0, f_start: float = 1.0, f_max: float = 1.0,
                       f_min: float = 1.0, cycle_length: int = 1) -> Callable[[int], float]:
    """step -> multiplier, usable as torch.optim.lr_scheduler.LambdaLR(opt, lr_lambda=...)."""
    kind = parse_enum(LRWarmupKind, kind, "lr_warmup.kind")
    if kind is LRWarmupKind.CONSTANT:
        return constant_multiplier
    if int(warmup_steps) != warmup_steps or warmup_steps < 0:
        raise ValueError(f"lr_warmup.warmup_steps must be an integer >= 0, got {warmup_steps!r}")
    if cycle_length <= warmup_steps:
        raise ValueError(f"lr_warmup.cycle_length ({cycle_length}) must exceed warmup_steps ({warmup_steps})")
    fn = linear_warmup_multiplier if kind is LRWarmupKind.LINEAR else warmup_cosine_multiplier
    return partial(fn, warmup_steps=int(warmup_steps), f_start=float(f_start), f_max=float(f_max),
                   f_min=float(f_min), cycle_length=int(cycle_length))
