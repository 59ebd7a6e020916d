"""Samples go from the sampler into feature extraction as uint8 tensors, with an optional lossless PNG export;
reading those PNGs back gives the same features (PNG stores uint8 RGB exactly)."""
from __future__ import annotations

import os
from pathlib import Path
from typing import Iterable, Iterator, Sequence

import numpy as np
import torch
from PIL import Image
from replication.utils.progress import ProgressLog

from replication.metrics.features import FeatureExtractor

PNG_NAME_FORMAT = "{:06d}.png"


def _check_uint8_nchw(images: torch.Tensor) -> None:
    if not torch.is_tensor(images) or images.dtype != torch.uint8 or images.dim() != 4 or images.shape[1] != 3:
        raise ValueError(
            f"expected a uint8 N x 3 x H x W tensor, got {type(images).__name__} "
            f"{getattr(images, 'dtype', '')} {tuple(getattr(images, 'shape', ()))}"
        )


class FeatureAccumulator:
    """Collects extractor features batch by batch; `png_dir` also writes each image as <index>.png."""

    def __init__(self, extractor: FeatureExtractor, png_dir: str | os.PathLike | None = None, start_index: int = 0):
        self.extractor = extractor
        self.png_dir = None if png_dir is None else Path(png_dir)
        if self.png_dir is not None:
            self.png_dir.mkdir(parents=True, exist_ok=True)
        self.count = start_index
        self._parts: dict[str, list[torch.Tensor]] = {}

    def add(self, images: torch.Tensor) -> None:
        _check_uint8_nchw(images)
        if self.png_dir is not None:
            self._export_png(images)
        for key, value in self.extractor(images).items():
            self._parts.setdefault(key, []).append(value)
        self.count += images.shape[0]

    def _export_png(self, images: torch.Tensor) -> None:
        for offset, image in enumerate(images.permute(0, 2, 3, 1).cpu().numpy()):
            target = self.png_dir / PNG_NAME_FORMAT.format(self.count + offset)
            tmp = target.with_name(f".{target.name}.tmp")
            Image.fromarray(image).save(tmp, format="PNG")
            os.replace(tmp, target)

    def result(self) -> dict[str, torch.Tensor]:
        if not self._parts:
            raise ValueError("no images were added to the FeatureAccumulator")
        return {key: torch.cat(values) for key, values in self._parts.items()}


def iter_png_dir(png_dir: str | os.PathLike, batch_size: int) -> Iterator[torch.Tensor]:
    """uint8 NCHW batches from the PNG files of a folder, in sorted file-name order."""
    files = sorted(Path(png_dir).glob("*.png"))
    if not files:
        raise FileNotFoundError(f"no .png files in {png_dir}")
    for start in range(0, len(files), batch_size):
        arrays = [np.asarray(Image.open(f).convert("RGB")) for f in files[start : start + batch_size]]
        yield torch.from_numpy(np.stack(arrays)).permute(0, 3, 1, 2).contiguous()


def iter_nhwc_shards(paths: Sequence[str | os.PathLike], batch_size: int) -> Iterator[torch.Tensor]:
    """uint8 NCHW batches from .npy shards of uint8 NHWC images (the sample stage's output)."""
    for path in paths:
        arr = np.load(path, mmap_mode="r", allow_pickle=False)
        if arr.dtype != np.uint8 or arr.ndim != 4 or arr.shape[-1] != 3:
            raise ValueError(f"{path}: expected uint8 N x H x W x 3, got {arr.dtype} {arr.shape}")
        for start in range(0, arr.shape[0], batch_size):
            yield torch.from_numpy(np.array(arr[start : start + batch_size])).permute(0, 3, 1, 2).contiguous()


def accumulate(batches: Iterable[torch.Tensor], extractor: FeatureExtractor, png_dir=None,
               progress: bool = False, total: int | None = None) -> dict[str, torch.Tensor]:
    acc = FeatureAccumulator(extractor, png_dir)
    with ProgressLog("features", total=total, unit="img", bar=progress) as bar:
        for batch in batches:
            acc.add(batch)
            bar.update(batch.shape[0])
    return acc.result()


def from_png_dir(png_dir: str | os.PathLike, extractor: FeatureExtractor, batch_size: int = 64,
                 progress: bool = False) -> dict[str, torch.Tensor]:
    return accumulate(iter_png_dir(png_dir, batch_size), extractor, progress=progress)
