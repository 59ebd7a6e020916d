"""Reference statistics of a prepared image set: FID mean/covariance over all images plus up to 10k feature
rows for precision/recall (the ADM reference-batch layout), keyed by dataset, split, preprocessing hash and
extractor; shared between groups as `.npz` files.
"""
from __future__ import annotations

import os
import re
from dataclasses import dataclass
from pathlib import Path
from typing import Iterable, Optional

import numpy as np
import torch
from replication.utils.progress import ProgressLog

from replication.metrics.features import POOL, FeatureExtractor
from replication.utils.io import ArtifactError, atomic_path, check_free_space
from replication.utils.verify import file_sha256, recorded_hash, write_hash_beside

NPZ_FORMAT_VERSION = 1
_META_KEYS = ("dataset", "split", "preprocessing_hash", "extractor", "num_images", "format_version")


def stats_nbytes(dim: int, pr_count: int) -> int:
    """Bytes of a statistics file for `dim`-d features: float64 mean and covariance, float32 precision/recall
    subset, plus 64 KiB for the metadata and the npz container."""
    return 8 * dim + 8 * dim * dim + 4 * dim * pr_count + (64 << 10)


class ReferenceMismatchError(ValueError):
    """Reference statistics were made under a different preprocessing or extractor than the samples."""


@dataclass
class ReferenceStats:
    mu: np.ndarray  # (D,) float64
    sigma: np.ndarray  # (D, D) float64
    pr_features: np.ndarray  # (<= pr_count, D) float32, a seeded uniform subset of the images
    dataset: str
    split: str
    preprocessing_hash: str
    extractor: str
    num_images: int
    # what the reference images held (a hash of their prepared files): statistics of other pixels under the same
    # preprocessing (re-prepared raw data, say) are recomputed, not reused. Empty when unknown (imported files).
    source_id: str = ""

    def save(self, path: str | os.PathLike) -> Path:
        path = Path(path)
        check_free_space(path.parent, stats_nbytes(int(self.mu.shape[0]), len(self.pr_features)),
                         what=f"reference statistics {path.name}")
        with atomic_path(path) as tmp, open(tmp, "wb") as fh:  # a file handle: np.savez would append ".npz"
            np.savez(
                fh, mu=self.mu.astype(np.float64), sigma=self.sigma.astype(np.float64),
                pr_features=self.pr_features.astype(np.float32), dataset=np.array(self.dataset),
                split=np.array(self.split), preprocessing_hash=np.array(self.preprocessing_hash),
                extractor=np.array(self.extractor), num_images=np.array(self.num_images, dtype=np.int64),
                format_version=np.array(NPZ_FORMAT_VERSION, dtype=np.int64), source_id=np.array(self.source_id),
            )
        # the file's hash, written after it: a cached file that no longer matches is recomputed, never used
        write_hash_beside(path)
        return path

    @classmethod
    def load(cls, path: str | os.PathLike) -> "ReferenceStats":
        path = Path(path)
        if not path.is_file():
            raise ArtifactError(f"reference statistics file {path} does not exist")
        try:
            with np.load(path, allow_pickle=False) as data:
                missing = [k for k in ("mu", "sigma", "pr_features", *_META_KEYS) if k not in data.files]
                if missing:
                    raise ArtifactError(f"{path} lacks the field(s) {missing}; not a reference statistics file")
                version = int(data["format_version"])
                if version != NPZ_FORMAT_VERSION:
                    raise ArtifactError(f"{path} has format_version {version}, this code reads {NPZ_FORMAT_VERSION}")
                stats = cls(
                    mu=data["mu"].astype(np.float64), sigma=data["sigma"].astype(np.float64),
                    pr_features=data["pr_features"].astype(np.float32), dataset=str(data["dataset"]),
                    split=str(data["split"]), preprocessing_hash=str(data["preprocessing_hash"]),
                    extractor=str(data["extractor"]), num_images=int(data["num_images"]),
                    source_id=str(data["source_id"]) if "source_id" in data.files else "",
                )
        except (ValueError, OSError) as exc:
            raise ArtifactError(f"{path} is not a readable reference statistics .npz: {exc}") from exc
        d = stats.mu.shape[0]
        if stats.sigma.shape != (d, d) or stats.pr_features.ndim != 2 or stats.pr_features.shape[1] != d:
            raise ArtifactError(f"{path}: inconsistent shapes mu {stats.mu.shape}, sigma {stats.sigma.shape}, "
                                f"pr_features {stats.pr_features.shape}")
        return stats


def _cached_problem(path: Path, source_id: Optional[str]) -> Optional[str]:
    """Why a cached statistics file must not be used (None: it may). Its recorded hash must match (a file
    imported without one is checked by its container alone) and it must describe the same reference images."""
    recorded = recorded_hash(path)
    if recorded is not None and file_sha256(path) != recorded:
        return "its content differs from the hash recorded when it was written"
    if source_id:
        try:
            with np.load(path, allow_pickle=False) as data:
                theirs = str(data["source_id"]) if "source_id" in data.files else ""
        except (ValueError, OSError) as exc:
            return f"it is unreadable ({exc})"
        if theirs and theirs != source_id:
            return "it was computed from other reference images (they were prepared again with other content)"
    return None


def _slug(text: str) -> str:
    return re.sub(r"[^A-Za-z0-9._-]+", "_", text).strip("_") or "unnamed"


def reference_cache_path(cache_dir: str | os.PathLike, dataset: str, split: str, preprocessing_hash: str,
                         extractor_name: str) -> Path:
    """<cache_dir>/<dataset>/<split>/<extractor>-<preprocessing hash>.npz"""
    return Path(cache_dir) / _slug(dataset) / _slug(split) / f"{_slug(extractor_name)}-{_slug(preprocessing_hash)}.npz"


def check_compatible(stats: ReferenceStats, preprocessing_hash: str, extractor_name: str,
                     dataset: str | None = None, split: str | None = None) -> None:
    """Refuse statistics made under another preprocessing, extractor, dataset or split (never compare silently)."""
    problems = []
    if stats.preprocessing_hash != preprocessing_hash:
        problems.append(f"preprocessing hash {stats.preprocessing_hash!r} (reference) != {preprocessing_hash!r} (samples)")
    if stats.extractor != extractor_name:
        problems.append(f"extractor {stats.extractor!r} (reference) != {extractor_name!r} (samples)")
    if dataset is not None and stats.dataset != dataset:
        problems.append(f"dataset {stats.dataset!r} (reference) != {dataset!r}")
    if split is not None and stats.split != split:
        problems.append(f"split {stats.split!r} (reference) != {split!r}")
    if problems:
        raise ReferenceMismatchError(
            "reference statistics do not match this evaluation: " + "; ".join(problems)
            + ". Recompute them with compute_reference_stats for this preprocessing/extractor."
        )


class _RunningMoments:
    """Streaming float64 mean and covariance; sums are taken around a shift (the first batch mean) for accuracy."""

    def __init__(self):
        self.n = 0
        self.shift = None
        self.sum = None
        self.outer = None

    def add(self, feats: np.ndarray) -> None:
        x = feats.astype(np.float64)
        if self.shift is None:
            self.shift = x.mean(axis=0)
            self.sum = np.zeros_like(self.shift)
            self.outer = np.zeros((x.shape[1], x.shape[1]))
        x = x - self.shift
        self.n += x.shape[0]
        self.sum += x.sum(axis=0)
        self.outer += x.T @ x

    def finish(self) -> tuple[np.ndarray, np.ndarray]:
        if self.n < 2:
            raise ValueError(f"reference statistics need at least 2 images, got {self.n}")
        mean_shifted = self.sum / self.n
        sigma = (self.outer - self.n * np.outer(mean_shifted, mean_shifted)) / (self.n - 1)
        return self.shift + mean_shifted, sigma


_MASK64 = np.uint64(0xFFFFFFFFFFFFFFFF)


def _splitmix64(x: np.ndarray) -> np.ndarray:
    """SplitMix64 finaliser (Steele et al. 2014): a counter-based hash, so image i's key ignores batching."""
    with np.errstate(over="ignore"):
        z = (x + np.uint64(0x9E3779B97F4A7C15)) & _MASK64
        z = ((z ^ (z >> np.uint64(30))) * np.uint64(0xBF58476D1CE4E5B9)) & _MASK64
        z = ((z ^ (z >> np.uint64(27))) * np.uint64(0x94D049BB133111EB)) & _MASK64
        return z ^ (z >> np.uint64(31))


def selection_keys(indices: np.ndarray, seed: int) -> np.ndarray:
    """Per-image random keys; the pr_count smallest keys form a uniform random subset (bottom-k sampling)."""
    with np.errstate(over="ignore"):
        salted = indices.astype(np.uint64) ^ _splitmix64(np.array([seed], dtype=np.uint64))
    return _splitmix64(salted)


class _BottomK:
    """Keeps the rows with the k smallest keys seen so far."""

    def __init__(self, k: int):
        self.k = k
        self.keys = np.empty(0, dtype=np.uint64)
        self.rows: np.ndarray | None = None

    def add(self, keys: np.ndarray, rows: np.ndarray) -> None:
        keys = np.concatenate([self.keys, keys])
        rows = rows if self.rows is None else np.concatenate([self.rows, rows])
        if len(keys) > self.k:
            keep = np.argpartition(keys, self.k - 1)[: self.k]
            keys, rows = keys[keep], rows[keep]
        self.keys, self.rows = keys, rows

    def result(self) -> np.ndarray:
        order = np.argsort(self.keys, kind="stable")  # a fixed order, whatever the batching
        return self.rows[order]


def compute_reference_stats(
    image_batches: Iterable[torch.Tensor],
    extractor: FeatureExtractor,
    dataset: str,
    split: str,
    preprocessing_hash: str,
    pr_count: int = 10_000,
    seed: int = 0,
    progress: bool = False,
    total: int | None = None,
) -> ReferenceStats:
    """Stream uint8 NCHW batches through `extractor`: mean/covariance over all images, plus the pool features
    of a seeded uniform subset of `pr_count` images for precision/recall and KID."""
    moments = _RunningMoments()
    subset = _BottomK(pr_count)
    seen = 0
    with ProgressLog(f"reference stats {dataset}/{split}", total=total, unit="img", bar=progress) as bar:
        for batch in image_batches:
            feats = extractor(batch)[POOL].numpy()
            moments.add(feats)
            subset.add(selection_keys(np.arange(seen, seen + len(feats)), seed), feats.astype(np.float32))
            seen += len(feats)
            bar.update(len(feats))
    mu, sigma = moments.finish()
    return ReferenceStats(mu, sigma, subset.result(), dataset, split, preprocessing_hash, extractor.name, seen)


def load_or_compute_reference(
    cache_dir: str | os.PathLike,
    dataset: str,
    split: str,
    preprocessing_hash: str,
    extractor: FeatureExtractor,
    image_batches_fn,
    pr_count: int = 10_000,
    seed: int = 0,
    progress: bool = False,
    expected_images: Optional[int] = None,
    source_id: Optional[str] = None,
) -> ReferenceStats:
    """Cached reference statistics; `image_batches_fn()` yields uint8 NCHW batches and is only called on a miss.

    `expected_images`: how many images the reference set holds now. Cached statistics of another number of images
    (a quick run with dataset.max_images, say) or with another precision/recall subset size are recomputed, not
    returned: the cache key (dataset, split, preprocessing, extractor) does not tell them apart."""
    import logging

    path = reference_cache_path(cache_dir, dataset, split, preprocessing_hash, extractor.name)
    problem = _cached_problem(path, source_id) if path.is_file() else None
    if problem is not None:
        logging.getLogger("replication").warning("cached reference statistics %s are not used: %s; recomputing",
                                                 path, problem)
    if path.is_file() and problem is None:
        stats = ReferenceStats.load(path)
        check_compatible(stats, preprocessing_hash, extractor.name, dataset, split)
        if expected_images is None or (stats.num_images == expected_images
                                        and len(stats.pr_features) == min(pr_count, expected_images)):
            return stats
        logging.getLogger("replication").warning(
            "cached reference statistics %s cover %d images (%d for precision/recall); the reference set now has %d "
            "(%d wanted): recomputing", path, stats.num_images, len(stats.pr_features), expected_images,
            min(pr_count, expected_images))
    # checked before the features are computed as well as when the file is written
    rows = pr_count if expected_images is None else min(pr_count, expected_images)
    check_free_space(path.parent, stats_nbytes(extractor.feature_dims[POOL], rows),
                     what=f"reference statistics {path.name}")
    stats = compute_reference_stats(image_batches_fn(), extractor, dataset, split, preprocessing_hash,
                                    pr_count, seed, progress)
    stats.source_id = source_id or ""
    stats.save(path)
    return stats
