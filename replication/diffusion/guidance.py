# Classifier-free guidance, Ho & Salimans 2021 Eq. (6) in the original release's form (ldm/models/diffusion/ddim.py):
# eps = eps(x, t, uncond) + s * (eps(x, t, cond) - eps(x, t, uncond)), so s = 1 is the plain conditional model.
# Classifier guidance, Dhariwal & Nichol 2021 Alg. 2 / Eq. (14), the release's DDIM `score_corrector` hook (LDM-8-G,
# paper Tab. 10): eps_hat = eps - sqrt(1 - alpha_bar_t) * s * grad_{x_t} log p_phi(y | x_t, t).
"""Guidance wraps a model into a plain denoiser `eps = denoiser(x_t, t)` for the samplers: classifier-free
(a conditional model against its own unconditional branch) or classifier guidance (a denoiser corrected by the
input gradient of a noisy-data classifier). It also provides the condition dropout used in training so that
one network also learns the unconditional model."""
from __future__ import annotations

import math
from typing import Callable, Optional, Sequence, Union

import torch
import torch.nn.functional as F

from replication.diffusion.ddim import Denoiser
from replication.diffusion.schedule import Schedule, extract

ConditionalModel = Callable[[torch.Tensor, torch.Tensor, torch.Tensor], torch.Tensor]
# logits = classifier(x_t, t): [B, num_classes], t a LongTensor [B] of original timestep indices
NoisyClassifier = Callable[[torch.Tensor, torch.Tensor], torch.Tensor]
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


def classifier_log_prob_grad(classifier: NoisyClassifier, x: torch.Tensor, t: torch.Tensor, labels: torch.Tensor,
                             max_label: Optional[int] = None) -> torch.Tensor:
    """grad_x log softmax(classifier(x, t))[labels], per sample (float32, detached). The gradient is taken with
    respect to the input only (torch.autograd.grad, so no parameter's .grad is touched), with gradients enabled
    inside a sampler's torch.no_grad; it cannot run under torch.inference_mode. Samples stay independent as long
    as the classifier mixes nothing across the batch (GroupNorm, not BatchNorm). `max_label` (the largest label,
    read from `labels` when None) is checked against the classifier's class count, so a label outside it is a
    ValueError rather than a device-side assert."""
    with torch.enable_grad():
        x_in = x.detach().float().requires_grad_(True)
        logits = classifier(x_in, t)
        if not isinstance(logits, torch.Tensor) or logits.ndim != 2 or logits.shape[0] != x.shape[0]:
            got = tuple(logits.shape) if isinstance(logits, torch.Tensor) else type(logits).__name__
            raise ValueError(f"classifier returned {got} for a batch of {x.shape[0]}; expected [batch, num_classes] "
                             f"logits")
        top = int(labels.max()) if max_label is None else max_label
        if top >= logits.shape[1]:
            raise ValueError(f"class label {top} is outside the classifier's {logits.shape[1]} classes")
        log_probs = F.log_softmax(logits.float(), dim=-1)
        chosen = log_probs.gather(1, labels.to(log_probs.device).reshape(-1, 1))
        (grad,) = torch.autograd.grad(chosen.sum(), x_in)
    return grad.detach()


def classifier_guided(denoiser: Denoiser, classifier: NoisyClassifier, labels: torch.Tensor, scale: float,
                      schedule: Schedule) -> Denoiser:
    """Denoiser with classifier guidance of scale `scale` toward the fixed batch of class `labels`:
    eps_hat(x, t) = eps(x, t) - sqrt(1 - alpha_bar_t) * scale * grad_x log p(labels | x, t), i.e. the score of
    p(x_t) p(y | x_t)^scale (Dhariwal & Nichol 2021, Eq. 14). alpha_bar_t is `schedule`'s (the denoiser's training
    schedule) at the original timestep t the sampler passes. Scale 0 returns `denoiser` itself, unguided. The
    result is float32 and detached; the samplers stay unchanged, so DDIM, PLMS and DDPM all take it."""
    if not (math.isfinite(scale) and scale >= 0.0):
        raise ValueError(f"classifier guidance scale must be a finite number >= 0 (0: no guidance), got {scale!r}")
    if not isinstance(labels, torch.Tensor) or labels.ndim != 1 or labels.dtype not in (torch.int64, torch.int32):
        what = (f"{labels.dtype} tensor of shape {tuple(labels.shape)}" if isinstance(labels, torch.Tensor)
                else type(labels).__name__)
        raise ValueError(f"classifier guidance needs one integer class label per sample (a 1-D LongTensor), got {what}")
    if labels.numel() and int(labels.min()) < 0:
        raise ValueError(f"class labels must be >= 0, got {int(labels.min())}")
    if scale == 0.0:
        return denoiser
    max_label = int(labels.max()) if labels.numel() else -1

    def guided(x: torch.Tensor, t: torch.Tensor) -> torch.Tensor:
        if x.shape[0] != labels.shape[0]:
            raise ValueError(f"batch of x ({x.shape[0]}) != number of class labels ({labels.shape[0]})")
        eps = denoiser(x, t).float()
        grad = classifier_log_prob_grad(classifier, x, t, labels, max_label)
        return (eps - scale * extract(schedule.sqrt_one_minus_alphas_cumprod, t, x.shape) * grad).detach()

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
