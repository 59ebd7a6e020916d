"""Frechet Inception Distance (Heusel et al. 2017, Eq. 6): ||mu1-mu2||^2 + Tr(S1 + S2 - 2 (S1 S2)^{1/2}).

Statistics are float64; the matrix square root is scipy's sqrtm with the usual guards (a small diagonal
offset when the product is singular, the real part when round-off leaves a tiny imaginary part).
"""
from __future__ import annotations

import enum
import warnings

import numpy as np
import scipy.linalg
import torch

# Diagonal offset added to both covariances when sqrtm of their product is not finite (TTUR fid.py uses 1e-6).
SQRTM_EPS = 1e-6
# Largest imaginary part of the diagonal of sqrtm(S1 S2) accepted as round-off (TTUR fid.py uses 1e-3).
IMAG_TOLERANCE = 1e-3


class TraceSqrtMethod(str, enum.Enum):
    SQRTM = "sqrtm"  # scipy.linalg.sqrtm of S1 S2 (TTUR, pytorch-fid, ADM evaluator)
    EIGH = "eigh"  # sum of sqrt of eigenvalues of the symmetric PSD matrix sqrt(S1) S2 sqrt(S1)


def _as_float64(x) -> np.ndarray:
    if torch.is_tensor(x):
        x = x.detach().cpu().numpy()
    return np.asarray(x, dtype=np.float64)


def feature_statistics(features) -> tuple[np.ndarray, np.ndarray]:
    """Mean and unbiased (N-1) covariance of N x D features, in float64."""
    feats = _as_float64(features)
    if feats.ndim != 2 or feats.shape[0] < 2:
        raise ValueError(f"need an N x D feature matrix with N >= 2, got shape {feats.shape}")
    mu = feats.mean(axis=0)
    centred = feats - mu
    sigma = centred.T @ centred / (feats.shape[0] - 1)
    return mu, sigma


def _check_stats(mu1, sigma1, mu2, sigma2):
    mu1, mu2 = np.atleast_1d(_as_float64(mu1)), np.atleast_1d(_as_float64(mu2))
    sigma1, sigma2 = np.atleast_2d(_as_float64(sigma1)), np.atleast_2d(_as_float64(sigma2))
    if mu1.shape != mu2.shape:
        raise ValueError(f"mean vectors differ in shape: {mu1.shape} vs {mu2.shape}")
    d = mu1.shape[0]
    if sigma1.shape != (d, d) or sigma2.shape != (d, d):
        raise ValueError(f"covariances must be {d}x{d}, got {sigma1.shape} and {sigma2.shape}")
    return mu1, sigma1, mu2, sigma2


def _sqrtm(a: np.ndarray) -> np.ndarray:
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")  # singular-matrix warnings are handled by the finiteness check
        return scipy.linalg.sqrtm(a)


def trace_sqrt_product_sqrtm(sigma1: np.ndarray, sigma2: np.ndarray) -> float:
    covmean = _sqrtm(sigma1 @ sigma2)
    if not np.isfinite(covmean).all():
        offset = np.eye(sigma1.shape[0]) * SQRTM_EPS
        covmean = _sqrtm((sigma1 + offset) @ (sigma2 + offset))
    if np.iscomplexobj(covmean):
        worst = np.max(np.abs(np.diagonal(covmean).imag))
        if worst > IMAG_TOLERANCE:
            raise ValueError(f"sqrtm(S1 S2) has an imaginary component {worst:.3g} > {IMAG_TOLERANCE}")
        covmean = covmean.real
    return float(np.trace(covmean))


def symmetric_sqrt(sigma: np.ndarray) -> np.ndarray:
    """Square root of a symmetric PSD matrix via eigh; negative round-off eigenvalues are clipped to 0."""
    vals, vecs = np.linalg.eigh((sigma + sigma.T) / 2)
    return (vecs * np.sqrt(np.clip(vals, 0.0, None))) @ vecs.T


def trace_sqrt_product_eigh(sigma1: np.ndarray, sigma2: np.ndarray, sqrt_sigma2: np.ndarray | None = None) -> float:
    """Tr((S1 S2)^{1/2}) = sum sqrt(eig(R S1 R)) with R = S2^{1/2}; pass `sqrt_sigma2` to reuse it."""
    root = symmetric_sqrt(sigma2) if sqrt_sigma2 is None else sqrt_sigma2
    inner = root @ sigma1 @ root
    vals = np.linalg.eigvalsh((inner + inner.T) / 2)
    return float(np.sqrt(np.clip(vals, 0.0, None)).sum())


def frechet_distance(mu1, sigma1, mu2, sigma2, method: TraceSqrtMethod | str = TraceSqrtMethod.SQRTM) -> float:
    """Frechet distance between N(mu1, sigma1) and N(mu2, sigma2), computed in float64."""
    mu1, sigma1, mu2, sigma2 = _check_stats(mu1, sigma1, mu2, sigma2)
    method = TraceSqrtMethod(method)
    if method is TraceSqrtMethod.SQRTM:
        tr_covmean = trace_sqrt_product_sqrtm(sigma1, sigma2)
    else:
        tr_covmean = trace_sqrt_product_eigh(sigma1, sigma2)
    diff = mu1 - mu2
    return float(diff @ diff + np.trace(sigma1) + np.trace(sigma2) - 2.0 * tr_covmean)


def trace_sqrt_product_lowrank(factor: np.ndarray, sigma2: np.ndarray) -> float:
    """Tr((S1 S2)^{1/2}) for S1 = F^T F with F of shape m x D, m < D: the non-zero eigenvalues of S1 S2 equal
    those of the m x m symmetric PSD matrix F S2 F^T (AB and BA share them), so no D x D decomposition is needed."""
    inner = factor @ sigma2 @ factor.T
    vals = np.linalg.eigvalsh((inner + inner.T) / 2)
    return float(np.sqrt(np.clip(vals, 0.0, None)).sum())


def fid_features_to_stats(features, mu2, sigma2, method: TraceSqrtMethod | str = TraceSqrtMethod.SQRTM) -> float:
    """FID of a feature matrix against (mu2, sigma2). With fewer samples than dimensions the sample covariance
    has rank < D and the exact low-rank form is used (same value, far cheaper); otherwise frechet_distance."""
    feats = _as_float64(features)
    if feats.ndim != 2 or feats.shape[0] < 2:
        raise ValueError(f"need an N x D feature matrix with N >= 2, got shape {feats.shape}")
    n, d = feats.shape
    if n - 1 >= d:
        mu1, sigma1 = feature_statistics(feats)
        return frechet_distance(mu1, sigma1, mu2, sigma2, method)
    mu1 = feats.mean(axis=0)
    factor = (feats - mu1) / np.sqrt(n - 1)
    mu1, _, mu2, sigma2 = _check_stats(mu1, np.eye(d), mu2, sigma2)
    diff = mu1 - mu2
    trace1 = float(np.square(factor).sum())
    return float(diff @ diff + trace1 + np.trace(sigma2) - 2.0 * trace_sqrt_product_lowrank(factor, sigma2))


def fid_from_features(features_1, features_2, method: TraceSqrtMethod | str = TraceSqrtMethod.SQRTM) -> float:
    mu2, s2 = feature_statistics(features_2)
    return fid_features_to_stats(features_1, mu2, s2, method)
