"""The networks a benchmark run times, built from the experiment's config as the stages build them, and the FLOP
each does per image (counted on fake tensors, so paper-size networks are counted in seconds on any machine)."""
from __future__ import annotations

from typing import Any, Optional, Sequence
from unittest import mock

import torch
from torch import nn

from replication.bench.measurement import count_flops
from replication.config import TypedConfig


def compose_typed(overrides: Sequence[str]) -> TypedConfig:
    """The experiment's validated config (`validate_config` of the composed overrides)."""
    from replication.config import validate_config
    from replication.stages.entry import compose

    return validate_config(compose(list(overrides)))


def build_unet(typed: TypedConfig) -> nn.Module:
    from replication.stages.artifacts import build_unet as build_stage_unet

    return build_stage_unet(typed)


def build_first_stage(typed: TypedConfig) -> nn.Module:
    from replication.stages.artifacts import build_first_stage as build_stage_first_stage

    return build_stage_first_stage(typed)


def class_labels(typed: TypedConfig, n: int, device: torch.device) -> Optional[torch.Tensor]:
    """Balanced class labels for a batch of n (sample i has class i % classes, as the sample stage), or None
    for an unconditional experiment."""
    from replication.stages.artifacts import num_label_classes

    classes = num_label_classes(typed)
    return None if not classes else (torch.arange(n, device=device) % classes).long()


def sampler_denoiser(typed: TypedConfig, call: Any, labels: Optional[torch.Tensor]):
    """eps(x, t) of `call` as the sample stage's Generator builds it (diffusion/denoiser.py), with the
    experiment's null class and guidance scale."""
    from replication.diffusion.denoiser import sampling_denoiser

    return sampling_denoiser(call, labels, typed.diffusion.null_class, typed.sampler.guidance_scale)


def random_inception() -> nn.Module:
    """torch-fidelity's FID Inception-v3 architecture with random weights: the same FLOPs and kernels as the real
    extractor, for throughput only. Nothing is downloaded: the weight loader is replaced for this construction."""
    import torch_fidelity.feature_extractor_inceptionv3 as tfi

    with mock.patch.object(tfi, "load_state_dict_from_url", lambda *a, **k: {}), \
            mock.patch.object(tfi.FeatureExtractorInceptionV3, "load_state_dict", lambda self, *a, **k: None):
        return tfi.FeatureExtractorInceptionV3("inception-v3-compat", ["2048", "logits_unbiased"])


def feature_module(typed: TypedConfig, device: torch.device, for_counting: bool = False) -> tuple[nn.Module, str]:
    """The module `evaluate` would run: the real Inception when metrics.inception_weights is set, the labelled
    stand-in where allowed (smoke), else the Inception architecture with random weights."""
    from replication.metrics.features import StandinExtractor, build_extractor

    metrics = typed.metrics
    weights = getattr(metrics, "inception_weights", None)
    if weights and not for_counting:
        return build_extractor("inception-v3-compat", weights, device=device)._module, "inception-v3-compat"
    if getattr(metrics, "allow_standin", False) and not weights:
        return StandinExtractor(seed=0, device=device), "stand-in (smoke only)"
    return random_inception().to(device), "inception-v3-compat architecture, random weights"


def image_resolution(typed: TypedConfig) -> int:
    """The resolution of the images the FID features see: the first stage's, else the dataset's."""
    ddconfig = typed.autoencoder.ddconfig
    return ddconfig.resolution if ddconfig else typed.dataset.resolution


def unet_flops(typed: TypedConfig, train: bool) -> int:
    """FLOP per image of one U-Net forward (with guidance, as the sampler calls it), or of a training step."""
    from replication.diffusion.objective import per_sample_error

    c = typed.unet
    diffusion = typed.diffusion

    def run(unet: nn.Module) -> None:
        x = torch.randn(1, c.in_channels, c.image_size, c.image_size)
        t = torch.zeros(1, dtype=torch.long)
        labels = class_labels(typed, 1, torch.device("cpu"))
        if not train:
            sampler_denoiser(typed, unet, labels)(x, t)
            return
        # q_sample is elementwise (no counted FLOP) and checks t data-dependently, which fake tensors cannot do
        pred = unet(x, t) if labels is None else unet(x, t, y=labels)
        per_sample_error(pred, torch.randn_like(x), diffusion.loss()).mean().backward()

    return count_flops(lambda: build_unet(typed), run)


def first_stage_flops(typed: TypedConfig, what: str) -> int:
    res = typed.autoencoder.ddconfig.resolution

    def run(ae: nn.Module) -> None:
        if what == "encode":
            ae.encode_moments(torch.randn(1, 3, res, res))
        else:
            h = res // ae.downsampling_factor
            ae.decode(torch.randn(1, ae.latent_channels, h, h))

    return count_flops(lambda: build_first_stage(typed), run)


def feature_flops(typed: TypedConfig) -> int:
    images = torch.zeros(1, 3, image_resolution(typed), image_resolution(typed), dtype=torch.uint8)
    # counted for real on the CPU at batch 1 (the stand-in's seeded construction does not run on fake tensors)
    with torch.no_grad():
        return count_flops(lambda: feature_module(typed, torch.device("cpu"), for_counting=True)[0],
                           lambda m: m(images), fake=False)
