"""Prepared images: one uint8 (N, H, W, 3) `.npy` file read through a memory map (random access without
decoding), optional `labels.npy` and `captions.json` (one caption per image, a JSON list of strings), `keys.txt`,
and `card.json` (source, counts, checksums, preprocessing hash,
skipped files). card.json is written last: a folder without it is an unfinished preparation."""
from __future__ import annotations

import os
import shutil
import struct
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Iterable, Iterator, Optional, Union

import numpy as np
import torch

from replication.utils.io import ArtifactError, atomic_path, atomic_write_json, atomic_write_text, read_json
from replication.utils.progress import ProgressLog
from replication.utils.verify import file_sha256

CARD = "card.json"
IMAGES = "images.npy"
LABELS = "labels.npy"
CAPTIONS = "captions.json"
KEYS = "keys.txt"
FORMAT_VERSION = 1
_HEADER_BYTES = 128  # fixed .npy v1 header, rewritten with the final count (numpy pads headers to 64 bytes)


@dataclass
class SkippedImage:
    """Yielded instead of an image when a corrupt file is skipped (on_corrupt: skip)."""

    name: str
    reason: str


# (key, image, label) or (key, image, label, caption)
PreparedItem = Union[tuple[str, np.ndarray, Optional[int]], tuple[str, np.ndarray, Optional[int], Optional[str]],
                     SkippedImage]


def _npy_header(shape: tuple[int, ...]) -> bytes:
    body = "{'descr': '|u1', 'fortran_order': False, 'shape': %r, }" % (tuple(shape),)
    pad = _HEADER_BYTES - 10 - len(body) - 1
    if pad < 0:
        raise ValueError(f"shape {shape} does not fit a {_HEADER_BYTES}-byte npy header")
    return b"\x93NUMPY\x01\x00" + struct.pack("<H", _HEADER_BYTES - 10) + (body + " " * pad + "\n").encode("latin1")


def write_prepared(
    items: Iterable[PreparedItem],
    out_dir: str | os.PathLike,
    card: dict,
    progress: bool = True,
    total: Optional[int] = None,
    extra_files: Optional[dict[str, str]] = None,
) -> dict:
    """Stream images into `out_dir/images.npy` (written under a temporary name, renamed when complete), then
    labels.npy, captions.json, keys.txt, the text files `extra_files` (name -> content, e.g. a vocabulary) and
    card.json. `card` must hold `spec_hash`; counts, shapes, skipped files and the sha256 of every written file are
    added. Returns the final card."""
    if "spec_hash" not in card:
        raise ValueError("write_prepared: the card must carry 'spec_hash' (the preprocessing hash)")
    final_dir = Path(out_dir)
    # the folder is built under a temporary name and renamed when complete: a reader (or a killed writer) sees
    # the old folder or the new one, never a mix of both
    out_dir = final_dir.with_name(f".{final_dir.name}.partial-{os.getpid()}")
    shutil.rmtree(out_dir, ignore_errors=True)
    out_dir.mkdir(parents=True)
    try:
        keys: list[str] = []
        labels: list[Optional[int]] = []
        captions: list[Optional[str]] = []
        skipped: list[dict] = []
        hw: Optional[tuple[int, int]] = None
        bar = ProgressLog(f"prepare {final_dir.name}", total=total, unit="img", bar=progress)
        with atomic_path(out_dir / IMAGES) as tmp:
            with open(tmp, "wb") as fh:
                fh.write(b"\0" * _HEADER_BYTES)
                for item in items:
                    bar.update(1)
                    if isinstance(item, SkippedImage):
                        skipped.append({"name": item.name, "reason": item.reason})
                        continue
                    key, arr, label, *rest = item
                    if arr.dtype != np.uint8 or arr.ndim != 3 or arr.shape[2] != 3:
                        raise ValueError(f"image '{key}': expected uint8 HWC RGB, got {arr.dtype} {arr.shape}")
                    if hw is None:
                        hw = arr.shape[:2]
                    elif arr.shape[:2] != hw:
                        raise ValueError(f"image '{key}' is {arr.shape[:2]}, the others {hw}")
                    fh.write(np.ascontiguousarray(arr).tobytes())
                    keys.append(key)
                    labels.append(label)
                    captions.append(rest[0] if rest else None)
                if not keys:
                    raise ValueError(f"no images to write to {final_dir} ({len(skipped)} skipped)")
                fh.seek(0)
                fh.write(_npy_header((len(keys), hw[0], hw[1], 3)))
        bar.close()
        files = {IMAGES: file_sha256(out_dir / IMAGES)}
        has_labels = any(y is not None for y in labels)
        if has_labels:
            if any(y is None for y in labels):
                raise ValueError("some images have labels and some do not")
            with atomic_path(out_dir / LABELS) as tmp:
                with open(tmp, "wb") as fh:
                    np.save(fh, np.asarray(labels, dtype=np.int64))
            files[LABELS] = file_sha256(out_dir / LABELS)
        has_captions = any(c is not None for c in captions)
        if has_captions:
            missing = [k for k, c in zip(keys, captions) if c is None]
            if missing:
                raise ValueError(f"some images have captions and some do not (no caption: {missing[:3]})")
            atomic_write_json(out_dir / CAPTIONS, captions)
            files[CAPTIONS] = file_sha256(out_dir / CAPTIONS)
        for name, text in (extra_files or {}).items():
            atomic_write_text(out_dir / name, text)
            files[name] = file_sha256(out_dir / name)
        atomic_write_text(out_dir / KEYS, "".join(k + "\n" for k in keys))
        files[KEYS] = file_sha256(out_dir / KEYS)
        final = dict(card)
        final.update(
            format_version=FORMAT_VERSION,
            count=len(keys),
            shape=[len(keys), hw[0], hw[1], 3],
            dtype="uint8",
            has_labels=has_labels,
            has_captions=has_captions,
            files=files,
            skipped=skipped,
            num_skipped=len(skipped),
        )
        atomic_write_json(out_dir / CARD, final)
    except BaseException:
        shutil.rmtree(out_dir, ignore_errors=True)
        raise
    publish_folder(out_dir, final_dir)
    return final


def read_captions(path: Path, sha256: Optional[str], count: int) -> list[str]:
    """The captions file `path`: a JSON list of `count` strings whose file hashes to `sha256` (when recorded), so a
    caption changed after preparation is named instead of trained on."""
    if not path.is_file():
        raise ArtifactError(f"{path} is missing: its card says the images have captions (prepare again)")
    if sha256 is not None and file_sha256(path) != sha256:
        raise ArtifactError(f"{path} differs from the SHA-256 its card records (prepare again)")
    captions = read_json(path)
    if not isinstance(captions, list) or len(captions) != count or not all(isinstance(c, str) for c in captions):
        raise ArtifactError(f"{path} is not a list of {count} caption strings")
    return captions


def publish_folder(built: Path, final: Path) -> None:
    """Rename the complete folder `built` to `final`; an old `final` is moved aside first and removed after."""
    if final.is_symlink():
        final.unlink()
    old = final.with_name(f".{final.name}.old-{os.getpid()}")
    if final.exists():
        shutil.rmtree(old, ignore_errors=True)
        os.replace(final, old)
    os.replace(built, final)
    shutil.rmtree(old, ignore_errors=True)


def write_alias(out_dir: str | os.PathLike, parts: list[str | os.PathLike], card: dict) -> dict:
    """A prepared set made of other prepared folders (e.g. the FID reference 'train + val'), without copying."""
    out_dir = Path(out_dir)
    out_dir.mkdir(parents=True, exist_ok=True)
    sets = [PreparedImages(p) for p in parts]
    hashes = {s.spec_hash for s in sets}
    if len(hashes) != 1:
        raise ValueError(f"cannot join prepared sets with different preprocessing: {sorted(hashes)}")
    final = dict(card)
    final.update(
        format_version=FORMAT_VERSION,
        parts=[os.path.relpath(Path(p).resolve(), out_dir.resolve()) for p in parts],
        count=sum(len(s) for s in sets),
        spec_hash=hashes.pop(),
        part_cards=[s.card for s in sets],
    )
    atomic_write_json(out_dir / CARD, final)
    return final


def to_model_input(x: Union[np.ndarray, torch.Tensor]) -> torch.Tensor:
    """uint8 NHWC -> float32 NCHW in [-1, 1], as the original loaders (`image / 127.5 - 1.0`). A torch input
    stays on its device: move uint8 batches to the GPU first and convert there to spare the CPU."""
    if isinstance(x, np.ndarray):
        if x.dtype != np.uint8 or x.ndim != 4 or x.shape[-1] != 3:
            raise ValueError(f"expected uint8 NHWC with 3 channels, got {x.dtype} {x.shape}")
        # numpy's strided multiply is several times faster on CPU than torch's permute-then-cast
        out = np.empty((x.shape[0], 3, x.shape[1], x.shape[2]), dtype=np.float32)
        np.divide(x.transpose(0, 3, 1, 2), np.float32(127.5), out=out)
        out -= np.float32(1.0)
        return torch.from_numpy(out)
    if x.dtype != torch.uint8 or x.ndim != 4 or x.shape[-1] != 3:
        raise ValueError(f"expected uint8 NHWC with 3 channels, got {x.dtype} {tuple(x.shape)}")
    return x.permute(0, 3, 1, 2).float().div_(127.5).sub_(1.0).contiguous()


def hflip_nhwc(x: np.ndarray) -> np.ndarray:
    """Mirror uint8 NHWC images left-right. Reversing whole 3-byte pixels (a void view) is ~2x faster than
    reversing a uint8 axis with a 3-byte inner stride."""
    pixels = np.ascontiguousarray(x).view(np.dtype((np.void, 3)))[..., 0]
    return np.ascontiguousarray(pixels[:, :, ::-1]).view(np.uint8).reshape(x.shape)


def flip_mask(n: int, seed: int, epoch: int) -> np.ndarray:
    """Which positions of an epoch are flipped (p = 0.5); fixed by (seed, epoch), not by the batch size."""
    return np.random.default_rng([seed, epoch, 1]).random(n) < 0.5


def epoch_order(n: int, shuffle: bool, seed: int, epoch: int) -> np.ndarray:
    return np.random.default_rng([seed, epoch, 0]).permutation(n) if shuffle else np.arange(n)


class PreparedImages(torch.utils.data.Dataset):
    """Random access to a prepared folder; item i is a uint8 HWC array. The memory map opens lazily, so the
    object pickles cheaply into DataLoader workers."""

    def __init__(self, out_dir: str | os.PathLike):
        self.dir = Path(out_dir)
        if not (self.dir / CARD).is_file():
            raise ArtifactError(f"{self.dir} has no {CARD}: the preparation did not finish (run the prepare stage)")
        self.card: dict[str, Any] = read_json(self.dir / CARD)
        self._parts = [PreparedImages((self.dir / p)) for p in self.card.get("parts", [])]
        self._offsets = np.cumsum([0] + [len(p) for p in self._parts])
        self._images: Optional[np.ndarray] = None
        self._labels: Optional[np.ndarray] = None
        self._labels_loaded = False
        self._captions: Optional[list[str]] = None
        self._captions_loaded = False

    # -- metadata -------------------------------------------------------------------------------------
    @property
    def spec_hash(self) -> str:
        return self.card["spec_hash"]

    @property
    def card_path(self) -> Path:
        return self.dir / CARD

    @property
    def flip_train(self) -> bool:
        return bool(self.card.get("flip_train", False))

    def __len__(self) -> int:
        return int(self.card["count"])

    @property
    def resolution(self) -> int:
        return int(self.card["shape"][1]) if not self._parts else self._parts[0].resolution

    # -- data -----------------------------------------------------------------------------------------
    def _array(self) -> np.ndarray:
        if self._images is None:
            path = self.dir / IMAGES
            try:
                arr = np.load(path, mmap_mode="r")
            except (OSError, ValueError) as exc:
                raise ArtifactError(f"{path} is not a readable .npy file: {exc}") from exc
            if list(arr.shape) != list(self.card["shape"]):
                raise ArtifactError(f"{path} has shape {arr.shape}, its card says {self.card['shape']}")
            self._images = arr
        return self._images

    @property
    def labels(self) -> Optional[np.ndarray]:
        if not self._labels_loaded:
            if self._parts:
                parts = [p.labels for p in self._parts]
                self._labels = None if any(x is None for x in parts) else np.concatenate(parts)
            elif self.card.get("has_labels"):
                self._labels = np.load(self.dir / LABELS)
            self._labels_loaded = True
        return self._labels

    @property
    def captions(self) -> Optional[list[str]]:
        """Each image's caption (image-caption datasets), checked against the SHA-256 its card records; None
        without captions."""
        if not self._captions_loaded:
            if self._parts:
                parts = [p.captions for p in self._parts]
                self._captions = None if any(x is None for x in parts) else [c for part in parts for c in part]
            elif self.card.get("has_captions"):
                self._captions = read_captions(self.dir / CAPTIONS, self.card["files"].get(CAPTIONS), len(self))
            self._captions_loaded = True
        return self._captions

    def get_batch(self, indices: np.ndarray) -> np.ndarray:
        """uint8 (len(indices), H, W, 3), in the order given."""
        indices = np.asarray(indices, dtype=np.int64)
        if indices.size and (indices.min() < 0 or indices.max() >= len(self)):
            raise IndexError(f"index out of range for {len(self)} images: {indices.min()}..{indices.max()}")
        if not self._parts:
            return np.ascontiguousarray(self._array()[indices])
        out = np.empty((len(indices), self.resolution, self.resolution, 3), dtype=np.uint8)
        which = np.searchsorted(self._offsets, indices, side="right") - 1
        for p in np.unique(which):
            sel = which == p
            out[sel] = self._parts[p].get_batch(indices[sel] - self._offsets[p])
        return out

    def __getitem__(self, i: int) -> np.ndarray:
        return self.get_batch(np.array([i]))[0]

    def __getstate__(self) -> dict:
        state = dict(self.__dict__)
        state["_images"] = None
        return state

    def iter_batches(
        self,
        batch_size: int,
        flip: bool = False,
        shuffle: bool = False,
        seed: int = 0,
        epoch: int = 0,
        drop_last: bool = False,
    ) -> Iterator[dict]:
        """One epoch of {"images": uint8 NHWC, "indices", "labels" (or None), "flipped"}. Order and flips
        depend on (seed, epoch) only: image at epoch position p is flipped iff flip_mask(...)[p]."""
        n = len(self)
        order = epoch_order(n, shuffle, seed, epoch)
        flips = flip_mask(n, seed, epoch) if flip else np.zeros(n, dtype=bool)
        labels = self.labels
        stop = n - n % batch_size if drop_last else n
        for start in range(0, stop, batch_size):
            idx = order[start : start + batch_size]
            imgs = self.get_batch(idx)
            f = flips[start : start + batch_size]
            if f.any():
                imgs[f] = hflip_nhwc(imgs[f])
            yield {"images": imgs, "indices": idx, "labels": None if labels is None else labels[idx], "flipped": f}
