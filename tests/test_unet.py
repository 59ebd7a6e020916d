"""U-Net (replication/models/unet.py): exact architecture of the released models, numerics of its parts."""
from __future__ import annotations

import json
import math
from pathlib import Path

import numpy as np
import pytest
import torch
from omegaconf import OmegaConf

from replication.models.attention import AttentionBlock, CrossAttention, QKVOrder, SpatialTransformer
from replication.models.compvis import CheckpointMismatchError, load_into
from replication.models.conditioning import ClassConditionalUNet, ClassEmbedder, drop_labels, null_condition, null_labels
from replication.models.unet import UNetModel
from replication.models.unet_blocks import timestep_embedding
from replication.models.unet_config import UNET_CONFIG_KEYS, build_unet, validate_unet_cfg
from replication.utils.schema import ConfigError

ROOT = Path(__file__).resolve().parents[1]
UNET_DIR = ROOT / "experiments" / "unet"
REF_DIR = ROOT / "tests" / "reference" / "compvis_modules"
UNET_PREFIX = "model.diffusion_model."

# Reference module dump (released config / model-zoo checkpoint) -> our experiments/unet/<name>.yaml.
JSON_TO_YAML = {
    "cfg-celebahq-ldm-vq-4": "celebahq_ldm4",
    "ldm-celeba256": "celebahq_ldm4",
    "cfg-ffhq-ldm-vq-4": "ffhq_ldm4",
    "ldm-ffhq256": "ffhq_ldm4",
    "cfg-lsun_bedrooms-ldm-vq-4": "lsun_bedrooms_ldm4",
    "ldm-lsun_beds256": "lsun_bedrooms_ldm4",
    "cfg-lsun_churches-ldm-kl-8": "lsun_churches_ldm8",
    "ldm-lsun_churches256": "lsun_churches_ldm8",
    "cfg-cin-ldm-vq-f8": "cin256",
    "ldm-cin256": "cin256",
    "cfg-cin256-v2": "cin256_v2",
    "ldm-text2img256": "text2img256",
    "cfg-txt2img-1p4B-eval": "txt2img_1p4b",
    "ldm-bsr_sr": "bsr_sr",
    "ldm-inpainting_big": "inpainting_big",
    "ldm-layout2img-openimages256": "layout2img_openimages256",
    "ldm-semantic_synthesis256": "semantic_synthesis256",
    "ldm-semantic_synthesis512": "semantic_synthesis512",
}

# Exact U-Net parameter counts of the released configs (PROTOCOL.md §3; SUMMARY.json `unet_params`).
RELEASED_COUNTS = {
    "celebahq_ldm4": 274_056_163,
    "ffhq_ldm4": 274_056_163,
    "lsun_bedrooms_ldm4": 274_056_163,
    "lsun_churches_ldm8": 294_966_916,
    "cin256": 394_984_196,
    "cin256_v2": 400_920_579,
    "text2img256": 403_623_939,
}


def _meta_unet(name: str) -> UNetModel:
    with torch.device("meta"):
        return build_unet(OmegaConf.load(UNET_DIR / f"{name}.yaml"))


def _n_params(model: torch.nn.Module) -> int:
    return sum(p.numel() for p in model.parameters())


def _ref_unet_shapes(json_name: str) -> dict[str, tuple[int, ...]]:
    sd = json.loads((REF_DIR / f"{json_name}.json").read_text())["state_dict"]
    return {k[len(UNET_PREFIX):]: tuple(v) for k, v in sd.items() if k.startswith(UNET_PREFIX)}


def _tiny(**over) -> UNetModel:
    kw = dict(OmegaConf.to_container(OmegaConf.load(UNET_DIR / "smoke.yaml")))
    kw.update(over)
    return UNetModel(**kw)


def _randomise(model: torch.nn.Module, seed: int = 0, std: float = 0.1) -> None:
    """Overwrite every parameter (zero-initialised output layers would otherwise block all gradients)."""
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for p in model.parameters():
            p.copy_(torch.randn(p.shape, generator=g) * std)


# ---------------------------------------------------------------- architecture vs. the release


@pytest.mark.parametrize("name,count", sorted(RELEASED_COUNTS.items()))
def test_released_parameter_counts(name, count):
    assert _n_params(_meta_unet(name)) == count


def test_every_reference_json_is_mapped():
    with_unet = sorted(
        p.stem for p in REF_DIR.glob("*.json")
        if p.stem != "SUMMARY" and any(k.startswith(UNET_PREFIX) for k in json.loads(p.read_text())["state_dict"])
    )
    assert with_unet, "no reference JSON with U-Net keys found"
    assert sorted(JSON_TO_YAML) == with_unet


@pytest.mark.parametrize("json_name", sorted(JSON_TO_YAML))
def test_names_and_shapes_equal_release(json_name):
    model = _meta_unet(JSON_TO_YAML[json_name])
    ours = {k: tuple(v.shape) for k, v in model.state_dict().items()}
    ref = _ref_unet_shapes(json_name)
    missing, extra = sorted(set(ref) - set(ours)), sorted(set(ours) - set(ref))
    bad = sorted(f"{k}: ref {ref[k]} ours {ours[k]}" for k in set(ref) & set(ours) if ref[k] != ours[k])
    assert not (missing or extra or bad), f"missing {missing[:20]}\nextra {extra[:20]}\nshape {bad[:20]}"
    summary = json.loads((REF_DIR / "SUMMARY.json").read_text())[json_name]
    assert _n_params(model) == summary["unet_params"]
    # A zero state dict built from the JSON loads through the strict loader (stride-0 zeros: no memory).
    zeros = {k: torch.zeros(()).expand(shape) for k, shape in ref.items()}
    load_into(model, zeros, what=json_name, assign=True)
    assert all(float(p.detach().reshape(-1)[0]) == 0.0 for p in model.parameters())


def test_load_into_lists_every_problem_once():
    model = _meta_unet("smoke")
    state = {k: torch.zeros(()).expand(v.shape) for k, v in model.state_dict().items()}
    state.pop("out.2.weight")
    state.pop("input_blocks.0.0.bias")
    state["label_emb.weight"] = torch.zeros(3, 4)
    state["time_embed.0.weight"] = torch.zeros(7, 7)
    with pytest.raises(CheckpointMismatchError) as info:
        load_into(model, state, what="smoke U-Net", assign=True)
    msg = str(info.value)
    for needle in ("smoke U-Net", "out.2.weight", "input_blocks.0.0.bias", "label_emb.weight", "time_embed.0.weight", "(7, 7)"):
        assert needle in msg


def test_head_layout_follows_original_rules():
    churches = _meta_unet("lsun_churches_ldm8")  # num_heads 8, num_head_channels -1
    heads = {m.num_heads for m in churches.modules() if isinstance(m, AttentionBlock)}
    assert heads == {8}
    celeb = _meta_unet("celebahq_ldm4")  # num_head_channels 32 -> heads = ch / 32
    assert all(m.num_heads == m.channels // 32 for m in celeb.modules() if isinstance(m, AttentionBlock))
    assert celeb.middle_block[1].num_heads == 224 * 4 // 32
    v2 = _meta_unet("cin256_v2")  # num_heads 1, legacy: one head of width ch
    for m in v2.modules():
        if isinstance(m, SpatialTransformer):
            attn = m.transformer_blocks[0].attn1
            assert attn.heads == 1 and attn.dim_head == m.in_channels
            assert m.transformer_blocks[0].attn2.to_k.in_features == 512


# ---------------------------------------------------------------- configs


def test_every_unet_yaml_validates_and_builds():
    files = sorted(UNET_DIR.glob("*.yaml"))
    assert len(files) >= 20
    for f in files:
        assert f.read_text().startswith("# Source:"), f"{f.name} must open with a source comment"
        cfg = validate_unet_cfg(OmegaConf.load(f))
        with torch.device("meta"):
            model = build_unet(cfg)
        assert _n_params(model) > 0


def test_imagenet_tab13_configs_sizes():
    # Tab. 13 prints 396M / 391M / 391M / 395M / 395M / 395M for LDM-1..32; LDM-4 disagrees (see yaml).
    expected_m = {"imagenet_ldm1": 396, "imagenet_ldm2": 391, "imagenet_ldm8": 395, "imagenet_ldm16": 395, "imagenet_ldm32": 395}
    for name, m in expected_m.items():
        assert abs(_n_params(_meta_unet(name)) / 1e6 - m) < 1.0, name  # the table rounds inconsistently
    assert _n_params(_meta_unet("imagenet_ldm4")) == RELEASED_COUNTS["cin256_v2"]


def test_config_rejects_unknown_and_missing_keys():
    good = dict(OmegaConf.to_container(OmegaConf.load(UNET_DIR / "smoke.yaml")))
    assert set(good) <= set(UNET_CONFIG_KEYS)
    with pytest.raises(ConfigError, match="num_head_chanels"):
        validate_unet_cfg({**good, "num_head_chanels": 8})
    partial = dict(good)
    del partial["model_channels"]
    with pytest.raises(ConfigError, match="model_channels"):
        validate_unet_cfg(partial)
    with pytest.raises(ConfigError):
        validate_unet_cfg({**good, "model_channels": "wide"})


def test_model_argument_errors():
    with pytest.raises(ValueError, match="context_dim"):
        _tiny(use_spatial_transformer=True)
    model = _tiny(num_classes=5)
    with pytest.raises(ValueError, match="num_classes=5"):
        model(torch.zeros(1, 4, 8, 8), torch.zeros(1, dtype=torch.long))


# ---------------------------------------------------------------- numerics


def test_timestep_embedding_closed_form():
    t = np.array([0, 1, 17, 500, 999], dtype=np.float64)
    for dim in (32, 33):
        half = dim // 2
        freqs = np.exp(-math.log(10000.0) * np.arange(half) / half)
        args = t[:, None] * freqs[None]
        ref = np.concatenate([np.cos(args), np.sin(args)] + ([np.zeros((len(t), 1))] if dim % 2 else []), axis=1)
        ours = timestep_embedding(torch.tensor(t, dtype=torch.long), dim).double().numpy()
        assert ours.shape == (len(t), dim)
        np.testing.assert_allclose(ours, ref, atol=2e-4, rtol=0)


def _legacy_attention_reference(qkv: torch.Tensor, heads: int) -> torch.Tensor:
    """The ADM QKVAttentionLegacy formula written out: per-head [q|k|v], q.k scaled by ch^-1/4 each."""
    b, width, length = qkv.shape
    ch = width // (3 * heads)
    q, k, v = qkv.reshape(b * heads, 3 * ch, length).split(ch, dim=1)
    scale = ch ** -0.25
    w = torch.einsum("bct,bcs->bts", q * scale, k * scale).softmax(dim=-1)
    return torch.einsum("bts,bcs->bct", w, v).reshape(b, -1, length)


def _new_order_attention_reference(qkv: torch.Tensor, heads: int) -> torch.Tensor:
    b, width, length = qkv.shape
    ch = width // (3 * heads)
    q, k, v = qkv.chunk(3, dim=1)
    scale = ch ** -0.25
    w = torch.einsum("bct,bcs->bts", (q * scale).reshape(b * heads, ch, length), (k * scale).reshape(b * heads, ch, length))
    w = w.softmax(dim=-1)
    return torch.einsum("bts,bcs->bct", w, v.reshape(b * heads, ch, length)).reshape(b, -1, length)


@pytest.mark.parametrize("order,reference", [(QKVOrder.LEGACY, _legacy_attention_reference), (QKVOrder.NEW, _new_order_attention_reference)])
def test_attention_block_matches_formula(order, reference):
    torch.manual_seed(0)
    block = AttentionBlock(64, num_head_channels=16, order=order)
    _randomise(block)
    x = torch.randn(2, 64, 4, 5)
    with torch.no_grad():
        flat = x.reshape(2, 64, -1)
        expected = flat + block.proj_out(reference(block.qkv(block.norm(flat)), 4))
        np.testing.assert_allclose(block(x).numpy(), expected.reshape(x.shape).numpy(), atol=1e-5, rtol=1e-5)


def test_cross_attention_matches_formula():
    torch.manual_seed(1)
    attn = CrossAttention(24, context_dim=10, heads=3, dim_head=8)
    x, c = torch.randn(2, 7, 24), torch.randn(2, 5, 10)
    with torch.no_grad():
        q, k, v = (t.reshape(2, -1, 3, 8).permute(0, 2, 1, 3) for t in (attn.to_q(x), attn.to_k(c), attn.to_v(c)))
        w = torch.einsum("bhid,bhjd->bhij", q, k).mul(8 ** -0.5).softmax(-1)
        expected = attn.to_out(torch.einsum("bhij,bhjd->bhid", w, v).permute(0, 2, 1, 3).reshape(2, 7, 24))
        np.testing.assert_allclose(attn(x, c).numpy(), expected.numpy(), atol=1e-5, rtol=1e-5)


@pytest.mark.parametrize("size", [(8, 8), (16, 16), (6, 10), (12, 8)])
def test_output_shape_equals_input_shape(size):
    model = _tiny().eval()
    x = torch.randn(2, 4, *size)
    with torch.no_grad():
        assert model(x, torch.tensor([3, 900])).shape == x.shape


def test_all_attention_goes_through_sdpa(monkeypatch):
    import replication.models.attention as attention_module

    calls = []
    real = attention_module.F.scaled_dot_product_attention

    def counting(*args, **kwargs):
        calls.append(args[0].shape)
        return real(*args, **kwargs)

    monkeypatch.setattr(attention_module.F, "scaled_dot_product_attention", counting)
    for kw, per_layer in (({}, 1), ({"use_spatial_transformer": True, "context_dim": 8, "transformer_depth": 2}, 4)):
        calls.clear()
        model = _tiny(**kw)
        n_layers = sum(isinstance(m, (AttentionBlock, SpatialTransformer)) for m in model.modules())
        with torch.no_grad():
            model(torch.randn(1, 4, 8, 8), torch.tensor([1]), context=torch.randn(1, 2, 8) if kw else None)
        assert n_layers > 0 and len(calls) == n_layers * per_layer


def test_zero_init_output_at_start():
    # ADM zero-initialises the final conv, so a fresh model predicts exactly 0.
    with torch.no_grad():
        out = _tiny()(torch.randn(1, 4, 8, 8), torch.tensor([5]))
    assert torch.count_nonzero(out) == 0


@pytest.mark.parametrize("variant", ["class_labels", "context", "scale_shift_updown"])
def test_gradient_reaches_every_parameter(variant):
    torch.manual_seed(0)
    if variant == "class_labels":
        model, kw = _tiny(num_classes=3), {"y": torch.tensor([0, 1, 2])}
    elif variant == "context":
        model = _tiny(use_spatial_transformer=True, context_dim=12, transformer_depth=2)
        kw = {"context": torch.randn(3, 5, 12)}
    else:
        model, kw = _tiny(use_scale_shift_norm=True, resblock_updown=True, num_head_channels=-1, num_heads=2), {}
    _randomise(model)
    out = model(torch.randn(3, 4, 8, 8), torch.tensor([1, 500, 999]), **kw)
    out.square().mean().backward()
    dead = [n for n, p in model.named_parameters() if p.grad is None or torch.count_nonzero(p.grad) == 0]
    assert not dead, f"no gradient for {dead}"


def test_gradient_checkpointing_same_gradients():
    torch.manual_seed(0)
    a = _tiny(use_spatial_transformer=True, context_dim=8)
    _randomise(a)
    b = _tiny(use_spatial_transformer=True, context_dim=8, gradient_checkpointing=True)
    b.load_state_dict(a.state_dict())
    x, t, c = torch.randn(2, 4, 8, 8), torch.tensor([3, 7]), torch.randn(2, 3, 8)
    for m in (a, b):
        m.train()
        m(x, t, context=c).square().sum().backward()
    for (n, pa), (_, pb) in zip(a.named_parameters(), b.named_parameters()):
        torch.testing.assert_close(pa.grad, pb.grad, rtol=1e-5, atol=1e-6, msg=n)


def test_bf16_autocast_close_to_fp32():
    torch.manual_seed(0)
    model = _tiny(use_spatial_transformer=True, context_dim=8, num_classes=4).eval()
    _randomise(model, std=0.05)
    x, t, c, y = torch.randn(2, 4, 8, 8), torch.tensor([10, 800]), torch.randn(2, 3, 8), torch.tensor([1, 3])
    with torch.no_grad():
        ref = model(x, t, context=c, y=y)
        with torch.autocast("cpu", dtype=torch.bfloat16):
            low = model(x, t, context=c, y=y)
    assert low.dtype == torch.bfloat16  # autocast really ran the convolutions in bf16
    rel = (low.float() - ref).norm() / ref.norm()
    assert rel < 0.03, f"relative error {rel:.4f}"


def test_batch_independence():
    torch.manual_seed(0)
    model = _tiny(num_classes=3).eval()
    _randomise(model)
    x, t, y = torch.randn(3, 4, 8, 8), torch.tensor([1, 2, 3]), torch.tensor([0, 1, 2])
    with torch.no_grad():
        full = model(x, t, y=y)
        single = torch.cat([model(x[i : i + 1], t[i : i + 1], y=y[i : i + 1]) for i in range(3)])
    torch.testing.assert_close(full, single, rtol=1e-4, atol=1e-5)


# ---------------------------------------------------------------- conditioning


def test_class_embedder_and_null_condition():
    emb = ClassEmbedder(embed_dim=6, n_classes=11, null_class=10)
    assert [k for k, _ in emb.named_parameters()] == ["embedding.weight"]
    labels = torch.tensor([0, 3, 10])
    out = emb(labels)
    assert out.shape == (3, 1, 6)
    torch.testing.assert_close(out[:, 0], emb.embedding.weight[labels])
    torch.testing.assert_close(null_condition(emb, 2)[:, 0], emb.embedding.weight[[10, 10]])
    assert null_labels(emb, 4).tolist() == [10] * 4
    with pytest.raises(ValueError, match="11"):
        emb(torch.tensor([11]))
    with pytest.raises(ValueError, match="null class"):
        null_condition(ClassEmbedder(4, n_classes=5), 1)


def test_drop_labels_rate():
    g = torch.Generator().manual_seed(0)
    labels = torch.zeros(20_000, dtype=torch.long)
    dropped = drop_labels(labels, 0.1, null_class=1000, generator=g)
    frac = (dropped == 1000).float().mean().item()
    assert abs(frac - 0.1) < 4 * math.sqrt(0.1 * 0.9 / 20_000)
    assert torch.equal(drop_labels(labels, 0.0, 1000), labels)


def test_class_conditional_unet_trains_embedding():
    torch.manual_seed(0)
    unet = _tiny(use_spatial_transformer=True, context_dim=6)
    model = ClassConditionalUNet(unet, ClassEmbedder(6, n_classes=4, null_class=3))
    _randomise(model)
    y = torch.tensor([0, 3])
    out = model(torch.randn(2, 4, 8, 8), torch.tensor([5, 6]), y)
    assert out.shape == (2, 4, 8, 8)
    out.square().mean().backward()
    grad = model.cond_stage_model.embedding.weight.grad
    assert torch.count_nonzero(grad[[0, 3]]) > 0 and torch.count_nonzero(grad[[1, 2]]) == 0
    assert {k.split(".")[0] for k in model.state_dict()} == {"diffusion_model", "cond_stage_model"}
