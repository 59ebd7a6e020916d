"""Latent cache: the prepared images encoded once by the frozen first stage (paper Sec. 3: the autoencoder is
trained once and reused), so LDM training needs no encoder pass. What is stored is the encoder's *moments*
(KL: mean and log-variance, so training still draws a fresh posterior sample each step as the original's
DiagonalGaussianDistribution.sample(); VQ: pre-quantisation features). Where training flips images, the
flipped image is encoded too: flipping a latent is not the same as encoding the flipped image.

On disk a cache is a folder (`<name>.latents/`) of .npy arrays written batch by batch into memory maps
(moments.npy, moments_flip.npy, labels.npy, captions.json) plus card.json, so a cache may be far larger than memory (LSUN
at full size) and is read back by memory mapping. The folder is built under a temporary name and renamed
when complete: a killed encoder leaves no half cache."""
from __future__ import annotations

import os
import shutil
from pathlib import Path
from typing import Callable, Iterator, Optional

import numpy as np
import torch

from replication.data.prepared import (PreparedImages, epoch_order, flip_mask, publish_folder, read_captions,
                                       to_model_input)
from replication.utils.io import ArtifactError, atomic_write_json, check_free_space, read_json
from replication.utils.verify import file_sha256
from replication.utils.progress import ProgressLog

MOMENTS = "moments"
MOMENTS_FLIP = "moments_flip"
LABELS = "labels"
CAPTIONS = "captions.json"
CARD_NAME = "card.json"


def card_path(cache_path: str | os.PathLike) -> Path:
    return Path(cache_path) / CARD_NAME


class _MemmapWriter:
    """Rows appended batch by batch into an .npy memory map whose shape is known after the first batch."""

    def __init__(self, path: Path, rows: int):
        self.path, self.rows, self.array, self.filled = path, rows, None, 0

    def add(self, batch: np.ndarray) -> None:
        if self.array is None:
            check_free_space(self.path.parent, self.rows * batch[0].nbytes, what=f"latent cache {self.path.name}")
            self.array = np.lib.format.open_memmap(self.path, mode="w+", dtype=batch.dtype,
                                                   shape=(self.rows, *batch.shape[1:]))
        self.array[self.filled:self.filled + len(batch)] = batch
        self.filled += len(batch)

    def close(self) -> list[int]:
        if self.array is None or self.filled != self.rows:
            raise ArtifactError(f"{self.path}: wrote {self.filled} of {self.rows} rows")
        self.array.flush()
        shape = list(self.array.shape)
        del self.array
        return shape


@torch.no_grad()
def encode_to_cache(
    encode_fn: Callable[[torch.Tensor], torch.Tensor],
    images: PreparedImages,
    out_path: str | os.PathLike,
    batch_size: int = 32,
    flips: bool = False,
    progress: bool = True,
    autoencoder_hash: Optional[str] = None,
    device: str | torch.device = "cpu",
    store_dtype: torch.dtype = torch.float32,
    extra_card: Optional[dict] = None,
) -> dict:
    """Encode every prepared image (and its mirror image when `flips`) with `encode_fn(x: float NCHW in
    [-1, 1]) -> moments`, and store moments(.npy), moments_flip, labels, captions and card.json (preprocessing hash,
    autoencoder hash, shapes, flips, plus `extra_card`) in the folder `out_path`. Returns the card."""
    n = len(images)
    out = Path(out_path)
    tmp = out.with_name(f".{out.name}.partial-{os.getpid()}")
    shutil.rmtree(tmp, ignore_errors=True)
    tmp.mkdir(parents=True)
    writers = {MOMENTS: _MemmapWriter(tmp / f"{MOMENTS}.npy", n)}
    if flips:
        writers[MOMENTS_FLIP] = _MemmapWriter(tmp / f"{MOMENTS_FLIP}.npy", n)
    np_dtype = torch.empty((), dtype=store_dtype).numpy().dtype
    bar = ProgressLog(f"encode {out.name}", total=n, unit="img", bar=progress)
    for batch in images.iter_batches(batch_size, flip=False, shuffle=False):
        x = to_model_input(batch["images"]).to(device)
        writers[MOMENTS].add(encode_fn(x).to("cpu", store_dtype).numpy().astype(np_dtype, copy=False))
        if flips:
            writers[MOMENTS_FLIP].add(encode_fn(torch.flip(x, dims=[3])).to("cpu", store_dtype).numpy())
        bar.update(len(batch["indices"]))
    bar.close()
    shapes = {k: w.close() for k, w in writers.items()}
    if images.labels is not None:
        np.save(tmp / f"{LABELS}.npy", np.asarray(images.labels, dtype=np.int64))
    captions = images.captions
    if captions is not None:
        atomic_write_json(tmp / CAPTIONS, captions)
    card = {
        "count": n,
        "moments_shape": shapes[MOMENTS],
        "dtype": str(store_dtype).removeprefix("torch."),
        "flips": bool(flips),
        "has_labels": images.labels is not None,
        "spec_hash": images.spec_hash,
        "autoencoder_hash": autoencoder_hash,
        "source_images": str(images.dir),
        "source_card": images.card.get("files", {}),
    }
    if captions is not None:
        card.update(has_captions=True, captions_sha256=file_sha256(tmp / CAPTIONS))
    card.update(extra_card or {})
    atomic_write_json(card_path(tmp), card)
    publish_folder(tmp, out)
    return card


class LatentDataset(torch.utils.data.Dataset):
    """Stored moments of N images (and of their mirror images when the cache has flips). `get(indices, flip)`
    returns moments, taking the mirror image's where `flip` is set; training draws that mask with p = 0.5 per
    visit, as the original draws its flips. Item i = {"moments", "label" (if stored)} of image i, unflipped."""

    def __init__(self, path: str | os.PathLike, expect_spec_hash: Optional[str] = None,
                 expect_autoencoder_hash: Optional[str] = None):
        self.path = Path(path)
        if not self.path.exists():
            raise ArtifactError(f"{self.path} does not exist (run the encode_latents stage)")
        if not card_path(self.path).exists():
            raise ArtifactError(f"{self.path} is not a complete latent cache (no {CARD_NAME}); re-run encode_latents")
        self.card = read_json(card_path(self.path))
        for key, want in (("spec_hash", expect_spec_hash), ("autoencoder_hash", expect_autoencoder_hash)):
            if want is not None and self.card.get(key) != want:
                raise ArtifactError(f"{self.path}: {key} is {self.card.get(key)}, expected {want}; re-encode the cache")
        # memory maps: the cache may exceed memory; a numpy gather copies only the rows of a batch
        self.moments = np.load(self.path / f"{MOMENTS}.npy", mmap_mode="r")
        flip_path, labels_path = self.path / f"{MOMENTS_FLIP}.npy", self.path / f"{LABELS}.npy"
        self.moments_flip = np.load(flip_path, mmap_mode="r") if flip_path.exists() else None
        self.labels = np.load(labels_path) if labels_path.exists() else None
        self.captions = (read_captions(self.path / CAPTIONS, self.card.get("captions_sha256"), self.card["count"])
                         if self.card.get("has_captions") else None)
        if self.moments.shape[0] != self.card["count"]:
            raise ArtifactError(f"{self.path}: {self.moments.shape[0]} rows but the card says {self.card['count']}")

    @property
    def spec_hash(self) -> str:
        return self.card["spec_hash"]

    @property
    def has_flips(self) -> bool:
        return self.moments_flip is not None

    def __len__(self) -> int:
        return self.moments.shape[0]

    def get(self, indices, flip=None) -> torch.Tensor:
        """Moments of images `indices`; where `flip` (bool mask, same length) is set, of the mirror image."""
        idx = np.asarray(indices, dtype=np.int64)
        if idx.size and (idx.min() < 0 or idx.max() >= len(self)):
            raise IndexError(f"index out of range for {len(self)} latents: {idx.min()}..{idx.max()}")
        m = np.array(self.moments[idx])
        if flip is not None:
            mask = np.asarray(flip, dtype=bool)
            if mask.shape != idx.shape:
                raise ValueError(f"flip mask shape {mask.shape} != indices shape {idx.shape}")
            if mask.any():
                if self.moments_flip is None:
                    raise ValueError(f"{self.path} was encoded without flips; cannot return mirrored latents")
                m[mask] = self.moments_flip[idx[mask]]
        return torch.from_numpy(m)

    def __getitem__(self, i: int) -> dict:
        out = {"moments": self.get(np.array([i]))[0]}
        if self.labels is not None:
            out["label"] = int(self.labels[i])
        return out

    def iter_batches(self, batch_size: int, shuffle: bool = True, flip: bool = True, seed: int = 0, epoch: int = 0,
                     drop_last: bool = False) -> Iterator[dict]:
        """One epoch of {"moments", "indices", "flipped", "labels"}; order and flips fixed by (seed, epoch) as
        in PreparedImages.iter_batches (flip only when the cache has flips)."""
        n = len(self)
        order = epoch_order(n, shuffle, seed, epoch)
        flips = flip_mask(n, seed, epoch) if (flip and self.has_flips) else np.zeros(n, dtype=bool)
        stop = n - n % batch_size if drop_last else n
        for start in range(0, stop, batch_size):
            idx, f = order[start : start + batch_size], flips[start : start + batch_size]
            yield {"moments": self.get(idx, f), "indices": idx, "flipped": f,
                   "labels": None if self.labels is None else self.labels[idx]}
