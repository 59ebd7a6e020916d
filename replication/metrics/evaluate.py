"""From features to the `metrics` block of metrics.json / recon_metrics.json (schema: stages/evaluate).

Inputs are feature dicts (features.POOL, features.LOGITS_UNBIASED) and reference statistics; no networks.
"""
from __future__ import annotations

from typing import Any, Mapping

import numpy as np
import torch

from replication.metrics.bootstrap import bootstrap_fid, fid_infinity
from replication.metrics.config import ExtractorName, MetricsConfig, PrProtocol
from replication.metrics.features import LOGITS_UNBIASED, POOL, FeatureExtractor
from replication.metrics.fid import feature_statistics, fid_features_to_stats
from replication.metrics.inception_score import inception_score
from replication.metrics.kid import kernel_inception_distance
from replication.metrics.precision_recall import precision_recall
from replication.metrics.reconstruction import summarize
from replication.metrics.reference import ReferenceStats, check_compatible

# Result keys of metrics.json (schema_version 1).
FID, PRECISION, RECALL, IS, KID = "FID", "precision", "recall", "IS", "KID"
RFID, RIS, PSNR, SSIM, LPIPS = "rFID", "rIS", "PSNR", "SSIM", "LPIPS"


def evaluator_label() -> str:
    import torch_fidelity

    return f"torch-fidelity {torch_fidelity.__version__}"


def extractor_caveats(extractor: FeatureExtractor, what: str = "feature extractor") -> list[str]:
    """Reasons a table must flag numbers made with this extractor."""
    if extractor.is_standin:
        return [f"stand-in {what}: {extractor.name}"]
    weights = getattr(extractor, "weights", None)
    if weights is not None and not weights.official:
        return [f"{what} {extractor.name} uses weights {weights.path} (sha256 {weights.sha256[:12]}...) that are not "
                f"the published file"]
    return []


def _pool(feats: Mapping[str, torch.Tensor], where: str) -> torch.Tensor:
    if POOL not in feats:
        raise KeyError(f"{where} features lack {POOL!r} (have {sorted(feats)})")
    return feats[POOL]


def _pr_label(protocol: str, k: int) -> str:
    return protocol if k == 3 else protocol.replace("k3", f"k{k}")


def evaluate_samples(
    sample_feats: Mapping[str, torch.Tensor],
    reference: ReferenceStats,
    cfg: MetricsConfig,
    extractor: FeatureExtractor,
    preprocessing_hash: str,
    pr_sample_feats: Mapping[str, torch.Tensor] | None = None,
    pr_reference: ReferenceStats | None = None,
    pr_extractor: FeatureExtractor | None = None,
    progress: bool = False,
) -> dict[str, Any]:
    """Returns {"metrics", "fid_extrapolated_infinity", "fid_infinity_curve", "protocol",
    "not_comparable_reasons", "notes"}. `pr_*` are only needed for the torch-fidelity VGG16 precision/recall."""
    check_compatible(reference, preprocessing_hash, extractor.name)
    pool = _pool(sample_feats, "sample")
    n = int(pool.shape[0])
    metrics: dict[str, Any] = {}
    reasons = extractor_caveats(extractor)
    notes: list[str] = []
    if n < cfg.paper_num_samples:
        notes.append(f"N={n} samples, fewer than the paper's {cfg.paper_num_samples}: FID is biased upwards; "
                     f"see the bootstrap interval and FID_inf")
    fid_inf = None
    curve = None
    if cfg.fid:
        value = fid_features_to_stats(pool, reference.mu, reference.sigma)
        replicates = cfg.bootstrap_samples or (cfg.bootstrap_default_when_short if n < cfg.paper_num_samples else 0)
        ci95 = None
        if replicates:
            interval = bootstrap_fid(pool, reference.mu, reference.sigma, replicates, cfg.seed, 0.95, progress)
            ci95 = [interval.low, interval.high]
            notes.append(f"FID ci95: bootstrap over the generated samples, {replicates} replicates, percentile "
                         f"interval re-centred on the estimate (replicate shift {interval.shift:.4g})")
        metrics[FID] = {"value": value, "ci95": ci95, "n_samples": n}
        if cfg.fid_infinity:
            result = fid_infinity(pool, reference.mu, reference.sigma, seed=cfg.seed, min_n=cfg.fid_infinity_min_n,
                                  points=cfg.fid_infinity_points, progress=progress)
            fid_inf = result.fid_infinity
            curve = [{"n": m, FID: f} for m, f in zip(result.ns, result.fids)]
    pr_count = None
    if cfg.pr:
        pr_count, pr_reasons = _precision_recall(metrics, pool, reference, cfg, extractor, preprocessing_hash,
                                                 pr_sample_feats, pr_reference, pr_extractor)
        reasons += pr_reasons
    if cfg.isc:
        if LOGITS_UNBIASED not in sample_feats:
            raise KeyError(f"IS needs {LOGITS_UNBIASED!r} features (inception-v3-compat or stand-in), "
                           f"have {sorted(sample_feats)}")
        score = inception_score(sample_feats[LOGITS_UNBIASED], cfg.isc_protocol, cfg.isc_splits,
                                cfg.isc_split_size, cfg.seed)
        metrics[IS] = {"value": score.value, "std": score.std, "n_samples": n, "protocol": score.protocol}
    if cfg.kid:
        kid = kernel_inception_distance(pool, reference.pr_features, cfg.kid_subsets, cfg.kid_subset_size,
                                        cfg.seed, progress)
        metrics[KID] = {"value": kid.value, "std": kid.std, "n_samples": n}
    protocol = {
        "num_samples": n, "evaluator": evaluator_label(), "feature_extractor": extractor.name,
        "pr_protocol": _pr_label(cfg.pr_protocol, cfg.pr_k) if cfg.pr else None, "pr_reference_images": pr_count,
        "reference_set": reference.split, "reference_images": reference.num_images,
        "preprocessing_hash": preprocessing_hash,
    }
    return {"metrics": metrics, "fid_extrapolated_infinity": fid_inf, "fid_infinity_curve": curve,
            "protocol": protocol, "not_comparable_reasons": reasons, "notes": notes}


def _precision_recall(metrics, pool, reference, cfg, extractor, preprocessing_hash, pr_sample_feats,
                      pr_reference, pr_extractor) -> tuple[int, list[str]]:
    reasons: list[str] = []
    if cfg.pr_protocol == PrProtocol.ADM_INCEPTION_K3.value:
        if extractor.name != ExtractorName.INCEPTION.value and not extractor.is_standin:
            raise ValueError(f"pr_protocol {cfg.pr_protocol!r} needs Inception features, got {extractor.name!r}")
        gen, ref = pool, reference.pr_features
    else:
        if pr_sample_feats is None or pr_reference is None or pr_extractor is None:
            raise ValueError(f"pr_protocol {cfg.pr_protocol!r} needs pr_sample_feats, pr_reference and pr_extractor "
                             f"(VGG16 features of samples and reference)")
        if pr_extractor.name != ExtractorName.VGG16.value:
            raise ValueError(f"pr_protocol {cfg.pr_protocol!r} needs the vgg16 extractor, got {pr_extractor.name!r}")
        check_compatible(pr_reference, preprocessing_hash, pr_extractor.name)
        reasons += extractor_caveats(pr_extractor, "precision/recall extractor")
        gen, ref = _pool(pr_sample_feats, "precision/recall sample"), pr_reference.pr_features
    n_ref = int(np.asarray(ref).shape[0])
    if n_ref < cfg.pr_reference_images:
        reasons.append(f"precision/recall used {n_ref} reference images, not {cfg.pr_reference_images}")
    pr = precision_recall(gen, torch.as_tensor(ref), cfg.pr_k, cfg.pr_protocol, cfg.pr_batch_size)
    label = _pr_label(pr.protocol, cfg.pr_k)
    common = {"ci95": None, "n_samples": pr.n_samples, "protocol": label}
    metrics[PRECISION] = {"value": pr.precision, **common}
    metrics[RECALL] = {"value": pr.recall, **common}
    return n_ref, reasons


def evaluate_reconstructions(
    original_feats: Mapping[str, torch.Tensor],
    reconstruction_feats: Mapping[str, torch.Tensor],
    per_image: Mapping[str, np.ndarray],
    cfg: MetricsConfig,
    extractor: FeatureExtractor,
    lpips_is_standin: bool = False,
) -> dict[str, Any]:
    """Returns {"metrics", "n_images", "protocol", "not_comparable_reasons"} for recon_metrics.json.
    `per_image` is ReconstructionAccumulator.per_image(): PSNR, SSIM (and LPIPS) per image."""
    orig_pool, rec_pool = _pool(original_feats, "original"), _pool(reconstruction_feats, "reconstruction")
    if orig_pool.shape[0] != rec_pool.shape[0]:
        raise ValueError(f"{orig_pool.shape[0]} originals but {rec_pool.shape[0]} reconstructions")
    metrics: dict[str, Any] = {}
    mu_o, sigma_o = feature_statistics(orig_pool)
    metrics[RFID] = {"value": fid_features_to_stats(rec_pool, mu_o, sigma_o)}
    if LOGITS_UNBIASED in reconstruction_feats:
        score = inception_score(reconstruction_feats[LOGITS_UNBIASED], cfg.isc_protocol, cfg.isc_splits,
                                cfg.isc_split_size, cfg.seed)
        metrics[RIS] = {"value": score.value, "std": score.std, "protocol": score.protocol}
    for key in (PSNR, SSIM, LPIPS):
        if key in per_image:
            metrics[key] = summarize(per_image[key])
    reasons = extractor_caveats(extractor)
    if lpips_is_standin:
        reasons.append("stand-in LPIPS network (random VGG16 trunk)")
    protocol = {"evaluator": evaluator_label(), "feature_extractor": extractor.name,
                "psnr_ssim_data_range": 255, "std": "population std over images (rIS: over IS splits)"}
    return {"metrics": metrics, "n_images": int(orig_pool.shape[0]), "protocol": protocol,
            "not_comparable_reasons": reasons}
