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
    crop_seed: Optional[int]  # random crops, and the random crop factor of super-resolution crops
    version: int = PREPROCESS_VERSION
    # super-resolution crops (family imagenet_sr): the square's side is c * shorter side, c ~ U[min, max]
    crop_factor: Optional[tuple[float, float]] = None


def spec_dict(spec: PreprocessSpec) -> dict:
    """The spec as the card records it and its hash reads it: a field that only some families set is left out
    where it is unset, so the specs (and hashes) of the other families are what they are without it."""
    fields = asdict(spec)
    if fields["crop_factor"] is None:
        fields.pop("crop_factor")
    else:
        fields["crop_factor"] = list(fields["crop_factor"])
    return fields


def spec_hash(spec: PreprocessSpec) -> str:
    return sha256_json(spec_dict(spec))


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


def preprocess_imagenet_sr(img: Image.Image, rng: Optional[np.random.Generator], size: int = 256,
                           crop_factor: tuple[float, float] = (0.5, 1.0), random_crop: bool = True) -> np.ndarray:
    """ImageNet for super-resolution as ldm/data/imagenet.py ImageNetSR makes its high-resolution image: a square of
    side int(c * shorter side), c ~ U[crop_factor] (at a random corner, or centred), resized to `size` with cv2
    INTER_AREA (data/superres.py `sr_crop`). The prepared set holds one such crop per image, drawn from the image's
    own `rng`; the release draws a new one at every visit. The degradation is drawn per visit when training."""
    from replication.data.superres import SRSpec, sr_crop  # superres.py builds on this module's resize

    spec = SRSpec(size=size, factor=1, min_crop_f=crop_factor[0], max_crop_f=crop_factor[1], random_crop=random_crop)
    return sr_crop(to_rgb_array(img), spec, rng)


def preprocess_places(img: Image.Image, train: bool, rng: Optional[np.random.Generator], size: int) -> np.ndarray:
    """Places for inpainting (paper Sec. E.2.2: "train on random 256 crops, evaluate on 512x512 crops").

    Training: a size x size window at a random corner (every corner equally likely) of the image at its stored
    scale, the scale of the evaluation crops, since Places365's high-resolution images have a shorter side of 512;
    an image whose shorter side is below `size` is first scaled up to it with PIL bicubic.
    Evaluation: the shorter side resized to `size` with PIL bicubic (no resize when it is already `size`), then the
    centre square. What is ours: LaMa's gen_mask_dataset.py also brings the shorter side to 512 but crops a square
    around the mask it drew; here the crop is the centre one and each image's mask is drawn on it afterwards
    (data/conditions.py), so the evaluation images are the same whatever mask configuration is used."""
    arr = to_rgb_array(img)
    h, w = arr.shape[:2]
    if not train or min(h, w) < size:
        new_h, new_w = smallest_side_size(h, w, size)
        if (new_h, new_w) != (h, w):
            arr = _resize_pil(np.ascontiguousarray(arr), (new_w, new_h), Image.Resampling.BICUBIC)
        h, w = new_h, new_w
    top, left = crop_box(h, w, size, Crop.random if train else Crop.center, rng)
    return np.ascontiguousarray(arr[top : top + size, left : left + size])


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
    Family.imagenet_sr: Interpolation.cv2_area,
    Family.places: Interpolation.pil_bicubic,
    # image-caption data (LAION, COCO): the release's txt2img loader is not public; centre crop to the shorter
    # side and a PIL bicubic resize, as the LSUN loader, is this harness's choice
    Family.captioned: Interpolation.pil_bicubic,
}


def spec_for(cfg: DatasetConfig, train: bool) -> PreprocessSpec:
    """The spec of the stored pixels. ImageNet training differs from evaluation (random crop), and so does Places
    (random crops at `resolution` for training, centre crops at `places.eval_resolution` for evaluation); the
    super-resolution crops of imagenet_sr are the same for both, as the release's ImageNetSR train and validation
    configurations."""
    expected = _EXPECTED_INTERPOLATION[cfg.family]
    if cfg.interpolation is not expected:
        raise ValueError(
            f"dataset '{cfg.name}': family '{cfg.family.value}' is prepared with interpolation "
            f"'{expected.value}' as the original loader; got '{cfg.interpolation.value}'"
        )
    if cfg.family is Family.imagenet_sr:
        sr = cfg.superres
        return PreprocessSpec(family=cfg.family.value, resolution=cfg.resolution, interpolation=cfg.interpolation.value,
                              crop=(Crop.random if sr.random_crop else Crop.center).value, crop_seed=cfg.crop_seed,
                              crop_factor=(float(sr.min_crop_f), float(sr.max_crop_f)))
    if cfg.family is Family.places:
        return PreprocessSpec(family=cfg.family.value,
                              resolution=cfg.resolution if train else cfg.places.eval_resolution,
                              interpolation=cfg.interpolation.value, crop=(Crop.random if train else Crop.center).value,
                              crop_seed=cfg.crop_seed if train else None)
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


def _imagenet_sr(size: int, crop_factor: tuple[float, float], random_crop: bool, img: Image.Image,
                 rng: Optional[np.random.Generator]) -> np.ndarray:
    return preprocess_imagenet_sr(img, rng, size, crop_factor, random_crop)


def _places(size: int, train: bool, img: Image.Image, rng: Optional[np.random.Generator]) -> np.ndarray:
    return preprocess_places(img, train, rng, size)


def preprocess_fn_for_spec(spec: PreprocessSpec) -> PreprocessFn:
    """A picklable `fn(img, rng) -> uint8 HWC` (rng is used only by random crops and crop factors)."""
    family = Family(spec.family)
    size = spec.resolution
    if family is Family.imagenet_sr:
        return partial(_imagenet_sr, size, spec.crop_factor, spec.crop == Crop.random.value)
    if family is Family.places:
        return partial(_places, size, spec.crop == Crop.random.value)
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
    """Per-image stream for random crops (and crop factors): image i of a split always gets the same crop, whatever
    the worker count."""
    if spec.crop_seed is None:
        return None
    return np.random.default_rng([spec.crop_seed, index])
