"""Extractors (stand-in, weights handling), reference statistics, streaming/PNG equality, evaluate_samples."""
from __future__ import annotations


import numpy as np
import pytest
import torch

from replication.metrics.config import validate_metrics_cfg
from replication.metrics.evaluate import evaluate_samples
from replication.metrics.features import (
    LOGITS_UNBIASED, POOL, STANDIN_LABEL, StandinNotAllowedError, WeightsNotFoundError, build_extractor,
    extract_batched,
)
from replication.metrics.fid import feature_statistics, frechet_distance
from replication.metrics.reference import (
    ReferenceMismatchError, ReferenceStats, check_compatible, compute_reference_stats, load_or_compute_reference,
    reference_cache_path,
)
from replication.metrics.streaming import FeatureAccumulator, from_png_dir, iter_nhwc_shards
from replication.utils.io import ArtifactError


pytestmark = pytest.mark.usefixtures("no_network")  # tests/conftest.py

@pytest.fixture(scope="module")
def standin():
    return build_extractor("standin", allow_standin=True)


def _images(n, seed, size=24):
    return torch.randint(0, 256, (n, 3, size, size), dtype=torch.uint8, generator=torch.Generator().manual_seed(seed))


# ---------------------------------------------------------------- extractors and weights
def test_standin_refused_unless_allowed():
    with pytest.raises(StandinNotAllowedError, match="allow_standin"):
        build_extractor("standin")


def test_standin_is_labelled_deterministic_and_batch_size_independent(standin):
    assert standin.is_standin and "STAND-IN" in standin.name and standin.name == STANDIN_LABEL
    images = _images(9, 0)
    whole = standin(images)
    assert whole[POOL].shape == (9, 2048) and whole[LOGITS_UNBIASED].shape == (9, 1008)
    split = extract_batched(standin, images, batch_size=4)
    again = build_extractor("standin", allow_standin=True)(images)
    for key in (POOL, LOGITS_UNBIASED):
        torch.testing.assert_close(split[key], whole[key], rtol=1e-5, atol=1e-6)
        torch.testing.assert_close(again[key], whole[key], rtol=0, atol=0)
    assert whole[POOL].std(0).mean() > 0  # features vary between images


@pytest.mark.parametrize("name,key,file_name", [
    ("inception-v3-compat", "metrics.inception_weights", "weights-inception-2015-12-05-6726825d.pth"),
    ("vgg16", "metrics.vgg16_weights", "vgg16-397923af.pth"),
])
def test_missing_weights_error_says_how_to_get_them(tmp_path, name, key, file_name):
    for path in (None, tmp_path / "absent.pth"):
        with pytest.raises(WeightsNotFoundError) as info:
            build_extractor(name, path)
        message = str(info.value)
        assert key in message and file_name in message and "https://" in message and "never downloads" in message
        if path is not None:
            assert str(path) in message


def test_weights_needing_code_unpickling_are_refused(tmp_path):
    path = tmp_path / "weights-inception-2015-12-05-6726825d.pth"
    torch.save({"x": print}, path)  # a reference to a callable: needs full unpickling
    with pytest.raises(ArtifactError, match="tensors-only"):
        build_extractor("inception-v3-compat", path)


def test_unknown_extractor_name():
    with pytest.raises(ValueError, match="inception-v3-compat"):
        build_extractor("inception")


# ---------------------------------------------------------------- reference statistics
def test_reference_stats_equal_direct_computation_and_ignore_batching(standin):
    images = _images(23, 1)
    feats = extract_batched(standin, images, batch_size=23)[POOL]
    mu, sigma = feature_statistics(feats)
    a = compute_reference_stats(images.split(5), standin, "d", "train", "hash-a", pr_count=10, seed=3)
    b = compute_reference_stats(images.split(9), standin, "d", "train", "hash-a", pr_count=10, seed=3)
    for stats in (a, b):
        np.testing.assert_allclose(stats.mu, mu, rtol=1e-5, atol=1e-7)
        np.testing.assert_allclose(stats.sigma, sigma, rtol=1e-4, atol=1e-8)
        assert stats.num_images == 23 and stats.pr_features.shape == (10, 2048)
    np.testing.assert_allclose(a.pr_features, b.pr_features, rtol=1e-5, atol=1e-6)
    # The P/R rows are 10 distinct rows of the full feature matrix.
    dists = torch.cdist(torch.from_numpy(a.pr_features).double(), feats.double())
    assert (dists.min(dim=1).values < 1e-3).all()
    assert len(set(dists.argmin(dim=1).tolist())) == 10
    # Another seed picks another subset.
    c = compute_reference_stats(images.split(5), standin, "d", "train", "hash-a", pr_count=10, seed=4)
    assert not np.allclose(np.sort(a.pr_features[:, 0]), np.sort(c.pr_features[:, 0]))


def test_reference_npz_round_trip_and_hash_refusal(tmp_path, standin):
    stats = compute_reference_stats([_images(6, 2)], standin, "lsun_churches", "train", "abc123", pr_count=4)
    path = stats.save(tmp_path / "ref.npz")
    assert path.is_file() and not list(tmp_path.glob(".*tmp"))
    loaded = ReferenceStats.load(path)
    np.testing.assert_array_equal(loaded.mu, stats.mu)
    np.testing.assert_array_equal(loaded.sigma, stats.sigma)
    np.testing.assert_array_equal(loaded.pr_features, stats.pr_features)
    assert (loaded.dataset, loaded.split, loaded.preprocessing_hash, loaded.extractor, loaded.num_images) == (
        "lsun_churches", "train", "abc123", STANDIN_LABEL, 6)
    check_compatible(loaded, "abc123", STANDIN_LABEL)
    with pytest.raises(ReferenceMismatchError) as info:
        check_compatible(loaded, "def456", STANDIN_LABEL)
    assert "abc123" in str(info.value) and "def456" in str(info.value)
    with pytest.raises(ReferenceMismatchError, match="extractor"):
        check_compatible(loaded, "abc123", "inception-v3-compat")


def test_reference_load_rejects_other_files(tmp_path):
    bad = tmp_path / "bad.npz"
    np.savez(bad, mu=np.zeros(3))
    with pytest.raises(ArtifactError, match="lacks"):
        ReferenceStats.load(bad)
    with pytest.raises(ArtifactError, match="does not exist"):
        ReferenceStats.load(tmp_path / "none.npz")


def test_reference_cache_is_keyed_and_reused(tmp_path, standin):
    calls = []

    def batches():
        calls.append(1)
        return iter([_images(5, 3)])

    first = load_or_compute_reference(tmp_path, "ffhq", "train", "h1", standin, batches, pr_count=3)
    second = load_or_compute_reference(tmp_path, "ffhq", "train", "h1", standin, batches, pr_count=3)
    assert len(calls) == 1
    np.testing.assert_array_equal(first.sigma, second.sigma)
    p1 = reference_cache_path(tmp_path, "ffhq", "train", "h1", standin.name)
    p2 = reference_cache_path(tmp_path, "ffhq", "train", "h2", standin.name)
    assert p1.is_file() and p1 != p2
    load_or_compute_reference(tmp_path, "ffhq", "train", "h2", standin, batches, pr_count=3)
    assert len(calls) == 2


# ---------------------------------------------------------------- streaming
def test_streaming_equals_png_round_trip(tmp_path, standin):
    images = _images(7, 4)
    acc = FeatureAccumulator(standin, png_dir=tmp_path / "png")
    acc.add(images[:3])
    acc.add(images[3:])
    streamed = acc.result()
    assert sorted(p.name for p in (tmp_path / "png").iterdir()) == [f"{i:06d}.png" for i in range(7)]
    read_back = from_png_dir(tmp_path / "png", standin, batch_size=2)
    for key in streamed:
        torch.testing.assert_close(read_back[key], streamed[key], rtol=1e-5, atol=1e-6)


def test_nhwc_shards_reader(tmp_path):
    images = _images(5, 5)
    np.save(tmp_path / "shard_00000.npy", images[:3].permute(0, 2, 3, 1).numpy())
    np.save(tmp_path / "shard_00001.npy", images[3:].permute(0, 2, 3, 1).numpy())
    got = torch.cat(list(iter_nhwc_shards(sorted(tmp_path.glob("*.npy")), batch_size=2)))
    assert torch.equal(got, images)


def test_accumulator_rejects_float_images(standin):
    with pytest.raises(ValueError, match="uint8"):
        FeatureAccumulator(standin).add(torch.zeros(2, 3, 8, 8))


# ---------------------------------------------------------------- evaluate_samples
class _FakeStandin:
    """Stands for a stand-in extractor: evaluate_samples only reads these attributes."""

    name = STANDIN_LABEL
    is_standin = True
    weights = None


def test_evaluate_samples_smoke_block(repo_root):
    # Low-dimensional synthetic features keep the linear algebra fast; 2048-d works the same way.
    from omegaconf import OmegaConf

    group = OmegaConf.load(repo_root / "experiments" / "metrics" / "smoke.yaml")
    cfg = validate_metrics_cfg(OmegaConf.create({"runs_root": "runs", "metrics": group}).metrics)
    g = torch.Generator().manual_seed(6)
    ref_feats = torch.randn(40, 12, generator=g)
    feats = {POOL: torch.randn(36, 12, generator=g) + 0.3, LOGITS_UNBIASED: torch.randn(36, 20, generator=g)}
    mu_r, sigma_r = feature_statistics(ref_feats)
    reference = ReferenceStats(mu_r, sigma_r, ref_feats[:32].numpy(), "builtin", "train", "hh", STANDIN_LABEL, 40)
    out = evaluate_samples(feats, reference, cfg, _FakeStandin(), "hh")
    m = out["metrics"]
    mu, sigma = feature_statistics(feats[POOL])
    assert m["FID"]["value"] == pytest.approx(frechet_distance(mu, sigma, mu_r, sigma_r))
    assert m["FID"]["n_samples"] == 36 and m["FID"]["ci95"][0] < m["FID"]["ci95"][1]
    assert m["precision"]["protocol"] == "adm-inception-k3" and 0 <= m["precision"]["value"] <= 1
    assert {"IS", "KID", "recall"} <= set(m) and m["IS"]["protocol"] == "torch-fidelity-2-splits"
    assert any("stand-in" in r for r in out["not_comparable_reasons"])
    assert any("32 reference images" in r for r in out["not_comparable_reasons"])
    assert any("N=36" in note for note in out["notes"])
    assert out["fid_extrapolated_infinity"] is not None and len(out["fid_infinity_curve"]) >= 2
    assert out["protocol"]["preprocessing_hash"] == "hh" and out["protocol"]["reference_images"] == 40
    with pytest.raises(ReferenceMismatchError, match="other-hash"):
        evaluate_samples(feats, reference, cfg, _FakeStandin(), "other-hash")


def test_evaluate_samples_vgg16_precision_recall_protocol():
    from replication.metrics.precision_recall import precision_recall

    class Inception:
        name, is_standin, weights = "inception-v3-compat", False, None

    class Vgg:
        name, is_standin, weights = "vgg16", False, None

    g = torch.Generator().manual_seed(9)
    ref_pool, ref_vgg = torch.randn(30, 6, generator=g), torch.randn(30, 10, generator=g)
    feats, vgg_feats = {POOL: torch.randn(25, 6, generator=g)}, {POOL: torch.randn(25, 10, generator=g) + 0.5}
    ref = ReferenceStats(*feature_statistics(ref_pool), ref_pool.numpy(), "d", "train", "h", "inception-v3-compat", 30)
    vgg_ref = ReferenceStats(*feature_statistics(ref_vgg), ref_vgg.numpy(), "d", "train", "h", "vgg16", 30)
    cfg = validate_metrics_cfg({"pr_protocol": "torch-fidelity-vgg16-k3", "pr_reference_images": 30,
                                "paper_num_samples": 25})
    with pytest.raises(ValueError, match="pr_sample_feats"):
        evaluate_samples(feats, ref, cfg, Inception(), "h")
    out = evaluate_samples(feats, ref, cfg, Inception(), "h", pr_sample_feats=vgg_feats, pr_reference=vgg_ref,
                           pr_extractor=Vgg())
    expected = precision_recall(vgg_feats[POOL], ref_vgg, k=3)
    assert out["metrics"]["precision"]["value"] == expected.precision
    assert out["metrics"]["recall"]["value"] == expected.recall
    assert out["metrics"]["recall"]["protocol"] == "torch-fidelity-vgg16-k3"
    assert out["not_comparable_reasons"] == [] and out["metrics"]["FID"]["ci95"] is None

@pytest.mark.slow
def test_vgg16_extractor_from_local_file(tmp_path):
    # Slow: a full random torchvision VGG16 (138M parameters) is built and saved.
    import torchvision

    torch.manual_seed(0)
    path = tmp_path / "vgg16-random.pth"
    torch.save(torchvision.models.vgg16(weights=None).state_dict(), path)
    extractor = build_extractor("vgg16", path)
    assert extractor.name == "vgg16" and not extractor.weights.official
    images = _images(3, 8)
    feats = extractor(images)
    assert set(feats) == {POOL} and feats[POOL].shape == (3, 4096) and (feats[POOL] >= 0).all()
    split = extract_batched(extractor, images, batch_size=2)
    torch.testing.assert_close(split[POOL], feats[POOL], rtol=1e-4, atol=1e-5)


def test_cached_reference_of_another_size_is_recomputed_not_reused(tmp_path, standin):
    """A quick run on dataset.max_images caches statistics under the same key as the full run: the image count
    and the precision/recall subset size tell them apart, so the full run does not get the quick run's numbers."""
    calls = []

    def batches(n):
        def make():
            calls.append(n)
            return iter([_images(n, 3)])
        return make

    small = load_or_compute_reference(tmp_path, "ffhq", "train", "h1", standin, batches(4), pr_count=3,
                                      expected_images=4)
    again = load_or_compute_reference(tmp_path, "ffhq", "train", "h1", standin, batches(4), pr_count=3,
                                      expected_images=4)
    assert calls == [4] and again.num_images == small.num_images == 4  # same set: reused
    full = load_or_compute_reference(tmp_path, "ffhq", "train", "h1", standin, batches(6), pr_count=3,
                                     expected_images=6)
    assert calls == [4, 6] and full.num_images == 6
    more_pr = load_or_compute_reference(tmp_path, "ffhq", "train", "h1", standin, batches(6), pr_count=5,
                                        expected_images=6)
    assert calls == [4, 6, 6] and len(more_pr.pr_features) == 5
