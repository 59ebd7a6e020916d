# DDIM sampler, Song et al. 2021 Eq. (12) with sigma_t of Eq. (16); the sampler of every LDM paper result
# (PROTOCOL §2), with the original release's step selection and a_prev rule (ldm/models/diffusion/ddim.py).
"""DDIM sampling over a sub-sequence of the T training timesteps.

Step selection (`ddim_timesteps`):
- DDIMSpacing.ORIGINAL: the original `make_ddim_timesteps(ddim_discr_method="uniform")`: with c = T // S,
  timesteps = {0, c, 2c, ...} < T, plus 1. The count is ceil(T / c), which can differ from S
  (S=400 -> c=2 -> 500 steps). When (T-1) is a multiple of c (e.g. c=1 or c=3 for T=1000) the +1 lands on
  t=T, where the original raises IndexError; here that is a ValueError.
- DDIMSpacing.EXACT: exactly S steps t_k = floor(k*T/S) + 1, k = 0..S-1 (same +1 offset). Equals ORIGINAL
  whenever S divides T. Needs S < T.

a_prev rule (`ddim_parameters`), verified against the original `make_ddim_sampling_parameters`:
alphas_prev = [alphas_cumprod[0]] + alphas_cumprod[timesteps[:-1]], i.e. the last step lands on the noise
level of t=0 (alphas_cumprod[0] = 1 - beta_0 of the *full* table), not on a clean sample.
FinalAlpha.ONE instead uses a_prev = 1 at the last step (DDIM paper's alpha_0 := 1), returning the clean
x0 prediction; it is not the original's behaviour and is off by default.

Table precision (`TablePrecision`, config key sampler.table_precision): the original's `DDIMSampler.make_schedule`
reads the model's float32 `alphas_cumprod` buffer (`register_schedule` stores every table as float32), so its
tables hold float32 alphas and sigmas computed from float32 inputs (PROTOCOL §7). FLOAT32 (the default) builds
the tables with the same values and dtypes; FLOAT64 reads the float64 schedule, which moves the eta = 1 sigmas
by up to 7e-6 relative at 400-500 steps and 2.5e-6 at 200 (measured for linear 0.0015-0.0195; 1 - a_t / a_prev
is small there).
"""
from __future__ import annotations

import math
from dataclasses import dataclass, field
from enum import Enum
from typing import Callable, Optional, Protocol

import numpy as np
import torch
from tqdm import tqdm

from replication.diffusion.schedule import Schedule, check_timesteps, parse_enum

Denoiser = Callable[[torch.Tensor, torch.Tensor], torch.Tensor]
# callback(step_index, t, x_prev, pred_x0) after each sampler step.
StepCallback = Callable[[int, int, torch.Tensor, torch.Tensor], None]


class NoiseSource(Protocol):
    """What samplers need from a random stream: replication.utils.rng.StackedRandomGenerator fits."""

    def randn_like(self, x: torch.Tensor) -> torch.Tensor: ...


class DDIMSpacing(str, Enum):
    ORIGINAL = "original"
    EXACT = "exact"


class FinalAlpha(str, Enum):
    ORIGINAL = "original"  # a_prev of the last step = alphas_cumprod[0] (CompVis release)
    ONE = "one"            # a_prev of the last step = 1 (returns the clean x0 prediction)


class TablePrecision(str, Enum):
    FLOAT32 = "float32"  # tables from the float32 alphas_cumprod buffer, as the release's DDIMSampler.make_schedule
    FLOAT64 = "float64"  # tables from the float64 schedule


@dataclass
class SampleResult:
    """What a sampler returns: the sample, the last x0 prediction, and what was run."""

    x: torch.Tensor
    pred_x0: torch.Tensor
    timesteps: np.ndarray  # ascending original indices of the steps run
    num_steps: int
    nfe: int  # denoiser calls (a guided denoiser batches cond+uncond into one call)
    extras: dict = field(default_factory=dict)


def uniform_indices(num_steps: int, num_timesteps: int, spacing: DDIMSpacing | str) -> np.ndarray:
    """Offset-free ascending selection of step indices in [0, T) (see module docstring for the rules)."""
    spacing = parse_enum(DDIMSpacing, spacing, "spacing")
    if int(num_steps) != num_steps or num_steps < 1:
        raise ValueError(f"number of sampling steps must be a positive integer, got {num_steps!r}")
    if num_steps > num_timesteps:
        raise ValueError(f"cannot take {num_steps} sampling steps with only T={num_timesteps} training timesteps")
    S, T = int(num_steps), int(num_timesteps)
    if spacing is DDIMSpacing.ORIGINAL:
        return np.arange(0, T, T // S, dtype=np.int64)
    return (np.arange(S, dtype=np.int64) * T) // S


def ddim_timesteps(num_steps: int, num_timesteps: int = 1000,
                   spacing: DDIMSpacing | str = DDIMSpacing.ORIGINAL) -> np.ndarray:
    """Ascending DDIM timesteps with the original's +1 offset. len() may differ from num_steps for ORIGINAL."""
    ts = uniform_indices(num_steps, num_timesteps, spacing) + 1
    if ts[-1] >= num_timesteps:
        raise ValueError(
            f"{num_steps} DDIM steps with spacing {parse_enum(DDIMSpacing, spacing, 'spacing').value!r} and "
            f"T={num_timesteps} select timestep {int(ts[-1])} (= T after the +1 offset), outside the schedule; "
            f"the original release fails here too. Choose another step count"
            + ("" if parse_enum(DDIMSpacing, spacing, "spacing") is DDIMSpacing.EXACT else " or spacing 'exact'"))
    return ts


@dataclass(frozen=True)
class DDIMParameters:
    """Per-step tables aligned with the ascending timesteps. With TablePrecision.FLOAT32 they hold the release's
    values and dtypes: alphas and sqrt_one_minus_alphas float32, alphas_prev float64 (holding float32 values, as
    the release's np.asarray of a list does), sigmas float64 (computed from the float32 alphas, with the release's
    float32 roundings). With FLOAT64 all are float64."""

    timesteps: np.ndarray
    alphas: np.ndarray                 # alpha_bar at t_k
    alphas_prev: np.ndarray            # alpha_bar the step lands on
    sigmas: np.ndarray
    sqrt_one_minus_alphas: np.ndarray  # sqrt(1 - alpha_bar at t_k), the release's ddim_sqrt_one_minus_alphas
    dir_coefs: np.ndarray              # sqrt(1 - a_prev - sigma^2), the coefficient of eps pointing to x_t
    precision: TablePrecision = TablePrecision.FLOAT32


def _alphas_cumprod(schedule: Schedule, precision: TablePrecision) -> np.ndarray:
    ac = schedule.alphas_cumprod.numpy()
    # float32: the release's registered buffer, torch.tensor(alphas_cumprod, dtype=float32): round to nearest
    return ac.astype(np.float32) if precision is TablePrecision.FLOAT32 else ac


def ddim_parameters(schedule: Schedule, timesteps: np.ndarray, eta: float,
                    final_alpha: FinalAlpha | str = FinalAlpha.ORIGINAL,
                    precision: TablePrecision | str = TablePrecision.FLOAT32) -> DDIMParameters:
    """sigma_k = eta * sqrt((1 - a_prev)/(1 - a) * (1 - a/a_prev)) (DDIM Eq. 16), a_prev per the original, in the
    arithmetic of the release's make_ddim_sampling_parameters for FLOAT32 (see TablePrecision)."""
    final_alpha = parse_enum(FinalAlpha, final_alpha, "final_alpha")
    precision = parse_enum(TablePrecision, precision, "table_precision")
    if not (eta >= 0.0 and math.isfinite(eta)):
        raise ValueError(f"eta must be a finite number >= 0, got {eta!r}")
    ts = np.asarray(timesteps, dtype=np.int64)
    check_timesteps(ts, schedule.num_timesteps)
    ac = _alphas_cumprod(schedule, precision)
    alphas = ac[ts]
    first_prev = ac[0] if final_alpha is FinalAlpha.ORIGINAL else 1.0
    # a list of float32 scalars made into an array is float64 in the release, and so here
    alphas_prev = np.concatenate([[first_prev], ac[ts[:-1]]]).astype(np.float64)
    if precision is TablePrecision.FLOAT32:
        # the release mixes a float32 tensor (alphas) with a float64 array (alphas_prev): 1 - alphas stays float32,
        # and torch divides an array by a tensor as `tensor.reciprocal() * array`, so 1 / (1 - alphas) is rounded
        # to float32 too; every other operation runs in float64 on the float32 values
        recip = (np.float32(1.0) / (np.float32(1.0) - alphas)).astype(np.float64)
        a64 = alphas.astype(np.float64)
        sigmas = eta * np.sqrt((1.0 - alphas_prev) * recip * (1.0 - a64 / alphas_prev))
        sqrt_one_minus = np.sqrt(np.float32(1.0) - alphas)  # float32, the release's np.sqrt(1. - ddim_alphas)
        # the release's step evaluates (1 - a_prev - sigma^2).sqrt() on float32 tensors
        ap32, s32 = alphas_prev.astype(np.float32), sigmas.astype(np.float32)
        dir_coefs = np.sqrt(np.maximum(np.float32(1.0) - ap32 - s32 * s32, np.float32(0.0)))
    else:
        sigmas = eta * np.sqrt((1.0 - alphas_prev) / (1.0 - alphas) * (1.0 - alphas / alphas_prev))
        sqrt_one_minus = np.sqrt(1.0 - alphas)
        dir_coefs = np.sqrt(np.maximum(1.0 - alphas_prev - sigmas * sigmas, 0.0))
    return DDIMParameters(timesteps=ts, alphas=alphas, alphas_prev=alphas_prev, sigmas=np.asarray(sigmas),
                          sqrt_one_minus_alphas=sqrt_one_minus, dir_coefs=dir_coefs, precision=precision)


def ddim_sigmas(schedule: Schedule, timesteps: np.ndarray, eta: float,
                final_alpha: FinalAlpha | str = FinalAlpha.ORIGINAL,
                precision: TablePrecision | str = TablePrecision.FLOAT32) -> np.ndarray:
    return ddim_parameters(schedule, timesteps, eta, final_alpha, precision).sigmas


def ddim_update(x: torch.Tensor, eps: torch.Tensor, params: DDIMParameters, k: int,
                noise: Optional[torch.Tensor]) -> tuple[torch.Tensor, torch.Tensor]:
    """Step k of the table (Eq. 12): x_prev = sqrt(a_prev) x0_hat + sqrt(1 - a_prev - sigma^2) eps + sigma * noise,
    with x0_hat = (x - sqrt(1 - a_t) eps) / sqrt(a_t). The scalars come from `params` as Python floats (a float32
    table's values stay exact; a float32 tensor op rounds a float64 square root of them to the float32 root);
    tensors stay in their dtype (float32)."""
    sigma = float(params.sigmas[k])
    pred_x0 = (x - float(params.sqrt_one_minus_alphas[k]) * eps) / math.sqrt(float(params.alphas[k]))
    x_prev = math.sqrt(float(params.alphas_prev[k])) * pred_x0 + float(params.dir_coefs[k]) * eps
    if sigma > 0.0:
        if noise is None:
            raise ValueError("sigma > 0 needs a noise tensor")
        x_prev = x_prev + sigma * noise
    return x_prev, pred_x0


def call_denoiser(denoiser: Denoiser, x: torch.Tensor, t: int) -> torch.Tensor:
    """eps = denoiser(x, t) with t broadcast to a LongTensor [B]; output checked and returned in float32."""
    ts = torch.full((x.shape[0],), int(t), dtype=torch.int64, device=x.device)
    eps = denoiser(x, ts)
    if not isinstance(eps, torch.Tensor) or eps.shape != x.shape:
        got = tuple(eps.shape) if isinstance(eps, torch.Tensor) else type(eps).__name__
        raise ValueError(f"denoiser returned {got} for input of shape {tuple(x.shape)} at t={t}; expected the same shape")
    return eps.float()


def check_noise_source(rng: Optional[NoiseSource], x: torch.Tensor, needed: bool, who: str) -> None:
    if not needed:
        return
    if rng is None:
        raise ValueError(f"{who} draws fresh noise (eta > 0 or ancestral steps) and needs rng, e.g. "
                         f"StackedRandomGenerator(seeds) with one seed per sample")
    n = len(rng) if hasattr(rng, "__len__") else None
    if n is not None and n != x.shape[0]:
        raise ValueError(f"rng has {n} per-sample streams but the batch has {x.shape[0]} samples")


@torch.no_grad()
def ddim_loop(denoiser: Denoiser, x_T: torch.Tensor, schedule: Schedule, num_steps: Optional[int] = None,
              eta: float = 0.0, rng: Optional[NoiseSource] = None,
              spacing: DDIMSpacing | str = DDIMSpacing.ORIGINAL, progress: bool = False,
              callback: Optional[StepCallback] = None, final_alpha: FinalAlpha | str = FinalAlpha.ORIGINAL,
              timesteps: Optional[np.ndarray] = None,
              precision: TablePrecision | str = TablePrecision.FLOAT32) -> SampleResult:
    """Run DDIM from x_T (treated as the sample at the largest selected timestep). `timesteps` (ascending
    original indices) overrides num_steps/spacing; `precision` picks the tables (TablePrecision)."""
    if timesteps is None:
        if num_steps is None:
            raise ValueError("give num_steps or an explicit timesteps list")
        timesteps = ddim_timesteps(num_steps, schedule.num_timesteps, spacing)
    params = ddim_parameters(schedule, timesteps, eta, final_alpha, precision)
    check_noise_source(rng, x_T, bool(np.any(params.sigmas > 0.0)), "DDIM")
    n = len(params.timesteps)
    x = x_T.float()
    pred_x0 = x
    order = range(n - 1, -1, -1)
    for i, k in enumerate(tqdm(order, total=n, desc=f"DDIM ({n} steps, eta={eta})", disable=not progress)):
        t = int(params.timesteps[k])
        eps = call_denoiser(denoiser, x, t)
        sigma = float(params.sigmas[k])
        noise = rng.randn_like(x).float() if sigma > 0.0 else None
        x, pred_x0 = ddim_update(x, eps, params, k, noise)
        if callback is not None:
            callback(i, t, x, pred_x0)
    return SampleResult(x=x, pred_x0=pred_x0, timesteps=params.timesteps, num_steps=n, nfe=n)


@torch.no_grad()
def ddim_sample(denoiser: Denoiser, x_T: torch.Tensor, schedule: Schedule, num_steps: int, eta: float = 0.0,
                rng: Optional[NoiseSource] = None, spacing: DDIMSpacing | str = DDIMSpacing.ORIGINAL,
                progress: bool = False, callback: Optional[StepCallback] = None,
                final_alpha: FinalAlpha | str = FinalAlpha.ORIGINAL,
                precision: TablePrecision | str = TablePrecision.FLOAT32) -> torch.Tensor:
    """DDIM sample (float32). Use ddim_loop for the step count actually run and the last x0 prediction."""
    return ddim_loop(denoiser, x_T, schedule, num_steps, eta, rng, spacing, progress, callback, final_alpha,
                     precision=precision).x
