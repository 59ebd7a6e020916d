"""Text-to-image through the stages' parts: the config checks of conditioning.kind=text, the training captions as token
ids with caption dropout drawn from the loop's generator, the joint training of the text encoder (its context comes
from the captions), classifier-free guidance against the empty prompt, and the evaluation's probe record. Real tiny
networks on the CPU."""
from __future__ import annotations

import numpy as np
import pytest
import torch

from replication.config import ConfigError, conditioning_record, validate_config
from replication.data.builtin import builtin_vocabulary, colour_rgb
from replication.data.tokenizer import CaptionTokenizer
from replication.diffusion.denoiser import GuidanceError, sampling_denoiser
from replication.models.conditioning import ema_scope
from replication.models.ema import EMA
from replication.models.text_encoder import TextConditionalUNet, TextEmbedder
from replication.stages.entry import compose
from replication.stages.evaluate import text_probe_record
from replication.stages.train_ldm import _CaptionSource

pytestmark = pytest.mark.usefixtures("one_thread")  # tests/conftest.py


@pytest.fixture
def tokenizer(tmp_path) -> CaptionTokenizer:
    path = tmp_path / "vocab.txt"
    path.write_text("".join(t + "\n" for t in builtin_vocabulary()))
    return CaptionTokenizer(path)


def _typed(*overrides: str):
    return validate_config(compose(["experiment=smoke_txt2img", *overrides]))


@pytest.mark.parametrize("override, message", [
    ("conditioning.vocab_path=null", "conditioning.vocab_path"),
    ("unet.context_dim=16", "unet.context_dim 32"),
    ("conditioning.text_encoder.max_seq_len=64", "max_seq_len must be 77"),
    ("conditioning.text_encoder.n_layer=0", "conditioning.text_encoder.n_layer"),
    ("diffusion.null_class=3", "empty prompt"),
    ("conditioning.caption_drop_prob=0.0", "never saw"),
    ("conditioning.caption_drop_prob=1.5", "conditioning.caption_drop_prob"),
    ("conditioning.probe_prompts=[a cat on a mat]", "probe_prompts[0]"),
    ("conditioning.probe_samples=0", "probe_samples >= 1"),
])
def test_text_config_errors_name_the_key(override, message):
    with pytest.raises(ConfigError, match=message.replace("[", r"\[")):
        _typed(override)


def test_text_settings_stay_out_of_the_other_kinds_keys():
    cin = validate_config(compose(["experiment=smoke_cin"])).root.conditioning
    assert set(conditioning_record(cin)) == {"kind", "num_classes", "n_embed_classes", "degradation", "sr_factor",
                                             "mask_config", "eval_seed"}
    text = conditioning_record(_typed().root.conditioning)
    assert text["vocab_path"].endswith("vocab.txt") and text["text_encoder"]["n_embed"] == 32
    # a guided released model needs no training dropout of its own
    assert _typed("conditioning.caption_drop_prob=0.0", "trainer.pretrained=x.ckpt").sampler.guidance_scale == 1.5


def test_training_tokens_are_the_captions_with_seeded_dropout(tokenizer):
    captions = [f"a {c} disc on a red and blue gradient" for c in ("green", "white", "grey", "yellow")] * 500
    source = _CaptionSource(captions, tokenizer, drop_prob=0.25)
    idx = torch.arange(len(captions))
    tokens = source.tokens(idx, torch.Generator().manual_seed(3))
    empty = tokenizer([""])[0]
    dropped = (tokens == empty).all(1)
    assert abs(dropped.float().mean().item() - 0.25) < 0.03  # 2000 draws: sd 0.0097
    np.testing.assert_array_equal(tokens[~dropped], tokenizer([captions[i] for i in idx[~dropped].tolist()]))
    again = source.tokens(idx, torch.Generator().manual_seed(3))
    assert torch.equal(tokens, again)
    picked = torch.tensor([7, 2, 7])
    assert torch.equal(_CaptionSource(captions, tokenizer, 0.0).tokens(picked, torch.Generator()),
                       tokenizer([captions[7], captions[2], captions[7]]))


def _tiny_text_model(vocab_size: int) -> TextConditionalUNet:
    from replication.models.unet import UNetModel

    torch.manual_seed(0)
    unet = UNetModel(image_size=8, in_channels=4, out_channels=4, model_channels=32, attention_resolutions=[1],
                     num_res_blocks=1, channel_mult=[1], num_head_channels=16, use_spatial_transformer=True,
                     transformer_depth=1, context_dim=16)
    for p in unet.parameters():  # the release zero-initialises the output convs: start from a model that reads tokens
        if not p.abs().sum():
            torch.nn.init.normal_(p, std=0.05)
    return TextConditionalUNet(unet, TextEmbedder(n_embed=16, n_layer=1, vocab_size=vocab_size))


def test_the_encoder_trains_jointly_on_the_caption_tokens_and_stays_out_of_the_ema(tokenizer):
    """One training step through TrainStep: the token embeddings of words in the captions move by their gradients,
    those of words in no caption only by AdamW's weight decay (a factor), so the context comes from the captions; the
    EMA covers the U-Net only, as the release's LitEma."""
    from replication.diffusion.objective import LossType
    from replication.diffusion.schedule import Schedule
    from replication.perf import FastPath
    from replication.training.step import MicroBatch, TrainStep

    model = _tiny_text_model(tokenizer.vocab_size)
    ema = EMA(model, decay=0.9, scope=ema_scope(model))
    assert ema.param_to_shadow and all(n.startswith("diffusion_model.") for n in ema.param_to_shadow)
    before = model.cond_stage_model.transformer.token_emb.weight.detach().clone()
    step = TrainStep(model, ema, Schedule.make("linear", 1000, 0.0015, 0.0195), LossType.L2, FastPath(),
                     torch.device("cpu"), lr=1e-2, betas=(0.9, 0.999), weight_decay=0.01)
    step.wrap()
    tokens = tokenizer(["a red disc on a blue and green gradient", "a red square on a blue and green gradient"])
    g = torch.Generator().manual_seed(0)
    batch = MicroBatch(torch.randn(2, 4, 8, 8, generator=g), torch.tensor([100, 700]), torch.randn(2, 4, 8, 8, generator=g),
                       tokens)
    step.step(lambda: batch)
    after = model.cond_stage_model.transformer.token_emb.weight.detach()
    used = sorted(set(tokens.flatten().tolist()))
    unused = [i for i in range(tokenizer.vocab_size) if i not in used]
    assert "white" in [builtin_vocabulary()[i] for i in unused]
    decay = 1 - 1e-2 * 0.01
    torch.testing.assert_close(after[unused], before[unused] * decay)
    moved = (after[used] - before[used] * decay).abs().amax(1)
    assert (moved > 1e-3).all()


def test_guidance_is_against_the_empty_prompt(tokenizer):
    model = _tiny_text_model(tokenizer.vocab_size).eval()
    prompts = tokenizer(["a red disc on a blue and green gradient", "a grey ring on a white and red gradient"])
    empty = tokenizer([""])
    x, t = torch.randn(2, 4, 8, 8, generator=torch.Generator().manual_seed(1)), torch.tensor([500, 20])
    with torch.no_grad():
        eps_c = model(x, t, tokens=prompts)
        eps_u = model(x, t, tokens=empty.expand(2, -1))
        guided = sampling_denoiser(model, None, None, 1.5, tokens=prompts, null_tokens=empty)(x, t)
        plain = sampling_denoiser(model, None, None, 1.0, tokens=prompts)(x, t)
    torch.testing.assert_close(guided, eps_u + 1.5 * (eps_c - eps_u), rtol=1e-4, atol=1e-5)
    torch.testing.assert_close(plain, eps_c)
    assert (eps_c - eps_u).abs().max() > 1e-4  # the prompt changes the prediction
    with pytest.raises(GuidanceError, match="empty prompt"):
        sampling_denoiser(model, None, None, 2.0, tokens=prompts)
    with pytest.raises(GuidanceError, match="token ids alone"):
        sampling_denoiser(model, torch.tensor([0, 1]), 3, 1.0, tokens=prompts)


def test_probe_record_says_whether_the_prompts_steer_the_colours():
    warm = "a white disc on a red and yellow gradient"
    cold = "a white disc on a blue and green gradient"
    target_w = (colour_rgb("red") + colour_rgb("yellow")) / 2
    target_c = (colour_rgb("blue") + colour_rgb("green")) / 2
    uncond = np.full((4, 3), 128.0)
    steered = text_probe_record([warm, cold], [np.tile(target_w, (4, 1)), np.tile(target_c, (4, 1))], uncond)
    assert steered["captions_matter"] and steered["separation"]["along_named"] == pytest.approx(1.0)
    assert steered["prompts"][0]["named_colours"] == ["red", "yellow"] and steered["prompts"][0]["distance_to_named"] == 0
    ignored = text_probe_record([warm, cold], [uncond, uncond], uncond)
    assert not ignored["captions_matter"] and ignored["separation"]["samples_distance"] == 0
