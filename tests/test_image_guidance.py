"""Image guiding (paper App. C, the "guiding" rows of Tab. 5/11): the corrected eps against its closed form on a
linear toy chain, guided DDIM lowering the guider's loss, the super-resolution targets, the LPIPS guider (random
stand-in trunk) and the sampler settings that turn it on."""
from __future__ import annotations

import numpy as np
import pytest
import torch
import torch.nn.functional as F
from omegaconf import OmegaConf

from replication.config import validate_config
from replication.diffusion.config import validate_sampler_cfg
from replication.diffusion.ddim import ddim_loop
from replication.diffusion.guidance import (build_guide_loss, image_guidance_grad, image_guided, l2_guide_loss,
                                            superres_guide)
from replication.diffusion.plms import plms_loop
from replication.diffusion.schedule import Schedule, extract
from replication.stages.entry import compose
from replication.utils.schema import ConfigError

SCHED = Schedule.make("linear", 1000, 0.0015, 0.0195)  # the paper models' schedule (PROTOCOL §3)
AC = SCHED.alphas_cumprod.numpy()
GEN = torch.Generator().manual_seed(0)
MU = 0.3 * torch.randn(1, 3, 8, 8, generator=GEN)  # toy latent data: N(MU, SD^2 I)
SD = 0.5
W = torch.randn(3, 3, generator=GEN) / 3**0.5  # the toy decoder's channel map
SCALE_FACTOR = 0.5


def gaussian_eps(x: torch.Tensor, t: torch.Tensor) -> torch.Tensor:
    """The exact eps of N(MU, SD^2 I) data: sqrt(1 - a) (x - sqrt(a) MU) / (a SD^2 + 1 - a)."""
    a = extract(SCHED.alphas_cumprod, t, x.shape)
    return (1 - a).sqrt() * (x - a.sqrt() * MU) / (a * SD * SD + 1 - a)


def linear_decode(z: torch.Tensor) -> torch.Tensor:
    """A fixed linear first stage: mix channels with W, then upsample x2 (8x8 latent -> 16x16 image)."""
    return F.interpolate(torch.einsum("oc,bchw->bohw", W, z), scale_factor=2, mode="nearest")


def test_corrected_eps_is_the_closed_form_on_a_linear_chain():
    """eps = c x, decoder D(z) = W z, guide 1/2 |D(z_0 / f) - y|^2, z_0 = k x with k = (1 - sqrt(1 - a) c) / sqrt(a):
    grad_x = (k / f) W^T (W k x / f - y), so eps_hat = c x + sqrt(1 - a) s grad_x, computed here in float64."""
    c, s = 0.3, 0.7
    g = torch.Generator().manual_seed(1)
    x = torch.randn(3, 3, 5, 5, generator=g)
    y = torch.randn(3, 3, 5, 5, generator=g)
    t = torch.tensor([10, 400, 990])

    def decode(z: torch.Tensor) -> torch.Tensor:
        return torch.einsum("oc,bchw->bohw", W, z)

    guided = image_guided(lambda v, _t: c * v, decode, lambda img: l2_guide_loss(img, y), s, SCHED, SCALE_FACTOR)
    with torch.no_grad():
        got = guided(x, t)
    a = AC[t.numpy()][:, None, None, None]
    k = (1.0 - np.sqrt(1.0 - a) * c) / np.sqrt(a)
    w, xn, yn = W.double().numpy(), x.double().numpy(), y.double().numpy()
    residual = np.einsum("oc,bchw->bohw", w, k * xn / SCALE_FACTOR) - yn
    grad = (k / SCALE_FACTOR) * np.einsum("oc,bohw->bchw", w, residual)
    want = c * xn + np.sqrt(1.0 - a) * s * grad
    assert not got.requires_grad and got.dtype == torch.float32
    np.testing.assert_allclose(got.double().numpy(), want, rtol=1e-5, atol=1e-5)


def test_scale_zero_returns_the_plain_denoiser():
    guide = superres_guide(l2_guide_loss, torch.zeros(1, 3, 4, 4))
    assert image_guided(gaussian_eps, linear_decode, guide, 0.0, SCHED, SCALE_FACTOR) is gaussian_eps


@pytest.mark.parametrize("target,scales", [("lowres", (0.3, 1.0)), ("upsampled", (0.02, 0.06))])
def test_guided_ddim_and_plms_lower_the_guide_loss(target, scales):
    """The same x_T sampled with and without guidance: the final sample's guide loss falls as the scale grows, for
    every sample of the batch. The summed L2 over the 16x16 output is 16 times that over the 4x4 input, so the
    "upsampled" scales are about 1/16 of the "lowres" ones."""
    g = torch.Generator().manual_seed(2)
    lowres = torch.rand(4, 3, 4, 4, generator=g) * 2 - 1
    x_T = torch.randn(4, 3, 8, 8, generator=g)
    guide = superres_guide(l2_guide_loss, lowres, target)
    for loop in (lambda d: ddim_loop(d, x_T, SCHED, 20, 0.0), lambda d: plms_loop(d, x_T, SCHED, 20)):
        losses = [guide(linear_decode(loop(image_guided(gaussian_eps, linear_decode, guide, s, SCHED,
                                                        SCALE_FACTOR)).x / SCALE_FACTOR)) for s in (0.0, *scales)]
        assert bool((losses[1] < losses[0]).all()) and bool((losses[2] < losses[1]).all()), losses


def test_guiding_leaves_the_decoder_parameters_and_the_input_alone():
    """The gradient is taken w.r.t. x_t only: a decoder with parameters gets no .grad, the input stays as it was."""
    decoder = torch.nn.Conv2d(3, 3, 1)
    lowres = torch.zeros(2, 3, 8, 8)
    x = torch.randn(2, 3, 8, 8, generator=torch.Generator().manual_seed(3))
    before = x.clone()
    guided = image_guided(gaussian_eps, decoder, superres_guide(l2_guide_loss, lowres), 1.0, SCHED)
    with torch.no_grad():
        out = guided(x, torch.tensor([100, 700]))
    assert decoder.weight.grad is None and decoder.bias.grad is None
    assert torch.equal(x, before) and not x.requires_grad
    assert not torch.allclose(out, gaussian_eps(x, torch.tensor([100, 700])))


def test_superres_targets_compare_at_the_input_size_or_the_output_size():
    """On constant images bicubic resampling is exact, so both targets give 1/2 (c - d)^2 per compared value:
    the low-resolution input's count of values for "lowres", the output's for "upsampled"."""
    image = torch.full((2, 3, 16, 16), 0.25)
    lowres = torch.full((2, 3, 4, 4), -0.5)
    half_sq = 0.5 * 0.75**2
    torch.testing.assert_close(superres_guide(l2_guide_loss, lowres, "lowres")(image),
                               torch.full((2,), half_sq * 3 * 4 * 4))
    torch.testing.assert_close(superres_guide(l2_guide_loss, lowres, "upsampled")(image),
                               torch.full((2,), half_sq * 3 * 16 * 16))


@pytest.fixture(scope="module")
def standin_lpips():
    return build_guide_loss("lpips", None, allow_standin=True)


def test_lpips_guider_runs_with_the_standin(standin_lpips):
    """The LPIPS path on 32x32 images (random stand-in VGG trunk): a finite, nonzero correction, per-sample
    losses that are 0 for identical images, and no gradient left on the frozen network."""
    g = torch.Generator().manual_seed(4)
    a = torch.rand(2, 3, 32, 32, generator=g) * 2 - 1
    assert torch.allclose(standin_lpips(a, a), torch.zeros(2), atol=1e-6)
    assert bool((standin_lpips(a, a.flip(-1)) > 0).all())

    def decode(z: torch.Tensor) -> torch.Tensor:
        return F.interpolate(torch.einsum("oc,bchw->bohw", W, z), scale_factor=4, mode="nearest")

    lowres = torch.rand(2, 3, 8, 8, generator=g) * 2 - 1
    x = torch.randn(2, 3, 8, 8, generator=g)
    t = torch.tensor([300, 800])
    guide = superres_guide(standin_lpips, lowres, "upsampled")
    with torch.no_grad():
        eps, grad = image_guidance_grad(gaussian_eps, decode, guide, x, t, SCHED, SCALE_FACTOR)
        out = image_guided(gaussian_eps, decode, guide, 2.0, SCHED, SCALE_FACTOR)(x, t)
    assert torch.isfinite(grad).all() and grad.abs().sum() > 0
    torch.testing.assert_close(out, eps + 2.0 * extract(SCHED.sqrt_one_minus_alphas_cumprod, t, x.shape) * grad)


def test_bad_guidance_arguments_are_refused():
    guide = superres_guide(l2_guide_loss, torch.zeros(1, 3, 4, 4))
    for scale in (-0.1, float("nan"), float("inf")):
        with pytest.raises(ValueError, match="image guidance scale"):
            image_guided(gaussian_eps, linear_decode, guide, scale, SCHED)
    with pytest.raises(ValueError, match="scale factor"):
        image_guided(gaussian_eps, linear_decode, guide, 1.0, SCHED, scale_factor=0.0)
    with pytest.raises(ValueError, match="image_guidance_target.*lowres"):
        superres_guide(l2_guide_loss, torch.zeros(1, 3, 4, 4), "bilinear")
    with pytest.raises(ValueError, match="image_guidance_loss.*lpips"):
        build_guide_loss("l1")
    with pytest.raises(ValueError, match="one loss per sample"):
        image_guided(gaussian_eps, linear_decode, lambda img: img.sum(), 1.0, SCHED)(
            torch.zeros(2, 3, 8, 8), torch.tensor([5, 5]))
    with pytest.raises(ValueError, match="batch size"):
        superres_guide(l2_guide_loss, torch.zeros(3, 3, 4, 4))(torch.zeros(2, 3, 16, 16))


BASE_SAMPLER = {"kind": "ddim", "steps": 50, "eta": 1.0, "num_samples": 8, "batch_size": 4, "source": "test"}


@pytest.mark.parametrize("key,value,match", [
    ("image_guidance_scale", -1.0, "sampler.image_guidance_scale must be >= 0"),
    ("image_guidance_loss", "vgg", r"sampler.image_guidance_loss.*'lpips', 'l2'"),
    ("image_guidance_target", "pixels", r"sampler.image_guidance_target.*'lowres', 'upsampled'"),
])
def test_sampler_settings_are_checked_by_name(key, value, match):
    with pytest.raises(ConfigError, match=match):
        validate_sampler_cfg({**BASE_SAMPLER, key: value})


def test_sampler_settings_default_to_off():
    c = validate_sampler_cfg({**BASE_SAMPLER})
    assert (c.image_guidance_scale, c.image_guidance_loss, c.image_guidance_target) == (0.0, "lpips", "lowres")
    c = validate_sampler_cfg({**BASE_SAMPLER, "image_guidance_scale": 2.0, "image_guidance_loss": "L2",
                              "image_guidance_target": "upsampled"})
    assert c.image_guidance_scale == 2.0


def _with_image_guidance(experiment: str, scale: float):
    cfg = compose([f"experiment={experiment}"])
    OmegaConf.set_struct(cfg, False)
    cfg.sampler.image_guidance_scale = scale
    return cfg


def test_image_guidance_is_for_super_resolution_only():
    assert validate_config(_with_image_guidance("smoke_sr", 1.5)).sampler.image_guidance_scale == 1.5
    for experiment in ("smoke", "smoke_inpaint"):
        with pytest.raises(ConfigError, match="sampler.image_guidance_scale.*conditioning.kind=lowres"):
            validate_config(_with_image_guidance(experiment, 1.5))
        assert validate_config(_with_image_guidance(experiment, 0.0)).sampler.image_guidance_scale == 0.0
