"""The sampler's denoiser eps(x_t, t) built from a network call: plain, class-conditional, or classifier-free
guided. The sample stage and the benchmark's sampling row build it here, so both sample with the same function."""
from __future__ import annotations

from typing import Callable, Optional

import torch

from replication.diffusion.guidance import classifier_free
from replication.diffusion.objective import Denoiser


class GuidanceError(ValueError):
    """Guidance was asked for without a null class to guide against; the message names the missing setting."""


def sampling_denoiser(call: Callable[..., torch.Tensor], labels: Optional[torch.Tensor], null_class: Optional[int],
                      guidance_scale: float, concat: Optional[torch.Tensor] = None,
                      tokens: Optional[torch.Tensor] = None, null_tokens: Optional[torch.Tensor] = None) -> Denoiser:
    """eps(x, t) of `call(x, t)` (unconditional, `labels` None) or of `call(x, t, y=labels)` for a fixed batch of
    class labels, guided with scale `guidance_scale` against `null_class` (the "no class" label the network was
    trained with). Scale 1 is the plain conditional model and needs no null class; any other scale without one
    is a GuidanceError, since guiding against a real class would sample something else without saying so.
    `concat` (a fixed batch of image-shaped conditions: low-resolution images, masked-image codes) gives
    eps = call(x, t, c_concat=concat); the release trains these models without a null condition, so guidance
    for them is a GuidanceError too.
    `tokens` (a fixed batch of caption token ids, text-to-image) gives eps = call(x, t, tokens=tokens), guided against
    `null_tokens`, the ids of the empty prompt "" (the release's unconditional input), one row or one per sample."""
    if tokens is not None:
        if labels is not None or concat is not None:
            raise GuidanceError("a denoiser takes token ids alone, not with class labels or a concatenated condition")
        if guidance_scale != 1.0 and null_tokens is None:
            raise GuidanceError(f"classifier-free guidance (scale {guidance_scale:g}) of a text model needs the token "
                                "ids of the empty prompt \"\"")

        def text_model(x: torch.Tensor, t: torch.Tensor, ids: torch.Tensor) -> torch.Tensor:
            return call(x, t, tokens=ids)

        return classifier_free(text_model, tokens, tokens if null_tokens is None else null_tokens, guidance_scale)
    if concat is not None:
        if labels is not None:
            raise GuidanceError("a denoiser takes class labels or a concatenated condition, not both")
        if guidance_scale != 1.0:
            raise GuidanceError(f"guidance (scale {guidance_scale:g}) needs an unconditional input, and the "
                                "concat-conditioned models (super-resolution, inpainting) have none: use scale 1")
        cond = concat
        return lambda x, t: call(x, t, c_concat=cond)
    if labels is None:
        return lambda x, t: call(x, t)

    def model(x: torch.Tensor, t: torch.Tensor, y: torch.Tensor) -> torch.Tensor:
        return call(x, t, y=y)

    if null_class is None:
        if guidance_scale != 1.0:
            raise GuidanceError(f"classifier-free guidance (scale {guidance_scale:g}) needs diffusion.null_class "
                                "(1000 for class-conditional ImageNet)")
        return classifier_free(model, labels, labels, 1.0)  # scale 1 runs the conditional branch only
    return classifier_free(model, labels, torch.full_like(labels, null_class), guidance_scale)
