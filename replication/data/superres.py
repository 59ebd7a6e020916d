"""Super-resolution pairs as the release's `ImageNetSR` makes them (ldm/data/imagenet.py; PROTOCOL.md section 7).

One high-resolution example is made in three steps:
1. a square crop of side int(c * shorter side), c ~ U[min_crop_f, max_crop_f] (random or centred);
2. the crop resized to `size` x `size` with cv2 INTER_AREA (albumentations SmallestMaxSize on a square);
3. the low-resolution input made from it by one degradation, to `size // factor`.

The paper says "bicubic interpolation with anti-aliasing" (Sec. 4.4) without naming the release option; which
one made Table 5 is therefore a config value (`pil_bicubic` by default) recorded in the dataset card and in every
result. The SR3 filter (keep images whose shorter side is at least 256) selects the images.
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import Callable, Optional

import cv2
import numpy as np
from PIL import Image

from replication.data.bsr import bsr_degrade
from replication.data.preprocess import resize_cv2

# SR3's filter, as the release's imagenet_{train,val}_hr_indices.p files apply it: shorter side >= 256
SR3_MIN_SIDE = 256


def passes_sr3_filter(height: int, width: int, min_side: int = SR3_MIN_SIDE) -> bool:
    return min(height, width) >= min_side


def _pil(resample: Image.Resampling) -> Callable[[np.ndarray, int], np.ndarray]:
    # torchvision's TF.resize on a PIL image with an int size: the shorter side to `size` through PIL's resize,
    # whose filters widen with the scale (anti-aliased); on the square crops here both sides become `size`
    def degrade(hr: np.ndarray, size: int) -> np.ndarray:
        return np.asarray(Image.fromarray(hr).resize((size, size), resample=resample), dtype=np.uint8)
    return degrade


def _cv(interpolation: int) -> Callable[[np.ndarray, int], np.ndarray]:
    # albumentations SmallestMaxSize(max_size=size, interpolation) = cv2.resize: no anti-aliasing for
    # INTER_LINEAR / INTER_CUBIC, so a fine pattern aliases into the low-resolution image
    def degrade(hr: np.ndarray, size: int) -> np.ndarray:
        return resize_cv2(hr, size, size, interpolation)
    return degrade


# the release's interpolation options (ImageNetSR.__init__), by the release's names
RESIZE_DEGRADATIONS: dict[str, Callable[[np.ndarray, int], np.ndarray]] = {
    "pil_bicubic": _pil(Image.Resampling.BICUBIC),
    "pil_bilinear": _pil(Image.Resampling.BILINEAR),
    "pil_nearest": _pil(Image.Resampling.NEAREST),
    "pil_box": _pil(Image.Resampling.BOX),
    "pil_hamming": _pil(Image.Resampling.HAMMING),
    "pil_lanczos": _pil(Image.Resampling.LANCZOS),
    "cv_bicubic": _cv(cv2.INTER_CUBIC),
    "cv_bilinear": _cv(cv2.INTER_LINEAR),
    "cv_nearest": _cv(cv2.INTER_NEAREST),
    "cv_area": _cv(cv2.INTER_AREA),
    "cv_lanczos": _cv(cv2.INTER_LANCZOS4),
}
# the release's BSR options (degradation_fn_bsr / _light: blur, resizes, noise, JPEG), drawn per image (data/bsr.py)
BSR_DEGRADATIONS = ("bsrgan", "bsrgan_light")
DEGRADATIONS = tuple(RESIZE_DEGRADATIONS) + BSR_DEGRADATIONS


class DegradationError(ValueError):
    """An unknown or unavailable degradation, or an input it cannot handle."""


@dataclass(frozen=True)
class SRSpec:
    """Everything that decides an SR pair's pixels; recorded in the dataset card and every result."""

    size: int = 256
    factor: int = 4
    degradation: str = "pil_bicubic"
    min_crop_f: float = 0.5
    max_crop_f: float = 1.0
    random_crop: bool = True

    def __post_init__(self) -> None:
        if self.degradation not in DEGRADATIONS:
            raise DegradationError(f"degradation {self.degradation!r} is not one of {', '.join(DEGRADATIONS)}")
        if self.size % self.factor:
            raise DegradationError(f"size {self.size} is not a multiple of the downscale factor {self.factor}")
        if not 0.0 < self.min_crop_f <= self.max_crop_f <= 1.0:
            raise DegradationError(f"need 0 < min_crop_f <= max_crop_f <= 1, got {self.min_crop_f}, {self.max_crop_f}")

    @property
    def lr_size(self) -> int:
        return self.size // self.factor


def degrade(hr: np.ndarray, degradation: str, lr_size: int, rng: Optional[np.random.Generator] = None) -> np.ndarray:
    """The low-resolution image (uint8 HWC, lr_size x lr_size) made from a square uint8 HWC image. The BSR options
    are random (blur kernel, resizes, noise, JPEG quality) and draw from `rng`."""
    if degradation not in DEGRADATIONS:
        SRSpec(degradation=degradation)  # raises the message that names the choices
    if hr.dtype != np.uint8 or hr.ndim != 3 or hr.shape[0] != hr.shape[1]:
        raise DegradationError(f"expected a square uint8 HWC image, got {hr.dtype} {hr.shape}")
    if degradation in BSR_DEGRADATIONS:
        if rng is None:
            raise DegradationError(f"degradation {degradation!r} is random and needs an rng")
        if hr.shape[0] % lr_size:
            raise DegradationError(f"a {hr.shape[0]}-pixel image does not scale to {lr_size} by an integer factor")
        return bsr_degrade(np.ascontiguousarray(hr), hr.shape[0] // lr_size, rng, light=degradation == "bsrgan_light")
    return RESIZE_DEGRADATIONS[degradation](np.ascontiguousarray(hr), lr_size)


def sr_crop(image: np.ndarray, spec: SRSpec, rng: Optional[np.random.Generator]) -> np.ndarray:
    """Steps 1 and 2: the square crop (side int(c * shorter side)) resized to spec.size with INTER_AREA.
    A random crop draws c and the corner from `rng` (every valid corner equally likely, as albumentations'
    RandomCrop); a centred crop with random_crop=False still draws c, as the release does."""
    if image.dtype != np.uint8 or image.ndim != 3:
        raise DegradationError(f"expected uint8 HWC, got {image.dtype} {image.shape}")
    if rng is None:
        raise DegradationError("an SR crop needs an rng (the crop factor is random)")
    h, w = image.shape[:2]
    side = int(min(h, w) * rng.uniform(spec.min_crop_f, spec.max_crop_f))
    if side < 1:
        raise DegradationError(f"image {w}x{h} is too small for a crop factor >= {spec.min_crop_f}")
    if spec.random_crop:
        top, left = int(rng.integers(0, h - side + 1)), int(rng.integers(0, w - side + 1))
    else:
        top, left = (h - side) // 2, (w - side) // 2
    crop = np.ascontiguousarray(image[top:top + side, left:left + side])
    return resize_cv2(crop, spec.size, spec.size, cv2.INTER_AREA)


def sr_pair(image: np.ndarray, spec: SRSpec, rng: Optional[np.random.Generator]) -> tuple[np.ndarray, np.ndarray]:
    """(high-resolution target, low-resolution input), both uint8 HWC; the model sees both scaled to [-1, 1]."""
    hr = sr_crop(image, spec, rng)
    return hr, degrade(hr, spec.degradation, spec.lr_size, rng)
