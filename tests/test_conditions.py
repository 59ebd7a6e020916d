"""The concat tasks' conditions made from prepared images: fresh per training visit, fixed per evaluation image,
and the config checks that keep them consistent with the model."""
from __future__ import annotations

import numpy as np
import pytest
import torch

from replication.config import ConfigError, validate_config
from replication.data.conditions import (ConditionError, EvaluationConditions, Inpainting, SuperResolution,
                                         evaluation_rngs, scaled_mask_config, square_mask, task_conditions,
                                         training_rngs)
from replication.data.masks import mask_config
from replication.stages.entry import compose


class _Images:
    """The two things EvaluationConditions reads of a prepared split."""

    def __init__(self, arr: np.ndarray):
        self.arr = arr

    def __len__(self) -> int:
        return len(self.arr)

    def get_batch(self, idx: np.ndarray) -> np.ndarray:
        return self.arr[np.asarray(idx)]


def _images(n: int = 6, size: int = 32, seed: int = 0) -> np.ndarray:
    return np.random.default_rng(seed).integers(0, 256, (n, size, size, 3), dtype=np.uint8)


def test_superres_inputs_are_the_degraded_images_in_unit_range():
    images = _images(3)
    task = SuperResolution("pil_bicubic", 4)
    out = task.make(images, evaluation_rngs(0, "val", np.arange(3)))
    assert out["lowres"].shape == (3, 3, 8, 8) and out["image"].shape == (3, 3, 32, 32)
    assert out["lowres"].min() >= -1 and out["lowres"].max() <= 1
    from PIL import Image

    want = np.array(Image.fromarray(images[1]).resize((8, 8), Image.Resampling.BICUBIC))
    np.testing.assert_array_equal(out["lowres_uint8"][1], want)
    torch.testing.assert_close(out["lowres"][1], torch.from_numpy(want).permute(2, 0, 1).float() / 127.5 - 1)
    torch.testing.assert_close(task.concat(out, lambda x: x, torch.device("cpu")), out["lowres"])


def test_random_degradations_differ_per_visit_and_repeat_per_seed():
    images = _images(2)
    task = SuperResolution("bsrgan_light", 4)
    g1, g2 = torch.Generator().manual_seed(5), torch.Generator().manual_seed(5)
    a = task.make(images, training_rngs(g1, 2))["lowres_uint8"]
    b = task.make(images, training_rngs(g2, 2))["lowres_uint8"]
    np.testing.assert_array_equal(a, b)  # the same generator state, the same degradations
    c = task.make(images, training_rngs(g1, 2))["lowres_uint8"]  # the next visit draws new ones
    assert not np.array_equal(a, c)


def test_masks_scale_from_lama_sizes_and_respect_the_area_limit():
    thick = mask_config("thick")
    assert scaled_mask_config(thick, 512) is thick
    small = scaled_mask_config(thick, 32)
    assert small.strokes.max_width == round(250 / 16) and small.boxes.bbox_max_size == round(300 / 16)
    areas = [square_mask(32, small, np.random.default_rng(i)).mean() for i in range(40)]
    assert max(areas) <= thick.max_tamper_area and np.mean(areas) > 0.02  # holes of real size, never over 50%


def test_inpainting_inputs_follow_the_release_conventions():
    images = _images(4)
    task = Inpainting("thick")
    out = task.make(images, evaluation_rngs(0, "val", np.arange(4)))
    mask, masked, image = out["mask"], out["masked_image"], out["image"]
    assert set(torch.unique(mask).tolist()) <= {-1.0, 1.0}  # +1 hole, -1 known
    hole = mask > 0
    assert torch.all(masked[hole.expand_as(masked)] == -1)  # (1 - m) * x in [0, 1], scaled: the hole is -1
    torch.testing.assert_close(masked[~hole.expand_as(masked)], image[~hole.expand_as(image)])
    np.testing.assert_allclose(out["area"], (mask > 0).float().flatten(1).mean(1).numpy())
    code = task.concat(out, lambda x: torch.nn.functional.avg_pool2d(x, 4), torch.device("cpu"))
    assert code.shape == (4, 4, 8, 8)  # 3 channels of the (toy) code + the mask resized to the latent
    assert set(torch.unique(code[:, 3]).tolist()) <= {-1.0, 1.0}


def test_evaluation_conditions_are_fixed_per_image_in_any_order():
    images = _Images(_images(6))
    cond = EvaluationConditions(Inpainting("thin"), images, "val", 3, lambda x: x, torch.device("cpu"))
    together = cond.inputs(np.array([4, 1, 2]))
    alone = cond.inputs(np.array([1]))
    torch.testing.assert_close(together["mask"][1], alone["mask"][0])
    other_seed = EvaluationConditions(Inpainting("thin"), images, "val", 4, lambda x: x, torch.device("cpu"))
    assert not torch.equal(other_seed.inputs(np.array([1]))["mask"], alone["mask"])
    with pytest.raises(ConditionError, match="7 samples .* has 6"):
        cond.check_count(7)


def test_inpainting_output_keeps_the_input_outside_the_hole():
    images = _Images(_images(3))
    cond = EvaluationConditions(Inpainting("thick"), images, "val", 0, lambda x: x, torch.device("cpu"))
    inputs = cond.inputs(np.arange(3))
    decoded = torch.rand(3, 3, 32, 32) * 2 - 1
    out = cond.finish(inputs, decoded)
    known = (inputs["mask"] < 0).expand_as(out)
    torch.testing.assert_close(out[known], inputs["image"][known])
    torch.testing.assert_close(out[~known], decoded[~known])


def test_unknown_options_and_sizes_are_refused_by_name():
    with pytest.raises(ConditionError, match="degradation 'bicubik'"):
        SuperResolution("bicubik", 4)
    with pytest.raises(ConditionError, match="mask_config 'wide'"):
        Inpainting("wide")
    with pytest.raises(ConditionError, match="multiple of 4"):
        SuperResolution("pil_bicubic", 4).make(_images(1, size=30), evaluation_rngs(0, "val", [0]))


@pytest.mark.parametrize("overrides, message", [
    (["experiment=smoke_sr", "conditioning.sr_factor=2"], "multiple of the autoencoder.s downsampling factor f=4"),
    (["experiment=smoke_sr", "conditioning.degradation=bicubik"], "bicubik"),
    (["experiment=smoke_inpaint", "conditioning.mask_config=wide"], "wide"),
    (["experiment=smoke_inpaint", "unet.in_channels=7"], "in_channels must be 9"),
])
def test_config_checks_name_the_setting(overrides, message):
    with pytest.raises(ConfigError, match=message):
        validate_config(compose(overrides))


def test_training_a_concat_model_on_cached_latents_is_refused_before_any_stage(tmp_path):
    from replication.preflight import preflight

    typed = validate_config(compose(["experiment=smoke_sr", "trainer.use_latent_cache=true"]))  # loads for inference
    with pytest.raises(ConfigError, match="set trainer.use_latent_cache=false"):
        preflight(typed)
    sample_only = validate_config(compose(["experiment=smoke_sr", "trainer.use_latent_cache=true",
                                           f"runs_root={tmp_path}", "stages=[sample]"]))
    preflight(sample_only)  # nothing trains: nothing to refuse


def test_task_experiments_build_their_conditions():
    sr = validate_config(compose(["experiment=smoke_sr"]))
    assert task_conditions(sr.root.conditioning) == SuperResolution("pil_bicubic", 4)
    inpaint = validate_config(compose(["experiment=smoke_inpaint"]))
    assert task_conditions(inpaint.root.conditioning) == Inpainting("thick")
    assert task_conditions(validate_config(compose(["experiment=smoke"])).root.conditioning) is None


def test_a_pixel_space_model_reads_the_input_upsampled_to_its_size():
    images = _images(2)
    pixel = task_conditions(validate_config(compose(["experiment=imagenet_sr_pixel"])).root.conditioning, 1)
    assert pixel == SuperResolution("pil_bicubic", 4, upsample=4)
    inputs = pixel.make(images, evaluation_rngs(0, "val", np.arange(2)))
    joined = pixel.concat(inputs, lambda x: x, torch.device("cpu"))
    assert joined.shape == (2, 3, 32, 32)  # the image's size: f = 1
    want = torch.nn.functional.interpolate(inputs["lowres"], scale_factor=4, mode="bicubic", align_corners=False)
    torch.testing.assert_close(joined, want.clamp(-1, 1))
    latent = SuperResolution("pil_bicubic", 4)  # LDM-4: the latent has the input's size, nothing is resampled
    torch.testing.assert_close(latent.concat(inputs, lambda x: x, torch.device("cpu")), inputs["lowres"])
