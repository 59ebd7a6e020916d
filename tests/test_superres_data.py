"""Super-resolution pairs: the release's crop, resize and degradations, checked against independent calls."""
from __future__ import annotations

import numpy as np
import pytest
import torchvision.transforms.functional as TF
from PIL import Image

from replication.data.superres import (DEGRADATIONS, DegradationError, SRSpec, degrade, passes_sr3_filter, sr_crop,
                                       sr_pair)


def _noise(h, w, seed=0):
    return np.random.default_rng(seed).integers(0, 256, size=(h, w, 3), dtype=np.uint8)


def _stripes(size=256, period=3.0):
    x = np.arange(size)
    row = (127.5 + 127.5 * np.sin(2 * np.pi * x / period)).round().astype(np.uint8)
    return np.repeat(np.repeat(row[None, :, None], size, axis=0), 3, axis=2)


def test_antialiased_bicubic_removes_a_pattern_that_plain_bicubic_aliases():
    hr = _stripes(256, period=3.0)  # 1/3 cycle per pixel: far above the 64-pixel image's Nyquist limit
    smooth = degrade(hr, "pil_bicubic", 64).astype(np.float64)
    aliased = degrade(hr, "cv_bicubic", 64).astype(np.float64)
    assert smooth.shape == aliased.shape == (64, 64, 3)
    # the anti-aliased filter averages the stripes away; the 4-tap cubic samples them into a false pattern
    assert smooth[..., 0].std() < 6.0
    assert aliased[..., 0].std() > 4 * smooth[..., 0].std()
    assert not np.array_equal(smooth, aliased)


def test_pil_bicubic_is_torchvision_resize_as_the_release_calls_it():
    hr = _noise(256, 256, seed=1)
    ours = degrade(hr, "pil_bicubic", 64)
    theirs = np.asarray(TF.resize(Image.fromarray(hr), 64, interpolation=TF.InterpolationMode.BICUBIC))
    np.testing.assert_array_equal(ours, theirs)


def test_full_centre_crop_is_an_area_resize():
    img = _noise(512, 512, seed=2)
    spec = SRSpec(size=128, factor=4, min_crop_f=1.0, max_crop_f=1.0, random_crop=False)
    hr = sr_crop(img, spec, np.random.default_rng(0))
    # INTER_AREA at an integer factor (4) is the mean of each 4x4 block, rounded
    blocks = img.astype(np.float64).reshape(128, 4, 128, 4, 3).mean(axis=(1, 3))
    assert np.abs(hr.astype(np.float64) - blocks).max() <= 0.5 + 1e-9


def test_random_crop_is_seeded_and_stays_inside():
    img = _noise(300, 420, seed=3)
    spec = SRSpec(size=64, factor=4)
    a = sr_pair(img, spec, np.random.default_rng(7))
    b = sr_pair(img, spec, np.random.default_rng(7))
    c = sr_pair(img, spec, np.random.default_rng(8))
    np.testing.assert_array_equal(a[0], b[0])
    np.testing.assert_array_equal(a[1], b[1])
    assert not np.array_equal(a[0], c[0])
    assert a[0].shape == (64, 64, 3) and a[1].shape == (16, 16, 3) and a[1].dtype == np.uint8


@pytest.mark.parametrize("name", ["bsrgan", "bsrgan_light"])
def test_bsr_options_are_seeded_per_image(name):
    img = _noise(300, 300, seed=4)
    spec = SRSpec(size=64, factor=4, degradation=name)
    a, b = sr_pair(img, spec, np.random.default_rng(1)), sr_pair(img, spec, np.random.default_rng(1))
    np.testing.assert_array_equal(a[1], b[1])
    assert a[1].shape == (16, 16, 3) and a[1].dtype == np.uint8
    with pytest.raises(DegradationError, match="needs an rng"):
        degrade(a[0], name, 16)


def test_spec_refuses_bad_choices():
    with pytest.raises(DegradationError, match="not one of"):
        SRSpec(degradation="bicubic")
    with pytest.raises(DegradationError, match="multiple"):
        SRSpec(size=250, factor=4)
    with pytest.raises(DegradationError, match="min_crop_f"):
        SRSpec(min_crop_f=0.9, max_crop_f=0.5)
    with pytest.raises(DegradationError, match="square uint8"):
        degrade(np.zeros((8, 9, 3), np.uint8), "cv_bicubic", 2)
    assert {"pil_bicubic", "cv_bicubic", "bsrgan", "bsrgan_light"} <= set(DEGRADATIONS)


def test_sr3_filter_is_the_shorter_side():
    assert passes_sr3_filter(256, 1000)
    assert not passes_sr3_filter(255, 1000)
    assert not passes_sr3_filter(1000, 200)
