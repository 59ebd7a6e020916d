"""Uncertainty of FID from a finite sample: a bootstrap interval over the generated features, and FID_inf,
the N -> infinity extrapolation of Chong & Forsyth (2020, Sec. 3: FID is linear in 1/N; fit, read the intercept).

Both hold the reference statistics fixed and evaluate many FIDs, so the reference covariance's square root
is computed once and each FID uses the symmetric eigenvalue form of Tr((S1 S2)^{1/2}) (fid.trace_sqrt_product_eigh),
or the exact low-rank form when there are fewer samples than feature dimensions.
"""
from __future__ import annotations

from dataclasses import dataclass

import numpy as np
import torch
from tqdm import tqdm

from replication.metrics.fid import symmetric_sqrt, trace_sqrt_product_eigh, trace_sqrt_product_lowrank


def _as_float64(x) -> np.ndarray:
    if torch.is_tensor(x):
        x = x.detach().cpu().numpy()
    x = np.asarray(x, dtype=np.float64)
    if x.ndim != 2 or x.shape[0] < 2:
        raise ValueError(f"need an N x D feature matrix with N >= 2, got shape {x.shape}")
    return x


class _FixedReferenceFid:
    """FID against fixed (mu, sigma) with sigma's square root cached."""

    def __init__(self, ref_mu, ref_sigma):
        self.mu = np.asarray(ref_mu, dtype=np.float64)
        self.sigma = np.asarray(ref_sigma, dtype=np.float64)
        self.root: np.ndarray | None = None  # computed on first full-rank use
        self.trace = float(np.trace(self.sigma))

    def __call__(self, mu: np.ndarray, factor: np.ndarray) -> float:
        """FID of N(mu, F^T F): F has one row per (weighted, centred) sample."""
        diff = mu - self.mu
        if factor.shape[0] < factor.shape[1]:
            tr_sqrt = trace_sqrt_product_lowrank(factor, self.sigma)
        else:
            tr_sqrt = trace_sqrt_product_eigh(factor.T @ factor, self.sigma, sqrt_sigma2=self._root())
        return float(diff @ diff + np.square(factor).sum() + self.trace - 2.0 * tr_sqrt)

    def _root(self) -> np.ndarray:
        if self.root is None:
            self.root = symmetric_sqrt(self.sigma)
        return self.root


def _weighted_factor(centred: np.ndarray, centre: np.ndarray, counts: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """Mean and covariance factor F (covariance = F^T F, unbiased) of the multiset holding row i counts[i] times."""
    n = counts.sum()
    mean_c = counts @ centred / n
    used = counts > 0
    factor = (centred[used] - mean_c) * np.sqrt(counts[used] / (n - 1))[:, None]
    return centre + mean_c, factor


def _weighted_stats(centred: np.ndarray, centre: np.ndarray, counts: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    mu, factor = _weighted_factor(centred, centre, counts)
    return mu, factor.T @ factor


@dataclass(frozen=True)
class BootstrapInterval:
    low: float
    high: float
    level: float
    replicates: int
    point: float  # FID of all samples
    shift: float  # median replicate minus point: the upward bias that resampling with replacement adds
    values: np.ndarray


def bootstrap_fid(sample_features, ref_mu, ref_sigma, replicates: int = 50, seed: int = 0, level: float = 0.95,
                  progress: bool = False) -> BootstrapInterval:
    """Bootstrap interval of FID: resample the generated features with replacement, take the percentile
    interval of the replicate FIDs and re-centre it on the point estimate. Duplicated rows shrink the effective
    sample size, so replicate FIDs sit above the point estimate (FID is biased upwards in 1/N); the re-centring
    removes that shift and keeps the spread, which is the sampling uncertainty this interval reports."""
    if replicates < 2:
        raise ValueError(f"bootstrap needs at least 2 replicates, got {replicates}")
    if not 0.0 < level < 1.0:
        raise ValueError(f"confidence level {level} must lie in (0, 1)")
    feats = _as_float64(sample_features)
    centre = feats.mean(axis=0)
    centred = feats - centre
    fid_fn = _FixedReferenceFid(ref_mu, ref_sigma)
    n = feats.shape[0]
    point = fid_fn(*_weighted_factor(centred, centre, np.ones(n)))
    rng = np.random.default_rng(seed)
    values = np.empty(replicates)
    for b in tqdm(range(replicates), disable=not progress, desc="FID bootstrap", leave=False):
        counts = rng.multinomial(n, np.full(n, 1.0 / n)).astype(np.float64)
        values[b] = fid_fn(*_weighted_factor(centred, centre, counts))
    tail = (1.0 - level) / 2.0
    q_low, median, q_high = np.quantile(values, [tail, 0.5, 1.0 - tail])
    shift = float(median - point)
    return BootstrapInterval(float(q_low - shift), float(q_high - shift), level, replicates, float(point), shift, values)


@dataclass(frozen=True)
class FidInfinity:
    fid_infinity: float
    slope: float  # FID(N) ~ fid_infinity + slope / N
    ns: list[int]
    fids: list[float]


def default_ns(n_total: int, min_n: int = 5000, points: int = 15) -> list[int]:
    """Chong & Forsyth's default grid: `points` sizes evenly spaced from min_n to all samples."""
    lo = min(min_n, n_total)
    return sorted({int(v) for v in np.linspace(lo, n_total, points)})


def fid_infinity(sample_features, ref_mu, ref_sigma, ns: list[int] | None = None, seed: int = 0,
                 min_n: int = 5000, points: int = 15, progress: bool = False) -> FidInfinity:
    """FID at several N (random subsets without replacement), least-squares line in 1/N, intercept at 1/N = 0."""
    feats = _as_float64(sample_features)
    ns = default_ns(feats.shape[0], min_n, points) if ns is None else sorted({int(n) for n in ns})
    if len(ns) < 2 or ns[0] < 2 or ns[-1] > feats.shape[0]:
        raise ValueError(f"FID_inf needs at least two subset sizes in [2, {feats.shape[0]}], got {ns}")
    fid_fn = _FixedReferenceFid(ref_mu, ref_sigma)
    rng = np.random.default_rng(seed)
    fids = []
    for n in tqdm(ns, disable=not progress, desc="FID_inf", leave=False):
        subset = feats[rng.permutation(feats.shape[0])[:n]]
        mu = subset.mean(axis=0)
        fids.append(fid_fn(mu, (subset - mu) / np.sqrt(n - 1)))
    slope, intercept = np.polyfit(1.0 / np.asarray(ns, dtype=np.float64), np.asarray(fids), 1)
    return FidInfinity(float(intercept), float(slope), ns, [float(f) for f in fids])
