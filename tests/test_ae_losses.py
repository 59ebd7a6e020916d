"""First-stage loss (App. G): formulas against hand computations, adaptive weight, disc warm start, gradient
flow to every trainable parameter, discriminator layout, and LPIPS construction without any download."""
from __future__ import annotations

from pathlib import Path

import pytest
import torch
from omegaconf import OmegaConf

from replication.models.autoencoder import AUX_CODEBOOK_LOSS, AUX_KL, AutoencoderKL, VQModel
from replication.models.autoencoder_config import validate_autoencoder_cfg
from replication.models.discriminator import NLayerDiscriminator
from replication.models.losses import (
    ADAPTIVE_MAX,
    LOG_D_WEIGHT,
    LOG_DISC_FACTOR,
    LOG_NLL,
    LPIPS_BACKBONE_FILE,
    LPIPS_BACKBONE_STANDIN,
    ORIGINAL_LPIPS_LIN_MD5,
    AutoencoderLoss,
    adaptive_weight,
    build_lpips,
)
from replication.utils.io import ArtifactError

ROOT = Path(__file__).resolve().parents[1]


@pytest.fixture(autouse=True, scope="module")
def one_thread():
    before = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(before)


pytestmark = pytest.mark.usefixtures("no_network")  # tests/conftest.py

@pytest.fixture(scope="module")
def standin_lpips():
    module, label = build_lpips(None, allow_standin=True, standin_seed=0)
    return module, label


def dd(double_z: bool) -> dict:
    return dict(
        ch=32, out_ch=3, ch_mult=[1, 2], num_res_blocks=1, attn_resolutions=[], dropout=0.0, in_channels=3,
        resolution=32, z_channels=4, double_z=double_z, attn_type="vanilla",
    )


def images(seed: int, n: int = 2, size: int = 32) -> torch.Tensor:
    g = torch.Generator().manual_seed(seed)
    return torch.rand(n, 3, size, size, generator=g) * 2 - 1


# ---- adaptive weight and warm start ---------------------------------------------------------------------


def test_adaptive_weight_matches_hand_computation():
    w = torch.randn(4, 3, requires_grad=True)
    a, b = torch.randn(4, 3), torch.randn(4, 3)
    nll, g = (a * w).sum(), (b * w).sum()  # gradients w.r.t. w are exactly a and b
    expected = a.norm() / (b.norm() + 1e-4) * 0.5
    torch.testing.assert_close(adaptive_weight(nll, g, w, disc_weight=0.5), expected)
    # clamp at 1e4 (before the disc_weight factor) when the GAN gradient vanishes
    clamped = adaptive_weight((1e3 * a * w).sum(), (0.0 * w).sum(), w, disc_weight=0.75)
    assert clamped.item() == pytest.approx(ADAPTIVE_MAX * 0.75)
    assert not clamped.requires_grad


def test_generator_loss_adaptive_weight_uses_last_layer_gradients():
    torch.manual_seed(0)
    model = VQModel(dd(False), 3, 16)
    loss_fn = AutoencoderLoss("vq", disc_start=0, disc_weight=0.6, perceptual_weight=0.0)
    x = images(1)
    x_rec, aux = model(x)
    _, logs = loss_fn.generator_loss(x, x_rec, aux, step=0, last_layer=model.last_layer())
    nll = torch.abs(x - x_rec).mean()
    g = -loss_fn.discriminator(x_rec).mean()
    grad_n = torch.autograd.grad(nll, model.last_layer(), retain_graph=True)[0]
    grad_g = torch.autograd.grad(g, model.last_layer(), retain_graph=True)[0]
    expected = torch.clamp(grad_n.norm() / (grad_g.norm() + 1e-4), 0, 1e4) * 0.6
    torch.testing.assert_close(logs[LOG_D_WEIGHT], expected, rtol=1e-4, atol=1e-6)


def test_kl_generator_loss_before_disc_start_is_nll_plus_kl():
    torch.manual_seed(1)
    model = AutoencoderKL(dd(True), 3)
    loss_fn = AutoencoderLoss("kl", disc_start=100, kl_weight=1e-3, perceptual_weight=0.0)
    with torch.no_grad():
        loss_fn.logvar.fill_(0.5)
    x = images(2)
    x_rec, aux = model(x, noise=torch.zeros(2, 3, 16, 16))
    loss, logs = loss_fn.generator_loss(x, x_rec, aux, step=99, last_layer=model.last_layer())
    b = x.shape[0]
    rec_sum = torch.abs(x - x_rec).sum()
    # nll = sum(|x-x'| / e^logvar + logvar) / B
    expected_nll = (rec_sum / torch.exp(torch.tensor(0.5)) + 0.5 * x.numel()) / b
    expected = expected_nll + 1e-3 * aux[AUX_KL].sum() / b
    torch.testing.assert_close(logs[LOG_NLL], expected_nll.detach())
    torch.testing.assert_close(loss, expected)
    assert logs[LOG_DISC_FACTOR].item() == 0.0


def test_vq_generator_loss_is_mean_l1_plus_codebook():
    torch.manual_seed(2)
    model = VQModel(dd(False), 3, 16)
    loss_fn = AutoencoderLoss("vq", disc_start=5, codebook_weight=2.0, perceptual_weight=0.0)
    x = images(3)
    x_rec, aux = model(x)
    loss, _ = loss_fn.generator_loss(x, x_rec, aux, step=0, last_layer=model.last_layer())
    torch.testing.assert_close(loss, torch.abs(x - x_rec).mean() + 2.0 * aux[AUX_CODEBOOK_LOSS])


def test_disc_factor_switches_on_at_disc_start():
    torch.manual_seed(3)
    model = VQModel(dd(False), 3, 16)
    loss_fn = AutoencoderLoss("vq", disc_start=10, perceptual_weight=0.0)
    x = images(4)
    x_rec, aux = model(x)
    d_before, logs_before = loss_fn.discriminator_loss(x, x_rec, step=9)
    assert d_before.item() == 0.0 and logs_before[LOG_DISC_FACTOR].item() == 0.0
    loss_fn.discriminator.eval()  # fixed BatchNorm statistics so the two forward passes agree
    d_after, _ = loss_fn.discriminator_loss(x, x_rec, step=10)
    real, fake = loss_fn.discriminator(x), loss_fn.discriminator(x_rec.detach())
    expected = 0.5 * (torch.clamp(1 - real, min=0).mean() + torch.clamp(1 + fake, min=0).mean())
    torch.testing.assert_close(d_after, expected)
    g_before, _ = loss_fn.generator_loss(x, x_rec, aux, step=9, last_layer=model.last_layer())
    g_after, logs_after = loss_fn.generator_loss(x, x_rec, aux, step=10, last_layer=model.last_layer())
    gan = logs_after[LOG_D_WEIGHT] * -fake.mean()
    torch.testing.assert_close(g_after, g_before + gan, rtol=1e-5, atol=1e-6)


def test_no_grad_evaluation_gives_zero_adaptive_weight():
    model = VQModel(dd(False), 3, 16)
    loss_fn = AutoencoderLoss("vq", disc_start=0, perceptual_weight=0.0)
    x = images(5)
    with torch.no_grad():
        x_rec, aux = model(x)
        _, logs = loss_fn.generator_loss(x, x_rec, aux, step=100, last_layer=model.last_layer())
    assert logs[LOG_D_WEIGHT].item() == 0.0


# ---- gradient flow ----------------------------------------------------------------------------------------


@pytest.mark.parametrize("kind", ["kl", "vq"])
def test_gradients_reach_every_trainable_parameter(kind, standin_lpips):
    torch.manual_seed(4)
    model = AutoencoderKL(dd(True), 3) if kind == "kl" else VQModel(dd(False), 3, 4)
    loss_fn = AutoencoderLoss(kind, disc_start=0, perceptual_weight=1.0, perceptual_module=standin_lpips[0])
    x = images(6, n=2)
    x_rec, aux = model(x)
    loss, _ = loss_fn.generator_loss(x, x_rec, aux, step=1, last_layer=model.last_layer())
    loss.backward()
    d_loss, _ = loss_fn.discriminator_loss(x, x_rec, step=1)
    d_loss.backward()
    named = list(model.named_parameters()) + [(f"loss.{n}", p) for n, p in loss_fn.named_parameters() if p.requires_grad]
    no_grad = [n for n, p in named if p.grad is None or not torch.isfinite(p.grad).all() or p.grad.abs().sum() == 0]
    assert not no_grad, f"parameters without gradient: {no_grad}"
    frozen = [n for n, p in loss_fn.perceptual_loss.named_parameters() if p.requires_grad]
    assert not frozen, f"LPIPS must stay frozen: {frozen}"


def test_perceptual_term_contributes_to_the_loss(standin_lpips):
    lp = standin_lpips[0]
    x = images(7)
    assert lp(x, x).abs().max().item() < 1e-6  # LPIPS(x, x) = 0
    loss_fn = AutoencoderLoss("vq", disc_start=10, perceptual_weight=1.0, perceptual_module=lp)
    y = images(8)
    zero = torch.zeros(())
    loss, _ = loss_fn.generator_loss(x, y, {AUX_CODEBOOK_LOSS: zero}, step=0, last_layer=None)
    torch.testing.assert_close(loss, torch.abs(x - y).mean() + lp(x, y).mean())


def test_loss_train_mode_keeps_lpips_in_eval(standin_lpips):
    loss_fn = AutoencoderLoss("kl", disc_start=0, perceptual_module=standin_lpips[0])
    loss_fn.train()
    assert loss_fn.discriminator.training and not loss_fn.perceptual_loss.training


# ---- LPIPS construction ------------------------------------------------------------------------------------


def test_lpips_without_weights_fails_with_instructions():
    with pytest.raises(ArtifactError, match="IMAGENET1K_V1") as info:
        AutoencoderLoss("kl", disc_start=0, perceptual_weight=1.0)
    assert "lpips_backbone_path" in str(info.value) and "allow_standin" in str(info.value)
    with pytest.raises(FileNotFoundError, match="nonexistent_vgg.pth"):
        build_lpips("/nonexistent_vgg.pth", allow_standin=False)


def test_packaged_lpips_linear_layers_are_the_originals():
    import hashlib

    import lpips

    path = Path(lpips.__file__).parent / "weights" / "v0.1" / "vgg.pth"
    assert hashlib.md5(path.read_bytes()).hexdigest() == ORIGINAL_LPIPS_LIN_MD5


def test_standin_is_labelled_and_seeded(standin_lpips):
    module, label = standin_lpips
    assert label == LPIPS_BACKBONE_STANDIN
    state = torch.random.get_rng_state()
    again, _ = build_lpips(None, allow_standin=True, standin_seed=0)
    assert torch.equal(torch.random.get_rng_state(), state), "building LPIPS must not consume the global RNG"
    for (k, a), b in zip(module.state_dict().items(), again.state_dict().values()):
        assert torch.equal(a, b), k
    loss_fn = AutoencoderLoss("kl", disc_start=0, perceptual_weight=0.0)
    assert loss_fn.lpips_backbone == "none" and loss_fn.perceptual_loss is None


def test_backbone_file_in_torchvision_layout_is_loaded(tmp_path, standin_lpips):
    module, _ = standin_lpips
    g = torch.Generator().manual_seed(9)
    tv_state, expected = {}, {}
    for key, value in module.net.state_dict().items():  # keys like slice3.12.weight <-> features.12.weight
        _, idx, param = key.split(".")
        tensor = torch.randn(value.shape, generator=g)
        tv_state[f"features.{idx}.{param}"] = tensor
        expected[key] = tensor
    tv_state["classifier.0.weight"] = torch.zeros(2, 2)  # torchvision files also hold the classifier
    path = tmp_path / "vgg16.pth"
    torch.save(tv_state, path)
    loaded, label = build_lpips(str(path), allow_standin=False)
    assert label == LPIPS_BACKBONE_FILE
    for key, tensor in expected.items():
        assert torch.equal(loaded.net.state_dict()[key], tensor), key
    del tv_state["features.28.bias"]
    torch.save(tv_state, path)
    with pytest.raises(ArtifactError, match=r"features\.28\.bias"):
        build_lpips(str(path), allow_standin=False)


# ---- discriminator -----------------------------------------------------------------------------------------


def test_patch_discriminator_layout_and_init():
    torch.manual_seed(10)
    d = NLayerDiscriminator(input_nc=3, n_layers=3)
    names = {k: tuple(v.shape) for k, v in d.state_dict().items()}
    # pix2pix layout: conv(3->64,s2)+bias; conv(64->128,s2), BN; conv(128->256,s2), BN; conv(256->512,s1), BN;
    # conv(512->1,s1)+bias. Convs followed by BatchNorm have no bias.
    assert names["main.0.weight"] == (64, 3, 4, 4) and "main.0.bias" in names
    assert names["main.2.weight"] == (128, 64, 4, 4) and "main.2.bias" not in names
    assert names["main.3.running_mean"] == (128,)
    assert names["main.8.weight"] == (512, 256, 4, 4)
    assert names["main.11.weight"] == (1, 512, 4, 4) and "main.11.bias" in names
    assert d(torch.randn(2, 3, 32, 32)).shape == (2, 1, 2, 2)
    convs = [m.weight for m in d.modules() if isinstance(m, torch.nn.Conv2d)]
    w = torch.cat([c.flatten() for c in convs])
    assert abs(w.mean().item()) < 1e-3 and abs(w.std().item() - 0.02) < 1e-3
    bns = [m for m in d.modules() if isinstance(m, torch.nn.BatchNorm2d)]
    assert all(torch.equal(m.bias, torch.zeros_like(m.bias)) for m in bns)
    assert abs(torch.cat([m.weight for m in bns]).mean().item() - 1.0) < 5e-3
    two = NLayerDiscriminator(input_nc=3, n_layers=2)
    assert tuple(two.state_dict()["main.5.weight"].shape) == (256, 128, 4, 4)


def test_from_config_uses_yaml_values():
    cfg = validate_autoencoder_cfg(OmegaConf.load(ROOT / "experiments/autoencoder/smoke_vq.yaml"))
    loss_fn = AutoencoderLoss.from_config(cfg.kind, cfg.loss)
    assert loss_fn.disc_start == cfg.loss.disc_start and loss_fn.disc_weight == cfg.loss.disc_weight
    assert loss_fn.perceptual_loss is None and not hasattr(loss_fn, "logvar")
