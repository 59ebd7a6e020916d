"""Inpainting masks after LaMa's published evaluation configurations (PROTOCOL.md section 7).

The paper evaluates inpainting on Places with LaMa's protocol (Tab. 6, 7) but does not say which of LaMa's mask
configurations it used; all three are here, by LaMa's names (configs/data_gen/random_{thick,thin,medium}_512.yaml),
and the experiment names its choice. LaMa's generator (saicinpainting/training/data/masks.py and
bin/gen_mask_dataset.py) works as follows, and so does this module:

- the image is resized with PIL bicubic so that its shorter side is `out_min_size` (512);
- `variants_n` candidate masks are drawn on the whole image. Each is, by `irregular_proba : box_proba`, either
  irregular strokes (thick lines drawn with cv2.line; each stroke 1-5 segments, angle 0.01 + integer radians,
  alternate strokes mirrored) or 1..max_times random boxes;
- each candidate is cut with a square crop of the shorter side that keeps the mask's extent inside where possible
  (`propose_random_square_crop` with min_overlap 1); candidates covering more than `max_tamper_area` are dropped;
- one surviving candidate is kept; with none, the image is tried again (at most 10 times).

What differs, on purpose: LaMa draws from the global NumPy state, unseeded, so its 30k test masks cannot be made
again (hence "LaMa†" in Tab. 7). Here every image draws from its own generator seeded by (seed, image key), so the
same evaluation set comes back on every machine and in any order.
"""
from __future__ import annotations

import hashlib
from dataclasses import dataclass, field
from typing import Optional

import cv2
import numpy as np
from PIL import Image

MAX_ATTEMPTS = 10  # bin/gen_mask_dataset.py: n_max
NUM_AREA_BINS = 10  # masked-area fractions in bins of 10%: "40-50%" is bin 4


class MaskError(ValueError):
    """A mask configuration or an input the generator cannot use."""


@dataclass(frozen=True)
class Strokes:
    """make_random_irregular_mask's arguments."""

    min_times: int
    max_times: int
    max_width: int
    max_angle: int = 4
    max_len: int = 60
    min_width: int = 5  # LaMa's constant added to every drawn width (5 + randint(max_width))
    min_len: int = 10  # LaMa's constant added to every drawn length (10 + randint(max_len))


@dataclass(frozen=True)
class Boxes:
    """make_random_rectangle_mask's arguments."""

    margin: int = 10
    bbox_min_size: int = 30
    bbox_max_size: int = 100
    min_times: int = 0
    max_times: int = 3


@dataclass(frozen=True)
class MaskConfig:
    name: str
    strokes: Strokes
    irregular_proba: float = 1.0
    boxes: Optional[Boxes] = None
    box_proba: float = 0.0
    variants_n: int = 5
    out_min_size: int = 512
    crop_min_overlap: float = 1.0
    max_tamper_area: float = 0.5

    def __post_init__(self) -> None:
        if self.irregular_proba < 0 or self.box_proba < 0 or self.irregular_proba + self.box_proba <= 0:
            raise MaskError(f"mask config {self.name!r}: probabilities must be >= 0 and not both 0")
        if self.box_proba > 0 and self.boxes is None:
            raise MaskError(f"mask config {self.name!r}: box_proba > 0 needs boxes")
        if not 0 < self.max_tamper_area <= 1:
            raise MaskError(f"mask config {self.name!r}: max_tamper_area must be in (0, 1]")


# LaMa configs/data_gen/random_{thick,thin,medium}_512.yaml
LAMA_CONFIGS: dict[str, MaskConfig] = {
    "thick": MaskConfig("thick", Strokes(min_times=1, max_times=5, max_width=250, max_angle=4, max_len=450),
                        boxes=Boxes(margin=10, bbox_min_size=30, bbox_max_size=300, min_times=1, max_times=4),
                        box_proba=0.3),
    "thin": MaskConfig("thin", Strokes(min_times=4, max_times=70, max_width=20, max_angle=4, max_len=100)),
    "medium": MaskConfig("medium", Strokes(min_times=4, max_times=10, max_width=100, max_angle=4, max_len=200),
                         boxes=Boxes(margin=0, bbox_min_size=30, bbox_max_size=150, min_times=1, max_times=5),
                         box_proba=0.3),
}


def mask_config(name: str) -> MaskConfig:
    if name not in LAMA_CONFIGS:
        raise MaskError(f"mask configuration {name!r} is not one of {', '.join(LAMA_CONFIGS)} (LaMa's evaluation sets)")
    return LAMA_CONFIGS[name]


def stroke_mask(height: int, width: int, s: Strokes, rng: np.random.Generator) -> np.ndarray:
    """float32 HxW in {0, 1}: random thick polylines (LaMa make_random_irregular_mask, DrawMethod.LINE)."""
    mask = np.zeros((height, width), np.float32)
    for i in range(int(rng.integers(s.min_times, s.max_times + 1))):
        x, y = int(rng.integers(width)), int(rng.integers(height))
        for _ in range(1 + int(rng.integers(5))):
            angle = 0.01 + int(rng.integers(s.max_angle))
            if i % 2 == 0:
                angle = 2 * 3.1415926 - angle  # LaMa's constant, kept so the geometry is theirs
            length = s.min_len + int(rng.integers(s.max_len))
            brush = s.min_width + int(rng.integers(s.max_width))
            end_x = int(np.clip(np.int32(x + length * np.sin(angle)), 0, width))
            end_y = int(np.clip(np.int32(y + length * np.cos(angle)), 0, height))
            cv2.line(mask, (x, y), (end_x, end_y), 1.0, brush)
            x, y = end_x, end_y
    return mask


def box_mask(height: int, width: int, b: Boxes, rng: np.random.Generator) -> np.ndarray:
    """float32 HxW in {0, 1}: random axis-aligned boxes (LaMa make_random_rectangle_mask)."""
    mask = np.zeros((height, width), np.float32)
    max_size = min(b.bbox_max_size, height - b.margin * 2, width - b.margin * 2)
    if max_size <= b.bbox_min_size:
        raise MaskError(f"image {width}x{height} is too small for boxes of {b.bbox_min_size}+ px with margin {b.margin}")
    for _ in range(int(rng.integers(b.min_times, b.max_times + 1))):
        bw, bh = int(rng.integers(b.bbox_min_size, max_size)), int(rng.integers(b.bbox_min_size, max_size))
        x0 = int(rng.integers(b.margin, width - b.margin - bw + 1))
        y0 = int(rng.integers(b.margin, height - b.margin - bh + 1))
        mask[y0:y0 + bh, x0:x0 + bw] = 1
    return mask


def candidate_mask(height: int, width: int, cfg: MaskConfig, rng: np.random.Generator) -> np.ndarray:
    """One draw of LaMa's MixedMaskGenerator: strokes or boxes, chosen by irregular_proba : box_proba."""
    p_boxes = cfg.box_proba / (cfg.irregular_proba + cfg.box_proba)
    if cfg.boxes is not None and rng.random() < p_boxes:
        return box_mask(height, width, cfg.boxes, rng)
    return stroke_mask(height, width, cfg.strokes, rng)


def square_crop_around(mask: np.ndarray, min_overlap: float, rng: np.random.Generator) -> tuple[int, int, int, int]:
    """(left, top, right, bottom) of a square crop of the shorter side that keeps the masked extent inside where the
    image allows (LaMa propose_random_square_crop). An empty mask gets a uniformly placed crop."""
    height, width = mask.shape
    ys, xs = np.nonzero(mask > 0.5)
    if height == width:
        return 0, 0, width, height
    crop = min(height, width)
    long_side = max(height, width)
    coords = xs if height < width else ys
    if coords.size == 0:
        start = int(rng.integers(0, long_side - crop + 1))
    else:
        lo_obj, hi_obj = int(coords.min()), int(coords.max())
        extent = hi_obj - lo_obj
        low = max(0, min(long_side - crop - 1, int(lo_obj + extent * min_overlap - crop)))
        high = max(low + 1, min(long_side - crop, int(lo_obj + extent * min_overlap)))
        start = int(rng.integers(low, high))
    return (start, 0, start + crop, height) if height < width else (0, start, width, start + crop)


def image_seed(seed: int, key: str) -> np.random.Generator:
    """A generator for one image from the run's seed and the image's key (its file name): independent of the order
    and the number of workers, the same on every machine."""
    digest = hashlib.sha256(f"{seed}:{key}".encode()).digest()
    return np.random.default_rng(int.from_bytes(digest[:8], "little"))


def resize_shorter_side(image: Image.Image, size: int) -> Image.Image:
    """gen_mask_dataset: scale so the shorter side is `size` (up or down), PIL bicubic, rounded sizes."""
    factor = size / min(image.size)
    if factor == 1.0:
        return image
    out = tuple(int(v) for v in (np.array(image.size) * factor).round().astype("uint32"))
    return image.resize(out, resample=Image.Resampling.BICUBIC)


@dataclass
class MaskedImage:
    image: np.ndarray  # uint8 HxWx3, the square evaluation crop
    mask: np.ndarray  # uint8 HxW, 1 = hole (to be filled), 0 = known
    attempts: int = 1
    crop_box: tuple[int, int, int, int] = field(default=(0, 0, 0, 0))

    @property
    def area(self) -> float:
        return float(self.mask.mean())


def make_masked_image(image: Image.Image, cfg: MaskConfig, rng: np.random.Generator, key: str = "image") -> MaskedImage:
    """One evaluation pair as gen_mask_dataset makes it: resize, `variants_n` candidates, square crops, drop those
    over `max_tamper_area`, keep one at random; retried up to MAX_ATTEMPTS times."""
    image = resize_shorter_side(image.convert("RGB"), cfg.out_min_size)
    arr = np.asarray(image, dtype=np.uint8)
    height, width = arr.shape[:2]
    for attempt in range(1, MAX_ATTEMPTS + 1):
        kept = []
        for _ in range(cfg.variants_n):
            mask = candidate_mask(height, width, cfg, rng)
            box = square_crop_around(mask, cfg.crop_min_overlap, rng)
            left, top, right, bottom = box
            cut = mask[top:bottom, left:right]
            if cut.mean() <= cfg.max_tamper_area:
                kept.append((cut, box))
        if kept:
            cut, box = kept[int(rng.integers(len(kept)))]
            left, top, right, bottom = box
            return MaskedImage(np.ascontiguousarray(arr[top:bottom, left:right]), (cut > 0.5).astype(np.uint8),
                               attempts=attempt, crop_box=box)
    raise MaskError(f"{key}: no mask of configuration {cfg.name!r} covered <= {cfg.max_tamper_area:.0%} of the crop "
                    f"in {MAX_ATTEMPTS} attempts")


def area_bin(area: float, bins: int = NUM_AREA_BINS) -> int:
    """The masked-area bin of a mask covering `area` (a fraction): [0, 10%) -> 0, ..., [40%, 50%) -> 4; an area of
    exactly 100% falls in the last bin."""
    if not 0.0 <= area <= 1.0:
        raise MaskError(f"masked area must be a fraction in [0, 1], got {area}")
    return min(int(area * bins), bins - 1)


def bin_label(index: int, bins: int = NUM_AREA_BINS) -> str:
    step = 100 // bins
    return f"{index * step}-{(index + 1) * step}%"
