"""Feature extractors for the sample metrics: torch-fidelity 0.4's `inception-v3-compat` (FID/IS/KID and the
ADM-style precision/recall), its VGG16 (torch-fidelity `prc`), and a seeded stand-in for the smoke run only.

Weights always come from a local file: this module never downloads (torch-fidelity would, if handed no path).
"""
from __future__ import annotations

import enum
import os
from dataclasses import dataclass
from pathlib import Path
from typing import Protocol, runtime_checkable

import torch
import torch.nn as nn
import torch.nn.functional as F

from replication.metrics.config import ExtractorName
from replication.utils.io import ArtifactError, sha256_file, torch_load_safe

# Feature keys every extractor returns (named constants, as torch-fidelity's KEY_METRIC_*).
POOL = "pool"
LOGITS_UNBIASED = "logits_unbiased"

STANDIN_LABEL = "STAND-IN (random conv features; numbers not comparable to any paper)"


class WeightsSource(enum.Enum):
    """Where a network's pretrained weights are documented to come from."""

    # torch-fidelity's URL_INCEPTION_V3 (feature_extractor_inceptionv3.py); the file is TF Inception
    # 2015-12-05 converted to PyTorch. The name's 8 hex digits are the SHA-256 prefix (torch.hub convention).
    INCEPTION = (
        "https://github.com/toshas/torch-fidelity/releases/download/v0.2.0/weights-inception-2015-12-05-6726825d.pth",
        "weights-inception-2015-12-05-6726825d.pth",
        "6726825d",
        "metrics.inception_weights",
    )
    # torchvision VGG16_Weights.IMAGENET1K_V1, which torch-fidelity's `vgg16` extractor and lpips' trunk use.
    VGG16 = (
        "https://download.pytorch.org/models/vgg16-397923af.pth",
        "vgg16-397923af.pth",
        "397923af",
        "metrics.vgg16_weights",
    )

    def __init__(self, url: str, file_name: str, sha256_prefix: str, config_key: str):
        self.url = url
        self.file_name = file_name
        self.sha256_prefix = sha256_prefix
        self.config_key = config_key


class WeightsNotFoundError(FileNotFoundError):
    """Pretrained feature weights are not available locally; the message says how to get them."""


class StandinNotAllowedError(RuntimeError):
    """The stand-in extractor was requested where real features are required."""


def missing_weights_message(source: WeightsSource, path: str | os.PathLike | None, config_key: str | None = None) -> str:
    key = config_key or source.config_key
    where = "no path is configured" if path is None else f"the configured file {str(path)!r} does not exist"
    return (
        f"Pretrained weights needed but {where} ({key}). This project never downloads weights at run time.\n"
        f"Get them on a machine with internet access:\n"
        f"    curl -L -o {source.file_name} {source.url}\n"
        f"(SHA-256 starts with {source.sha256_prefix}), copy the file to this machine, e.g. to "
        f"weights/{source.file_name}, and set {key}=/absolute/path/to/{source.file_name} "
        f"(a Hydra override or experiments/metrics/*.yaml)."
    )


@dataclass(frozen=True)
class WeightsInfo:
    path: str
    sha256: str
    official: bool  # the SHA-256 starts with the documented prefix


def resolve_weights(path: str | os.PathLike | None, source: WeightsSource, config_key: str | None = None) -> WeightsInfo:
    """Check a local weights file exists and holds tensors only; never downloads."""
    if path is None or not Path(path).is_file():
        raise WeightsNotFoundError(missing_weights_message(source, path, config_key))
    state = torch_load_safe(path)  # refuses files that need code unpickling
    if not isinstance(state, dict) or not all(isinstance(v, torch.Tensor) for v in state.values()):
        raise ArtifactError(f"{path} is not a state dict of tensors (expected {source.file_name})")
    digest = sha256_file(path)
    return WeightsInfo(path=str(path), sha256=digest, official=digest.startswith(source.sha256_prefix))


@runtime_checkable
class FeatureExtractor(Protocol):
    name: str
    is_standin: bool
    feature_dims: dict[str, int]
    weights: WeightsInfo | None

    def __call__(self, images: torch.Tensor) -> dict[str, torch.Tensor]:
        """uint8 NCHW RGB images -> float32 features on the CPU, keyed by POOL (and LOGITS_UNBIASED)."""
        ...


def _check_images(images: torch.Tensor) -> None:
    if not torch.is_tensor(images) or images.dtype != torch.uint8:
        raise TypeError(f"feature extraction needs a uint8 tensor, got {type(images).__name__} "
                        f"{getattr(images, 'dtype', '')}")
    if images.dim() != 4 or images.shape[1] != 3:
        raise ValueError(f"feature extraction needs N x 3 x H x W images, got shape {tuple(images.shape)}")


class _TorchFidelityExtractor:
    """Runs a torch-fidelity feature extractor module and renames its outputs."""

    def __init__(self, name: str, module: nn.Module, key_map: dict[str, str], dims: dict[str, int],
                 weights: WeightsInfo, device: str | torch.device):
        self.name = name
        self.is_standin = False
        self.weights = weights
        self.feature_dims = dims
        self._key_map = key_map
        self.device = torch.device(device)
        self._module = module.to(self.device).eval()

    @torch.no_grad()
    def __call__(self, images: torch.Tensor) -> dict[str, torch.Tensor]:
        _check_images(images)
        out = self._module(images.to(self.device))
        named = self._module.convert_features_tuple_to_dict(out)
        return {ours: named[theirs].float().cpu() for theirs, ours in self._key_map.items()}


def _build_inception(weights_path, device) -> _TorchFidelityExtractor:
    from torch_fidelity.feature_extractor_inceptionv3 import FeatureExtractorInceptionV3

    info = resolve_weights(weights_path, WeightsSource.INCEPTION)
    # The path is always given, so torch-fidelity loads this file and never calls load_state_dict_from_url.
    module = FeatureExtractorInceptionV3(
        ExtractorName.INCEPTION.value, ["2048", "logits_unbiased"], feature_extractor_weights_path=info.path
    )
    return _TorchFidelityExtractor(
        ExtractorName.INCEPTION.value, module, {"2048": POOL, "logits_unbiased": LOGITS_UNBIASED},
        {POOL: 2048, LOGITS_UNBIASED: 1008}, info, device,
    )


def _build_vgg16(weights_path, device) -> _TorchFidelityExtractor:
    from torch_fidelity.feature_extractor_vgg16 import FeatureExtractorVGG16

    info = resolve_weights(weights_path, WeightsSource.VGG16)
    module = FeatureExtractorVGG16(ExtractorName.VGG16.value, ["fc2_relu"], feature_extractor_weights_path=info.path)
    # POOL holds torch-fidelity's `prc` layer for VGG16 (fc2_relu, 4096-d); VGG16 has no IS logits here.
    return _TorchFidelityExtractor(ExtractorName.VGG16.value, module, {"fc2_relu": POOL}, {POOL: 4096}, info, device)


class StandinExtractor(nn.Module):
    """Seeded random conv features with Inception's output sizes. Smoke runs only: not comparable to anything."""

    name = STANDIN_LABEL
    is_standin = True
    weights = None
    feature_dims = {POOL: 2048, LOGITS_UNBIASED: 1008}
    # Small fixed working resolution: the stand-in only needs to be cheap and deterministic.
    INPUT_SIZE = 64

    def __init__(self, seed: int = 0, device: str | torch.device = "cpu"):
        super().__init__()
        gen = torch.Generator().manual_seed(seed)
        widths = (3, 32, 64, 128)
        self.convs = nn.ModuleList(nn.Conv2d(a, b, 3, stride=2, padding=1) for a, b in zip(widths[:-1], widths[1:]))
        self.head = nn.Conv2d(widths[-1], self.feature_dims[POOL], 1)
        self.logit_weight = nn.Parameter(torch.empty(self.feature_dims[POOL], self.feature_dims[LOGITS_UNBIASED]))
        with torch.no_grad():
            for conv in [*self.convs, self.head]:  # He-normal, so activations keep their scale
                conv.weight.copy_(torch.randn(conv.weight.shape, generator=gen) * (2.0 / conv.weight[0].numel()) ** 0.5)
                conv.bias.zero_()
            self.logit_weight.copy_(torch.randn(self.logit_weight.shape, generator=gen) / self.feature_dims[POOL] ** 0.5)
        self.requires_grad_(False)
        self.device = torch.device(device)
        self.to(self.device).eval()

    @torch.no_grad()
    def forward(self, images: torch.Tensor) -> dict[str, torch.Tensor]:
        _check_images(images)
        x = images.to(self.device, torch.float32) / 127.5 - 1.0
        x = F.interpolate(x, size=(self.INPUT_SIZE, self.INPUT_SIZE), mode="bilinear", align_corners=False)
        for conv in self.convs:
            x = F.relu(conv(x))
        pool = F.relu(self.head(x)).mean(dim=(2, 3))
        return {POOL: pool.cpu(), LOGITS_UNBIASED: (pool @ self.logit_weight).cpu()}


def build_extractor(
    name: str,
    weights_path: str | os.PathLike | None = None,
    device: str | torch.device = "cpu",
    allow_standin: bool = False,
    standin_seed: int = 0,
) -> FeatureExtractor:
    """`name` is one of ExtractorName's values. Missing weights raise WeightsNotFoundError saying how to get them."""
    if name == ExtractorName.INCEPTION.value:
        return _build_inception(weights_path, device)
    if name == ExtractorName.VGG16.value:
        return _build_vgg16(weights_path, device)
    if name == ExtractorName.STANDIN.value:
        if not allow_standin:
            raise StandinNotAllowedError(
                "the stand-in feature extractor was requested but metrics.allow_standin is false; only the smoke "
                "experiment may use it, because its numbers are not comparable to any paper"
            )
        return StandinExtractor(seed=standin_seed, device=device)
    raise ValueError(f"unknown feature extractor {name!r}; choose one of {[e.value for e in ExtractorName]}")


def extract_batched(extractor: FeatureExtractor, images: torch.Tensor, batch_size: int) -> dict[str, torch.Tensor]:
    """Features of a uint8 NCHW tensor, `batch_size` images at a time, concatenated."""
    parts: dict[str, list[torch.Tensor]] = {}
    for start in range(0, images.shape[0], batch_size):
        for key, value in extractor(images[start : start + batch_size]).items():
            parts.setdefault(key, []).append(value)
    return {key: torch.cat(values) for key, values in parts.items()}
