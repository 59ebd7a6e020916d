# Ancestral DDPM sampler, Ho et al. 2020 Algorithm 2 with the posterior variance beta-tilde_t (Eq. 7), as the
# original LatentDiffusion.p_sample_loop (clip_denoised=False for latents); optional respacing (Nichol & Dhariwal 2021).
"""Ancestral sampling over all T steps, or over a respaced subset of them.

Full chain: t = T-1, ..., 0 with x_{t-1} = mu_tilde(x0_hat, x_t) + sqrt(beta_tilde_t) * z, no noise at t = 0.
Respaced chain (num_steps < T): the visited indices are ddim.uniform_indices(num_steps, T, spacing) (no +1
offset, so t = 0 is always the last step) and the tables come from Schedule.respace.

Table precision: the original's p_sample_loop reads the model's float32 buffers, which `register_schedule` computes
in float64 and rounds to float32, and takes the noise scale exp(0.5 * log variance) in float32. With
TablePrecision.FLOAT32 (the default) the chain's tables are rounded the same way and the noise scale is evaluated in
float32 (numpy's exp, which can differ from a GPU's expf in the last bit); FLOAT64 keeps the float64 tables.
"""
from __future__ import annotations

from typing import Optional

import numpy as np
import torch
from tqdm import tqdm

from replication.diffusion.ddim import (DDIMSpacing, Denoiser, NoiseSource, SampleResult, StepCallback, TablePrecision,
                                        call_denoiser, check_noise_source, uniform_indices)
from replication.diffusion.schedule import Schedule, parse_enum

TABLES = ("sqrt_recip_alphas_cumprod", "sqrt_recipm1_alphas_cumprod", "posterior_mean_coef1", "posterior_mean_coef2",
          "posterior_log_variance_clipped")


def ddpm_tables(chain: Schedule, precision: TablePrecision | str = TablePrecision.FLOAT32) -> dict[str, np.ndarray]:
    """The chain's tables a step reads, plus `std` = exp(0.5 * posterior_log_variance_clipped), in the precision
    of TablePrecision (see the module docstring)."""
    precision = parse_enum(TablePrecision, precision, "table_precision")
    dtype = np.float32 if precision is TablePrecision.FLOAT32 else np.float64
    tab = {name: getattr(chain, name).numpy().astype(dtype) for name in TABLES}
    tab["std"] = np.exp(dtype(0.5) * tab["posterior_log_variance_clipped"])
    return tab


def ddpm_chain(schedule: Schedule, num_steps: Optional[int] = None,
               spacing: DDIMSpacing | str = DDIMSpacing.ORIGINAL) -> tuple[np.ndarray, Schedule]:
    """(original timestep indices visited, ascending; the schedule of that chain)."""
    T = schedule.num_timesteps
    if num_steps is None or num_steps == T:
        return np.arange(T, dtype=np.int64), schedule
    indices = uniform_indices(num_steps, T, spacing)
    return indices, schedule.respace(indices)


@torch.no_grad()
def ddpm_loop(denoiser: Denoiser, x_T: torch.Tensor, schedule: Schedule, num_steps: Optional[int] = None,
              rng: Optional[NoiseSource] = None, spacing: DDIMSpacing | str = DDIMSpacing.ORIGINAL,
              progress: bool = False, callback: Optional[StepCallback] = None,
              precision: TablePrecision | str = TablePrecision.FLOAT32) -> SampleResult:
    indices, chain = ddpm_chain(schedule, num_steps, spacing)
    n = len(indices)
    check_noise_source(rng, x_T, n > 1, "DDPM")
    tab = ddpm_tables(chain, precision)
    x = x_T.float()
    pred_x0 = x
    for i, k in enumerate(tqdm(range(n - 1, -1, -1), total=n, desc=f"DDPM ({n} steps)", disable=not progress)):
        t = int(indices[k])
        eps = call_denoiser(denoiser, x, t)
        pred_x0 = float(tab["sqrt_recip_alphas_cumprod"][k]) * x - float(tab["sqrt_recipm1_alphas_cumprod"][k]) * eps
        mean = float(tab["posterior_mean_coef1"][k]) * pred_x0 + float(tab["posterior_mean_coef2"][k]) * x
        if k > 0:
            x = mean + float(tab["std"][k]) * rng.randn_like(x).float()
        else:
            x = mean
        if callback is not None:
            callback(i, t, x, pred_x0)
    return SampleResult(x=x, pred_x0=pred_x0, timesteps=indices, num_steps=n, nfe=n)


@torch.no_grad()
def ddpm_sample(denoiser: Denoiser, x_T: torch.Tensor, schedule: Schedule, num_steps: Optional[int] = None,
                eta: float = 1.0, rng: Optional[NoiseSource] = None,
                spacing: DDIMSpacing | str = DDIMSpacing.ORIGINAL, progress: bool = False,
                callback: Optional[StepCallback] = None,
                precision: TablePrecision | str = TablePrecision.FLOAT32) -> torch.Tensor:
    """Ancestral sample; same calling convention as ddim_sample. DDPM's variance equals DDIM's at eta = 1, so
    any other eta is refused rather than silently ignored."""
    if eta != 1.0:
        raise ValueError(f"DDPM ancestral sampling has the eta=1 variance; got eta={eta!r}. Use the DDIM sampler")
    return ddpm_loop(denoiser, x_T, schedule, num_steps, rng, spacing, progress, callback, precision).x
