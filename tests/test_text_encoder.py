"""The text / layout conditioning encoder (replication/models/text_encoder.py): the released BERTEmbedders' tensor
names, shapes and counts, its numerics against x-transformers' formulas, and the text-conditional denoiser."""
from __future__ import annotations

import json
import math
from pathlib import Path

import pytest
import torch
from omegaconf import OmegaConf

from replication.models.compvis import load_into
from replication.models.conditioning import ema_scope
from replication.models.ema import EMA
from replication.models.text_encoder import (
    RELEASED_TEXT_ENCODERS,
    TextConditionalUNet,
    TextEmbedder,
    build_text_embedder,
    validate_text_encoder_cfg,
)
from replication.models.unet import UNetModel
from replication.utils.schema import ConfigError

ROOT = Path(__file__).resolve().parents[1]
REF_DIR = ROOT / "tests" / "reference" / "compvis_modules"
UNET_DIR = ROOT / "experiments" / "unet"
COND_PREFIX = "cond_stage_model."

# released encoder -> (its parameter dump, the released U-Net config whose context_dim it feeds, its parameter count)
RELEASED = {
    "txt2img-1p4B": ("cond-txt2img-1p4B", "txt2img_1p4b", 581_994_042),
    "text2img256": ("cond-text2img256", "text2img256", 186_154_682),
    "layout2img-openimages256": ("cond-layout2img-openimages256", "layout2img_openimages256", 58_858_496),
}


def _reference(dump: str) -> tuple[dict, dict[str, tuple[int, ...]]]:
    ref = json.loads((REF_DIR / f"{dump}.json").read_text())
    sd = ref["state_dict"]
    items = sd.items() if isinstance(sd, dict) else sd
    shapes = {name[len(COND_PREFIX):]: tuple(shape) for name, shape in items}
    assert all(name.startswith(COND_PREFIX) for name, _ in (sd.items() if isinstance(sd, dict) else sd))
    return ref, shapes


def _tiny_embedder(**over) -> TextEmbedder:
    kw = dict(n_embed=16, n_layer=2, vocab_size=50, max_seq_len=12)
    kw.update(over)
    return TextEmbedder(**kw)


@pytest.mark.parametrize("name", sorted(RELEASED))
def test_names_shapes_and_counts_equal_release(name):
    dump, _, count = RELEASED[name]
    ref, shapes = _reference(dump)
    with torch.device("meta"):
        model = build_text_embedder(RELEASED_TEXT_ENCODERS[name])
    ours = {k: tuple(v.shape) for k, v in model.state_dict().items()}
    assert ours == shapes
    n = sum(p.numel() for p in model.parameters())
    assert n == count == ref["num_elements"]
    assert len(ours) == ref["num_tensors"]
    cfg = RELEASED_TEXT_ENCODERS[name]
    assert {k: getattr(cfg, k) for k in ref["params"]} == ref["params"]


@pytest.mark.parametrize("name", sorted(RELEASED))
def test_context_width_feeds_the_released_unet(name):
    _, unet_yaml, _ = RELEASED[name]
    unet_cfg = OmegaConf.load(UNET_DIR / f"{unet_yaml}.yaml")
    assert RELEASED_TEXT_ENCODERS[name].n_embed == unet_cfg.context_dim


def test_released_state_loads_by_name():
    """A state dict named as the release's cond_stage_model.* (prefix removed) loads into the encoder."""
    model = _tiny_embedder()
    state = {k: torch.randn_like(v) for k, v in _tiny_embedder().state_dict().items()}
    load_into(model, state, what="tiny encoder")
    assert all(torch.equal(model.state_dict()[k], v) for k, v in state.items())


def _x_transformers_reference(model: TextEmbedder, tokens: torch.Tensor) -> torch.Tensor:
    """The release's forward, written from ldm/modules/x_transformer.py with einsum attention and explicit ops."""
    sd = model.state_dict()
    p = "transformer."
    dim = sd[p + "norm.weight"].shape[0]
    x = sd[p + "token_emb.weight"][tokens] + sd[p + "pos_emb.emb.weight"][: tokens.shape[1]][None]
    depth2 = len({k.split(".")[3] for k in sd if k.startswith(p + "attn_layers.layers.")})
    for i in range(depth2):
        lp = f"{p}attn_layers.layers.{i}."
        h = torch.nn.functional.layer_norm(x, (dim,), sd[lp + "0.weight"], sd[lp + "0.bias"], eps=1e-5)
        if i % 2 == 0:
            b, n, _ = h.shape
            q, k, v = (h @ sd[f"{lp}1.to_{w}.weight"].T for w in "qkv")
            q, k, v = (t.reshape(b, n, 8, -1).permute(0, 2, 1, 3) for t in (q, k, v))
            dots = torch.einsum("bhid,bhjd->bhij", q, k) * q.shape[-1] ** -0.5
            out = torch.einsum("bhij,bhjd->bhid", dots.softmax(dim=-1), v).permute(0, 2, 1, 3).reshape(b, n, -1)
            out = out @ sd[lp + "1.to_out.weight"].T + sd[lp + "1.to_out.bias"]
        else:
            g = h @ sd[lp + "1.net.0.0.weight"].T + sd[lp + "1.net.0.0.bias"]
            g = 0.5 * g * (1 + torch.erf(g / math.sqrt(2)))
            out = g @ sd[lp + "1.net.2.weight"].T + sd[lp + "1.net.2.bias"]
        x = x + out
    return torch.nn.functional.layer_norm(x, (dim,), sd[p + "norm.weight"], sd[p + "norm.bias"], eps=1e-5)


def test_forward_matches_x_transformers_formulas():
    torch.manual_seed(0)
    model = _tiny_embedder(n_embed=24, n_layer=3).eval()
    with torch.no_grad():
        for prm in model.parameters():  # LayerNorm weights 1 / biases 0 by default would hide a swapped norm
            prm.normal_(0, 0.3)
    tokens = torch.randint(0, 50, (3, 12))
    with torch.no_grad():
        ours = model(tokens)
        ref = _x_transformers_reference(model, tokens)
    assert ours.shape == (3, 12, 24)
    torch.testing.assert_close(ours, ref, rtol=1e-5, atol=1e-5)


def test_no_padding_mask_and_batch_independence():
    """Padding ids change the other positions' context (no mask, as the release); samples do not mix."""
    torch.manual_seed(1)
    model = _tiny_embedder().eval()
    a = torch.tensor([[2, 5, 7, 3] + [0] * 8])
    b = torch.tensor([[2, 5, 7, 3] + [9] * 8])
    with torch.no_grad():
        ca, cb, both = model(a), model(b), model(torch.cat([a, b]))
    assert not torch.allclose(ca[0, :4], cb[0, :4])
    torch.testing.assert_close(both, torch.cat([ca, cb]))


def test_input_errors():
    model = _tiny_embedder()
    with pytest.raises(ValueError, match="2-D"):
        model(torch.zeros(12, dtype=torch.long))
    with pytest.raises(TypeError, match="integer"):
        model(torch.zeros(1, 12))
    with pytest.raises(ValueError, match="max_seq_len 12"):
        model(torch.zeros(1, 13, dtype=torch.long))
    with pytest.raises(ValueError, match=r"out of range \[0, 50\)"):
        model(torch.full((1, 12), 50))


def test_config_validation():
    cfg = validate_text_encoder_cfg({"n_embed": 32, "n_layer": 2})
    assert (cfg.vocab_size, cfg.max_seq_len, cfg.embedding_dropout) == (30522, 77, 0.0)
    with pytest.raises(ConfigError, match="n_layers"):
        validate_text_encoder_cfg({"n_embed": 32, "n_layers": 2})
    with pytest.raises(ConfigError, match="n_layer"):
        validate_text_encoder_cfg({"n_embed": 32})
    with pytest.raises(ConfigError, match="text_encoder.max_seq_len"):
        validate_text_encoder_cfg({"n_embed": 32, "n_layer": 2, "max_seq_len": 0})
    with pytest.raises(ConfigError, match="cond.embedding_dropout"):
        validate_text_encoder_cfg({"n_embed": 32, "n_layer": 2, "embedding_dropout": 1.0}, group="cond")


def test_embedding_init_and_frozen_lm_head():
    torch.manual_seed(0)
    model = TextEmbedder(n_embed=64, n_layer=1, vocab_size=4000, max_seq_len=77)
    t = model.transformer
    assert abs(t.token_emb.weight.std().item() - 0.02) < 0.002
    assert abs(t.pos_emb.emb.weight.std().item() - 0.02) < 0.004
    assert not any(p.requires_grad for p in t.to_logits.parameters())
    trainable = {n for n, p in model.named_parameters() if p.requires_grad}
    assert trainable == {n for n in model.state_dict() if not n.startswith("transformer.to_logits.")}


def _tiny_cross_attention_unet(context_dim: int) -> UNetModel:
    """The smoke U-Net with cross-attention, its weights drawn at random: the zero-initialised output layers of a
    fresh U-Net would make eps (and the encoder's gradient) independent of the context."""
    kw = dict(OmegaConf.to_container(OmegaConf.load(UNET_DIR / "smoke.yaml")))
    kw.update(use_spatial_transformer=True, context_dim=context_dim)
    unet = UNetModel(**kw)
    with torch.no_grad():
        for prm in unet.parameters():
            prm.normal_(0, 0.1)
    return unet


def test_text_conditional_unet_shapes_gradients_and_ema_scope():
    torch.manual_seed(0)
    embedder = _tiny_embedder(n_embed=16, max_seq_len=77, vocab_size=60)
    model = TextConditionalUNet(_tiny_cross_attention_unet(context_dim=16), embedder)
    tokens = torch.randint(0, 60, (2, 77))
    assert embedder(tokens).shape == (2, 77, 16)
    x = torch.randn(2, 4, 8, 8)
    eps = model(x, torch.tensor([3, 500]), tokens)
    assert eps.shape == x.shape
    eps.square().mean().backward()
    # the encoder trains jointly with the U-Net (cond_stage_trainable): its layers receive gradients
    grads = {n: p.grad for n, p in model.cond_stage_model.named_parameters() if p.requires_grad}
    assert grads and all(g is not None and g.abs().sum() > 0 for g in grads.values())
    assert ema_scope(model) == "diffusion_model."
    ema = EMA(model, scope=ema_scope(model))
    assert ema.state_dict() and not any(k.startswith("cond_stage_model") for k in ema.state_dict())


def test_text_conditional_unet_uses_the_tokens():
    torch.manual_seed(0)
    embedder = _tiny_embedder(n_embed=16)
    model = TextConditionalUNet(_tiny_cross_attention_unet(context_dim=16), embedder).eval()
    x, t = torch.randn(1, 4, 8, 8), torch.tensor([10])
    with torch.no_grad():
        e1 = model(x, t, torch.tensor([[2, 5, 7, 3] + [0] * 8]))
        e2 = model(x, t, torch.tensor([[2, 6, 7, 3] + [0] * 8]))
    assert not torch.allclose(e1, e2)
