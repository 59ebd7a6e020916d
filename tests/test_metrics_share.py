"""Reference statistics exported by one group and imported by another land where the evaluate stage looks,
keyed by dataset, split, preprocessing hash and extractor; a damaged file is refused."""
from __future__ import annotations

import numpy as np
import pytest

from replication.metrics.reference import ReferenceStats, reference_cache_path
from replication.metrics.share import export_stats, import_stats, list_cache, main
from replication.utils.io import ArtifactError


def _stats(dataset="lsun_churches", h="abc123"):
    rng = np.random.default_rng(0)
    feats = rng.normal(size=(20, 8))
    return ReferenceStats(mu=feats.mean(0), sigma=np.cov(feats, rowvar=False), pr_features=feats.astype(np.float32),
                          dataset=dataset, split="train", preprocessing_hash=h, extractor="inception-v3-compat",
                          num_images=20)


def test_export_then_import_round_trip(tmp_path):
    group_a, group_b = tmp_path / "a", tmp_path / "b"
    s = _stats()
    s.save(reference_cache_path(group_a, s.dataset, s.split, s.preprocessing_hash, s.extractor))
    _stats("ffhq", "zzz").save(reference_cache_path(group_a, "ffhq", "train", "zzz", "inception-v3-compat"))
    exported = export_stats(group_a, tmp_path / "shared", dataset="lsun_churches")
    assert len(exported) == 1
    target = import_stats(exported[0], group_b)
    assert target == reference_cache_path(group_b, "lsun_churches", "train", "abc123", "inception-v3-compat")
    back = ReferenceStats.load(target)
    np.testing.assert_array_equal(back.mu, s.mu)
    np.testing.assert_array_equal(back.sigma, s.sigma)
    assert [p for p, _ in list_cache(group_b)] == [target]
    with pytest.raises(FileExistsError):
        import_stats(exported[0], group_b)
    assert main(["list", "--cache", str(group_b)]) == 0


def test_damaged_file_is_refused(tmp_path):
    bad = tmp_path / "bad.npz"
    np.savez(bad, mu=np.zeros(3))
    with pytest.raises(ArtifactError, match="lacks the field"):
        import_stats(bad, tmp_path / "cache")
