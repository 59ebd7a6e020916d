# Classifier-free guidance, Ho & Salimans 2021 Eq. (6) in the original release's form (ldm/models/diffusion/ddim.py):
# eps = eps(x, t, uncond) + s * (eps(x, t, cond) - eps(x, t, uncond)), so s = 1 is the plain conditional model.
"""Guidance wraps the conditional model into a plain denoiser `eps = denoiser(x_t, t)` for the samplers, and
provides the condition dropout used in training so that one network also learns the unconditional model."""
from __future__ import annotations

import math
from typing import Callable, Sequence, Union

import torch

from replication.diffusion.ddim import Denoiser

ConditionalModel = Callable[[torch.Tensor, torch.Tensor, torch.Tensor], torch.Tensor]
Condition = Union[torch.Tensor, Sequence[str]]


def _match_batch(uncond: torch.Tensor, cond: torch.Tensor) -> torch.Tensor:
    if uncond.shape == cond.shape:
        return uncond
    if uncond.shape[0] == 1 and uncond.shape[1:] == cond.shape[1:]:
        return uncond.expand_as(cond)
    raise ValueError(f"unconditional input shape {tuple(uncond.shape)} does not fit the condition shape "
                     f"{tuple(cond.shape)} (need equal shapes, or a batch of 1 to broadcast)")


def classifier_free(model: ConditionalModel, cond: torch.Tensor, uncond: torch.Tensor, scale: float) -> Denoiser:
    """Denoiser for guidance scale `scale` over a fixed batch of conditions. For s != 1 the model runs once on
    the concatenated batch [uncond; cond]; for s == 1 it runs on cond only, so the result is exactly the
    conditional model's."""
    if not math.isfinite(scale):
        raise ValueError(f"guidance scale must be finite, got {scale!r}")
    if scale == 1.0:
        def conditional(x: torch.Tensor, t: torch.Tensor) -> torch.Tensor:
            return model(x, t, cond)
        return conditional

    uncond_b = _match_batch(uncond, cond)
    c_in = torch.cat([uncond_b, cond])

    def guided(x: torch.Tensor, t: torch.Tensor) -> torch.Tensor:
        if x.shape[0] != cond.shape[0]:
            raise ValueError(f"batch of x ({x.shape[0]}) != batch of the condition ({cond.shape[0]})")
        out = model(torch.cat([x, x]), torch.cat([t, t]), c_in)
        eps_u, eps_c = out.chunk(2)
        return eps_u + scale * (eps_c - eps_u)

    return guided


def null_class_labels(n: int, null_class: int, device: str | torch.device = "cpu") -> torch.Tensor:
    """n copies of the "no class" label (cIN: index 1000 of a 1001-entry ClassEmbedder, PROTOCOL §2)."""
    if n < 1:
        raise ValueError(f"n must be >= 1, got {n}")
    return torch.full((n,), int(null_class), dtype=torch.int64, device=device)


def drop_condition(cond: Condition, null_cond: Union[torch.Tensor, int, str], p: float,
                   generator: torch.Generator | None = None) -> Condition:
    """Replace each sample's condition by `null_cond` with probability p (Ho & Salimans 2021, Alg. 1 line 3).

    cond: class labels [B], context [B, ...], or a list of captions (null_cond "" then). null_cond broadcasts
    against one sample's condition (a scalar label, a [1, ...] or [...] tensor). The Bernoulli draws use
    `generator` (CPU), one per sample, drawn even when p == 0 so the random stream does not depend on p.
    """
    if not (0.0 <= p <= 1.0):
        raise ValueError(f"condition drop probability must be in [0, 1], got {p!r}")
    n = len(cond)
    drop = torch.rand(n, generator=generator) < p
    if isinstance(cond, torch.Tensor):
        null = torch.as_tensor(null_cond, dtype=cond.dtype, device=cond.device)
        if null.ndim == cond.ndim:
            if null.shape[0] != 1:
                raise ValueError(f"null condition with a batch dimension must have batch 1, got {tuple(null.shape)}")
            null = null[0]
        if null.shape != cond.shape[1:] and null.ndim != 0:
            raise ValueError(f"null condition shape {tuple(null.shape)} does not match one sample's condition "
                             f"shape {tuple(cond.shape[1:])}")
        mask = drop.to(cond.device).reshape(n, *([1] * (cond.ndim - 1)))
        return torch.where(mask, null.expand(cond.shape[1:]) if null.ndim else null, cond)
    if not isinstance(null_cond, str):
        raise ValueError(f"captions are dropped to a string (\"\" in the original), got {type(null_cond).__name__}")
    return [null_cond if d else c for c, d in zip(cond, drop.tolist())]
