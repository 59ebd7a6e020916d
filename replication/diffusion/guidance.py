# Classifier-free guidance, Ho & Salimans 2021 Eq. (6) in the original release's form (ldm/models/diffusion/ddim.py):
# eps = eps(x, t, uncond) + s * (eps(x, t, cond) - eps(x, t, uncond)), so s = 1 is the plain conditional model.
# Classifier guidance, Dhariwal & Nichol 2021 Alg. 2 / Eq. (14), the release's DDIM `score_corrector` hook (LDM-8-G,
# paper Tab. 10): eps_hat = eps - sqrt(1 - alpha_bar_t) * s * grad_{x_t} log p_phi(y | x_t, t).
# Image guiding, paper App. C (Eqs. 16-17; the "guiding" rows of Tab. 5 and 11): the same correction with the
# guider p(y | T(D(z_0(z_t)))), z_0(z_t) the x0 prediction from (z_t, eps), D the first-stage decoder, T a
# differentiable map of the image and y a target image; log p = -loss, so eps_hat = eps + sqrt(1 - alpha_bar_t)
# * s * grad_{z_t} loss. Eq. 17 is the Gaussian guider (loss 1/2 ||y - T(D(z_0))||^2); the SR rows use LPIPS.
"""Guidance wraps a model into a plain denoiser `eps = denoiser(x_t, t)` for the samplers: classifier-free
(a conditional model against its own unconditional branch), classifier guidance (a denoiser corrected by the
input gradient of a noisy-data classifier) or image guiding (corrected by the input gradient of an image loss
on the decoded x0 prediction). It also provides the condition dropout used in training so that one network
also learns the unconditional model."""
from __future__ import annotations

import math
from enum import Enum
from typing import TYPE_CHECKING, Callable, Optional, Sequence, Union

import torch
import torch.nn.functional as F

from replication.diffusion.ddim import Denoiser
from replication.diffusion.objective import predict_x0_from_eps
from replication.diffusion.schedule import Schedule, extract, parse_enum

if TYPE_CHECKING:
    from replication.metrics.reconstruction import LpipsMetric

ConditionalModel = Callable[[torch.Tensor, torch.Tensor, torch.Tensor], torch.Tensor]
# logits = classifier(x_t, t): [B, num_classes], t a LongTensor [B] of original timestep indices
NoisyClassifier = Callable[[torch.Tensor, torch.Tensor], torch.Tensor]
Condition = Union[torch.Tensor, Sequence[str]]
# loss = guide_loss(image, target): images [B, C, H, W] in [-1, 1] -> one loss per sample [B]
GuideLoss = Callable[[torch.Tensor, torch.Tensor], torch.Tensor]
# loss = guide(decoded): the decoded x0 prediction [B, C, H, W] -> one loss per sample [B] (T and y built in)
ImageGuide = Callable[[torch.Tensor], torch.Tensor]


class ImageGuidanceLoss(str, Enum):
    LPIPS = "lpips"  # the perceptual guider of Tab. 5/11 (App. C puts LPIPS in place of Eq. 17's L2)
    L2 = "l2"  # Eq. 17, the Gaussian guider with sigma 1: 1/2 ||y - T(D(z_0))||^2 summed over pixels


class ImageGuidanceTarget(str, Enum):
    """What the super-resolution guider compares; the paper names LPIPS but neither T nor y for Tab. 5/11."""

    LOWRES = "lowres"  # T = bicubic (anti-aliased) downsampling to the input's size, y = the low-resolution input
    UPSAMPLED = "upsampled"  # T = identity, y = the low-resolution input bicubic-upsampled to the output size


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


def l2_guide_loss(image: torch.Tensor, target: torch.Tensor) -> torch.Tensor:
    """1/2 ||target - image||^2 per sample: minus the log-likelihood of the Gaussian guider of Eq. 17 (sigma 1,
    up to its constant), summed over channels and pixels."""
    if image.shape != target.shape:
        raise ValueError(f"guided image {tuple(image.shape)} and target {tuple(target.shape)} differ in shape")
    return 0.5 * (image.float() - target.float()).square().flatten(1).sum(1)


def lpips_guide_loss(metric: "LpipsMetric") -> GuideLoss:
    """LPIPS(image, target) per sample as a differentiable guider: `metric`'s network on images in [-1, 1]
    (LPIPS' own input range). Its weights are frozen; the gradient reaches the image only."""
    network = metric.model

    def loss(image: torch.Tensor, target: torch.Tensor) -> torch.Tensor:
        if image.shape != target.shape:
            raise ValueError(f"guided image {tuple(image.shape)} and target {tuple(target.shape)} differ in shape")
        return network(image.float(), target.float()).flatten()

    return loss


def build_guide_loss(kind: ImageGuidanceLoss | str, lpips_weights: Optional[str] = None, allow_standin: bool = False,
                     device: str | torch.device = "cpu") -> GuideLoss:
    """The guider's loss named by `kind` (sampler.image_guidance_loss). LPIPS loads its VGG16 trunk from the local
    `lpips_weights` (metrics.lpips_vgg_weights) through replication.metrics.reconstruction.build_lpips: without
    one it is that function's how-to-get-it error, or with `allow_standin` its labelled random stand-in."""
    loss_kind = parse_enum(ImageGuidanceLoss, kind, "image_guidance_loss")
    if loss_kind is ImageGuidanceLoss.L2:
        return l2_guide_loss
    from replication.metrics.reconstruction import build_lpips

    return lpips_guide_loss(build_lpips(lpips_weights, allow_standin=allow_standin, device=device))


def superres_guide(guide_loss: GuideLoss, lowres: torch.Tensor,
                   target: ImageGuidanceTarget | str = ImageGuidanceTarget.LOWRES) -> ImageGuide:
    """The super-resolution guider over a fixed batch of low-resolution inputs `lowres` [B, C, h, w] in [-1, 1]
    (data.conditions.SuperResolution). `target` says what is compared (ImageGuidanceTarget): "lowres" follows
    App. C's T as a downsampling (its Fig. 14 uses bicubic downsampling), "upsampled" compares at full size.
    Both the choice and the bicubic resampling (anti-aliased down, as the inputs were made; clamped to [-1, 1] up)
    are ours: the paper does not say how its LPIPS guider met the input."""
    kind = parse_enum(ImageGuidanceTarget, target, "image_guidance_target")
    if lowres.ndim != 4:
        raise ValueError(f"low-resolution inputs must be a batch [B, C, h, w], got shape {tuple(lowres.shape)}")
    y = lowres.detach().float()

    def guide(decoded: torch.Tensor) -> torch.Tensor:
        if decoded.shape[:2] != y.shape[:2]:
            raise ValueError(f"decoded batch {tuple(decoded.shape)} does not match the low-resolution inputs "
                             f"{tuple(y.shape)} in batch size and channels")
        if kind is ImageGuidanceTarget.LOWRES:
            small = F.interpolate(decoded, size=tuple(y.shape[-2:]), mode="bicubic", align_corners=False,
                                  antialias=True)
            return guide_loss(small, y)
        big = F.interpolate(y, size=tuple(decoded.shape[-2:]), mode="bicubic", align_corners=False).clamp(-1.0, 1.0)
        return guide_loss(decoded, big)

    return guide


def image_guidance_grad(denoiser: Denoiser, decode: Callable[[torch.Tensor], torch.Tensor], guide: ImageGuide,
                        x: torch.Tensor, t: torch.Tensor, schedule: Schedule,
                        scale_factor: float = 1.0) -> tuple[torch.Tensor, torch.Tensor]:
    """(eps, grad_x loss), both float32 and detached: eps = denoiser(x, t), loss = guide(decode(z_0 / scale_factor))
    with z_0 = (x - sqrt(1 - alpha_bar_t) eps) / sqrt(alpha_bar_t), the whole chain differentiated as App. C's
    z_0(z_t) (through the denoiser and the decoder). The gradient is taken with respect to the input only
    (torch.autograd.grad: no parameter's .grad is touched), with gradients enabled inside a sampler's
    torch.no_grad; it cannot run under torch.inference_mode. The per-sample losses are summed, so each sample's
    gradient is its own as long as nothing mixes the batch."""
    with torch.enable_grad():
        x_in = x.detach().float().requires_grad_(True)
        eps = denoiser(x_in, t).float()
        z0 = predict_x0_from_eps(schedule, x_in, t, eps)
        loss = guide(decode(z0 / scale_factor))
        if not isinstance(loss, torch.Tensor) or loss.shape != (x.shape[0],):
            got = tuple(loss.shape) if isinstance(loss, torch.Tensor) else type(loss).__name__
            raise ValueError(f"image guide returned {got} for a batch of {x.shape[0]}; expected one loss per sample")
        (grad,) = torch.autograd.grad(loss.float().sum(), x_in)
    return eps.detach(), grad.detach()


def image_guided(denoiser: Denoiser, decode: Callable[[torch.Tensor], torch.Tensor], guide: ImageGuide, scale: float,
                 schedule: Schedule, scale_factor: float = 1.0) -> Denoiser:
    """Denoiser with image guiding of scale `scale` (paper App. C): eps_hat(x, t) = eps(x, t) + sqrt(1 - alpha_bar_t)
    * scale * grad_x guide(decode(z_0(x, t) / scale_factor)), so sampling descends the guider's loss. `decode` is
    the first stage's decoder and `scale_factor` the latent scaling (diffusion.scale_factor), as the sample stage
    decodes; `guide` compares the decoded image with its target (superres_guide). App. C's Eq. 16 has no scale:
    `scale` is Dhariwal & Nichol's s, and its value for Tab. 5/11 is not given. Scale 0 returns `denoiser`
    itself. The result is float32 and detached, so DDIM, PLMS and DDPM take it unchanged."""
    if not (math.isfinite(scale) and scale >= 0.0):
        raise ValueError(f"image guidance scale must be a finite number >= 0 (0: no guidance), got {scale!r}")
    if not (math.isfinite(scale_factor) and scale_factor > 0.0):
        raise ValueError(f"latent scale factor must be a finite number > 0, got {scale_factor!r}")
    if scale == 0.0:
        return denoiser

    def guided(x: torch.Tensor, t: torch.Tensor) -> torch.Tensor:
        eps, grad = image_guidance_grad(denoiser, decode, guide, x, t, schedule, scale_factor)
        return (eps + scale * extract(schedule.sqrt_one_minus_alphas_cumprod, t, x.shape) * grad).detach()

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
