"""Class-label conditioning tau_theta(y) for cross-attention (paper Sec. 3.3 and Tab. 13/15: learned 512-d class embedding).

`ClassEmbedder` keeps the original parameter name `embedding.weight` (checkpoint key
`cond_stage_model.embedding.weight`). Classifier-free guidance (cin256-v2) reserves one extra class index as
the "no label" input: n_classes 1001 with null index 1000 [cfg: configs/latent-diffusion/cin256-v2.yaml].

The transformer encoder of the text- and layout-conditional models (the release's BERTEmbedder) and their
denoiser are in `replication.models.text_encoder`.
"""
from __future__ import annotations

from typing import Optional

import torch
from torch import nn


def check_ids(ids: torch.Tensor, what: str, dims: tuple[str, ...], upper: int) -> None:
    """Refuse index input of a conditioning embedding that is not integer, not of the axes `dims` (("B",) for
    labels, ("B", "L") for token sequences) or outside [0, upper), naming `what` (singular) in the message."""
    if ids.ndim != len(dims):
        layout = f"({', '.join(dims)}{',' if len(dims) == 1 else ''})"
        raise ValueError(f"{what}s must be {len(dims)}-D {layout}, got shape {tuple(ids.shape)}")
    if ids.dtype not in (torch.int64, torch.int32):
        raise TypeError(f"{what}s must be integer, got {ids.dtype}")
    # the range check reads the ids on the host: skipped inside torch.compile, where it would split the graph (and
    # sync the GPU) on every forward; training and sampling check their inputs once up front
    if not torch.compiler.is_compiling() and ids.numel() and (int(ids.min()) < 0 or int(ids.max()) >= upper):
        raise ValueError(f"{what} out of range [0, {upper}): min {int(ids.min())}, max {int(ids.max())}")


class ClassEmbedder(nn.Module):
    """labels (B,) int64 -> context (B, 1, embed_dim): a one-token sequence for the SpatialTransformer."""

    def __init__(self, embed_dim: int, n_classes: int = 1000, null_class: int | None = None):
        super().__init__()
        if null_class is not None and not 0 <= null_class < n_classes:
            raise ValueError(f"null_class {null_class} outside [0, {n_classes}) (n_classes must include it)")
        self.n_classes = n_classes
        self.null_class = null_class
        self.embedding = nn.Embedding(n_classes, embed_dim)

    @property
    def embed_dim(self) -> int:
        return self.embedding.embedding_dim

    def forward(self, labels: torch.Tensor) -> torch.Tensor:
        check_ids(labels, "class label", ("B",), self.n_classes)
        return self.embedding(labels.long())[:, None, :]


def null_labels(embedder: ClassEmbedder, batch_size: int, device: torch.device | str | None = None) -> torch.Tensor:
    """The unconditional label batch (all `null_class`) used for the eps_uncond branch of classifier-free guidance."""
    if embedder.null_class is None:
        raise ValueError(
            f"this ClassEmbedder (n_classes {embedder.n_classes}) has no null class; classifier-free guidance "
            "needs one (cin256-v2: n_classes 1001, null_class 1000)"
        )
    device = embedder.embedding.weight.device if device is None else device
    return torch.full((batch_size,), embedder.null_class, dtype=torch.long, device=device)


def null_condition(embedder: ClassEmbedder, batch_size: int) -> torch.Tensor:
    """Context tensor (B, 1, D) of the null label: the `uncond` input of `diffusion.guidance.classifier_free`."""
    return embedder(null_labels(embedder, batch_size))


def drop_labels(
    labels: torch.Tensor, drop_prob: float, null_class: int, generator: torch.Generator | None = None
) -> torch.Tensor:
    """Replace each label by `null_class` with probability `drop_prob` (training for classifier-free guidance).

    The drop probability the authors used is not stated in paper or code (PROTOCOL.md §2); it is a config choice.
    """
    if not 0.0 <= drop_prob <= 1.0:
        raise ValueError(f"drop_prob must be in [0, 1], got {drop_prob}")
    if drop_prob == 0.0:
        return labels
    u = torch.rand(labels.shape, generator=generator, device=labels.device if generator is None else generator.device)
    return torch.where(u.to(labels.device) < drop_prob, torch.full_like(labels, null_class), labels)


class ClassConditionalUNet(nn.Module):
    """eps(x, t, y) of the cross-attention class-conditional LDMs (cin256, cin256-v2, Tab. 13): context = tau(y).

    Children are named as in the release (`diffusion_model` inside DiffusionWrapper, `cond_stage_model`), so an
    EMA over this module has LitEma's shadow names. The embedding is trained jointly (`cond_stage_trainable`).
    """

    def __init__(self, unet: nn.Module, embedder: ClassEmbedder):
        super().__init__()
        self.diffusion_model = unet
        self.cond_stage_model = embedder

    def forward(self, x: torch.Tensor, timesteps: torch.Tensor, y: torch.Tensor) -> torch.Tensor:
        return self.diffusion_model(x, timesteps, context=self.cond_stage_model(y))


def ema_scope(model: nn.Module) -> Optional[str]:
    """Parameter-name prefix the EMA averages: the U-Net alone, as the release (`LitEma(self.model)` in
    ldm/models/diffusion/ddpm.py covers the DiffusionWrapper, not `cond_stage_model`). None = every parameter."""
    # every conditional wrapper (class, concat) holds the U-Net as `diffusion_model` beside `cond_stage_model`
    wrapped = hasattr(model, "diffusion_model") and hasattr(model, "cond_stage_model")
    return "diffusion_model." if wrapped else None
