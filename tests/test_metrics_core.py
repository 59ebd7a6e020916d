"""Metric arithmetic against closed forms, hand-checkable cases and torch-fidelity's own functions."""
from __future__ import annotations


import numpy as np
import pytest
import torch

from replication.metrics.bootstrap import _weighted_stats, bootstrap_fid, fid_infinity
from replication.metrics.config import validate_metrics_cfg
from replication.metrics.fid import feature_statistics, frechet_distance
from replication.metrics.inception_score import inception_score
from replication.metrics.kid import kernel_inception_distance, mmd2_unbiased
from replication.metrics.precision_recall import precision_recall
from replication.utils.schema import ConfigError


pytestmark = pytest.mark.usefixtures("no_network")  # tests/conftest.py

def _closed_form_fid(mu1, a, mu2, b):
    """Commuting covariances Q diag(a) Q^T, Q diag(b) Q^T: Tr((S1 S2)^1/2) = sum sqrt(a_i b_i)."""
    return float(np.sum((mu1 - mu2) ** 2) + np.sum((np.sqrt(a) - np.sqrt(b)) ** 2))


@pytest.mark.parametrize("method", ["sqrtm", "eigh"])
def test_frechet_distance_matches_closed_form(method):
    rng = np.random.default_rng(0)
    d = 16
    q, _ = np.linalg.qr(rng.normal(size=(d, d)))
    a, b = rng.uniform(0.1, 3.0, d), rng.uniform(0.1, 3.0, d)
    mu1, mu2 = rng.normal(size=d), rng.normal(size=d)
    s1, s2 = (q * a) @ q.T, (q * b) @ q.T
    expected = _closed_form_fid(mu1, a, mu2, b)
    assert frechet_distance(mu1, s1, mu2, s2, method) == pytest.approx(expected, rel=1e-9, abs=1e-10)
    # Diagonal case, and distance to itself.
    assert frechet_distance(mu1, np.diag(a), mu2, np.diag(b), method) == pytest.approx(expected, rel=1e-9)
    assert frechet_distance(mu1, s1, mu1, s1, method) == pytest.approx(0.0, abs=1e-9)


def test_frechet_distance_non_commuting_one_side_identity():
    # With S2 = I: Tr(S1^1/2) = sum sqrt(eig(S1)), for any (non-diagonal) S1.
    rng = np.random.default_rng(1)
    m = rng.normal(size=(6, 6))
    s1 = m @ m.T + 0.1 * np.eye(6)
    expected = np.trace(s1) + 6 - 2 * np.sqrt(np.linalg.eigvalsh(s1)).sum()
    assert frechet_distance(np.zeros(6), s1, np.zeros(6), np.eye(6)) == pytest.approx(expected, rel=1e-9)


@pytest.mark.parametrize("n", [4, 9, 30])
def test_low_rank_route_equals_full_sqrtm(n):
    # Fewer samples than dimensions (n=4, 9 with d=12) take the exact low-rank form; n=30 the full one.
    from replication.metrics.fid import fid_features_to_stats

    rng = np.random.default_rng(2)
    d = 12
    feats = rng.normal(size=(n, d)) * rng.uniform(0.5, 2.0, d) + 0.3
    ref = rng.normal(size=(200, d))
    ref_mu, ref_sigma = feature_statistics(ref)
    mu, sigma = feature_statistics(feats)
    expected = frechet_distance(mu, sigma, ref_mu, ref_sigma, "sqrtm")
    assert fid_features_to_stats(feats, ref_mu, ref_sigma) == pytest.approx(expected, rel=1e-7)


def test_frechet_distance_rejects_mismatched_shapes():
    with pytest.raises(ValueError, match="shape"):
        frechet_distance(np.zeros(3), np.eye(3), np.zeros(4), np.eye(4))


def test_feature_statistics_equal_numpy_float64():
    feats = torch.randn(50, 7, dtype=torch.float32)
    mu, sigma = feature_statistics(feats)
    x = feats.double().numpy()
    assert mu.dtype == np.float64 and sigma.dtype == np.float64
    np.testing.assert_allclose(mu, x.mean(0), rtol=1e-12)
    np.testing.assert_allclose(sigma, np.cov(x, rowvar=False), rtol=1e-10, atol=1e-14)


# ---------------------------------------------------------------- precision / recall
def test_pr_identical_sets_are_one_and_one():
    x = torch.randn(40, 5)
    pr = precision_recall(x, x.clone(), k=3)
    assert (pr.precision, pr.recall) == (1.0, 1.0)
    assert pr.protocol == "adm-inception-k3"


def test_pr_far_apart_sets_are_zero_and_zero():
    x = torch.randn(30, 5)
    pr = precision_recall(x + 1000.0, x, k=3)
    assert (pr.precision, pr.recall) == (0.0, 0.0)


def test_pr_hand_checked_one_dimensional_case():
    # Reference {0,1,2,3,4}, k=1: every reference ball has radius 1.
    # Generated {0.5, 10, 2.2, 100}: k=1 radii 1.7, 7.8, 1.7, 90.
    # Precision: 0.5 and 2.2 lie within 1 of a reference point -> 2/4.
    # Recall: 0..2 lie in the 0.5-ball (radius 1.7), 3 and 4 in the 10-ball (radius 7.8) -> 5/5.
    ref = torch.tensor([[0.0], [1.0], [2.0], [3.0], [4.0]])
    gen = torch.tensor([[0.5], [10.0], [2.2], [100.0]])
    pr = precision_recall(gen, ref, k=1, protocol="torch-fidelity-vgg16-k3")
    assert pr.precision == pytest.approx(0.5)
    assert pr.recall == pytest.approx(1.0)
    # Shrink the far generated point's reach: with 100 -> 12 its radius is 2.0 (to 10); 10's radius becomes 2.0
    # too, so reference 4 (distance 6 to 10) is outside every generated ball: recall 4/5.
    gen2 = torch.tensor([[0.5], [10.0], [2.2], [12.0]])
    assert precision_recall(gen2, ref, k=1).recall == pytest.approx(0.8)


def test_pr_boundary_counts_as_inside():
    ref = torch.tensor([[0.0], [1.0]])  # k=1 radius 1 each
    gen = torch.tensor([[2.0], [5.0]])  # 2.0 is exactly on the ball around 1.0
    assert precision_recall(gen, ref, k=1).precision == pytest.approx(0.5)


def test_pr_equals_torch_fidelity_and_is_batch_size_independent():
    from torch_fidelity.metric_prc import calculate_precision_recall_full

    g = torch.Generator().manual_seed(3)
    gen = torch.randn(120, 8, generator=g) * 1.2 + 0.3
    ref = torch.randn(90, 8, generator=g)
    theirs = calculate_precision_recall_full(gen.double(), ref.double(), neighborhood=3, batch_size=10000)
    for batch in (7, 50, 10000):
        ours = precision_recall(gen, ref, k=3, batch_size=batch)
        # torch-fidelity averages in float32: agreement to float32 resolution means the same counts.
        assert (ours.precision, ours.recall) == pytest.approx(theirs, abs=1e-6)
    assert 0.0 < theirs[0] < 1.0 and 0.0 < theirs[1] < 1.0  # a non-trivial case


def test_pr_needs_more_points_than_k():
    with pytest.raises(ValueError, match="k=3"):
        precision_recall(torch.randn(3, 2), torch.randn(10, 2), k=3)


# ---------------------------------------------------------------- Inception score
def test_is_closed_forms():
    # Uniform predictions: IS = 1. Confident, distinct, balanced predictions over C classes: IS = C.
    assert inception_score(torch.zeros(20, 10), splits=2).value == pytest.approx(1.0)
    c = 8
    logits = torch.full((4 * c, c), -1e4, dtype=torch.float64)
    logits[torch.arange(4 * c), torch.arange(4 * c) % c] = 0.0
    score = inception_score(logits, protocol="adm", split_size=c)
    assert score.value == pytest.approx(c, rel=1e-9) and score.std == pytest.approx(0.0, abs=1e-9)
    assert score.protocol == "adm-splits-of-8"


def test_is_equals_torch_fidelity():
    from torch_fidelity.metric_isc import isc_features_to_metric

    logits = torch.randn(103, 20, generator=torch.Generator().manual_seed(4), dtype=torch.float64) * 3
    theirs = isc_features_to_metric(logits, splits=5, shuffle=True, rng_seed=2020)
    ours = inception_score(logits, splits=5, seed=2020)
    assert ours.value == pytest.approx(theirs["inception_score_mean"], rel=1e-10)
    assert ours.std == pytest.approx(theirs["inception_score_std"], rel=1e-8)
    assert ours.protocol == "torch-fidelity-5-splits"


# ---------------------------------------------------------------- KID
def test_mmd2_unbiased_hand_computation():
    # d = 1, kernel (xy + 1)^3. x = {0, 1}, y = {0, 2}.
    x, y = np.array([[0.0], [1.0]]), np.array([[0.0], [2.0]])
    k = lambda a, b: (a * b + 1) ** 3  # noqa: E731
    off_xx = 2 * k(0, 1) / 2
    off_yy = 2 * k(0, 2) / 2
    xy = (k(0, 0) + k(0, 2) + k(1, 0) + k(1, 2)) / 4
    assert mmd2_unbiased(x, y) == pytest.approx(off_xx + off_yy - 2 * xy)


def test_kid_equals_torch_fidelity():
    from torch_fidelity.metric_kid import kid_features_to_metric

    g = torch.Generator().manual_seed(5)
    a = torch.randn(60, 6, generator=g, dtype=torch.float64) + 0.5
    b = torch.randn(50, 6, generator=g, dtype=torch.float64)
    theirs = kid_features_to_metric(a, b, kid_subsets=7, kid_subset_size=20, rng_seed=11, verbose=False)
    ours = kernel_inception_distance(a, b, subsets=7, subset_size=20, seed=11)
    assert ours.value == pytest.approx(theirs["kernel_inception_distance_mean"], rel=1e-10)
    assert ours.std == pytest.approx(theirs["kernel_inception_distance_std"], rel=1e-8)


def test_kid_subset_too_large_names_the_key():
    with pytest.raises(ValueError, match="kid_subset_size"):
        kernel_inception_distance(np.zeros((5, 2)), np.zeros((50, 2)), subsets=1, subset_size=10)


# ---------------------------------------------------------------- bootstrap and FID_inf
def test_weighted_stats_equal_explicit_resample():
    rng = np.random.default_rng(6)
    x = rng.normal(size=(25, 4))
    counts = rng.multinomial(25, np.full(25, 1 / 25)).astype(float)
    centre = x.mean(0)
    mu, sigma = _weighted_stats(x - centre, centre, counts)
    explicit = np.repeat(x, counts.astype(int), axis=0)
    np.testing.assert_allclose(mu, explicit.mean(0), rtol=1e-12)
    np.testing.assert_allclose(sigma, np.cov(explicit, rowvar=False), rtol=1e-10, atol=1e-14)


def test_bootstrap_interval_is_seeded_and_brackets_replicates():
    rng = np.random.default_rng(7)
    feats = rng.normal(size=(300, 5)) + 0.2
    ref_mu, ref_sigma = np.zeros(5), np.eye(5)
    a = bootstrap_fid(feats, ref_mu, ref_sigma, replicates=40, seed=1)
    b = bootstrap_fid(feats, ref_mu, ref_sigma, replicates=40, seed=1)
    np.testing.assert_array_equal(a.values, b.values)
    mu_all, sigma_all = feature_statistics(feats)
    assert a.point == pytest.approx(frechet_distance(mu_all, sigma_all, ref_mu, ref_sigma), rel=1e-8)
    # The percentile interval of the replicates, re-centred on the point estimate.
    q_low, median, q_high = np.quantile(a.values, [0.025, 0.5, 0.975])
    assert a.shift == pytest.approx(median - a.point)
    assert (a.low, a.high) == pytest.approx((q_low - a.shift, q_high - a.shift))
    assert a.low < a.point < a.high
    # Replicate 0 equals FID of the explicitly resampled rows (same seeded draw).
    counts = np.random.default_rng(1).multinomial(300, np.full(300, 1 / 300))
    explicit = np.repeat(feats, counts, axis=0)
    mu, sigma = feature_statistics(explicit)
    assert a.values[0] == pytest.approx(frechet_distance(mu, sigma, ref_mu, ref_sigma), rel=1e-8)


def test_bootstrap_low_rank_route_equals_explicit_resample():
    # Fewer samples (6) than dimensions (9): the replicates take the low-rank route.
    rng = np.random.default_rng(9)
    feats = rng.normal(size=(6, 9))
    ref_mu, ref_sigma = feature_statistics(rng.normal(size=(50, 9)))
    result = bootstrap_fid(feats, ref_mu, ref_sigma, replicates=3, seed=2)
    counts = np.random.default_rng(2).multinomial(6, np.full(6, 1 / 6))
    mu, sigma = feature_statistics(np.repeat(feats, counts, axis=0))
    assert result.values[0] == pytest.approx(frechet_distance(mu, sigma, ref_mu, ref_sigma), rel=1e-7)


def test_fid_infinity_removes_the_finite_sample_bias():
    # Samples from N(delta, I) against the reference N(0, I): the true FID is |delta|^2 = 1, and FID(N) is
    # biased upwards by about c/N. The extrapolation must land near 1 and much nearer than FID at small N.
    rng = np.random.default_rng(8)
    d = 10
    delta = np.zeros(d)
    delta[0] = 1.0
    feats = rng.normal(size=(4000, d)) + delta
    result = fid_infinity(feats, np.zeros(d), np.eye(d), ns=[250, 500, 1000, 2000, 4000], seed=0)
    assert result.fids[0] > result.fids[-1] > 1.0
    assert result.slope > 0
    assert abs(result.fid_infinity - 1.0) < 0.1
    assert abs(result.fid_infinity - 1.0) < 0.5 * abs(result.fids[0] - 1.0)


# ---------------------------------------------------------------- config
def test_config_unknown_key_is_named():
    with pytest.raises(ConfigError, match="pr_kk"):
        validate_metrics_cfg({"pr_kk": 3})


def test_config_bad_enum_and_standin_without_permission():
    with pytest.raises(ConfigError, match="pr_protocol"):
        validate_metrics_cfg({"pr_protocol": "adm"})
    with pytest.raises(ConfigError, match="allow_standin"):
        validate_metrics_cfg({"feature_extractor": "standin"})


def test_experiment_metric_configs_validate(repo_root):
    from omegaconf import OmegaConf

    names = sorted(p.stem for p in (repo_root / "experiments" / "metrics").glob("*.yaml"))
    assert {"paper", "smoke", "autoencoder"} <= set(names)
    def load(name):  # group files may interpolate root keys (runs_root), so load them inside a root
        root = OmegaConf.create({"runs_root": "runs", "metrics": OmegaConf.load(repo_root / "experiments" / "metrics" / f"{name}.yaml")})
        return root.metrics

    for name in names:
        cfg = validate_metrics_cfg(load(name))
        assert cfg.allow_standin == (name == "smoke")
        assert cfg.reference_cache_dir == "runs/reference_stats"
    paper = validate_metrics_cfg(load("paper"))
    assert (paper.pr_k, paper.pr_reference_images, paper.pr_protocol) == (3, 10000, "adm-inception-k3")
