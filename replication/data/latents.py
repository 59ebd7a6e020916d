"""Latent cache: the prepared images encoded once by the frozen first stage (paper Sec. 3: the autoencoder is
trained once and reused), so LDM training needs no encoder pass. What is stored is the encoder's *moments*
(KL: mean and log-variance, so training still draws a fresh posterior sample each step as the original's
DiagonalGaussianDistribution.sample(); VQ: pre-quantisation features). Where training flips images, the
flipped image is encoded too: flipping a latent is not the same as encoding the flipped image."""
from __future__ import annotations

import json
import os
from pathlib import Path
from typing import Callable, Iterator, Optional

import numpy as np
import torch
from tqdm import tqdm

from replication.data.prepared import PreparedImages, epoch_order, flip_mask, to_model_input
from replication.utils.io import ArtifactError, atomic_write_json, load_tensor_metadata, load_tensors, read_json, save_tensors

MOMENTS = "moments"
MOMENTS_FLIP = "moments_flip"
LABELS = "labels"
CARD_SUFFIX = ".card.json"


def card_path(cache_path: str | os.PathLike) -> Path:
    p = Path(cache_path)
    return p.with_name(p.name.removesuffix(".safetensors") + CARD_SUFFIX)


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
    [-1, 1]) -> moments`, and store {moments, moments_flip?, labels?} in one safetensors file with a card
    `<name>.card.json` (preprocessing hash, autoencoder hash, shapes, flips, plus `extra_card`). Returns the
    card."""
    n = len(images)
    chunks, flip_chunks = [], []
    bar = tqdm(total=n, desc=f"encode {Path(out_path).name}", unit="img", disable=not progress)
    for batch in images.iter_batches(batch_size, flip=False, shuffle=False):
        x = to_model_input(batch["images"]).to(device)
        chunks.append(encode_fn(x).to("cpu", store_dtype))
        if flips:
            flip_chunks.append(encode_fn(torch.flip(x, dims=[3])).to("cpu", store_dtype))
        bar.update(len(batch["indices"]))
    bar.close()
    tensors = {MOMENTS: torch.cat(chunks)}
    if flips:
        tensors[MOMENTS_FLIP] = torch.cat(flip_chunks)
    if images.labels is not None:
        tensors[LABELS] = torch.from_numpy(np.asarray(images.labels, dtype=np.int64))
    card = {
        "count": n,
        "moments_shape": list(tensors[MOMENTS].shape),
        "dtype": str(store_dtype).removeprefix("torch."),
        "flips": bool(flips),
        "has_labels": LABELS in tensors,
        "spec_hash": images.spec_hash,
        "autoencoder_hash": autoencoder_hash,
        "source_images": str(images.dir),
        "source_card": images.card.get("files", {}),
    }
    card.update(extra_card or {})
    metadata = {"card": json.dumps(card, sort_keys=True)}
    save_tensors(out_path, tensors, metadata=metadata)
    atomic_write_json(card_path(out_path), card)
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
        meta = load_tensor_metadata(self.path)
        self.card = json.loads(meta["card"]) if "card" in meta else read_json(card_path(self.path))
        for key, want in (("spec_hash", expect_spec_hash), ("autoencoder_hash", expect_autoencoder_hash)):
            if want is not None and self.card.get(key) != want:
                raise ArtifactError(f"{self.path}: {key} is {self.card.get(key)}, expected {want}; re-encode the cache")
        tensors = load_tensors(self.path)
        # numpy views: a numpy gather is several times faster than torch indexing under CPU contention
        self.moments = tensors[MOMENTS].numpy()
        self.moments_flip = tensors[MOMENTS_FLIP].numpy() if MOMENTS_FLIP in tensors else None
        self.labels = tensors[LABELS].numpy() if LABELS in tensors else None

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
        m = self.moments[idx]
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
