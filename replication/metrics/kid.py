"""Kernel Inception Distance (Binkowski et al. 2018, Sec. 3): unbiased MMD^2 with the cubic polynomial
kernel k(x, y) = (x.y / d + 1)^3, averaged over random subsets (torch-fidelity defaults: 100 x 1000).

Subsets are drawn as torch-fidelity draws them (numpy RandomState(seed).choice without replacement, first the
generated then the reference subset), so with the same seed both pick the same rows; arithmetic is float64.
"""
from __future__ import annotations

from dataclasses import dataclass

import numpy as np
import torch
from tqdm import tqdm

# Binkowski et al. 2018: degree 3, gamma = 1/d, coef0 = 1.
POLY_DEGREE = 3
POLY_COEF0 = 1.0


@dataclass(frozen=True)
class KernelInceptionDistance:
    value: float
    std: float
    n_samples: int
    n_reference: int
    subsets: int
    subset_size: int


def polynomial_kernel(x: np.ndarray, y: np.ndarray) -> np.ndarray:
    return (x @ y.T / x.shape[1] + POLY_COEF0) ** POLY_DEGREE


def mmd2_unbiased(x: np.ndarray, y: np.ndarray) -> float:
    """Unbiased MMD^2 for equal-size sets: off-diagonal means of K_xx and K_yy minus twice the mean of K_xy."""
    m = x.shape[0]
    k_xx, k_yy, k_xy = polynomial_kernel(x, x), polynomial_kernel(y, y), polynomial_kernel(x, y)
    off_xx = (k_xx.sum() - np.trace(k_xx)) / (m * (m - 1))
    off_yy = (k_yy.sum() - np.trace(k_yy)) / (m * (m - 1))
    return float(off_xx + off_yy - 2.0 * k_xy.mean())


def _as_numpy(x) -> np.ndarray:
    if torch.is_tensor(x):
        x = x.detach().cpu().numpy()
    x = np.asarray(x, dtype=np.float64)
    if x.ndim != 2:
        raise ValueError(f"need an N x D feature matrix, got shape {x.shape}")
    return x


def kernel_inception_distance(
    sample_features, reference_features, subsets: int = 100, subset_size: int = 1000, seed: int = 2020,
    progress: bool = False,
) -> KernelInceptionDistance:
    gen, ref = _as_numpy(sample_features), _as_numpy(reference_features)
    if gen.shape[1] != ref.shape[1]:
        raise ValueError(f"feature dimensions differ: {gen.shape[1]} vs {ref.shape[1]}")
    if subset_size < 2 or subset_size > min(len(gen), len(ref)):
        raise ValueError(
            f"metrics.kid_subset_size={subset_size} must be between 2 and the smaller set size "
            f"(samples: {len(gen)}, reference: {len(ref)})"
        )
    rng = np.random.RandomState(seed)
    values = np.empty(subsets)
    for i in tqdm(range(subsets), disable=not progress, desc="KID subsets", leave=False):
        a = gen[rng.choice(len(gen), subset_size, replace=False)]
        b = ref[rng.choice(len(ref), subset_size, replace=False)]
        values[i] = mmd2_unbiased(a, b)
    return KernelInceptionDistance(float(values.mean()), float(values.std()), len(gen), len(ref), subsets, subset_size)
