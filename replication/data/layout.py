"""Bounding-box layouts -> the token sequence of the layout-to-image LDM's encoder (layout2img-openimages256,
paper Sec. 4.3.1 and Tab. 9: a `BERTEmbedder` of vocabulary 8192 over 92 tokens).

The release names no data code for this model; the encoder's shape matches taming-transformers'
`ObjectsBoundingBoxConditionalBuilder` (taming/data/conditional_builder/objects_bbox.py and
objects_center_points.py) with the settings of taming's Open Images scene config
(configs/open_images_scene_images_transformer.yaml: no_tokens 8192, max_objects_per_image 30, encode_crop true,
use_group_parameter true), whose `embedding_dim` is 30 * 3 + 2 = 92. That LDM used this builder is a guess
(PROTOCOL.md section 7); the layout below is taming's:
- one shared vocabulary of `no_tokens` ids; coordinates live on a G x G grid, G = int(sqrt(no_tokens)) = 90, and a
  point (x, y) in [0, 1]^2 is the single token round(y * (G - 1)) * G + round(x * (G - 1)) (Python's round, half to
  even, as taming's `tokenize_coordinates`); the top-left (x0, y0) and bottom-right (x0 + w, y0 + h) corners of a
  box are two such tokens;
- an object is the triple (class token, top-left token, bottom-right token); the class token is taming's object
  representation, category + num_classes * is_group_of (`class_token`);
- the objects fill max_objects triples in order; missing objects are the triple (none, none, none) with
  none = no_tokens - 1 = 8191;
- with encode_crop, two last tokens are the crop's corners. Boxes and crop are then both relative to the whole
  image (taming rescales the boxes into the crop only without encode_crop); the full image is the crop
  (0, 0, 1, 1), tokens (0, 8099).
What taming's `build` does around this and is left to the data pipeline: it shuffles the objects (random.shuffle),
drops those outside the crop, flips boxes and crop for a horizontal flip, and truncates more than max_objects
objects with a warning, where `boxes_to_tokens` refuses them so no layout is cut silently.
Boxes here are corner boxes (x0, y0, x1, y1) in [0, 1] (taming's are (x0, y0, w, h): the tokens are the same).
"""
from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Sequence

import numpy as np
import torch

FULL_CROP = (0.0, 0.0, 1.0, 1.0)
OBJECT_TOKENS = 3  # class, top-left corner, bottom-right corner
CROP_TOKENS = 2


class LayoutError(ValueError):
    """A layout the token builder cannot represent (too many objects, a box outside the image, a bad class id)."""


@dataclass(frozen=True)
class LayoutTokenSpec:
    """taming's builder settings: the vocabulary size (= the encoder's vocab_size), objects per layout, crop tokens."""

    no_tokens: int = 8192
    max_objects: int = 30
    encode_crop: bool = True

    def __post_init__(self) -> None:
        if self.no_tokens < 5 or self.max_objects < 1:
            raise LayoutError(f"a layout needs a grid of at least 2x2 and one object, got no_tokens {self.no_tokens}, "
                              f"max_objects {self.max_objects}")

    @property
    def grid(self) -> int:
        """Grid cells per side: int(sqrt(no_tokens)) (taming's no_sections), 90 for 8192."""
        return math.isqrt(self.no_tokens)

    @property
    def none(self) -> int:
        """The padding id of an absent object (no_tokens - 1); class tokens must stay below it."""
        return self.no_tokens - 1

    @property
    def length(self) -> int:
        """Tokens per layout (taming's embedding_dim): 30 * 3 + 2 = 92, the encoder's max_seq_len."""
        return self.max_objects * OBJECT_TOKENS + (CROP_TOKENS if self.encode_crop else 0)


LAYOUT_SPEC = LayoutTokenSpec()


def coordinate_token(x: float, y: float, spec: LayoutTokenSpec = LAYOUT_SPEC) -> int:
    """The token of the grid point nearest (x, y) in [0, 1]^2: row-major index on the G x G grid."""
    g = spec.grid
    return int(round(y * (g - 1))) * g + int(round(x * (g - 1)))


def token_coordinates(token: int, spec: LayoutTokenSpec = LAYOUT_SPEC) -> tuple[float, float]:
    """(x, y) in [0, 1]^2 of a coordinate token, the grid point itself."""
    g = spec.grid
    if not 0 <= token < g * g:
        raise LayoutError(f"token {token} is no coordinate of the {g}x{g} grid (ids 0..{g * g - 1})")
    return (token % g) / (g - 1), (token // g) / (g - 1)


def class_token(category: int, num_classes: int, is_group_of: bool = False,
                spec: LayoutTokenSpec = LAYOUT_SPEC) -> int:
    """taming's object representation with use_group_parameter: category + num_classes * is_group_of."""
    if not 0 <= category < num_classes:
        raise LayoutError(f"category {category} outside [0, {num_classes})")
    token = category + num_classes * int(bool(is_group_of))
    if token >= spec.none:
        raise LayoutError(f"class token {token} collides with the padding id {spec.none}: {num_classes} classes "
                          f"(twice that with group-of) must stay below it")
    return token


def _check_boxes(boxes: np.ndarray, what: str) -> None:
    if boxes.ndim != 2 or boxes.shape[1] != 4:
        raise LayoutError(f"{what} must be (N, 4) corner boxes (x0, y0, x1, y1), got shape {boxes.shape}")
    bad = ~np.isfinite(boxes).all(axis=1) | (boxes < 0).any(axis=1) | (boxes > 1).any(axis=1)
    bad |= (boxes[:, 2] < boxes[:, 0]) | (boxes[:, 3] < boxes[:, 1])
    if bad.any():
        i = int(np.flatnonzero(bad)[0])
        raise LayoutError(f"{what}[{i}] = {boxes[i].tolist()} is not a box (x0 <= x1, y0 <= y1) inside [0, 1]; "
                          f"{int(bad.sum())} such box(es)")


def boxes_to_tokens(boxes: Sequence[Sequence[float]] | np.ndarray | torch.Tensor,
                    class_ids: Sequence[int] | np.ndarray | torch.Tensor,
                    crop: Sequence[float] = FULL_CROP, spec: LayoutTokenSpec = LAYOUT_SPEC) -> torch.Tensor:
    """N corner boxes in [0, 1] (relative to the whole image) and their class tokens -> LongTensor (spec.length,):
    the N object triples in the given order, padding triples for the rest, then the crop's two corner tokens."""
    b = np.asarray(boxes.cpu() if isinstance(boxes, torch.Tensor) else boxes, dtype=np.float64).reshape(-1, 4)
    c = np.asarray(class_ids.cpu() if isinstance(class_ids, torch.Tensor) else class_ids).reshape(-1)
    if len(b) != len(c):
        raise LayoutError(f"{len(b)} boxes but {len(c)} class ids")
    if len(b) > spec.max_objects:
        raise LayoutError(f"{len(b)} objects exceed the layout's {spec.max_objects} (taming's builder keeps the "
                          "first ones after shuffling; choose which to keep before building the tokens)")
    if len(c) and (not np.issubdtype(c.dtype, np.integer) or c.min() < 0 or c.max() >= spec.none):
        raise LayoutError(f"class ids must be integers in [0, {spec.none}) ({spec.none} pads absent objects), "
                          f"got {c.tolist()}")
    _check_boxes(b, "boxes")
    tokens: list[int] = []
    for (x0, y0, x1, y1), cls in zip(b.tolist(), c.tolist()):
        tokens += [int(cls), coordinate_token(x0, y0, spec), coordinate_token(x1, y1, spec)]
    tokens += [spec.none] * (OBJECT_TOKENS * (spec.max_objects - len(b)))
    if spec.encode_crop:
        cb = np.asarray(crop, dtype=np.float64).reshape(1, 4)
        _check_boxes(cb, "crop")
        x0, y0, x1, y1 = cb[0].tolist()
        tokens += [coordinate_token(x0, y0, spec), coordinate_token(x1, y1, spec)]
    return torch.tensor(tokens, dtype=torch.int64)


def _check_tokens(tokens: torch.Tensor, spec: LayoutTokenSpec) -> list[int]:
    if tokens.shape != (spec.length,):
        raise LayoutError(f"a layout is {spec.length} tokens, got shape {tuple(tokens.shape)}")
    values = tokens.tolist()
    if min(values) < 0 or max(values) >= spec.no_tokens:
        raise LayoutError(f"layout tokens must be in [0, {spec.no_tokens})")
    return values


def tokens_to_boxes(tokens: torch.Tensor, spec: LayoutTokenSpec = LAYOUT_SPEC) -> tuple[torch.Tensor, torch.Tensor]:
    """The inverse of `boxes_to_tokens` (taming's inverse_build): corner boxes (N, 4) float64 on the grid and class
    tokens (N,) int64 of the triples whose class is not the padding id. A box comes back within half a grid cell
    (1 / (2 (G - 1)) of the image side) of the one encoded, exactly when its corners were grid points."""
    values = _check_tokens(tokens, spec)
    boxes, classes = [], []
    for i in range(spec.max_objects):
        cls, top_left, bottom_right = values[OBJECT_TOKENS * i: OBJECT_TOKENS * (i + 1)]
        if cls == spec.none:
            continue
        classes.append(cls)
        boxes.append(token_coordinates(top_left, spec) + token_coordinates(bottom_right, spec))
    return (torch.tensor(boxes, dtype=torch.float64).reshape(-1, 4), torch.tensor(classes, dtype=torch.int64))


def tokens_to_crop(tokens: torch.Tensor, spec: LayoutTokenSpec = LAYOUT_SPEC) -> tuple[float, float, float, float]:
    """The crop (x0, y0, x1, y1) that the layout's last two tokens encode."""
    if not spec.encode_crop:
        raise LayoutError("this layout spec encodes no crop")
    values = _check_tokens(tokens, spec)
    return token_coordinates(values[-2], spec) + token_coordinates(values[-1], spec)
