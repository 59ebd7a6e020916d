"""The release's BSR degradations (replication/data/bsr.py): shapes, determinism, and each building block against
the parameters the release gives it."""
from __future__ import annotations

import random

import numpy as np
import pytest

from replication.data import bsr


def _textured(h: int, w: int, seed: int = 0) -> np.ndarray:
    rng = np.random.default_rng(seed)
    y, x = np.mgrid[0:h, 0:w]
    base = 127 + 60 * np.sin(x / 3.0)[..., None] * np.cos(y / 5.0)[..., None] * np.array([1.0, 0.7, 0.4])
    return np.clip(base + rng.normal(0, 20, (h, w, 3)), 0, 255).astype(np.uint8)


def _smooth(size: int = 64) -> np.ndarray:
    y, x = np.mgrid[0:size, 0:size] / (size - 1.0)
    return np.stack([0.2 + 0.6 * x, 0.3 + 0.4 * y, 0.5 + 0.3 * x * y], -1).astype(np.float32)


def _moments(k: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """Centroid (x, y) and covariance in (x = column, y = row) pixel coordinates of a kernel of sum 1."""
    y, x = np.mgrid[0:k.shape[0], 0:k.shape[1]].astype(float)
    mx, my = (k * x).sum(), (k * y).sum()
    dx, dy = x - mx, y - my
    cov = np.array([[(k * dx * dx).sum(), (k * dx * dy).sum()], [(k * dx * dy).sum(), (k * dy * dy).sum()]])
    return np.array([mx, my]), cov


# ---------------------------------------------------------------- the whole degradation

@pytest.mark.parametrize("light", [False, True])
@pytest.mark.parametrize("sf", [2, 4])
def test_output_is_uint8_rgb_of_one_sf_th_the_size(sf: int, light: bool) -> None:
    hr = _textured(64, 48)
    for seed in range(6):  # several seeds, so both the halving-first and the direct path of x4 run
        lr = bsr.bsr_degrade(hr, sf, np.random.default_rng(seed), light)
        assert lr.dtype == np.uint8 and lr.shape == (64 // sf, 48 // sf, 3)


@pytest.mark.parametrize("light", [False, True])
def test_same_seed_same_image_other_seed_other_image(light: bool) -> None:
    hr = _textured(64, 64)
    random.seed(1)
    np.random.seed(1)
    a = bsr.bsr_degrade(hr, 4, np.random.default_rng(123), light)
    random.seed(2)  # the global generators play no part
    np.random.seed(2)
    b = bsr.bsr_degrade(hr, 4, np.random.default_rng(123), light)
    assert np.array_equal(a, b)
    others = [bsr.bsr_degrade(hr, 4, np.random.default_rng(s), light) for s in (124, 125, 126)]
    assert all(not np.array_equal(a, o) for o in others)


def test_a_side_not_divisible_by_sf_is_cropped_first() -> None:
    hr = _textured(67, 70)
    lr = bsr.bsr_degrade(hr, 4, np.random.default_rng(5), False)
    assert lr.shape == (16, 17, 3)
    # the top-left 64 x 68 part, as the release's mod crop keeps
    assert np.array_equal(lr, bsr.bsr_degrade(hr[:64, :68], 4, np.random.default_rng(5), False))


@pytest.mark.parametrize("light, max_mean_shift, max_std", [(False, 8.0, 26.0), (True, 3.0, 3.0)])
def test_flat_grey_stays_near_flat(light: bool, max_mean_shift: float, max_std: float) -> None:
    grey = np.full((64, 64, 3), 128, np.uint8)
    stds = []
    for seed in range(30):
        lr = bsr.bsr_degrade(grey, 4, np.random.default_rng(seed), light).astype(float)
        assert np.abs(lr.mean(axis=(0, 1)) - 128).max() <= max_mean_shift
        stds.append(lr.std(axis=(0, 1)).max())
    # blur and resizes keep a flat image flat; what remains is the noise step's level (<= 25 / 2 grey levels)
    assert max(stds) <= max_std
    textured_std = _textured(64, 64).astype(float).std()
    assert np.median(stds) < textured_std / 5


@pytest.mark.parametrize("bad, match", [
    (np.zeros((32, 32, 3), np.float32), "uint8"),
    (np.zeros((32, 32), np.uint8), "uint8 HWC"),
    (np.zeros((32, 32, 4), np.uint8), "3 channels"),
    (np.zeros((3, 32, 32), np.uint8), "3 channels"),
])
def test_refuses_what_is_not_uint8_hwc_rgb(bad: np.ndarray, match: str) -> None:
    with pytest.raises(bsr.BSRError, match=match):
        bsr.bsr_degrade(bad, 4, np.random.default_rng(0), False)


def test_refuses_unsupported_scale_factors_and_tiny_images() -> None:
    hr = _textured(48, 48)
    for sf in (1, 3, 8):
        with pytest.raises(bsr.BSRError, match=f"scale factor {sf}"):
            bsr.bsr_degrade(hr, sf, np.random.default_rng(0), False)
    with pytest.raises(bsr.BSRError, match="too small"):
        bsr.bsr_degrade(hr[:7], 4, np.random.default_rng(0), False)
    assert bsr.bsr_degrade(hr[:8, :8], 4, np.random.default_rng(0), False).shape == (2, 2, 3)


# ---------------------------------------------------------------- blur kernels

@pytest.mark.parametrize("theta, l1, l2", [(0.0, 6.0, 2.0), (0.6, 6.0, 2.0), (2.2, 3.0, 9.0), (1.0, 4.0, 4.0)])
def test_anisotropic_kernel_has_the_requested_covariance(theta: float, l1: float, l2: float) -> None:
    k = bsr.anisotropic_gaussian(41, theta, l1, l2)
    assert k.shape == (41, 41) and k.sum() == pytest.approx(1.0, abs=1e-12)
    centre, cov = _moments(k)
    v = np.array([np.cos(theta), np.sin(theta)])  # l1 is the variance along (cos, sin) in (x, y)
    w = np.array([np.sin(theta), -np.cos(theta)])
    expected = l1 * np.outer(v, v) + l2 * np.outer(w, w)
    assert np.allclose(centre, [20.0, 20.0], atol=1e-9)
    assert np.allclose(cov, expected, atol=1e-6)


def test_isotropic_kernel_is_matlab_fspecial() -> None:
    k = bsr.fspecial_gaussian(25, 1.5)
    centre, cov = _moments(k)
    assert k.sum() == pytest.approx(1.0, abs=1e-12)
    assert np.allclose(centre, [12.0, 12.0]) and np.allclose(cov, np.diag([2.25, 2.25]), atol=1e-6)
    assert (bsr.fspecial_gaussian(25, 0.3) == 0).any()  # MATLAB's eps cut-off of the far taps
    # an even side sits between pixels; a vanishing sigma gives its limit, not the release's all-zero kernel
    tiny = bsr.fspecial_gaussian(6, 0.01)
    assert tiny.sum() == pytest.approx(1.0) and np.allclose(tiny[2:4, 2:4], 0.25)


@pytest.mark.parametrize("sf", [2, 4])
@pytest.mark.parametrize("light", [False, True])
def test_random_kernels_are_normalised(sf: int, light: bool) -> None:
    for seed in range(60):
        k = bsr.random_blur_kernel(sf, np.random.default_rng(seed), light)
        assert np.isfinite(k).all() and (k >= 0).all()
        assert k.sum() == pytest.approx(1.0, abs=1e-12)


def test_light_blur_is_narrower() -> None:
    def draws(light: bool) -> tuple[list[int], list[float]]:
        sizes, spreads = [], []
        for seed in range(150):
            k = bsr.random_blur_kernel(4, np.random.default_rng(seed), light)
            sizes.append(k.shape[0])
            if k.shape[0] % 2:
                # an even side has no centre tap: with a nearly singular covariance its mass moves to the taps
                # nearest the long axis, wherever they are (the release's kernel does the same)
                spreads.append(float(np.linalg.eigvalsh(_moments(k)[1]).max()))
        return sizes, spreads

    full_sizes, full_spreads = draws(False)
    light_sizes, light_spreads = draws(True)
    # full: sides 7..25 (odd), variance up to 4 + sf = 8; light: sides 5..14, variance up to (4 + sf) / 4 = 2
    assert set(full_sizes) <= set(range(7, 26, 2)) and max(full_sizes) > 14
    assert set(light_sizes) <= set(range(5, 15)) and any(s % 2 == 0 for s in light_sizes)
    assert max(light_spreads) <= 2.0 * 1.01
    assert max(full_spreads) > 4.0


def test_add_blur_convolves_with_mirrored_borders() -> None:
    img = np.zeros((41, 41, 3), np.float32)
    img[20, 20] = 1.0
    out = bsr.add_blur(img, 4, np.random.default_rng(3), False)
    k = bsr.random_blur_kernel(4, np.random.default_rng(3), False)
    r = k.shape[0] // 2
    assert out.dtype == np.float32
    assert np.allclose(out[20 - r:20 + r + 1, 20 - r:20 + r + 1, 1], k[::-1, ::-1], atol=1e-7)
    flat = np.full((20, 20, 3), 0.3, np.float32)
    assert np.allclose(bsr.add_blur(flat, 4, np.random.default_rng(4), False), 0.3, atol=1e-6)


@pytest.mark.parametrize("sf", [2, 4])
def test_shift_pixel_moves_the_kernel_up_left_by_half_sf_minus_one(sf: int) -> None:
    k = bsr.fspecial_gaussian(25, 1.2)
    shifted = bsr.shift_pixel(k, sf)
    assert np.allclose(_moments(shifted / shifted.sum())[0], 12.0 - (sf - 1) / 2, atol=1e-9)


# ---------------------------------------------------------------- resizes

def test_imresize_np_is_matlab_bicubic_with_antialiasing() -> None:
    ramp = np.tile(np.arange(1, 41, dtype=np.float32)[None, :, None], (9, 1, 3))
    out = bsr.imresize_np(ramp, 0.5, True)
    assert out.dtype == np.float32 and out.shape == (5, 20, 3)
    # MATLAB's mapping: output pixel i (1-based) sits at input 2 i - 0.5; a ramp stays a ramp away from borders
    assert np.allclose(out[2, 4:16, 0], 2 * np.arange(5, 17) - 0.5, atol=1e-4)
    flat = np.full((12, 10, 3), 0.4, np.float32)
    assert np.allclose(bsr.imresize_np(flat, 0.5, True), 0.4, atol=1e-6)
    # antialiasing: stripes of period 3 (1.5 output pixels, above the new Nyquist rate) are damped, not aliased
    stripes = np.tile(np.array([0.0, 0.0, 1.0] * 12, np.float32)[None, :, None], (8, 1, 3))
    assert bsr.imresize_np(stripes, 0.5, True)[:, 4:-4].std() < 0.1
    assert bsr.imresize_np(stripes, 0.5, False)[:, 4:-4].std() > 0.25


def test_random_downsample_stays_in_range() -> None:
    img = bsr.uint2single(_textured(48, 48))
    shapes = set()
    for seed in range(20):
        out = bsr.random_downsample(img, 4, np.random.default_rng(seed), 0.75)
        assert out.dtype == np.float32 and out.min() >= 0.0 and out.max() <= 1.0
        shapes.add(out.shape)
        assert 48 / 8 <= out.shape[0] <= 48 and out.shape[:2] == (out.shape[1], out.shape[1])
    assert (12, 12, 3) in shapes  # the blur + [::sf, ::sf] branch


def test_shuffle_order_keeps_the_random_downscale_before_the_final_resize() -> None:
    firsts = set()
    for seed in range(200):
        order = bsr.shuffle_order(np.random.default_rng(seed))
        assert sorted(order) == list(range(7)) and order.index(2) < order.index(3)
        firsts.add(order[0])
    assert firsts == {0, 1, 2, 4, 5, 6}


# ---------------------------------------------------------------- noise and JPEG

@pytest.mark.parametrize("variant", [bsr.BSRGAN, bsr.BSRGAN_LIGHT])
def test_gaussian_noise_level_lies_in_the_release_range(variant: bsr.BSRVariant) -> None:
    low, high = variant.noise_levels
    grey = np.full((128, 128, 3), 0.5, np.float32)
    grey_levels = []
    for seed in range(40):
        out = bsr.add_gaussian_noise(grey, np.random.default_rng(seed), low, high)
        assert out.dtype == np.float32
        noise = (out - 0.5) * 255
        std = noise.std(axis=(0, 1))
        assert std.max() <= high * 1.03  # every branch: a level <= noise_level2 grey levels
        assert np.abs(noise.mean(axis=(0, 1))).max() < 0.5
        if np.array_equal(noise[..., 0], noise[..., 1]):  # the grey branch: one draw for all channels
            grey_levels.append(std[0])
            assert low * 0.97 <= std[0]
    assert grey_levels  # p = 0.4 per draw


def test_gaussian_noise_of_the_light_variant_is_weaker() -> None:
    grey = np.full((64, 64, 3), 0.5, np.float32)
    full = [bsr.add_gaussian_noise(grey, np.random.default_rng(s), *bsr.BSRGAN.noise_levels).std() for s in range(30)]
    light = [bsr.add_gaussian_noise(grey, np.random.default_rng(s), *bsr.BSRGAN_LIGHT.noise_levels).std()
             for s in range(30)]
    assert max(light) * 255 <= 2 * 1.05 < max(full) * 255


def test_jpeg_on_a_smooth_image_changes_little() -> None:
    smooth = _smooth()
    for seed in range(20):
        out = bsr.add_jpeg_noise(smooth, np.random.default_rng(seed), bsr.BSRGAN.jpeg_quality)
        assert out.dtype == np.float32 and out.shape == smooth.shape
        diff = np.abs(out - smooth) * 255
        assert diff.mean() < 3.0 and diff.max() < 20.0


def test_jpeg_removes_high_frequencies_of_a_noisy_image() -> None:
    def hf_energy(im: np.ndarray) -> float:
        return float(((im[1:] - im[:-1]) ** 2).mean() + ((im[:, 1:] - im[:, :-1]) ** 2).mean())

    noisy = np.clip(_smooth() + np.random.default_rng(0).normal(0, 10 / 255, (64, 64, 3)), 0, 1).astype(np.float32)
    for seed in range(10):
        out = bsr.add_jpeg_noise(noisy, np.random.default_rng(seed), bsr.BSRGAN.jpeg_quality)
        assert hf_energy(out) < 0.75 * hf_energy(noisy)


def test_jpeg_quality_ranges_of_the_two_variants() -> None:
    img = np.clip(_smooth(32) + np.random.default_rng(1).normal(0, 8 / 255, (32, 32, 3)), 0, 1).astype(np.float32)
    by_quality = {q: bsr.add_jpeg_noise(img, np.random.default_rng(0), (q, q)) for q in range(25, 101)}

    def qualities(out: np.ndarray) -> set[int]:
        return {q for q, ref in by_quality.items() if np.array_equal(ref, out)}

    full = [qualities(bsr.add_jpeg_noise(img, np.random.default_rng(s), bsr.BSRGAN.jpeg_quality)) for s in range(30)]
    light = [qualities(bsr.add_jpeg_noise(img, np.random.default_rng(s), bsr.BSRGAN_LIGHT.jpeg_quality))
             for s in range(30)]
    assert all(qs & set(range(30, 96)) for qs in full)
    assert any(max(qs) < 80 for qs in full)
    assert all(qs & set(range(80, 96)) for qs in light)


def test_uint_single_conversions_round_as_the_release() -> None:
    img = np.arange(256, dtype=np.uint8).reshape(16, 16, 1)
    single = bsr.uint2single(img)
    assert single.dtype == np.float32 and np.array_equal(bsr.single2uint(single), img)
    assert np.array_equal(bsr.single2uint(np.array([-0.2, 0.5 / 255, 1.5 / 255, 1.3], np.float32)), [0, 0, 2, 255])
