"""Strict metrics configuration (Hydra group `metrics`): an unknown or mistyped key is an error naming it."""
from __future__ import annotations

import enum
from dataclasses import dataclass
from typing import Any, Mapping, Optional

from omegaconf import DictConfig

from replication.utils.schema import ConfigError, merge_into_schema

# Paper rows use 50k samples [PROTOCOL.md §1, Sec. E.3.1].
PAPER_NUM_SAMPLES = 50_000
# ADM reference batches keep 10k images for precision/recall [guided-diffusion evaluations/README].
ADM_PR_REFERENCE_IMAGES = 10_000
# Kynkäänniemi et al. 2019 / ADM evaluator `nhood_sizes=(3,)`.
ADM_PR_K = 3


class ExtractorName(str, enum.Enum):
    INCEPTION = "inception-v3-compat"
    VGG16 = "vgg16"
    STANDIN = "standin"


class PrProtocol(str, enum.Enum):
    # Inception pool_3 features, k=3, 10k reference images: the paper's precision/recall [Sec. E.3.1].
    ADM_INCEPTION_K3 = "adm-inception-k3"
    # torch-fidelity's `prc`: VGG16 fc2_relu features, k=3.
    TORCH_FIDELITY_VGG16_K3 = "torch-fidelity-vgg16-k3"


class IscProtocol(str, enum.Enum):
    # torch-fidelity: shuffle with a fixed seed, `isc_splits` equal splits, mean and std over splits.
    TORCH_FIDELITY = "torch-fidelity"
    # ADM evaluator: consecutive splits of `isc_split_size` images, no shuffle.
    ADM = "adm"


@dataclass
class MetricsConfig:
    feature_extractor: str = ExtractorName.INCEPTION.value
    # Local weight files; nothing is ever downloaded at run time (see features.py for where to get them).
    inception_weights: Optional[str] = None
    vgg16_weights: Optional[str] = None
    lpips_vgg_weights: Optional[str] = None
    allow_standin: bool = False
    fid: bool = True
    pr: bool = True
    pr_k: int = ADM_PR_K
    pr_reference_images: int = ADM_PR_REFERENCE_IMAGES
    pr_protocol: str = PrProtocol.ADM_INCEPTION_K3.value
    pr_batch_size: int = 10_000  # rows per pairwise-distance block; memory only, results do not depend on it
    isc: bool = False
    isc_protocol: str = IscProtocol.TORCH_FIDELITY.value
    isc_splits: int = 10  # torch-fidelity default
    isc_split_size: int = 5000  # ADM evaluator default
    kid: bool = False
    kid_subsets: int = 100  # torch-fidelity default
    kid_subset_size: int = 1000  # torch-fidelity default
    num_samples: int = PAPER_NUM_SAMPLES
    paper_num_samples: int = PAPER_NUM_SAMPLES
    bootstrap_samples: int = 0  # 0: a CI is only computed when num_samples < paper_num_samples
    bootstrap_default_when_short: int = 50
    fid_infinity: bool = False
    fid_infinity_points: int = 15  # Chong & Forsyth 2020 code default
    fid_infinity_min_n: int = 5000  # Chong & Forsyth 2020 code default
    seed: int = 2020  # torch-fidelity's rng_seed default
    batch_size: int = 64
    device: str = "cpu"
    reference_cache_dir: str = "data/reference_stats"
    export_png: bool = False
    source: str = "torch-fidelity 0.4.0 inception-v3-compat; ADM evaluator protocol for precision/recall"


_ENUM_FIELDS = {
    "feature_extractor": ExtractorName,
    "pr_protocol": PrProtocol,
    "isc_protocol": IscProtocol,
}
_POSITIVE_INT_FIELDS = (
    "pr_k", "pr_reference_images", "pr_batch_size", "isc_splits", "isc_split_size", "kid_subsets",
    "kid_subset_size", "num_samples", "paper_num_samples", "fid_infinity_points", "fid_infinity_min_n", "batch_size",
)


def validate_metrics_cfg(cfg: Mapping[str, Any] | DictConfig | MetricsConfig | None) -> MetricsConfig:
    """Merge `cfg` onto the schema (None: every default); unknown keys and bad values raise ConfigError naming
    them."""
    result = merge_into_schema(MetricsConfig, {} if cfg is None else cfg, "metrics")
    _check_values(result)
    return result


def _check_values(cfg: MetricsConfig) -> None:
    for name, enum_cls in _ENUM_FIELDS.items():
        value = getattr(cfg, name)
        allowed = [e.value for e in enum_cls]
        if value not in allowed:
            raise ConfigError(f"metrics.{name}={value!r} is not one of {allowed}")
    for name in _POSITIVE_INT_FIELDS:
        if getattr(cfg, name) <= 0:
            raise ConfigError(f"metrics.{name}={getattr(cfg, name)} must be a positive integer")
    if cfg.bootstrap_samples < 0 or cfg.bootstrap_default_when_short < 0:
        raise ConfigError("metrics.bootstrap_samples and bootstrap_default_when_short must be >= 0")
    if cfg.feature_extractor == ExtractorName.STANDIN.value and not cfg.allow_standin:
        raise ConfigError(
            "metrics.feature_extractor='standin' needs metrics.allow_standin=true (only the smoke experiment may use it)"
        )
