# Forward-process variance schedule beta_1..beta_T and its derived tables (Ho et al. 2020, Eq. 4 and 7;
# LDM paper Sec. 3.2 / Tab. 12-15: T=1000, "linear"). Computed once in float64 and read through extract().
"""Noise schedule.

Schedule kinds keep the names of the original release (CompVis/latent-diffusion
`ldm/modules/diffusionmodules/util.py::make_beta_schedule`), which differ from the usual meaning:

- "linear":      betas = linspace(sqrt(b0), sqrt(b1), T) ** 2   (linear in sqrt(beta); the paper's "linear")
- "sqrt_linear": betas = linspace(b0, b1, T)                    (plain linear in beta, DDPM's "linear")
- "cosine":      Nichol & Dhariwal (2021) Eq. 17, alpha_bar(t) = cos^2(((t/T + s)/(1 + s)) * pi/2), betas
                 clipped to [0, 0.999] as in their Sec. 3.2
- "sqrt":        betas = linspace(b0, b1, T) ** 0.5

Tables follow the original's `register_schedule` (ddpm.py) with v_posterior = 0 (its default).
"""
from __future__ import annotations

import math
import weakref
from dataclasses import dataclass, fields
from enum import Enum
from typing import Sequence

import numpy as np
import torch

# Nichol & Dhariwal (2021), Sec. 3.2: betas of the cosine schedule are clipped to at most 0.999 to avoid the
# singularity at t = T.
COSINE_MAX_BETA = 0.999
# Original `register_schedule`: the posterior variance is 0 at t = 0, so its log is clipped at this floor.
POSTERIOR_LOG_VARIANCE_FLOOR = 1e-20


class ScheduleKind(str, Enum):
    LINEAR = "linear"
    SQRT_LINEAR = "sqrt_linear"
    COSINE = "cosine"
    SQRT = "sqrt"


def parse_enum(enum_cls: type[Enum], value: object, what: str) -> Enum:
    """Turn a config string (or an enum member) into `enum_cls`, naming the allowed values on failure."""
    if isinstance(value, enum_cls):
        return value
    allowed = [m.value for m in enum_cls]
    if isinstance(value, str):
        for member in enum_cls:
            if value.lower() == str(member.value).lower():
                return member
    raise ValueError(f"unknown {what} {value!r}; allowed values: {allowed}")


def make_betas(kind: ScheduleKind | str, timesteps: int, linear_start: float, linear_end: float,
               cosine_s: float = 8e-3) -> np.ndarray:
    """beta_t for t = 0..T-1 in float64, with the original release's meaning of each kind name."""
    kind = parse_enum(ScheduleKind, kind, "beta_schedule")
    if int(timesteps) != timesteps or timesteps < 1:
        raise ValueError(f"timesteps must be a positive integer, got {timesteps!r}")
    T = int(timesteps)
    if kind is ScheduleKind.COSINE:
        steps = np.arange(T + 1, dtype=np.float64) / T
        alpha_bar = np.cos((steps + cosine_s) / (1.0 + cosine_s) * math.pi / 2.0) ** 2
        alpha_bar = alpha_bar / alpha_bar[0]
        betas = np.clip(1.0 - alpha_bar[1:] / alpha_bar[:-1], 0.0, COSINE_MAX_BETA)
    else:
        if not (0.0 < linear_start <= linear_end < 1.0):
            raise ValueError(f"need 0 < linear_start <= linear_end < 1, got linear_start={linear_start!r}, "
                             f"linear_end={linear_end!r}")
        # float64 torch ops, as the original: torch.linspace's points differ from np.linspace's in the last bit of
        # about a third of the betas (and torch's CPU square root from numpy's in some), so alphas_cumprod and every
        # table built on it equal the release's float64 values
        ramp = torch.linspace(linear_start ** 0.5, linear_end ** 0.5, T, dtype=torch.float64) \
            if kind is ScheduleKind.LINEAR else torch.linspace(linear_start, linear_end, T, dtype=torch.float64)
        if kind is ScheduleKind.LINEAR:
            betas = (ramp ** 2).numpy()
        elif kind is ScheduleKind.SQRT_LINEAR:
            betas = ramp.numpy()
        else:  # ScheduleKind.SQRT
            betas = (ramp ** 0.5).numpy()
    return np.asarray(betas, dtype=np.float64)


@dataclass(frozen=True, eq=False)
class Schedule:
    """All per-timestep tables of the Gaussian diffusion, float64 CPU tensors of length T."""

    betas: torch.Tensor
    alphas: torch.Tensor
    alphas_cumprod: torch.Tensor
    alphas_cumprod_prev: torch.Tensor
    sqrt_alphas_cumprod: torch.Tensor
    sqrt_one_minus_alphas_cumprod: torch.Tensor
    log_one_minus_alphas_cumprod: torch.Tensor
    sqrt_recip_alphas_cumprod: torch.Tensor
    sqrt_recipm1_alphas_cumprod: torch.Tensor
    posterior_variance: torch.Tensor
    posterior_log_variance_clipped: torch.Tensor
    posterior_mean_coef1: torch.Tensor
    posterior_mean_coef2: torch.Tensor

    @property
    def num_timesteps(self) -> int:
        return int(self.betas.shape[0])

    @classmethod
    def make(cls, kind: ScheduleKind | str = ScheduleKind.LINEAR, timesteps: int = 1000,
             linear_start: float = 1e-4, linear_end: float = 2e-2, cosine_s: float = 8e-3) -> "Schedule":
        """Build the schedule. Defaults are the original DDPM class defaults (ddpm.py); LDM configs override
        linear_start/linear_end (experiments/diffusion/*.yaml)."""
        return cls.from_betas(make_betas(kind, timesteps, linear_start, linear_end, cosine_s))

    @classmethod
    def from_betas(cls, betas: Sequence[float] | np.ndarray | torch.Tensor) -> "Schedule":
        b = np.asarray(betas.cpu().numpy() if isinstance(betas, torch.Tensor) else betas, dtype=np.float64)
        if b.ndim != 1 or b.size < 1:
            raise ValueError(f"betas must be a non-empty 1-D array, got shape {b.shape}")
        if not np.all((b > 0.0) & (b < 1.0)):
            bad = int(np.flatnonzero(~((b > 0.0) & (b < 1.0)))[0])
            raise ValueError(f"betas must lie in (0, 1); beta[{bad}] = {b[bad]!r}")
        alphas = 1.0 - b
        ac = np.cumprod(alphas)
        ac_prev = np.append(1.0, ac[:-1])
        post_var = b * (1.0 - ac_prev) / (1.0 - ac)
        tables = dict(
            betas=b,
            alphas=alphas,
            alphas_cumprod=ac,
            alphas_cumprod_prev=ac_prev,
            sqrt_alphas_cumprod=np.sqrt(ac),
            sqrt_one_minus_alphas_cumprod=np.sqrt(1.0 - ac),
            log_one_minus_alphas_cumprod=np.log(1.0 - ac),
            sqrt_recip_alphas_cumprod=np.sqrt(1.0 / ac),
            sqrt_recipm1_alphas_cumprod=np.sqrt(1.0 / ac - 1.0),
            posterior_variance=post_var,
            posterior_log_variance_clipped=np.log(np.maximum(post_var, POSTERIOR_LOG_VARIANCE_FLOOR)),
            posterior_mean_coef1=b * np.sqrt(ac_prev) / (1.0 - ac),
            posterior_mean_coef2=(1.0 - ac_prev) * np.sqrt(alphas) / (1.0 - ac),
        )
        return cls(**{k: torch.from_numpy(np.ascontiguousarray(v)) for k, v in tables.items()})

    def respace(self, timesteps: Sequence[int] | np.ndarray) -> "Schedule":
        """Schedule of the sub-chain visiting only `timesteps` (ascending original indices), with
        beta'_k = 1 - alpha_bar[t_k] / alpha_bar[t_{k-1}] and alpha_bar[t_{-1}] = 1 (Nichol & Dhariwal 2021,
        Sec. 4). The denoiser must still be called with the original indices t_k."""
        ts = np.asarray(timesteps, dtype=np.int64)
        check_timesteps(ts, self.num_timesteps)
        ac = self.alphas_cumprod.numpy()[ts]
        prev = np.append(1.0, ac[:-1])
        return Schedule.from_betas(1.0 - ac / prev)

    def table_names(self) -> list[str]:
        return [f.name for f in fields(self)]


def check_timesteps(ts: np.ndarray, num_timesteps: int) -> None:
    """Timesteps must be strictly increasing indices into a schedule of length `num_timesteps`."""
    if ts.ndim != 1 or ts.size < 1:
        raise ValueError(f"timesteps must be a non-empty 1-D list, got shape {ts.shape}")
    if ts[0] < 0 or ts[-1] >= num_timesteps:
        raise ValueError(f"timesteps must lie in [0, {num_timesteps - 1}], got {ts[0]}..{ts[-1]}")
    if np.any(np.diff(ts) <= 0):
        raise ValueError("timesteps must be strictly increasing")


_DEVICE_TABLES: dict[tuple[int, str], tuple[weakref.ref, torch.Tensor]] = {}


def _table_on(arr: torch.Tensor, device: torch.device) -> torch.Tensor:
    """A device copy of a (never modified) schedule table, made once per table and device."""
    key = (id(arr), str(device))
    hit = _DEVICE_TABLES.get(key)
    if hit is not None and hit[0]() is arr:
        return hit[1]
    for k in [k for k, (ref, _) in _DEVICE_TABLES.items() if ref() is None]:  # tables of dropped schedules
        del _DEVICE_TABLES[k]
    copy = arr.to(device)
    _DEVICE_TABLES[key] = (weakref.ref(arr), copy)
    return copy


def extract(arr: torch.Tensor, t: torch.Tensor, shape: Sequence[int] | torch.Size,
            dtype: torch.dtype = torch.float32) -> torch.Tensor:
    """arr[t] (float64 table, one value per sample), reshaped to [B, 1, ..., 1] to broadcast against `shape`,
    cast to `dtype` on t's device. The only way samplers and losses read the schedule."""
    if t.ndim != 1:
        raise ValueError(f"t must be a 1-D LongTensor [B], got shape {tuple(t.shape)}")
    if t.dtype not in (torch.int64, torch.int32):
        raise ValueError(f"t must be an integer tensor, got {t.dtype}")
    if t.device.type == "cpu":
        idx = t.detach().to(torch.int64)
        if idx.numel() and (int(idx.min()) < 0 or int(idx.max()) >= arr.shape[0]):
            raise ValueError(f"timestep out of range [0, {arr.shape[0] - 1}]: min {int(idx.min())}, max {int(idx.max())}")
        out = arr[idx].to(dtype=dtype)
    else:
        # gather on t's device from a cached copy of the table: reading t back to the host, or copying the table
        # from pageable memory, would sync the GPU on every training step. The same float64 values, cast after the
        # gather, so results are identical; the device's indexing checks the upper bound (t comes from
        # sample_timesteps or a sampler's grid, never negative).
        out = _table_on(arr, t.device)[t.detach().to(torch.int64)].to(dtype)
    return out.reshape(t.shape[0], *([1] * (len(shape) - 1)))
