"""Inpainting scores per masked-area bin, against the same numbers computed on hand-picked subsets."""
from __future__ import annotations

import numpy as np
import pytest

from replication.metrics.binned import binned_scores
from replication.metrics.fid import fid_from_features


def _data(seed=0, n=60, dim=8):
    rng = np.random.default_rng(seed)
    areas = rng.uniform(0.0, 0.5, n)
    real = rng.normal(size=(n, dim))
    fake = real + rng.normal(scale=0.3, size=(n, dim))
    lpips = rng.uniform(0.05, 0.4, n)
    return areas, lpips, fake, real


def test_each_bin_scores_exactly_its_own_images():
    areas, lpips, fake, real = _data()
    out = binned_scores(areas, lpips, fake, real)
    hard = (areas >= 0.4) & (areas < 0.5)
    assert out["bins"]["40-50%"]["count"] == int(hard.sum())
    assert out["bins"]["40-50%"]["FID"] == pytest.approx(fid_from_features(fake[hard], real[hard]))
    assert out["bins"]["40-50%"]["LPIPS"]["value"] == pytest.approx(lpips[hard].mean())
    assert out["all"]["FID"] == pytest.approx(fid_from_features(fake, real))
    assert out["all"]["LPIPS"]["std"] == pytest.approx(lpips.std())
    assert sum(b["count"] for b in out["bins"].values()) == len(areas)


def test_a_bin_whose_images_are_unchanged_has_zero_fid():
    areas, lpips, fake, real = _data(seed=1)
    low = areas < 0.1
    fake[low] = real[low]
    out = binned_scores(areas, lpips, fake, real)
    assert out["bins"]["0-10%"]["FID"] == pytest.approx(0.0, abs=1e-6)
    assert out["bins"]["10-20%"]["FID"] > 0.01


def test_small_and_empty_bins_say_why_they_have_no_fid():
    areas = np.array([0.05, 0.06, 0.45])
    feats = np.random.default_rng(0).normal(size=(3, 4))
    out = binned_scores(areas, None, feats, feats + 0.1)
    assert out["bins"]["40-50%"]["FID"] is None and "at least 2" in out["bins"]["40-50%"]["FID_note"]
    assert out["bins"]["90-100%"]["count"] == 0 and "LPIPS" not in out["bins"]["90-100%"]
    with pytest.raises(ValueError, match="3 mask areas but 2"):
        binned_scores(areas, None, feats[:2], feats)
