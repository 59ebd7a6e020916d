"""Concat conditioning (SR, inpainting, semantic synthesis): input channels, the release's value conventions,
compositing, and the names of the released checkpoints."""
from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest
import torch
import torch.nn.functional as F
from omegaconf import OmegaConf

from replication.diffusion.guidance import classifier_free
from replication.models.autoencoder import build_autoencoder
from replication.models.autoencoder_config import validate_autoencoder_cfg
from replication.models.concat_conditioning import (ConcatConditionalUNet, SpatialRescaler, composite,
                                                    concat_in_channels, inpainting_condition, inpainting_inputs)
from replication.models.conditioning import ema_scope
from replication.models.unet import UNetModel

ROOT = Path(__file__).resolve().parents[1]
REF_DIR = ROOT / "tests" / "reference" / "compvis_modules"


def _tiny_unet(in_channels: int, out_channels: int = 4) -> UNetModel:
    kw = dict(OmegaConf.to_container(OmegaConf.load(ROOT / "experiments" / "unet" / "smoke.yaml")))
    kw.update(in_channels=in_channels, out_channels=out_channels)
    return UNetModel(**kw)


def _tiny_vq():
    return build_autoencoder(validate_autoencoder_cfg(OmegaConf.load(ROOT / "experiments" / "autoencoder" / "smoke_vq.yaml")))


def _image_and_mask(size=32, seed=0):
    rng = np.random.default_rng(seed)
    img = rng.integers(0, 256, (size, size, 3), dtype=np.uint8)
    mask = np.zeros((size, size), np.uint8)
    mask[8:20, 4:28] = 255
    return img, mask


def test_released_concat_models_have_the_expected_input_channels():
    for name, task, latent in (("bsr_sr", "superres", 3), ("inpainting_big", "inpainting", 3)):
        shape = json.loads((REF_DIR / f"ldm-{name}.json").read_text())["state_dict"][
            "model.diffusion_model.input_blocks.0.0.weight"]
        assert shape[1] == concat_in_channels(task, latent), name
    with pytest.raises(ValueError, match="unknown concat task"):
        concat_in_channels("colour", 3)


def test_superres_condition_is_the_low_resolution_image_concatenated():
    torch.manual_seed(0)
    unet = _tiny_unet(in_channels=concat_in_channels("superres", 4))
    model = ConcatConditionalUNet(unet)
    x, lr = torch.randn(2, 4, 8, 8), torch.rand(2, 3, 8, 8) * 2 - 1
    t = torch.tensor([3, 700])
    torch.testing.assert_close(model(x, t, lr), unet(torch.cat([x, lr], 1), t))
    with pytest.raises(ValueError, match="must match the latent"):
        model(x, t, torch.zeros(2, 3, 16, 16))
    # names as the release (model.diffusion_model.*), and the EMA averages the U-Net alone
    assert all(k.startswith("diffusion_model.") for k in model.state_dict())
    assert ema_scope(model) == "diffusion_model."


def test_inpainting_inputs_follow_the_release_conventions():
    img, mask = _image_and_mask()
    b = inpainting_inputs(img, mask)
    hole = torch.from_numpy(mask >= 128)
    assert set(torch.unique(b["mask"]).tolist()) == {-1.0, 1.0}
    assert torch.all(b["mask"][0, 0][hole] == 1) and torch.all(b["mask"][0, 0][~hole] == -1)
    # the hole of the masked image is black (-1); elsewhere it is the image
    assert torch.all(b["masked_image"][0][:, hole] == -1)
    torch.testing.assert_close(b["masked_image"][0][:, ~hole], b["image"][0][:, ~hole])
    with pytest.raises(ValueError, match="does not match the image"):
        inpainting_inputs(img, mask[:16])


def test_inpainting_input_is_first_stage_encoding_and_mask():
    torch.manual_seed(0)
    vq = _tiny_vq().eval()
    img, mask = _image_and_mask()
    b = inpainting_inputs(img, mask)
    with torch.no_grad():
        c = inpainting_condition(vq.encode_moments, b["masked_image"], b["mask"])
        latent = vq.encode_moments(b["image"])
    assert c.shape == (1, vq.latent_channels + 1, 8, 8)
    # channels: encoding of the masked image, then the mask at latent size (nearest), still +-1
    torch.testing.assert_close(c[:, :vq.latent_channels], vq.encode_moments(b["masked_image"]))
    torch.testing.assert_close(c[:, -1:], F.interpolate(b["mask"], size=(8, 8), mode="nearest"))
    # the U-Net sees z_t and c: 2 * latent + 1 channels (inpainting_big: 3 + 3 + 1 = 7)
    unet = _tiny_unet(in_channels=concat_in_channels("inpainting", vq.latent_channels), out_channels=vq.latent_channels)
    eps = ConcatConditionalUNet(unet)(latent, torch.tensor([10]), c)
    assert eps.shape == latent.shape


def test_composite_keeps_every_pixel_outside_the_hole():
    img, mask = _image_and_mask(seed=3)
    b = inpainting_inputs(img, mask)
    predicted = torch.rand_like(b["image"]) * 2 - 1
    out = composite(b["image"], b["mask"], predicted)
    pixels = (out[0].permute(1, 2, 0).numpy() * 255).round().astype(np.uint8)
    known = mask < 128
    np.testing.assert_array_equal(pixels[known], img[known])
    inside = ((predicted + 1) / 2)[0].permute(1, 2, 0).numpy()[~known]
    np.testing.assert_allclose(out[0].permute(1, 2, 0).numpy()[~known], inside, atol=1e-6)


def test_spatial_rescaler_is_bilinear_stages_then_a_1x1_conv():
    torch.manual_seed(0)
    r = SpatialRescaler(n_stages=2, method="bilinear", multiplier=0.5, in_channels=182, out_channels=3)
    assert sorted(r.state_dict()) == ["channel_mapper.weight"]  # the release's name, no bias
    seg = F.one_hot(torch.randint(0, 182, (1, 32, 32)), 182).permute(0, 3, 1, 2).float()
    half = F.interpolate(F.interpolate(seg, scale_factor=0.5, mode="bilinear"), scale_factor=0.5, mode="bilinear")
    torch.testing.assert_close(r(seg), F.conv2d(half, r.channel_mapper.weight))
    model = ConcatConditionalUNet(_tiny_unet(in_channels=7), cond_stage=r)
    assert "cond_stage_model.channel_mapper.weight" in model.state_dict()
    assert model(torch.randn(1, 4, 8, 8), torch.tensor([5]), seg).shape == (1, 4, 8, 8)


def test_classifier_free_guidance_works_for_a_concat_condition():
    torch.manual_seed(0)
    model = ConcatConditionalUNet(_tiny_unet(in_channels=7)).eval()
    for p in model.parameters():  # the zero-initialised output layer would make every prediction 0
        torch.nn.init.normal_(p, std=0.05)
    x, t = torch.randn(2, 4, 8, 8), torch.tensor([100, 100])
    cond, uncond = torch.randn(2, 3, 8, 8), torch.zeros(1, 3, 8, 8)
    with torch.no_grad():
        guided = classifier_free(model, cond, uncond, 3.0)(x, t)
        e_c, e_u = model(x, t, cond), model(x, t, uncond.expand_as(cond))
    torch.testing.assert_close(guided, e_u + 3.0 * (e_c - e_u), rtol=1e-4, atol=1e-5)
    assert not torch.allclose(e_c, e_u)
