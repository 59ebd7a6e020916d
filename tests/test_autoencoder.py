"""First-stage models: shapes for every f, attention/downsampling semantics, KL posterior and VQ quantiser
against closed forms, configs (every experiments/autoencoder/*.yaml validates; unknown keys are named)."""
from __future__ import annotations

import math
from pathlib import Path

import pytest
import torch
from omegaconf import OmegaConf

from replication.models.ae_blocks import AttnBlock, Downsample, ResnetBlock, Upsample
from replication.models.autoencoder import (
    AUX_CODEBOOK_LOSS,
    AUX_INDICES,
    AUX_KL,
    AutoencoderKL,
    IdentityFirstStage,
    VQModel,
    build_autoencoder,
    load_first_stage_state,
    make_first_stage,
)
from replication.models.autoencoder_config import (
    AEKind,
    downsampling_factor,
    learning_rate,
    needs_training,
    validate_autoencoder_cfg,
)
from replication.models.distributions import LOGVAR_MAX, DiagonalGaussian
from replication.models.quantize import VectorQuantizer
from replication.utils.schema import ConfigError

ROOT = Path(__file__).resolve().parents[1]
AE_DIR = ROOT / "experiments" / "autoencoder"


@pytest.fixture(autouse=True, scope="module")
def one_thread():
    """Tiny shapes run fastest single-threaded; more threads oversubscribe the shared CPU."""
    before = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(before)


pytestmark = pytest.mark.usefixtures("no_network")  # tests/conftest.py

def tiny_ddconfig(f: int, double_z: bool, attn_type: str = "vanilla") -> dict:
    levels = int(math.log2(f)) + 1
    return dict(
        ch=32,
        out_ch=3,
        ch_mult=[1] * (levels - 1) + [2],
        num_res_blocks=1,
        attn_resolutions=[16] if f >= 2 else [],
        dropout=0.0,
        in_channels=3,
        resolution=32,
        z_channels=4,
        double_z=double_z,
        attn_type=attn_type,
    )


SHAPE_CASES = [("identity", 1)] + [(kind, f) for kind in ("kl", "vq") for f in (2, 4, 8, 16, 32)]


@pytest.mark.parametrize("kind, f", SHAPE_CASES)
def test_latent_and_reconstruction_shapes(kind, f):
    torch.manual_seed(0)
    embed_dim = 3
    if kind == "identity":
        model = make_first_stage(kind, None, embed_dim)
    else:
        model = make_first_stage(kind, tiny_ddconfig(f, double_z=kind == "kl"), embed_dim, n_embed=16)
    assert model.downsampling_factor == f
    assert model.latent_channels == embed_dim
    x = torch.randn(2, 3, 32, 32)
    moments = model.encode_moments(x)
    expected_moment_channels = 2 * embed_dim if kind == "kl" else embed_dim
    assert moments.shape == (2, expected_moment_channels, 32 // f, 32 // f)
    z = model.latent_from_moments(moments)
    assert z.shape == (2, embed_dim, 32 // f, 32 // f)
    assert model.decode(z).shape == x.shape
    x_rec, aux = model(x)
    assert x_rec.shape == x.shape
    if kind == "kl":
        assert aux[AUX_KL].shape == (2,)
    elif kind == "vq":
        assert aux[AUX_CODEBOOK_LOSS].dim() == 0 and aux[AUX_INDICES].shape == (2, 32 // f, 32 // f)


def test_input_not_divisible_by_f_is_rejected():
    model = AutoencoderKL(tiny_ddconfig(4, double_z=True), 3)
    with pytest.raises(ValueError, match="divisible by f=4"):
        model.encode_moments(torch.randn(1, 3, 30, 32))


def test_downsample_pads_right_and_bottom_only():
    # With a stride-2 3x3 conv, an impulse in input row 2 reaches output row 0 only if no top padding is used.
    down = Downsample(1)
    with torch.no_grad():
        down.conv.weight.fill_(1.0)
        down.conv.bias.zero_()
    x = torch.zeros(1, 1, 8, 8)
    x[0, 0, 2, 2] = 1.0
    y = down(x)
    assert y.shape == (1, 1, 4, 4)
    assert y[0, 0, 0, 0] == 1.0 and y[0, 0, 1, 1] == 1.0
    assert y[0, 0, 2:, :].abs().sum() == 0 and y[0, 0, :, 2:].abs().sum() == 0


def test_upsample_is_nearest_then_conv():
    up = Upsample(1)
    with torch.no_grad():
        up.conv.weight.zero_()
        up.conv.weight[0, 0, 1, 1] = 1.0  # identity kernel
        up.conv.bias.zero_()
    x = torch.arange(4.0).reshape(1, 1, 2, 2)
    expected = torch.tensor([[0, 0, 1, 1], [0, 0, 1, 1], [2, 2, 3, 3], [2, 2, 3, 3]], dtype=torch.float32)
    assert torch.equal(up(x)[0, 0], expected)


def test_attention_matches_explicit_softmax():
    torch.manual_seed(1)
    block = AttnBlock(32)
    x = torch.randn(2, 32, 5, 3)
    h = block.norm(x)
    q, k, v = (conv(h).flatten(2) for conv in (block.q, block.k, block.v))  # [B, C, N]
    weights = torch.softmax(torch.einsum("bci,bcj->bij", q, k) / math.sqrt(32), dim=-1)
    out = torch.einsum("bij,bcj->bci", weights, v).reshape(x.shape)
    expected = x + block.proj_out(out)
    torch.testing.assert_close(block(x), expected, atol=1e-5, rtol=1e-5)
    assert block.q.weight.shape == (32, 32, 1, 1)


def test_resnet_block_shortcut_only_when_width_changes():
    assert not hasattr(ResnetBlock(32, 32, 0.0), "nin_shortcut")
    block = ResnetBlock(32, 64, 0.0)
    assert block.nin_shortcut.weight.shape == (64, 32, 1, 1)
    with torch.no_grad():  # zero residual branch -> output is the 1x1 shortcut of x
        block.conv2.weight.zero_()
        block.conv2.bias.zero_()
    x = torch.randn(1, 32, 4, 4)
    torch.testing.assert_close(block(x), block.nin_shortcut(x))


def test_attn_type_none_removes_all_attention():
    model = VQModel(tiny_ddconfig(4, double_z=False, attn_type="none"), 3, 16)
    assert not [k for k in model.state_dict() if "attn" in k]
    assert isinstance(model.encoder.mid.attn_1, torch.nn.Identity)
    with_attn = VQModel(tiny_ddconfig(4, double_z=False), 3, 16)
    assert any("mid.attn_1.q.weight" in k for k in with_attn.state_dict())


def test_group_norm_width_error_names_value():
    dd = tiny_ddconfig(4, double_z=True)
    dd["ch"] = 16
    with pytest.raises(ValueError, match="16"):
        AutoencoderKL(dd, 3)


# ---- KL posterior ---------------------------------------------------------------------------------------


def test_diagonal_gaussian_against_closed_forms():
    torch.manual_seed(2)
    mean = torch.randn(3, 4, 5, 5)
    logvar = torch.randn(3, 4, 5, 5)
    post = DiagonalGaussian(torch.cat([mean, logvar], dim=1))
    noise = torch.randn_like(mean)
    torch.testing.assert_close(post.sample(noise), mean + torch.exp(0.5 * logvar) * noise)
    assert torch.equal(post.mode(), mean)
    ref = torch.distributions.Normal(mean, torch.exp(0.5 * logvar))
    prior = torch.distributions.Normal(torch.zeros_like(mean), torch.ones_like(mean))
    torch.testing.assert_close(post.kl(), torch.distributions.kl_divergence(ref, prior).sum((1, 2, 3)), rtol=1e-5, atol=1e-4)
    other_mean, other_logvar = torch.randn_like(mean), torch.randn_like(mean)
    other = DiagonalGaussian(torch.cat([other_mean, other_logvar], dim=1))
    ref_other = torch.distributions.Normal(other_mean, torch.exp(0.5 * other_logvar))
    torch.testing.assert_close(
        post.kl(other), torch.distributions.kl_divergence(ref, ref_other).sum((1, 2, 3)), rtol=1e-5, atol=1e-3
    )
    s = post.sample(noise)
    torch.testing.assert_close(post.nll(s), -ref.log_prob(s).sum((1, 2, 3)), rtol=1e-5, atol=1e-3)


def test_diagonal_gaussian_clamps_logvar_and_checks_noise():
    post = DiagonalGaussian(torch.cat([torch.zeros(1, 1, 1, 1), torch.full((1, 1, 1, 1), 50.0)], dim=1))
    assert post.logvar.item() == LOGVAR_MAX
    with pytest.raises(ValueError, match="noise shape"):
        post.sample(torch.zeros(1, 2, 1, 1))


def test_kl_model_latent_from_moments():
    model = AutoencoderKL(tiny_ddconfig(4, double_z=True), 3)
    m = torch.randn(2, 6, 8, 8)
    assert torch.equal(model.latent_from_moments(m), m[:, :3])
    noise = torch.randn(2, 3, 8, 8)
    torch.testing.assert_close(model.latent_from_moments(m, noise), m[:, :3] + torch.exp(0.5 * m[:, 3:]) * noise)


# ---- VQ -------------------------------------------------------------------------------------------------


def test_quantiser_picks_nearest_entry_exactly():
    torch.manual_seed(3)
    vq = VectorQuantizer(n_embed=10, embed_dim=4)
    with torch.no_grad():
        vq.embedding.weight.copy_(torch.randn(10, 4))
    z = torch.randn(2, 4, 3, 5)
    z_q, _, idx = vq(z)
    flat = z.permute(0, 2, 3, 1).reshape(-1, 4)
    brute = torch.cdist(flat, vq.embedding.weight).argmin(1).reshape(2, 3, 5)
    assert torch.equal(idx, brute)
    # every output vector is exactly a codebook row
    assert torch.equal(z_q.permute(0, 2, 3, 1), vq.embedding.weight[idx])


def test_quantiser_straight_through_and_legacy_loss_gradients():
    torch.manual_seed(4)
    beta = 0.25
    vq = VectorQuantizer(n_embed=6, embed_dim=3, beta=beta)
    with torch.no_grad():
        vq.embedding.weight.copy_(torch.randn(6, 3))
    z = torch.randn(2, 3, 4, 4, requires_grad=True)
    z_q, loss, idx = vq(z)
    w = torch.randn_like(z_q)
    (grad_z,) = torch.autograd.grad((w * z_q).sum(), z, retain_graph=True)
    torch.testing.assert_close(grad_z, w)  # straight-through: identity Jacobian

    e = vq.embedding.weight.detach()[idx].permute(0, 3, 1, 2)  # [B, C, H, W]
    n = z.numel()
    torch.testing.assert_close(loss, (1 + beta) * ((e - z.detach()) ** 2).mean())
    grad_z_loss, grad_e_loss = torch.autograd.grad(loss, [z, vq.embedding.weight])
    # legacy form: commitment term weight 1 (acts on z), codebook term weight beta (acts on e)
    torch.testing.assert_close(grad_z_loss, -2.0 * (e - z.detach()) / n)
    expected_e = torch.zeros(6, 3)
    diff = (e - z.detach()).permute(0, 2, 3, 1).reshape(-1, 3)
    expected_e.index_add_(0, idx.reshape(-1), 2.0 * beta * diff / n)
    torch.testing.assert_close(grad_e_loss, expected_e)


def test_vq_decode_quantises_the_pre_quantisation_latent():
    torch.manual_seed(5)
    model = VQModel(tiny_ddconfig(4, double_z=False), 3, 16).eval()
    x = torch.randn(1, 3, 16, 16)
    h = model.encode(x)
    assert torch.equal(h, model.encode_moments(x))  # the LDM sees pre-quantisation latents
    x_rec, aux = model(x)
    torch.testing.assert_close(model.decode(h), x_rec)
    z_q = model.quantize.lookup(aux[AUX_INDICES])
    torch.testing.assert_close(model.decode(h), model.decode_quantized(z_q))


def test_last_layer_is_decoder_output_conv():
    model = AutoencoderKL(tiny_ddconfig(4, double_z=True), 3)
    assert model.last_layer() is model.decoder.conv_out.weight


def test_identity_first_stage_has_no_parameters():
    model = IdentityFirstStage(3)
    x = torch.randn(2, 3, 8, 8)
    assert len(list(model.parameters())) == 0
    assert torch.equal(model.decode(model.encode(x)), x)
    assert model.last_layer() is None


def test_load_first_stage_state_drops_loss_keys_and_lists_problems():
    torch.manual_seed(6)
    src = VQModel(tiny_ddconfig(4, double_z=False), 3, 16)
    state = {f"first_stage_model.{k}": v for k, v in src.state_dict().items()}
    state["first_stage_model.loss.logvar"] = torch.zeros(())
    state["model.diffusion_model.x"] = torch.zeros(1)
    dst = VQModel(tiny_ddconfig(4, double_z=False), 3, 16)
    load_first_stage_state(dst, state, prefix="first_stage_model.")
    for k, v in src.state_dict().items():
        assert torch.equal(dst.state_dict()[k], v), k
    bad = dict(src.state_dict())
    bad.pop("quant_conv.bias")
    bad["quantize.embedding.weight"] = torch.zeros(5, 3)
    with pytest.raises(ValueError, match=r"(?s)quant_conv\.bias.*quantize\.embedding\.weight"):
        load_first_stage_state(dst, bad)


# ---- configs --------------------------------------------------------------------------------------------

ALL_YAMLS = sorted(AE_DIR.glob("*.yaml"))
REQUIRED = {
    "kl_f4", "kl_f8", "kl_f16", "kl_f32", "vq_f4", "vq_f4_noattn", "vq_f8", "vq_f8_n256", "vq_f16",
    "vq_f2", "vq_f32", "identity_f1", "smoke_kl", "smoke_vq",
}


def test_required_configs_exist():
    assert REQUIRED <= {p.stem for p in ALL_YAMLS}, REQUIRED - {p.stem for p in ALL_YAMLS}


@pytest.mark.parametrize("path", ALL_YAMLS, ids=lambda p: p.stem)
def test_every_config_validates_and_cites_its_source(path):
    text = path.read_text()
    assert text.startswith("#"), f"{path.name} must open with a comment naming its source"
    cfg = validate_autoencoder_cfg(OmegaConf.load(path))
    assert cfg.name == path.stem
    assert cfg.source.strip()


def test_paper_latent_shapes_of_study_configs():
    # Tab. 13/14: f=2 -> 128x128x2 with |Z|=2048; f=1 is pixel space; f=32 uses Tab. 8's c=16 (see yaml).
    expected = {"vq_f2": (2, 2, 2048), "identity_f1": (1, 3, None), "vq_f32": (32, 16, 16384), "kl_f32": (32, 64, None)}
    for name, (f, c, n) in expected.items():
        cfg = validate_autoencoder_cfg(OmegaConf.load(AE_DIR / f"{name}.yaml"))
        assert (downsampling_factor(cfg), cfg.embed_dim, cfg.n_embed) == (f, c, n), name


def test_smoke_configs_build_and_run():
    for name in ("smoke_kl", "smoke_vq"):
        cfg = validate_autoencoder_cfg(OmegaConf.load(AE_DIR / f"{name}.yaml"))
        assert cfg.loss.disc_start > cfg.train.steps
        model = build_autoencoder(cfg)
        x_rec, _ = model(torch.randn(1, 3, 32, 32))
        assert x_rec.shape == (1, 3, 32, 32)


@pytest.mark.parametrize(
    "path_in_cfg, key",
    [(("ddconfig", "chmult"), "ddconfig.chmult"), (("loss", "kl_wieght"), "loss.kl_wieght"), (("typo",), "typo")],
)
def test_unknown_key_is_rejected_by_name(path_in_cfg, key):
    raw = OmegaConf.to_container(OmegaConf.load(AE_DIR / "kl_f8.yaml"))
    node = raw
    for part in path_in_cfg[:-1]:
        node = node[part]
    node[path_in_cfg[-1]] = 1
    with pytest.raises(ConfigError, match=f"unknown key '{key}'"):
        validate_autoencoder_cfg(raw)


def test_missing_and_inconsistent_configs_are_rejected():
    raw = OmegaConf.to_container(OmegaConf.load(AE_DIR / "vq_f8.yaml"))
    del raw["ddconfig"]["z_channels"]
    with pytest.raises(ConfigError, match="ddconfig.z_channels"):
        validate_autoencoder_cfg(raw)
    raw = OmegaConf.to_container(OmegaConf.load(AE_DIR / "vq_f8.yaml"))
    raw["n_embed"] = None
    with pytest.raises(ConfigError, match="n_embed"):
        validate_autoencoder_cfg(raw)
    raw = OmegaConf.to_container(OmegaConf.load(AE_DIR / "kl_f8.yaml"))
    raw["kind"] = "kll"
    with pytest.raises(ConfigError, match="kind"):
        validate_autoencoder_cfg(raw)


def test_training_helpers():
    cfg = validate_autoencoder_cfg(OmegaConf.load(AE_DIR / "kl_f8.yaml"))
    assert cfg.kind is AEKind.kl and needs_training(cfg)
    # main.py rule: accumulate * n_gpus * batch * base_lr
    assert learning_rate(cfg.train, num_devices=2) == pytest.approx(1 * 2 * 4 * 4.5e-6)
    assert not needs_training(validate_autoencoder_cfg(OmegaConf.load(AE_DIR / "identity_f1.yaml")))
