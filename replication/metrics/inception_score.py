"""Inception Score (Salimans et al. 2016): exp(E_x KL(p(y|x) || p(y))), averaged over splits.

Both protocols read Inception's bias-free logits (`logits_unbiased`), as torch-fidelity and the ADM evaluator do.
- torch-fidelity: rows shuffled with a fixed seed, `splits` equal parts, mean and (population) std over parts.
- ADM evaluator: consecutive parts of `split_size` rows, no shuffle; ADM reports the mean only.
"""
from __future__ import annotations

from dataclasses import dataclass

import numpy as np
import torch

from replication.metrics.config import IscProtocol


@dataclass(frozen=True)
class InceptionScore:
    value: float
    std: float
    n_samples: int
    protocol: str  # e.g. "torch-fidelity-10-splits" or "adm-splits-of-5000"


def _split_score(log_p: torch.Tensor) -> float:
    p = log_p.exp()
    log_marginal = torch.logsumexp(log_p, dim=0) - np.log(log_p.shape[0])
    kl = (p * (log_p - log_marginal)).sum(dim=1).mean()
    return float(kl.exp())


def _check_logits(logits) -> torch.Tensor:
    logits = torch.as_tensor(logits)
    if logits.dim() != 2:
        raise ValueError(f"need N x C logits, got shape {tuple(logits.shape)}")
    return logits.double()


def inception_score(
    logits,
    protocol: IscProtocol | str = IscProtocol.TORCH_FIDELITY,
    splits: int = 10,
    split_size: int = 5000,
    seed: int = 2020,
    shuffle: bool = True,
) -> InceptionScore:
    protocol = IscProtocol(protocol)
    logits = _check_logits(logits)
    n = logits.shape[0]
    log_p = logits.log_softmax(dim=1)
    if protocol is IscProtocol.TORCH_FIDELITY:
        if not 1 <= splits <= n:
            raise ValueError(f"isc_splits={splits} must be between 1 and the number of samples {n}")
        if shuffle:
            log_p = log_p[np.random.RandomState(seed).permutation(n)]
        bounds = [(i * n // splits, (i + 1) * n // splits) for i in range(splits)]
        label = f"torch-fidelity-{splits}-splits"
    else:
        if split_size < 1:
            raise ValueError(f"isc_split_size={split_size} must be positive")
        bounds = [(s, min(s + split_size, n)) for s in range(0, n, split_size)]
        label = f"adm-splits-of-{split_size}"
    scores = [_split_score(log_p[a:b]) for a, b in bounds]
    return InceptionScore(float(np.mean(scores)), float(np.std(scores)), n, label)
