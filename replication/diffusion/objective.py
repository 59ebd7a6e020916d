# LDM training objective, paper Eq. (2)/(3): L = E_{z, eps~N(0,1), t} || eps - eps_theta(z_t, t) ||_p^p, the
# "simple" loss of Ho et al. 2020 (Eq. 14), as the original ddpm.py computes it (logvar 0, elbo weight 0).
"""Forward noising q(z_t | z_0), x0/eps conversions, and the per-sample diffusion loss."""
from __future__ import annotations

from enum import Enum
from typing import Callable

import torch

from replication.diffusion.schedule import Schedule, extract, parse_enum

Denoiser = Callable[[torch.Tensor, torch.Tensor], torch.Tensor]


class Parameterization(str, Enum):
    EPS = "eps"  # the network predicts the added noise (all paper models)
    X0 = "x0"    # the network predicts the clean input (kept for completeness; the original supports it)


class LossType(str, Enum):
    L1 = "l1"
    L2 = "l2"


def q_sample(schedule: Schedule, x0: torch.Tensor, t: torch.Tensor, noise: torch.Tensor) -> torch.Tensor:
    """z_t = sqrt(alpha_bar_t) z_0 + sqrt(1 - alpha_bar_t) eps (Ho et al. 2020, Eq. 4)."""
    if noise.shape != x0.shape:
        raise ValueError(f"noise shape {tuple(noise.shape)} != x0 shape {tuple(x0.shape)}")
    return (extract(schedule.sqrt_alphas_cumprod, t, x0.shape, x0.dtype) * x0
            + extract(schedule.sqrt_one_minus_alphas_cumprod, t, x0.shape, x0.dtype) * noise)


def predict_x0_from_eps(schedule: Schedule, x_t: torch.Tensor, t: torch.Tensor, eps: torch.Tensor) -> torch.Tensor:
    """z_0 = (z_t - sqrt(1 - alpha_bar_t) eps) / sqrt(alpha_bar_t), i.e. Eq. 4 solved for z_0."""
    return (extract(schedule.sqrt_recip_alphas_cumprod, t, x_t.shape, x_t.dtype) * x_t
            - extract(schedule.sqrt_recipm1_alphas_cumprod, t, x_t.shape, x_t.dtype) * eps)


def predict_eps_from_x0(schedule: Schedule, x_t: torch.Tensor, t: torch.Tensor, x0: torch.Tensor) -> torch.Tensor:
    """eps = (z_t - sqrt(alpha_bar_t) z_0) / sqrt(1 - alpha_bar_t); lets an x0-predicting model drive eps samplers."""
    return ((extract(schedule.sqrt_recip_alphas_cumprod, t, x_t.shape, x_t.dtype) * x_t - x0)
            / extract(schedule.sqrt_recipm1_alphas_cumprod, t, x_t.shape, x_t.dtype))


def sample_timesteps(batch: int, num_timesteps: int, generator: torch.Generator | None = None,
                     device: str | torch.device = "cpu") -> torch.Tensor:
    """t ~ Uniform{0, ..., T-1} per sample (original ddpm.py `forward`), drawn on the CPU generator."""
    if batch < 1 or num_timesteps < 1:
        raise ValueError(f"need batch >= 1 and num_timesteps >= 1, got {batch}, {num_timesteps}")
    t = torch.randint(0, num_timesteps, (batch,), generator=generator, dtype=torch.int64)
    return t.to(device)


def per_sample_error(pred: torch.Tensor, target: torch.Tensor, loss_type: LossType | str) -> torch.Tensor:
    """mean over all non-batch dims of |target - pred|^p (p = 1 or 2) -> shape [B]."""
    loss_type = parse_enum(LossType, loss_type, "loss_type")
    if pred.shape != target.shape:
        raise ValueError(f"prediction shape {tuple(pred.shape)} != target shape {tuple(target.shape)}")
    diff = target - pred
    err = diff.abs() if loss_type is LossType.L1 else diff.square()
    return err.flatten(1).mean(dim=1)


def diffusion_loss(denoiser: Denoiser, x0: torch.Tensor, schedule: Schedule, t: torch.Tensor,
                   noise: torch.Tensor, loss_type: LossType | str = LossType.L2,
                   parameterization: Parameterization | str = Parameterization.EPS) -> torch.Tensor:
    """Per-sample simple loss [B]; the caller averages (and weights, if it wants to) over the batch."""
    parameterization = parse_enum(Parameterization, parameterization, "parameterization")
    x_t = q_sample(schedule, x0, t, noise)
    pred = denoiser(x_t, t)
    target = noise if parameterization is Parameterization.EPS else x0
    return per_sample_error(pred, target, loss_type)


def scale_by_std_factor(z: torch.Tensor) -> float:
    """1 / std of all latent entries of the first training batch (original LatentDiffusion.on_train_batch_start
    with scale_by_std=True; torch's unbiased std). Computed in float64."""
    if z.numel() < 2:
        raise ValueError(f"need at least 2 latent values to estimate a std, got {z.numel()}")
    std = float(z.detach().flatten().to(torch.float64).std())
    if not std > 0.0:
        raise ValueError(f"latents have std {std}; cannot rescale by 1/std")
    return 1.0 / std
