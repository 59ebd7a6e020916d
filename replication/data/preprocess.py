"""The paper's image preprocessing, one function per dataset family (PROTOCOL.md §4). Every function maps a
PIL image to a uint8 HWC RGB array at the target resolution; the random horizontal flip of training is not
stored, it is drawn when reading (`prepared.iter_batches`), as the original draws it per visit."""
from __future__ import annotations

from dataclasses import asdict, dataclass
from enum import Enum
from functools import partial
from typing import Callable, Optional

import cv2
import numpy as np
from PIL import Image

from replication.data.config import DatasetConfig, Family, Interpolation
from replication.utils.io import sha256_json

# Bump when the code of a preprocessing function changes its output: it is part of the hashed spec.
PREPROCESS_VERSION = 2



class Crop(str, Enum):
    center = "center"
    random = "random"  # ImageNet training (taming ImagePaths with random_crop=True)


@dataclass(frozen=True)
class PreprocessSpec:
    """Everything that decides the stored pixels. Its hash travels into every derived artifact."""

    family: str
    resolution: int
    interpolation: str
    crop: str
    crop_seed: Optional[int]  # only for random crops
    version: int = PREPROCESS_VERSION


def spec_hash(spec: PreprocessSpec) -> str:
    return sha256_json(asdict(spec))


# ---------------------------------------------------------------------------------------------------------
# Building blocks
# ---------------------------------------------------------------------------------------------------------
def to_rgb_array(img: Image.Image) -> np.ndarray:
    """`if not image.mode == "RGB": image = image.convert("RGB")`, then uint8 HWC (both original loaders)."""
    if img.mode != "RGB":
        img = img.convert("RGB")
    return np.asarray(img, dtype=np.uint8)


def center_crop_square_lsun(arr: np.ndarray) -> np.ndarray:
    """ldm/data/lsun.py: crop = min(h, w); img[(h-crop)//2:(h+crop)//2, (w-crop)//2:(w+crop)//2]."""
    h, w = arr.shape[:2]
    crop = min(h, w)
    return arr[(h - crop) // 2 : (h + crop) // 2, (w - crop) // 2 : (w + crop) // 2]


def smallest_side_size(h: int, w: int, size: int) -> tuple[int, int]:
    """albumentations SmallestMaxSize: scale = size / min(h, w); new dims = round(dim * scale) (Python round)."""
    scale = size / float(min(h, w))
    if scale == 1.0:
        return h, w
    return round(h * scale), round(w * scale)


def crop_box(h: int, w: int, size: int, crop: Crop, rng: Optional[np.random.Generator]) -> tuple[int, int]:
    """Top-left corner of a size x size window. Center: albumentations CenterCrop ((h - size) // 2).
    Random: every valid corner equally likely, as albumentations RandomCrop (int((h - size + 1) * U[0,1)))."""
    if h < size or w < size:
        raise ValueError(f"cannot crop {size}x{size} from an image of {h}x{w}")
    if crop is Crop.center:
        return (h - size) // 2, (w - size) // 2
    if rng is None:
        raise ValueError("a random crop needs an rng")
    return int(rng.integers(0, h - size + 1)), int(rng.integers(0, w - size + 1))


def resize_cv2(arr: np.ndarray, out_h: int, out_w: int, interpolation: int = cv2.INTER_LINEAR) -> np.ndarray:
    """cv2.resize(arr, (out_w, out_h), interpolation) on uint8 HWC: the call the original loaders make through
    albumentations, so the stored pixels are the release's to the last grey level (no antialiasing for
    INTER_LINEAR / INTER_CUBIC, as cv2)."""
    if arr.dtype != np.uint8 or arr.ndim != 3:
        raise ValueError(f"expected uint8 HWC, got {arr.dtype} with shape {arr.shape}")
    if arr.shape[:2] == (out_h, out_w):
        return arr.copy()
    out = cv2.resize(np.ascontiguousarray(arr), (out_w, out_h), interpolation=interpolation)
    return out if out.ndim == 3 else out[..., None]  # cv2 drops a single channel axis


def _resize_pil(arr: np.ndarray, size: tuple[int, int], resample: Image.Resampling) -> np.ndarray:
    return np.asarray(Image.fromarray(arr).resize(size, resample=resample), dtype=np.uint8)


# ---------------------------------------------------------------------------------------------------------
# Per-dataset functions
# ---------------------------------------------------------------------------------------------------------
def preprocess_lsun(img: Image.Image, size: int = 256) -> np.ndarray:
    """LSUN Churches/Bedrooms as ldm/data/lsun.py (LSUNBase.__getitem__): center crop to the shorter side,
    then PIL bicubic resize to size x size."""
    arr = center_crop_square_lsun(to_rgb_array(img))
    return _resize_pil(np.ascontiguousarray(arr), (size, size), Image.Resampling.BICUBIC)


def _smallest_side_then_crop(img: Image.Image, size: int, crop: Crop, rng: Optional[np.random.Generator]) -> np.ndarray:
    """taming/data/base.py ImagePaths/NumpyPaths: albumentations SmallestMaxSize(max_size=size) with its default
    interpolation cv2.INTER_LINEAR, then CenterCrop or RandomCrop(size, size)."""
    arr = to_rgb_array(img)
    h, w = arr.shape[:2]
    new_h, new_w = smallest_side_size(h, w, size)
    arr = resize_cv2(arr, new_h, new_w)
    top, left = crop_box(new_h, new_w, size, crop, rng)
    return np.ascontiguousarray(arr[top : top + size, left : left + size])


def preprocess_faces(img: Image.Image, size: int = 256) -> np.ndarray:
    """CelebA-HQ and FFHQ as taming/data/faceshq.py (CelebAHQTrain/FFHQTrain, random_crop=False): shorter side
    to `size` with cv2 INTER_LINEAR, center crop. No flip."""
    return _smallest_side_then_crop(img, size, Crop.center, None)


def preprocess_imagenet(img: Image.Image, train: bool, rng: Optional[np.random.Generator], size: int = 256) -> np.ndarray:
    """ImageNet as ldm/data/imagenet.py (taming ImagePaths): shorter side to `size` with cv2 INTER_LINEAR, then a
    random crop for training (ImageNetTrain random_crop default True) or a center crop for evaluation."""
    return _smallest_side_then_crop(img, size, Crop.random if train else Crop.center, rng)


def preprocess_builtin(img: Image.Image, size: int) -> np.ndarray:
    arr = to_rgb_array(img)
    if arr.shape[:2] != (size, size):
        raise ValueError(f"builtin images are made at {size}x{size}; got {arr.shape[1]}x{arr.shape[0]}")
    return arr


# ---------------------------------------------------------------------------------------------------------
# Dispatch from a config
# ---------------------------------------------------------------------------------------------------------
_EXPECTED_INTERPOLATION = {
    Family.builtin: Interpolation.none,
    Family.lsun: Interpolation.pil_bicubic,
    Family.ffhq: Interpolation.cv2_bilinear,
    Family.celebahq: Interpolation.cv2_bilinear,
    Family.imagenet: Interpolation.cv2_bilinear,
    # image-caption data (LAION, COCO): the release's txt2img loader is not public; centre crop to the shorter
    # side and a PIL bicubic resize, as the LSUN loader, is this harness's choice
    Family.captioned: Interpolation.pil_bicubic,
}


def spec_for(cfg: DatasetConfig, train: bool) -> PreprocessSpec:
    """The spec of the stored pixels. Only ImageNet training differs between train and eval (random crop)."""
    expected = _EXPECTED_INTERPOLATION[cfg.family]
    if cfg.interpolation is not expected:
        raise ValueError(
            f"dataset '{cfg.name}': family '{cfg.family.value}' is prepared with interpolation "
            f"'{expected.value}' as the original loader; got '{cfg.interpolation.value}'"
        )
    random_crop = cfg.family is Family.imagenet and train
    return PreprocessSpec(
        family=cfg.family.value,
        resolution=cfg.resolution,
        interpolation=cfg.interpolation.value,
        crop=(Crop.random if random_crop else Crop.center).value,
        crop_seed=cfg.crop_seed if random_crop else None,
    )


PreprocessFn = Callable[[Image.Image, Optional[np.random.Generator]], np.ndarray]


def _drop_rng(fn: Callable[[Image.Image], np.ndarray], img: Image.Image, rng: Optional[np.random.Generator]) -> np.ndarray:
    return fn(img)


def _imagenet(size: int, train: bool, img: Image.Image, rng: Optional[np.random.Generator]) -> np.ndarray:
    return preprocess_imagenet(img, train, rng, size)


def preprocess_fn_for_spec(spec: PreprocessSpec) -> PreprocessFn:
    """A picklable `fn(img, rng) -> uint8 HWC` (rng is used only by random crops)."""
    family = Family(spec.family)
    size = spec.resolution
    if family in (Family.lsun, Family.captioned):
        return partial(_drop_rng, partial(preprocess_lsun, size=size))
    if family in (Family.ffhq, Family.celebahq):
        return partial(_drop_rng, partial(preprocess_faces, size=size))
    if family is Family.imagenet:
        return partial(_imagenet, size, spec.crop == Crop.random.value)
    return partial(_drop_rng, partial(preprocess_builtin, size=size))


def preprocess_for(cfg: DatasetConfig, train: bool = True) -> PreprocessFn:
    return preprocess_fn_for_spec(spec_for(cfg, train))


def crop_rng(spec: PreprocessSpec, index: int) -> Optional[np.random.Generator]:
    """Per-image stream for random crops: image i always gets the same crop, whatever the worker count."""
    if spec.crop_seed is None:
        return None
    return np.random.default_rng([spec.crop_seed, index])
