"""Autoencoder reconstruction metrics for the paper's Tab. 8: PSNR, SSIM and LPIPS per image, reported as the
mean and standard deviation over images (our reading of the table's "±", PROTOCOL.md §1).

Conventions (the paper states none): images are uint8 RGB and both PSNR and SSIM use the data range 255
(values computed in float64 on [0, 255]); SSIM follows Wang et al. 2004 (Gaussian window 11 x 11, sigma 1.5,
K1 = 0.01, K2 = 0.03), evaluated on the window positions that lie fully inside the image, per channel, then
averaged over channels; LPIPS is the `lpips` package's VGG variant (v0.1) on inputs scaled to [-1, 1].
"""
from __future__ import annotations

import os
import warnings
from dataclasses import dataclass

import numpy as np
import torch
import torch.nn.functional as F

from replication.metrics.features import WeightsInfo, WeightsSource, resolve_weights
from replication.utils.io import torch_load_safe

DATA_RANGE = 255.0
# Wang et al. 2004, Sec. III-C.
SSIM_WINDOW = 11
SSIM_SIGMA = 1.5
SSIM_K1 = 0.01
SSIM_K2 = 0.03

LPIPS_STANDIN_LABEL = "STAND-IN LPIPS (random VGG16 trunk; numbers not comparable to any paper)"


def _pair(original: torch.Tensor, reconstruction: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    for name, t in (("original", original), ("reconstruction", reconstruction)):
        if not torch.is_tensor(t) or t.dtype != torch.uint8 or t.dim() != 4:
            raise ValueError(f"{name} must be a uint8 N x C x H x W tensor, got {getattr(t, 'dtype', type(t))} "
                             f"{tuple(getattr(t, 'shape', ()))}")
    if original.shape != reconstruction.shape:
        raise ValueError(f"shapes differ: original {tuple(original.shape)} vs reconstruction {tuple(reconstruction.shape)}")
    return original.double(), reconstruction.double()


def psnr(original: torch.Tensor, reconstruction: torch.Tensor) -> torch.Tensor:
    """Per-image PSNR in dB with data range 255; identical images give +inf."""
    a, b = _pair(original, reconstruction)
    mse = (a - b).square().flatten(1).mean(dim=1)
    return 10.0 * torch.log10(DATA_RANGE**2 / mse)


def gaussian_window(size: int = SSIM_WINDOW, sigma: float = SSIM_SIGMA) -> torch.Tensor:
    x = torch.arange(size, dtype=torch.float64) - (size - 1) / 2
    w = torch.exp(-(x**2) / (2 * sigma**2))
    return w / w.sum()


def ssim(original: torch.Tensor, reconstruction: torch.Tensor) -> torch.Tensor:
    """Per-image SSIM (mean over valid window positions and channels)."""
    a, b = _pair(original, reconstruction)
    n, c, h, w = a.shape
    if h < SSIM_WINDOW or w < SSIM_WINDOW:
        raise ValueError(f"SSIM needs images of at least {SSIM_WINDOW}x{SSIM_WINDOW}, got {h}x{w}")
    g = gaussian_window()
    kernel_h = g.view(1, 1, 1, -1).repeat(c, 1, 1, 1)
    kernel_v = g.view(1, 1, -1, 1).repeat(c, 1, 1, 1)

    def blur(x: torch.Tensor) -> torch.Tensor:  # separable Gaussian, valid positions only
        return F.conv2d(F.conv2d(x, kernel_h, groups=c), kernel_v, groups=c)

    mu_a, mu_b = blur(a), blur(b)
    var_a = blur(a * a) - mu_a**2
    var_b = blur(b * b) - mu_b**2
    cov = blur(a * b) - mu_a * mu_b
    c1, c2 = (SSIM_K1 * DATA_RANGE) ** 2, (SSIM_K2 * DATA_RANGE) ** 2
    ssim_map = ((2 * mu_a * mu_b + c1) * (2 * cov + c2)) / ((mu_a**2 + mu_b**2 + c1) * (var_a + var_b + c2))
    return ssim_map.flatten(1).mean(dim=1)


class LpipsMetric:
    """lpips.LPIPS(net='vgg') whose VGG16 trunk comes from a local torchvision state dict (never downloaded)."""

    def __init__(self, vgg_weights_path: str | os.PathLike | None = None, allow_standin: bool = False,
                 device: str | torch.device = "cpu", standin_seed: int = 0):
        import lpips

        self.weights: WeightsInfo | None = None
        if vgg_weights_path is None and allow_standin:
            self.is_standin, self.name = True, LPIPS_STANDIN_LABEL
        else:
            self.weights = resolve_weights(vgg_weights_path, WeightsSource.VGG16, config_key="metrics.lpips_vgg_weights")
            self.is_standin, self.name = False, "lpips-vgg-v0.1"
        with warnings.catch_warnings(), torch.random.fork_rng(devices=[]):
            warnings.filterwarnings("ignore", category=UserWarning)  # torchvision's `pretrained` deprecation
            torch.manual_seed(standin_seed)  # the stand-in trunk is the seeded random init
            # pnet_rand=True: the trunk is built without torchvision's download; the linear calibration
            # layers (pretrained=True) ship inside the lpips package.
            model = lpips.LPIPS(net="vgg", pretrained=True, pnet_rand=True, verbose=False)
        if self.weights is not None:
            self._load_trunk(model, torch_load_safe(self.weights.path))
        self.device = torch.device(device)
        self.model = model.to(self.device).eval().requires_grad_(False)

    @staticmethod
    def _load_trunk(model, vgg_state: dict[str, torch.Tensor]) -> None:
        """torchvision `features.<i>.*` -> lpips `net.slice<k>.<i>.*` (lpips keeps torchvision's layer indices)."""
        target = {}
        for name in model.net.state_dict():
            _, index, param = name.split(".")
            source = f"features.{index}.{param}"
            if source not in vgg_state:
                raise KeyError(f"VGG16 state dict lacks {source!r} needed for LPIPS (is it a torchvision vgg16?)")
            target[name] = vgg_state[source]
        model.net.load_state_dict(target, strict=True)

    @torch.no_grad()
    def __call__(self, original: torch.Tensor, reconstruction: torch.Tensor) -> torch.Tensor:
        _pair(original, reconstruction)
        a = original.to(self.device, torch.float32) / 127.5 - 1.0
        b = reconstruction.to(self.device, torch.float32) / 127.5 - 1.0
        return self.model(a, b).flatten().double().cpu()


def build_lpips(vgg_weights_path=None, allow_standin: bool = False, device="cpu") -> LpipsMetric:
    """Real LPIPS from a local VGG16 file; without one, a stand-in if allowed, else the how-to-get-it error."""
    return LpipsMetric(vgg_weights_path, allow_standin, device)


def summarize(values) -> dict[str, float]:
    """{"value": mean, "std": population std} over images."""
    arr = np.asarray(values, dtype=np.float64)
    if arr.size == 0:
        raise ValueError("no values to summarise")
    return {"value": float(arr.mean()), "std": float(arr.std())}


@dataclass
class ReconstructionAccumulator:
    """Per-image PSNR, SSIM and (optionally) LPIPS for batches of (original, reconstruction) uint8 NCHW pairs."""

    lpips_metric: LpipsMetric | None = None

    def __post_init__(self):
        self.values: dict[str, list[torch.Tensor]] = {"PSNR": [], "SSIM": []}
        if self.lpips_metric is not None:
            self.values["LPIPS"] = []

    def add(self, original: torch.Tensor, reconstruction: torch.Tensor) -> None:
        self.values["PSNR"].append(psnr(original, reconstruction))
        self.values["SSIM"].append(ssim(original, reconstruction))
        if self.lpips_metric is not None:
            self.values["LPIPS"].append(self.lpips_metric(original, reconstruction))

    def per_image(self) -> dict[str, np.ndarray]:
        return {k: torch.cat(v).numpy() for k, v in self.values.items() if v}
