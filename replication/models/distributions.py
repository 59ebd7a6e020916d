# Diagonal Gaussian posterior q(z|x) of the KL-regularised first stage (paper Sec. 3.1 / App. G,
# original ldm/modules/distributions/distributions.py).
from __future__ import annotations

import math
from typing import Sequence

import torch

# Clamp range of log-variance used by the original release (keeps exp() finite).
LOGVAR_MIN = -30.0
LOGVAR_MAX = 20.0


class DiagonalGaussian:
    """N(mean, diag(exp(logvar))) over [B, C, H, W] latents; `moments` stacks mean and logvar on dim 1."""

    def __init__(self, moments: torch.Tensor):
        if moments.dim() < 2 or moments.shape[1] % 2 != 0:
            raise ValueError(f"moments must have an even channel count on dim 1; got shape {tuple(moments.shape)}")
        self.moments = moments
        self.mean, logvar = torch.chunk(moments, 2, dim=1)
        self.logvar = torch.clamp(logvar, LOGVAR_MIN, LOGVAR_MAX)
        self.std = torch.exp(0.5 * self.logvar)
        self.var = torch.exp(self.logvar)

    def sample(self, noise: torch.Tensor | None = None, generator: torch.Generator | None = None) -> torch.Tensor:
        """mean + std * noise; `noise` (standard normal, shape of mean) is drawn here when not supplied."""
        if noise is None:
            noise = torch.randn(self.mean.shape, generator=generator, device=self.mean.device, dtype=self.mean.dtype)
        elif noise.shape != self.mean.shape:
            raise ValueError(f"noise shape {tuple(noise.shape)} does not match latent shape {tuple(self.mean.shape)}")
        return self.mean + self.std * noise

    def mode(self) -> torch.Tensor:
        return self.mean

    def kl(self, other: "DiagonalGaussian | None" = None, dims: Sequence[int] = (1, 2, 3)) -> torch.Tensor:
        """KL(self || other) summed over `dims` (per sample); `other=None` means the standard normal prior."""
        if other is None:
            return 0.5 * torch.sum(self.mean.pow(2) + self.var - 1.0 - self.logvar, dim=tuple(dims))
        return 0.5 * torch.sum(
            (self.mean - other.mean).pow(2) / other.var + self.var / other.var - 1.0 - self.logvar + other.logvar,
            dim=tuple(dims),
        )

    def nll(self, sample: torch.Tensor, dims: Sequence[int] = (1, 2, 3)) -> torch.Tensor:
        """-log q(sample) summed over `dims`."""
        return 0.5 * torch.sum(
            math.log(2.0 * math.pi) + self.logvar + (sample - self.mean).pow(2) / self.var, dim=tuple(dims)
        )
