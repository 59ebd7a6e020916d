"""The release's BSR degradations for super-resolution (`bsrgan` and `bsrgan_light` of `ImageNetSR`).

The release (CompVis/latent-diffusion, ldm/data/imagenet.py) makes the low-resolution input of an SR pair with
`degradation_fn_bsr` = ldm/modules/image_degradation/bsrgan.py `degradation_bsrgan_variant` or
`degradation_fn_bsr_light` = bsrgan_light.py `degradation_bsrgan_variant`, BSRGAN's degradation model (Zhang et
al. 2021) with the camera-ISP step switched off. One image goes through:

1. uint8 -> float32 in [0, 1] (`uint2single`), cropped to a multiple of sf (`mod_crop`);
2. for sf 4, with probability 1/4, a first halving (even odds: cv2.resize with a random interpolation, or
   MATLAB-style antialiased bicubic `imresize_np`), after which the rest runs as sf 2;
3. the steps blur, blur (full variant only), random downscale, resize to 1/sf, Gaussian noise, JPEG (p = 0.9)
   in a random order in which the random downscale always comes before the resize to 1/sf;
4. a last JPEG compression, then float -> uint8 (`single2uint`).

`bsr_degrade` is that pipeline, operation for operation, with the release's probabilities, parameter ranges and
OpenCV / SciPy calls (`BSRGAN` and `BSRGAN_LIGHT` hold the ranges that differ between the variants). Deliberate
differences:
- Randomness comes only from the `numpy.random.Generator` passed in: the release draws from Python's global
  `random` and NumPy's global `np.random` state (inside DataLoader workers), so its LR images cannot be
  regenerated; here the same image and seed give the same LR image. The draws map one to one
  (random.random / np.random.rand -> rng.random, random.randint(a, b) -> rng.integers(a, b + 1),
  random.uniform -> rng.uniform, random.choice -> a uniform index, random.sample(range(7), 7) ->
  rng.permutation(7)); the streams themselves differ, so no single image equals one the release made.
- Input and output are uint8 HWC RGB; the float32 conversions inside are the release's. What the release would
  take silently or fail on deep inside is refused up front (`BSRError`): another dtype or layout, an sf outside
  `SUPPORTED_SCALE_FACTORS`, a side shorter than 2 sf.
- `mod_crop` crops each side to a multiple of sf. The release's mod crop swaps the axes (rows to W - W % sf,
  columns to H - H % sf), which is the same for the square images `ImageNetSR` passes and would cut a
  non-square image to a near-square one; here the output is always (H // sf, W // sf).
- Kernels are normalised in the log domain (see `fspecial_gaussian`, `anisotropic_gaussian`): where the
  release's exp underflows to an all-zero kernel (bsrgan_light's 6x6 isotropic kernel with sigma < 0.0183,
  about 0.5 % of light-variant images) it blurs the image to black, and just above that sigma its taps are
  subnormal floats (zero on a CPU set to flush them); here such a kernel is its finite limit.
  Variances are floored at `MIN_VARIANCE`, where a zero draw (probability 2^-53) makes the release's kernel
  singular (a NaN kernel, or an error from scipy).
- `imresize_np` computes in float64 NumPy where the release uses float32 torch (differences ~1e-7, far below
  the final uint8 step); `shift_pixel` interpolates bilinearly itself (the release's scipy interp2d, a linear
  spline through the grid, is the same interpolation and no longer exists in SciPy >= 1.14).
- The correlated-noise branch of `add_gaussian_noise` fixes the signs of its SVD factor (see there), so its
  samples do not depend on which LAPACK the machine has.
What still depends on the machine: cv2.resize on float32 runs OpenCV's CPU-dispatched SIMD code (SSE / AVX2 /
AVX-512, with or without FMA), whose last float bits can differ between CPUs, and JPEG goes through the libjpeg
bundled with the installed OpenCV; both reach the uint8 output only at rounding boundaries or across OpenCV
versions, so pin OpenCV where bit-identical LR images matter. The release shares both dependencies.
"""
from __future__ import annotations

from dataclasses import dataclass

import cv2
import numpy as np
from scipy import ndimage
from scipy.linalg import orth

# The scale factors BSRGAN defines its degradation for (its models are x2 and x4; the sf == 4 path halves first
# and continues as x2); the paper's SR experiments use x4. The release itself does not check sf.
SUPPORTED_SCALE_FACTORS = (2, 4)
# cv2.INTER_LINEAR, cv2.INTER_CUBIC, cv2.INTER_AREA: the release's random.choice([1, 2, 3]) for every resize
RESIZE_INTERPOLATIONS = (cv2.INTER_LINEAR, cv2.INTER_CUBIC, cv2.INTER_AREA)
# probabilities shared by both variants (degradation_bsrgan_variant's jpeg_prob, scale2_prob)
JPEG_PROB = 0.9
SCALE2_PROB = 0.25
# the smallest kernel variance used; a release draw of exactly 0 would make its covariance singular
MIN_VARIANCE = 1e-12


class BSRError(ValueError):
    """An input `bsr_degrade` cannot take: not uint8 HWC RGB, an unsupported sf, or an image too small for it."""


@dataclass(frozen=True)
class BSRVariant:
    """The parameters in which bsrgan_light.py differs from bsrgan.py.

    blur_width_scale: add_blur's anisotropic variance bound (4 + sf) and isotropic sigma bound (2 + 0.2 sf) are
      multiplied by it (the light file divides both by 4);
    aniso_sizes / iso_sizes: (a, b, step) - the kernel side is step * randint(a, b) + 3;
    blur_steps: how many of the two blur slots are active (the light file comments the second out);
    downsample_resize_prob: the chance that the random downscale is a cv2 resize rather than blur + subsample;
    noise_levels: (noise_level1, noise_level2) of add_Gaussian_noise, in grey levels;
    jpeg_quality: the inclusive range of add_JPEG_noise's quality factor.
    """

    name: str
    blur_width_scale: float
    aniso_sizes: tuple[int, int, int]
    iso_sizes: tuple[int, int, int]
    blur_steps: int
    downsample_resize_prob: float
    noise_levels: tuple[int, int]
    jpeg_quality: tuple[int, int]


BSRGAN = BSRVariant("bsrgan", 1.0, (2, 11, 2), (2, 11, 2), 2, 0.75, (2, 25), (30, 95))
BSRGAN_LIGHT = BSRVariant("bsrgan_light", 0.25, (2, 11, 1), (2, 4, 1), 1, 0.8, (1, 2), (80, 95))


def bsr_variant(light: bool) -> BSRVariant:
    return BSRGAN_LIGHT if light else BSRGAN


def uint2single(img: np.ndarray) -> np.ndarray:
    """utils_image.uint2single: uint8 -> float32 in [0, 1] (divided in float64, then rounded to float32)."""
    return np.float32(img / 255.0)


def single2uint(img: np.ndarray) -> np.ndarray:
    """utils_image.single2uint: clip to [0, 1], scale in the image's float type, round half to even, uint8."""
    return np.uint8((img.clip(0, 1) * 255.0).round())


def mod_crop(img: np.ndarray, sf: int) -> np.ndarray:
    """The mod crop of degradation_bsrgan_variant: the top-left part whose sides are multiples of sf (each side
    by its own length; the release's slice swaps them, the same on square images, see the module docstring)."""
    h, w = img.shape[:2]
    return img[: h - h % sf, : w - w % sf].copy()


def _random_interpolation(rng: np.random.Generator) -> int:
    return RESIZE_INTERPOLATIONS[int(rng.integers(len(RESIZE_INTERPOLATIONS)))]


def _normalised_exp(log_k: np.ndarray) -> np.ndarray:
    """exp(log_k) / sum, with the maximum subtracted first so that no kernel underflows to all zeros."""
    k = np.exp(log_k - log_k.max())
    return k / k.sum()


def fspecial_gaussian(hsize: int, sigma: float) -> np.ndarray:
    """bsrgan.py fspecial_gaussian (MATLAB fspecial('gaussian')): an hsize x hsize isotropic Gaussian on the grid
    -(hsize-1)/2 .. (hsize-1)/2 (half-integers for an even side: the kernel then sits between pixels), entries
    below eps * max set to 0, normalised to sum 1.

    Computed relative to the maximum: the release's exp(-r^2 / 2 sigma^2) underflows to an all-zero kernel for
    an even side and sigma < 0.0183 and then leaves it unnormalised (it blurs the image to black); here that
    kernel is its limit, the four centre taps at 1/4. sigma^2 is floored at MIN_VARIANCE."""
    half = (hsize - 1) / 2.0
    x, y = np.meshgrid(np.arange(-half, half + 1), np.arange(-half, half + 1))
    var = max(float(sigma) ** 2, MIN_VARIANCE)
    log_h = -(x * x + y * y) / (2.0 * var)
    h = np.exp(log_h - log_h.max())
    h[h < np.finfo(float).eps * h.max()] = 0.0
    return h / h.sum()


def anisotropic_gaussian(ksize: int, theta: float, l1: float, l2: float) -> np.ndarray:
    """bsrgan.py anisotropic_Gaussian + gm_blur_kernel: a ksize x ksize Gaussian with covariance
    Sigma = l1 v v^T + l2 w w^T, v = (cos theta, sin theta), w = (sin theta, -cos theta), in (x = column,
    y = row) offsets from the centre (ksize/2 - 0.5, a half pixel off the grid for an even ksize, as the
    release), normalised to sum 1. l1 and l2 are variances (pixels^2), floored at MIN_VARIANCE.

    The release evaluates scipy's multivariate_normal.pdf per tap and divides by the sum; the same kernel is
    computed here from the quadratic form relative to its minimum, so it cannot underflow to all zeros. An
    even ksize has no centre tap: for a nearly singular Sigma the mass then goes to the taps nearest the long
    axis, which can lie far from the centre, and the kernel's spread exceeds l1 and l2 (as the release's)."""
    c, s = np.cos(theta), np.sin(theta)
    # the release's V = [[c, s], [s, -c]] is symmetric and its own inverse, so Sigma^-1 = V diag(1/l1, 1/l2) V
    v = np.array([[c, s], [s, -c]])
    inv = v @ np.diag([1.0 / max(l1, MIN_VARIANCE), 1.0 / max(l2, MIN_VARIANCE)]) @ v
    offsets = np.arange(ksize) - ksize / 2.0 + 0.5
    x, y = np.meshgrid(offsets, offsets)
    q = inv[0, 0] * x * x + 2.0 * inv[0, 1] * x * y + inv[1, 1] * y * y
    return _normalised_exp(-0.5 * q)


def random_blur_kernel(sf: int, rng: np.random.Generator, light: bool) -> np.ndarray:
    """The kernel add_blur draws (bsrgan.py / bsrgan_light.py add_blur): with probability 1/2 anisotropic, with
    variances l1, l2 ~ U[0, (4 + sf) * scale) and angle ~ U[0, pi), else isotropic with sigma ~
    U[0, (2 + 0.2 sf) * scale); the side is step * randint(a, b) + 3 (BSRVariant)."""
    v = bsr_variant(light)
    if rng.random() < 0.5:
        bound = (4.0 + sf) * v.blur_width_scale
        l1, l2 = bound * rng.random(), bound * rng.random()
        a, b, step = v.aniso_sizes
        ksize = step * int(rng.integers(a, b + 1)) + 3
        return anisotropic_gaussian(ksize, rng.random() * np.pi, l1, l2)
    a, b, step = v.iso_sizes
    ksize = step * int(rng.integers(a, b + 1)) + 3
    return fspecial_gaussian(ksize, (2.0 + 0.2 * sf) * v.blur_width_scale * rng.random())


def _convolve_mirror(img: np.ndarray, kernel: np.ndarray) -> np.ndarray:
    # the release's ndimage.filters.convolve(img, k[..., None], mode='mirror'): each channel alone, float32 out
    return ndimage.convolve(img, kernel[:, :, None], mode="mirror")


def add_blur(img: np.ndarray, sf: int, rng: np.random.Generator, light: bool = False) -> np.ndarray:
    """add_blur: the float32 HWC image convolved with a `random_blur_kernel` (scipy.ndimage.convolve, mirror
    borders, as the release)."""
    return _convolve_mirror(img, random_blur_kernel(sf, rng, light))


def shift_pixel(x: np.ndarray, sf: int, upper_left: bool = True) -> np.ndarray:
    """bsrgan.py shift_pixel on a 2-D kernel: resampled bilinearly at (i + s, j + s), s = (sf - 1) / 2 (minus s
    for upper_left=False), coordinates clipped to the grid, so the content moves up-left by s and a blur +
    nearest subsampling by sf stays centred on the low-resolution pixel grid."""
    h, w = x.shape
    shift = (sf - 1) * 0.5 if upper_left else -(sf - 1) * 0.5
    rows = np.clip(np.arange(h) + shift, 0, h - 1)
    cols = np.clip(np.arange(w) + shift, 0, w - 1)
    r0 = np.minimum(np.floor(rows).astype(int), h - 1)
    c0 = np.minimum(np.floor(cols).astype(int), w - 1)
    r1, c1 = np.minimum(r0 + 1, h - 1), np.minimum(c0 + 1, w - 1)
    fr, fc = (rows - r0)[:, None], (cols - c0)[None, :]
    top = x[r0][:, c0] * (1 - fc) + x[r0][:, c1] * fc
    bottom = x[r1][:, c0] * (1 - fc) + x[r1][:, c1] * fc
    return top * (1 - fr) + bottom * fr


def _matlab_cubic(d: np.ndarray) -> np.ndarray:
    a = np.abs(d)
    inner = 1.5 * a**3 - 2.5 * a**2 + 1.0
    outer = -0.5 * a**3 + 2.5 * a**2 - 4.0 * a + 2.0
    return np.where(a <= 1, inner, np.where(a <= 2, outer, 0.0))


def _resize_matrix(in_len: int, out_len: int, scale: float, antialiasing: bool) -> np.ndarray:
    """utils_image.calculate_weights_indices as a dense (out_len, in_len) matrix: MATLAB's bicubic taps (widened
    by 1/scale when shrinking with antialiasing), rows normalised to 1, taps outside folded back symmetrically
    (the release's symmetric padding)."""
    widen = scale < 1 and antialiasing
    width = 4.0 / scale if widen else 4.0
    u = np.arange(1, out_len + 1) / scale + 0.5 * (1 - 1 / scale)
    taps = int(np.ceil(width)) + 2
    idx = np.floor(u - width / 2)[:, None] + np.arange(taps)[None, :]
    dist = u[:, None] - idx
    weights = scale * _matlab_cubic(dist * scale) if widen else _matlab_cubic(dist)
    weights /= weights.sum(axis=1, keepdims=True)
    j = (idx.astype(int) - 1) % (2 * in_len)  # 0-based, folded: -1 -> 0, in_len -> in_len - 1
    j = np.where(j >= in_len, 2 * in_len - 1 - j, j)
    m = np.zeros((out_len, in_len))
    np.add.at(m, (np.repeat(np.arange(out_len), taps), j.ravel()), weights.ravel())
    return m


def imresize_np(img: np.ndarray, scale: float, antialiasing: bool = True) -> np.ndarray:
    """utils_image.imresize_np: MATLAB imresize(img, scale, 'bicubic') on a float HWC image, output side
    ceil(side * scale), rows first then columns, no rounding or clipping; float32 out as the release (which
    computes in float32 torch, here float64)."""
    h, w = img.shape[:2]
    out_h, out_w = int(np.ceil(h * scale)), int(np.ceil(w * scale))
    rows = np.einsum("oh,hwc->owc", _resize_matrix(h, out_h, scale, antialiasing), img.astype(np.float64))
    out = np.einsum("pw,owc->opc", _resize_matrix(w, out_w, scale, antialiasing), rows)
    return out.astype(np.float32)


def _fixed_sign_factor(cov: np.ndarray) -> np.ndarray:
    """F with F^T F = the SVD square of cov (what NumPy's multivariate_normal samples with, also for an
    indefinite cov), each row's largest entry made positive: LAPACK builds may return either sign of a
    singular vector, and the sign decides the samples."""
    _, s, vh = np.linalg.svd(cov)
    signs = np.sign(vh[np.arange(len(vh)), np.abs(vh).argmax(axis=1)])
    return np.sqrt(s)[:, None] * (vh * signs[:, None])


def add_gaussian_noise(img: np.ndarray, rng: np.random.Generator, noise_level1: int = 2,
                       noise_level2: int = 25) -> np.ndarray:
    """bsrgan.py add_Gaussian_noise: a level n ~ randint(noise_level1, noise_level2) grey levels; with
    probability 0.4 colour noise N(0, (n/255)^2) per channel, 0.4 grey noise (one draw for all channels), 0.2
    channel-correlated noise with covariance |L^2 U^T D U| (L = noise_level2 / 255, D = diag(U[0, 1)^3),
    U = orth(U[0, 1)^{3x3}), the absolute value taken per entry); noise cast to float32, result clipped to [0, 1].

    The entrywise absolute value can make that covariance indefinite; the release's np.random.multivariate_normal
    then warns and samples with the SVD square of the matrix, as `_fixed_sign_factor` does (without the warning).
    The column signs of orth's U cancel in |U^T D U|."""
    level = int(rng.integers(noise_level1, noise_level2 + 1))
    rnum = rng.random()
    if rnum > 0.6:
        noise = rng.normal(0.0, level / 255.0, img.shape)
    elif rnum < 0.4:
        noise = rng.normal(0.0, level / 255.0, (*img.shape[:2], 1))
    else:
        big = noise_level2 / 255.0
        d = np.diag(rng.random(3))
        u = orth(rng.random((3, 3)))
        cov = np.abs(big**2 * (u.T @ d @ u))
        noise = rng.standard_normal((*img.shape[:2], 3)) @ _fixed_sign_factor(cov)
    return np.clip(img + noise.astype(np.float32), 0.0, 1.0)


def add_jpeg_noise(img: np.ndarray, rng: np.random.Generator, quality_range: tuple[int, int] = (30, 95)) -> np.ndarray:
    """add_JPEG_noise: a quality q ~ randint(*quality_range) (bsrgan.py 30..95, bsrgan_light.py 80..95); the
    float RGB image to uint8 (`single2uint`), to BGR, through cv2.imencode('.jpg', quality q; OpenCV's default
    4:2:0 chroma) and cv2.imdecode, back to float32 RGB."""
    quality = int(rng.integers(quality_range[0], quality_range[1] + 1))
    bgr = cv2.cvtColor(single2uint(img), cv2.COLOR_RGB2BGR)
    ok, buf = cv2.imencode(".jpg", bgr, [int(cv2.IMWRITE_JPEG_QUALITY), quality])
    if not ok:
        raise BSRError(f"OpenCV could not JPEG-encode an image of shape {bgr.shape}")
    return cv2.cvtColor(uint2single(cv2.imdecode(buf, cv2.IMREAD_COLOR)), cv2.COLOR_BGR2RGB)


def _resize(img: np.ndarray, out_w: int, out_h: int, rng: np.random.Generator) -> np.ndarray:
    out = cv2.resize(np.ascontiguousarray(img), (out_w, out_h), interpolation=_random_interpolation(rng))
    return np.clip(out, 0.0, 1.0)


def random_downsample(img: np.ndarray, sf: int, rng: np.random.Generator, resize_prob: float) -> np.ndarray:
    """The "downsample2" step: with probability resize_prob a cv2.resize by 1 / sf1, sf1 ~ U[1, 2 sf), to
    (int(W / sf1), int(H / sf1)); otherwise a 25x25 Gaussian (sigma ~ U[0.1, 0.6 sf)) moved by `shift_pixel`,
    renormalised, convolved (mirror) and subsampled [::sf, ::sf]. Clipped to [0, 1]."""
    if rng.random() < resize_prob:
        sf1 = rng.uniform(1.0, 2.0 * sf)
        return _resize(img, int(1 / sf1 * img.shape[1]), int(1 / sf1 * img.shape[0]), rng)
    k = shift_pixel(fspecial_gaussian(25, rng.uniform(0.1, 0.6 * sf)), sf)
    out = _convolve_mirror(img, k / k.sum())[0::sf, 0::sf]
    return np.clip(out, 0.0, 1.0)


def shuffle_order(rng: np.random.Generator) -> list[int]:
    """The order of the seven step slots (0, 1 blur; 2 random downscale; 3 resize to 1/sf; 4 noise; 5 JPEG;
    6 camera ISP, off in the variant): a random permutation in which 2 and 3 trade places if 3 came first."""
    order = [int(i) for i in rng.permutation(7)]
    i2, i3 = order.index(2), order.index(3)
    if i2 > i3:
        order[i2], order[i3] = order[i3], order[i2]
    return order


def _check_input(hr: np.ndarray, sf: int) -> None:
    if not isinstance(hr, np.ndarray) or hr.dtype != np.uint8 or hr.ndim != 3 or hr.shape[2] != 3:
        what = f"{hr.dtype} {hr.shape}" if isinstance(hr, np.ndarray) else type(hr).__name__
        raise BSRError(f"expected a uint8 HWC RGB image (3 channels), got {what}")
    if sf not in SUPPORTED_SCALE_FACTORS:
        raise BSRError(f"scale factor {sf} is not one of {SUPPORTED_SCALE_FACTORS} (BSRGAN's x2 and x4)")
    h, w = hr.shape[:2]
    if h // sf < 2 or w // sf < 2:
        # the random downscale shrinks by up to 2 sf; below 2 sf pixels a side it would leave nothing
        raise BSRError(f"image {w}x{h} is too small for sf {sf}: each side needs at least {2 * sf} pixels")


def bsr_degrade(hr: np.ndarray, sf: int, rng: np.random.Generator, light: bool) -> np.ndarray:
    """The low-resolution image the release's degradation_bsrgan_variant (light: bsrgan_light.py's) makes from
    `hr`: uint8 HWC RGB in, uint8 HWC RGB of shape (H // sf, W // sf, 3) out, every random choice drawn from
    `rng`. A side that is not a multiple of sf is cropped to one first (bottom / right rows and columns dropped),
    as the release's mod crop does. See the module docstring for the steps and the deliberate differences."""
    _check_input(hr, sf)
    variant = bsr_variant(light)
    image = uint2single(mod_crop(hr, sf))
    if sf == 4 and rng.random() < SCALE2_PROB:
        # "downsample1": halve, then continue as x2
        if rng.random() < 0.5:
            image = _resize(image, image.shape[1] // 2, image.shape[0] // 2, rng)
        else:
            image = np.clip(imresize_np(image, 0.5, True), 0.0, 1.0)
        sf = 2
    # the size the resize to 1/sf aims at, taken when the random downscale runs (always before it)
    width, height = image.shape[1], image.shape[0]
    for step in shuffle_order(rng):
        if step in (0, 1):
            if step < variant.blur_steps:
                image = add_blur(image, sf, rng, light)
        elif step == 2:
            width, height = image.shape[1], image.shape[0]
            image = random_downsample(image, sf, rng, variant.downsample_resize_prob)
        elif step == 3:
            # the release's int(1 / sf * a): exact for sf 2 and 4 on these multiples of sf
            image = _resize(image, width // sf, height // sf, rng)
        elif step == 4:
            image = add_gaussian_noise(image, rng, *variant.noise_levels)
        elif step == 5 and rng.random() < JPEG_PROB:
            image = add_jpeg_noise(image, rng, variant.jpeg_quality)
    image = add_jpeg_noise(image, rng, variant.jpeg_quality)
    return single2uint(image)
