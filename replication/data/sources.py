"""What every raw dataset format shares: a family module (lsun.py, faces.py, imagenet.py) turns a config and a
split into `RawRecord`s, with the split lists read here; `decode_record` opens one, naming the file when it is
corrupt or truncated. Decoding is a top-level function so prepare.py can run it in worker processes. Which
family module reads a dataset is families.py's choice: this module imports none of them."""
from __future__ import annotations

import hashlib
import io
import os
import warnings
from dataclasses import dataclass, field
from pathlib import Path
from typing import Callable, Iterator, Optional, Union

import numpy as np
from PIL import Image

from replication.data.config import DatasetConfig, Split
from replication.utils.io import sha256_file


class CorruptImageError(RuntimeError):
    """An image file cannot be decoded completely."""

    def __init__(self, name: str, reason: str):
        super().__init__(f"corrupt or truncated image '{name}': {reason}")
        self.name = name
        self.reason = reason


class SplitListError(RuntimeError):
    """A split list is missing, names an unknown image, or has duplicates."""


class PayloadKind:
    IMAGE = "image"  # encoded image (PNG/JPEG/WebP) as bytes or a file path
    NPY = "npy"  # PGGAN CelebA-HQ array: uint8 (1, 3, H, W)


@dataclass
class RawRecord:
    key: str  # identity inside the dataset (LSUN key, FFHQ number, ...)
    name: str  # what an error message names: file path, or LMDB path + key
    payload: Union[bytes, str]  # encoded bytes, or a file path read in the worker
    kind: str = PayloadKind.IMAGE
    label: Optional[int] = None
    md5: Optional[str] = None  # publisher's per-file checksum, verified when reading
    caption: Optional[str] = None  # image-caption datasets (text-to-image)


@dataclass
class SplitRecords:
    count: Optional[int]  # number of records `records` will yield (None: known only once read, WebDataset shards)
    records: Iterator[RawRecord]
    origin: dict = field(default_factory=dict)  # how the split was defined (list file + hash, or fallback rule)


def _read_bytes(rec: RawRecord) -> bytes:
    if isinstance(rec.payload, bytes):
        return rec.payload
    try:
        return Path(rec.payload).read_bytes()
    except OSError as exc:
        raise CorruptImageError(rec.name, f"cannot read file: {exc}") from exc


def decode_record(rec: RawRecord) -> Image.Image:
    """Fully decode (PIL .load(), never LOAD_TRUNCATED_IMAGES) so a truncated file fails here, naming it."""
    data = _read_bytes(rec)
    if rec.md5 is not None:
        actual = hashlib.md5(data).hexdigest()
        if actual != rec.md5.lower():
            raise CorruptImageError(rec.name, f"md5 mismatch: expected {rec.md5.lower()}, actual {actual}")
    if rec.kind == PayloadKind.NPY:
        return _decode_npy(rec.name, data)
    try:
        with warnings.catch_warnings():
            warnings.simplefilter("error", Image.DecompressionBombWarning)
            img = Image.open(io.BytesIO(data))
            img.load()
    except (OSError, SyntaxError, ValueError, EOFError, Image.DecompressionBombWarning, Image.DecompressionBombError) as exc:
        raise CorruptImageError(rec.name, f"{type(exc).__name__}: {exc}") from exc
    return img


def _decode_npy(name: str, data: bytes) -> Image.Image:
    try:
        arr = np.load(io.BytesIO(data), allow_pickle=False)
    except (ValueError, OSError, EOFError) as exc:
        raise CorruptImageError(name, f"not a readable .npy array: {exc}") from exc
    # PGGAN's CelebA-HQ arrays are uint8 (1, 3, H, W); accept (3, H, W) and (H, W, 3) too.
    if arr.ndim == 4 and arr.shape[0] == 1:
        arr = arr[0]
    if arr.ndim == 3 and arr.shape[0] == 3 and arr.shape[-1] != 3:
        arr = np.transpose(arr, (1, 2, 0))
    if arr.dtype != np.uint8 or arr.ndim != 3 or arr.shape[-1] != 3:
        raise CorruptImageError(name, f"expected a uint8 RGB array, got {arr.dtype} {arr.shape}")
    return Image.fromarray(np.ascontiguousarray(arr), mode="RGB")


# ---------------------------------------------------------------------------------------------------------
# Split lists
# ---------------------------------------------------------------------------------------------------------
def raw_dir(cfg: DatasetConfig) -> Path:
    root = Path(cfg.root)
    return root / cfg.raw_subdir if cfg.raw_subdir else root


def downloads_hint(cfg: DatasetConfig) -> str:
    """The dataset's configured files as the exact paths to place by hand (where a download is impossible), each
    with its source; '' when the dataset configures none."""
    root = Path(cfg.root)
    lines = []
    for f in cfg.download.files:
        source = f" (from {f.url})" if f.url else ""
        if f.extract:
            marker = f", or its contents as {root / f.done_marker}" if f.done_marker else ""
            lines.append(f"  - {root / f.name}{source}: extracted into {root}{marker}")
        else:
            lines.append(f"  - {root / f.name}{source}")
    if not lines:
        return ""
    return "Files of this dataset, each fetched by the prepare stage or placed there by hand:\n" + "\n".join(lines)


def evenly_spaced(items: list, count: Optional[int]) -> list:
    """`count` items evenly spaced over the list (all of them when `count` is None or not smaller), so a capped
    split (max_images) still spans the whole sorted list: every class of ImageNet, every category of Places."""
    if count is None or count >= len(items):
        return items
    step = len(items) / count
    return [items[int(i * step)] for i in range(count)]


def find_list_file(root: Path, listed: str) -> Optional[Path]:
    """`listed` relative to root, or any file with that base name below root (archives nest differently)."""
    direct = Path(listed) if Path(listed).is_absolute() else root / listed
    if direct.is_file():
        return direct
    if not root.is_dir():
        return None
    base = Path(listed).name
    for dirpath, _dirnames, filenames in os.walk(root):
        if base in filenames:
            return Path(dirpath) / base
    return None


def read_split_list(path: Path, key_of: Callable[[str], str]) -> list[str]:
    keys, seen = [], set()
    for lineno, line in enumerate(path.read_text().splitlines(), 1):
        line = line.strip()
        if not line:
            continue
        key = key_of(line)
        if key in seen:
            raise SplitListError(f"{path}:{lineno}: '{line}' is listed twice")
        seen.add(key)
        keys.append(key)
    return keys


def split_keys(
    cfg: DatasetConfig, split: Split, key_of: Callable[[str], str], all_keys: Callable[[], list[str]]
) -> tuple[list[str], dict]:
    """Keys of `split` in list order, from the original list, or the documented fallback: all keys sorted,
    the last `splits.fallback_val_count` form val, the rest train."""
    listed = cfg.splits.train_list if split is Split.train else cfg.splits.val_list
    root = Path(cfg.root)
    path = find_list_file(root, listed) if listed else None
    if path is not None:
        keys = read_split_list(path, key_of)
        origin = {"kind": "list", "list": str(path), "list_sha256": sha256_file(path), "listed": len(keys)}
    elif cfg.splits.allow_fallback and cfg.splits.fallback_val_count is not None:
        ordered = sorted(all_keys())
        n_val = cfg.splits.fallback_val_count
        if n_val > len(ordered):
            raise SplitListError(f"fallback split wants {n_val} val images but only {len(ordered)} exist under {raw_dir(cfg)}")
        keys = ordered[len(ordered) - n_val :] if split is Split.val else ordered[: len(ordered) - n_val]
        origin = {
            "kind": "fallback",
            "rule": f"keys sorted ascending; the last {n_val} are val, the rest train",
            "listed": len(keys),
        }
    else:
        where = f"place {root / listed} (any folder below {root} is searched)" if listed else "set its split list"
        hint = downloads_hint(cfg)
        raise SplitListError(
            f"dataset '{cfg.name}': split list for '{split.value}' not found (looked for '{listed}' under {root}): "
            f"{where}, or set splits.allow_fallback: true with splits.fallback_val_count for the documented "
            "deterministic split." + (f"\n{hint}" if hint else "")
        )
    if cfg.max_images is not None:
        keys = keys[: cfg.max_images]
        origin["max_images"] = cfg.max_images
    return keys, origin
