# PLMS sampler: Liu et al. 2022 (PNDM), pseudo linear multistep on the DDIM transfer, as in the original release
# (ldm/models/diffusion/plms.py): a pseudo improved-Euler warm-up step, then 2/3/4-step Adams-Bashforth on eps.
"""PLMS sampling on the DDIM timesteps (same step selection, a_prev rule and tables as ddim.py: the original's
PLMSSampler.make_schedule builds them from the float32 alphas_cumprod buffer too), eta = 0 only."""
from __future__ import annotations

from typing import Optional

import numpy as np
import torch
from tqdm import tqdm

from replication.diffusion.ddim import (DDIMSpacing, Denoiser, FinalAlpha, SampleResult, StepCallback, TablePrecision,
                                        call_denoiser, ddim_parameters, ddim_timesteps, ddim_update)
from replication.diffusion.schedule import Schedule

# Adams-Bashforth weights on (eps_t, eps_{t+1}, eps_{t+2}, eps_{t+3}), newest first (PNDM Eq. 12; the
# original plms.py), indexed by how many earlier eps are available.
ADAMS_BASHFORTH = {
    1: (np.array([3.0, -1.0]) / 2.0),
    2: (np.array([23.0, -16.0, 5.0]) / 12.0),
    3: (np.array([55.0, -59.0, 37.0, -9.0]) / 24.0),
}
HISTORY = max(ADAMS_BASHFORTH)


def combine_eps(eps: torch.Tensor, history: list[torch.Tensor]) -> torch.Tensor:
    """Adams-Bashforth combination of the current eps and up to 3 previous ones (history oldest first)."""
    weights = ADAMS_BASHFORTH[min(len(history), HISTORY)]
    terms = [eps] + history[::-1][: len(weights) - 1]
    out = float(weights[0]) * terms[0]
    for w, e in zip(weights[1:], terms[1:]):
        out = out + float(w) * e
    return out


@torch.no_grad()
def plms_loop(denoiser: Denoiser, x_T: torch.Tensor, schedule: Schedule, num_steps: Optional[int] = None,
              eta: float = 0.0, spacing: DDIMSpacing | str = DDIMSpacing.ORIGINAL, progress: bool = False,
              callback: Optional[StepCallback] = None, final_alpha: FinalAlpha | str = FinalAlpha.ORIGINAL,
              timesteps: Optional[np.ndarray] = None,
              precision: TablePrecision | str = TablePrecision.FLOAT32) -> SampleResult:
    if eta != 0.0:
        raise ValueError(f"PLMS is deterministic: eta must be 0, got {eta!r} (the original raises too)")
    if timesteps is None:
        if num_steps is None:
            raise ValueError("give num_steps or an explicit timesteps list")
        timesteps = ddim_timesteps(num_steps, schedule.num_timesteps, spacing)
    params = ddim_parameters(schedule, timesteps, 0.0, final_alpha, precision)
    n = len(params.timesteps)
    x = x_T.float()
    pred_x0 = x
    history: list[torch.Tensor] = []
    nfe = 0
    for i, k in enumerate(tqdm(range(n - 1, -1, -1), total=n, desc=f"PLMS ({n} steps)", disable=not progress)):
        t = int(params.timesteps[k])
        eps = call_denoiser(denoiser, x, t)
        nfe += 1
        if not history:
            # Pseudo improved Euler (2nd order): average eps here and at the provisional next point. The
            # original evaluates the last step's provisional point at the same t (t_next clamps to the end).
            x_next, _ = ddim_update(x, eps, params, k, None)
            t_next = int(params.timesteps[max(k - 1, 0)])
            eps_prime = 0.5 * (eps + call_denoiser(denoiser, x_next, t_next))
            nfe += 1
        else:
            eps_prime = combine_eps(eps, history)
        x, pred_x0 = ddim_update(x, eps_prime, params, k, None)
        history.append(eps)
        if len(history) > HISTORY:
            history.pop(0)
        if callback is not None:
            callback(i, t, x, pred_x0)
    return SampleResult(x=x, pred_x0=pred_x0, timesteps=params.timesteps, num_steps=n, nfe=nfe)


@torch.no_grad()
def plms_sample(denoiser: Denoiser, x_T: torch.Tensor, schedule: Schedule, num_steps: int, eta: float = 0.0,
                rng: object = None, spacing: DDIMSpacing | str = DDIMSpacing.ORIGINAL, progress: bool = False,
                callback: Optional[StepCallback] = None,
                final_alpha: FinalAlpha | str = FinalAlpha.ORIGINAL,
                precision: TablePrecision | str = TablePrecision.FLOAT32) -> torch.Tensor:
    """PLMS sample; same calling convention as ddim_sample (rng is accepted and unused: PLMS draws no noise)."""
    return plms_loop(denoiser, x_T, schedule, num_steps, eta, spacing, progress, callback, final_alpha,
                     precision=precision).x
