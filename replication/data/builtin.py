"""A tiny deterministic image distribution for the smoke run: one or two coloured shapes (disc, square,
ring) on a two-colour linear gradient. Structured enough that an autoencoder and an LDM have something to
learn, small enough to need no download. Image i depends only on (seed, i), not on how many are made.

With labels, image i's class is the kind of its first shape (0 disc, 1 square, 2 ring): a three-class problem for
the class-conditional smoke run (`experiment=smoke_cin`), with the same pixels as the unlabelled set."""
from __future__ import annotations

import numpy as np

_SHAPES = ("disc", "square", "ring")
NUM_BUILTIN_CLASSES = len(_SHAPES)


def _one_image(rng: np.random.Generator, resolution: int) -> tuple[np.ndarray, int]:
    r = resolution
    yy, xx = np.mgrid[0:r, 0:r].astype(np.float32) / max(r - 1, 1)
    angle = rng.uniform(0.0, 2.0 * np.pi)
    t = np.clip(0.5 + (xx - 0.5) * np.cos(angle) + (yy - 0.5) * np.sin(angle), 0.0, 1.0)[..., None]
    c0, c1 = rng.uniform(0.0, 255.0, size=(2, 3)).astype(np.float32)
    img = (1.0 - t) * c0 + t * c1
    label = -1
    for _ in range(int(rng.integers(1, 3))):
        kind = int(rng.integers(0, len(_SHAPES)))
        label = kind if label < 0 else label
        shape = _SHAPES[kind]
        cy, cx = rng.uniform(0.2, 0.8, size=2)
        radius = rng.uniform(0.1, 0.3)
        colour = rng.uniform(0.0, 255.0, size=3).astype(np.float32)
        if shape == "disc":
            mask = (yy - cy) ** 2 + (xx - cx) ** 2 <= radius**2
        elif shape == "square":
            mask = (np.abs(yy - cy) <= radius) & (np.abs(xx - cx) <= radius)
        else:
            d2 = (yy - cy) ** 2 + (xx - cx) ** 2
            mask = (d2 <= radius**2) & (d2 >= (0.6 * radius) ** 2)
        img[mask] = colour
    return np.clip(np.rint(img), 0, 255).astype(np.uint8), label


def make_builtin_labelled(num_images: int, resolution: int, seed: int, start: int = 0) -> tuple[np.ndarray, np.ndarray]:
    """(uint8 images (num_images, resolution, resolution, 3), int64 labels in [0, 3)); image k is drawn from the
    stream (seed, start + k) and labelled with the kind of its first shape."""
    if num_images < 0 or resolution < 2:
        raise ValueError(f"need num_images >= 0 and resolution >= 2 (got {num_images}, {resolution})")
    out = np.empty((num_images, resolution, resolution, 3), dtype=np.uint8)
    labels = np.empty(num_images, dtype=np.int64)
    for k in range(num_images):
        out[k], labels[k] = _one_image(np.random.default_rng([seed, start + k]), resolution)
    return out, labels


def make_builtin_images(num_images: int, resolution: int, seed: int, start: int = 0) -> np.ndarray:
    """uint8 (num_images, resolution, resolution, 3); image k is drawn from the stream (seed, start + k)."""
    return make_builtin_labelled(num_images, resolution, seed, start)[0]
