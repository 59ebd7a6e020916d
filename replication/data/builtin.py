"""A tiny deterministic image distribution for the smoke run: one or two coloured shapes (disc, square,
ring) on a two-colour linear gradient. Structured enough that an autoencoder and an LDM have something to
learn, small enough to need no download. Image i depends only on (seed, i), not on how many are made.

Two styles (the dataset config's `builtin.style`):
- "full" (the smoke run's): gradient ends and shape colours drawn from the whole RGB cube, one or two shapes of
  radius 0.1-0.3 of the image side.
- "simple" (the demo run's): colours from a palette of six, one shape of radius 0.22-0.38, on a gradient between
  two different palette colours; the shape's colour differs from both. Few enough degrees of freedom that a
  small autoencoder and LDM learn it within minutes on a CPU.

With labels, image i's class is the kind of its first shape (0 disc, 1 square, 2 ring): a three-class problem for
the class-conditional smoke run (`experiment=smoke_cin`), with the same pixels as the unlabelled set.

With captions (`make_builtin_captioned`, the text-to-image smoke run `experiment=smoke_txt2img`), image i is
described by what was drawn: "a red disc on a blue and green gradient" (shape colour and kind, then the gradient's
two ends; a second shape of style "full" adds "and a ... "). Colours are named by the nearest palette colour
(`COLOUR_NAMES`), exactly so in style "simple". `builtin_vocabulary()` is a WordPiece vocabulary holding every
word of these captions; `parse_builtin_caption` reads one back, so an evaluation can check the colours a prompt
names. The pixels are the same as those of the unlabelled set."""
from __future__ import annotations

import numpy as np

_SHAPES = ("disc", "square", "ring")
NUM_BUILTIN_CLASSES = len(_SHAPES)
BUILTIN_STYLES = ("full", "simple")
# "simple" style: red, green, blue, yellow, white, dark grey
_PALETTE = np.array([[220, 40, 40], [40, 180, 60], [40, 80, 220], [235, 200, 40], [240, 240, 240], [50, 50, 50]],
                    dtype=np.float32)
COLOUR_NAMES = ("red", "green", "blue", "yellow", "white", "grey")  # the palette's colours, in its order
_CAPTION_WORDS = ("a", "and", "on", "gradient")


def colour_name(rgb: np.ndarray) -> str:
    """The palette colour nearest to `rgb` (Euclidean in RGB): a palette colour is named exactly."""
    return COLOUR_NAMES[int(np.argmin(((_PALETTE - np.asarray(rgb, dtype=np.float32)) ** 2).sum(axis=1)))]


def colour_rgb(name: str) -> np.ndarray:
    """float32 RGB of a palette colour name."""
    if name not in COLOUR_NAMES:
        raise ValueError(f"{name!r} is not a built-in colour ({', '.join(COLOUR_NAMES)})")
    return _PALETTE[COLOUR_NAMES.index(name)].copy()


def _caption(shapes: list[tuple[int, np.ndarray]], c0: np.ndarray, c1: np.ndarray) -> str:
    """What was drawn, in words: each shape's colour and kind, then the gradient's two ends."""
    things = " and ".join(f"a {colour_name(colour)} {_SHAPES[kind]}" for kind, colour in shapes)
    return f"{things} on a {colour_name(c0)} and {colour_name(c1)} gradient"


def parse_builtin_caption(caption: str) -> dict:
    """{"shapes": [(colour, kind), ...], "gradient": (colour, colour)} of a caption in the built-in grammar;
    ValueError naming what does not fit."""
    words = caption.lower().split()
    try:
        on = words.index("on")
    except ValueError:
        raise ValueError(f"{caption!r} is not a built-in caption ('a COLOUR SHAPE on a COLOUR and COLOUR "
                         "gradient')") from None
    head, tail = words[:on], words[on + 1:]
    shapes = []
    for k in range(0, len(head), 4):
        part = head[k:k + 3]
        ok = len(part) == 3 and part[0] == "a" and part[1] in COLOUR_NAMES and part[2] in _SHAPES
        if not ok or (k + 3 < len(head) and head[k + 3] != "and"):
            raise ValueError(f"{caption!r}: {' '.join(head)!r} is not 'a COLOUR SHAPE [and a COLOUR SHAPE]' "
                             f"(colours {', '.join(COLOUR_NAMES)}; shapes {', '.join(_SHAPES)})")
        shapes.append((part[1], part[2]))
    if (len(tail) != 5 or tail[0] != "a" or tail[2] != "and" or tail[4] != "gradient"
            or tail[1] not in COLOUR_NAMES or tail[3] not in COLOUR_NAMES or not shapes):
        raise ValueError(f"{caption!r} is not a built-in caption ('a COLOUR SHAPE on a COLOUR and COLOUR gradient'; "
                         f"colours {', '.join(COLOUR_NAMES)})")
    return {"shapes": shapes, "gradient": (tail[1], tail[3])}


def builtin_vocabulary() -> list[str]:
    """A WordPiece vocabulary (one token a line, the id its line number) with BERT's special tokens and every word
    of the built-in captions: what the smoke run tokenizes its captions with."""
    from replication.data.tokenizer import SPECIAL_TOKENS

    return [*SPECIAL_TOKENS, *_CAPTION_WORDS, *COLOUR_NAMES, *_SHAPES]


def _grid(resolution: int) -> tuple[np.ndarray, np.ndarray]:
    return np.mgrid[0:resolution, 0:resolution].astype(np.float32) / max(resolution - 1, 1)


def _gradient(rng: np.random.Generator, yy: np.ndarray, xx: np.ndarray, c0: np.ndarray, c1: np.ndarray) -> np.ndarray:
    angle = rng.uniform(0.0, 2.0 * np.pi)
    t = np.clip(0.5 + (xx - 0.5) * np.cos(angle) + (yy - 0.5) * np.sin(angle), 0.0, 1.0)[..., None]
    return (1.0 - t) * c0 + t * c1


def _mask(kind: int, yy: np.ndarray, xx: np.ndarray, cy: float, cx: float, radius: float, ring_inner: float) -> np.ndarray:
    shape = _SHAPES[kind]
    if shape == "disc":
        return (yy - cy) ** 2 + (xx - cx) ** 2 <= radius**2
    if shape == "square":
        return (np.abs(yy - cy) <= radius) & (np.abs(xx - cx) <= radius)
    d2 = (yy - cy) ** 2 + (xx - cx) ** 2
    return (d2 <= radius**2) & (d2 >= (ring_inner * radius) ** 2)


def _one_image(rng: np.random.Generator, resolution: int) -> tuple[np.ndarray, int, str]:
    """Style "full": image, label, caption."""
    yy, xx = _grid(resolution)
    angle = rng.uniform(0.0, 2.0 * np.pi)  # drawn before the colours (the order fixes the pixels of each seed)
    t = np.clip(0.5 + (xx - 0.5) * np.cos(angle) + (yy - 0.5) * np.sin(angle), 0.0, 1.0)[..., None]
    c0, c1 = rng.uniform(0.0, 255.0, size=(2, 3)).astype(np.float32)
    img = (1.0 - t) * c0 + t * c1
    label = -1
    shapes = []
    for _ in range(int(rng.integers(1, 3))):
        kind = int(rng.integers(0, len(_SHAPES)))
        label = kind if label < 0 else label
        cy, cx = rng.uniform(0.2, 0.8, size=2)
        radius = rng.uniform(0.1, 0.3)
        colour = rng.uniform(0.0, 255.0, size=3).astype(np.float32)
        img[_mask(kind, yy, xx, cy, cx, radius, ring_inner=0.6)] = colour
        shapes.append((kind, colour))
    return np.clip(np.rint(img), 0, 255).astype(np.uint8), label, _caption(shapes, c0, c1)


def _simple_image(rng: np.random.Generator, resolution: int) -> tuple[np.ndarray, int, str]:
    """Style "simple": palette colours, one large shape (a thick ring, so it stays a ring at 32 pixels); image,
    label, caption."""
    yy, xx = _grid(resolution)
    i0, i1, i2 = rng.permutation(len(_PALETTE))[:3]  # gradient ends and shape: three different colours
    img = _gradient(rng, yy, xx, _PALETTE[i0], _PALETTE[i1])
    kind = int(rng.integers(0, len(_SHAPES)))
    cy, cx = rng.uniform(0.3, 0.7, size=2)
    radius = rng.uniform(0.22, 0.38)
    img[_mask(kind, yy, xx, cy, cx, radius, ring_inner=0.5)] = _PALETTE[i2]
    caption = _caption([(kind, _PALETTE[i2])], _PALETTE[i0], _PALETTE[i1])
    return np.clip(np.rint(img), 0, 255).astype(np.uint8), kind, caption


def make_builtin_labelled(num_images: int, resolution: int, seed: int, start: int = 0,
                          style: str = "full") -> tuple[np.ndarray, np.ndarray]:
    """(uint8 images (num_images, resolution, resolution, 3), int64 labels in [0, 3)); image k is drawn from the
    stream (seed, start + k) in the given style ("full" or "simple") and labelled with the kind of its first shape."""
    images, labels, _ = make_builtin_captioned(num_images, resolution, seed, start, style)
    return images, labels


def make_builtin_captioned(num_images: int, resolution: int, seed: int, start: int = 0,
                           style: str = "full") -> tuple[np.ndarray, np.ndarray, list[str]]:
    """`make_builtin_labelled`'s images and labels, and each image's caption (what was drawn, in words)."""
    if num_images < 0 or resolution < 2:
        raise ValueError(f"need num_images >= 0 and resolution >= 2 (got {num_images}, {resolution})")
    if style not in BUILTIN_STYLES:
        raise ValueError(f"builtin style must be one of {', '.join(BUILTIN_STYLES)} (got '{style}')")
    draw = _one_image if style == "full" else _simple_image
    out = np.empty((num_images, resolution, resolution, 3), dtype=np.uint8)
    labels = np.empty(num_images, dtype=np.int64)
    captions = []
    for k in range(num_images):
        out[k], labels[k], caption = draw(np.random.default_rng([seed, start + k]), resolution)
        captions.append(caption)
    return out, labels, captions


def make_builtin_images(num_images: int, resolution: int, seed: int, start: int = 0, style: str = "full") -> np.ndarray:
    """uint8 (num_images, resolution, resolution, 3); image k is drawn from the stream (seed, start + k)."""
    return make_builtin_labelled(num_images, resolution, seed, start, style)[0]
