"""Every experiment composes, validates against the schemas and builds its real objects; configs are strict."""
from __future__ import annotations

import dataclasses
from pathlib import Path

import pytest
import yaml
from omegaconf import OmegaConf

from replication.config import GROUPS, ConfigError, validate_config
from replication.models.unet_config import UNetConfig
from replication.stages.entry import CONFIG_DIR, compose

EXPERIMENTS = sorted(p.stem for p in (CONFIG_DIR / "experiment").glob("*.yaml"))
PAPER_ROWS = {
    "celebahq_ldm4", "ffhq_ldm4", "lsun_churches_ldm8", "lsun_bedrooms_ldm4", "imagenet_cin_ldm4",
    "imagenet_cin_ldm4_cfg", "imagenet_ldm1", "imagenet_ldm2", "imagenet_ldm4", "imagenet_ldm8", "imagenet_ldm16",
    "imagenet_ldm32", "ae_kl_f4", "ae_kl_f8", "ae_kl_f16", "ae_kl_f32", "ae_vq_f4", "ae_vq_f4_noattn", "ae_vq_f8",
    "ae_vq_f8_n256", "ae_vq_f16", "smoke",
}


def test_every_paper_row_has_an_experiment_file():
    assert PAPER_ROWS <= set(EXPERIMENTS), sorted(PAPER_ROWS - set(EXPERIMENTS))


@pytest.mark.parametrize("name", EXPERIMENTS)
def test_experiment_composes_and_validates(name):
    cfg = compose([f"experiment={name}"])
    typed = validate_config(cfg)
    assert typed.root.name == name
    text = (CONFIG_DIR / "experiment" / f"{name}.yaml").read_text()
    assert text.startswith("# @package _global_\n#"), "each experiment opens with a comment naming its table row"


@pytest.mark.parametrize("name", [e for e in EXPERIMENTS if not e.startswith("ae_")])
def test_experiment_instantiates_real_objects(name):
    """Build the U-Net and first stage on the meta device (shapes only), the schedule, and check the wiring."""
    import torch

    from replication.config import CONCAT_KINDS, CONCAT_TASK
    from replication.stages.artifacts import build_first_stage, build_unet

    typed = validate_config(compose([f"experiment={name}"]))
    with torch.device("meta"):
        unet = build_unet(typed)
        first = build_first_stage(typed)
    assert first.latent_channels == typed.unet.out_channels
    kind = typed.root.conditioning.kind
    if kind in CONCAT_KINDS:  # the U-Net also reads the concatenated condition
        from replication.models.concat_conditioning import concat_in_channels

        assert typed.unet.in_channels == concat_in_channels(CONCAT_TASK[kind], first.latent_channels)
    else:
        assert typed.unet.in_channels == first.latent_channels
    schedule = typed.diffusion.make_schedule()
    assert schedule.num_timesteps == typed.diffusion.timesteps


def test_dvc_experiment_lists_match_files():
    lists = yaml.safe_load((CONFIG_DIR / "dvc_experiments.yaml").read_text())
    assert sorted(lists["all_experiments"]) == EXPERIMENTS
    assert sorted(lists["ldm_experiments"] + lists["ae_experiments"]) == EXPERIMENTS
    for name in lists["ae_experiments"]:
        assert validate_config(compose([f"experiment={name}"])).root.kind.value == "autoencoder"


def test_the_typed_config_has_one_attribute_per_group():
    typed = validate_config(compose(["experiment=smoke"]))
    assert tuple(f.name for f in dataclasses.fields(typed)) == ("root", *GROUPS)
    assert isinstance(typed.unet, UNetConfig)
    with pytest.raises(TypeError):
        typed["unet"]  # groups are attributes, never looked up by a string
    with pytest.raises(dataclasses.FrozenInstanceError):
        typed.unet = typed.unet


def test_unknown_top_level_key_is_rejected_with_its_name():
    cfg = compose(["experiment=smoke"])
    OmegaConf.set_struct(cfg, False)
    cfg.learnig_rate = 1.0
    with pytest.raises(ConfigError, match="learnig_rate"):
        validate_config(cfg)


@pytest.mark.parametrize("group,key", [("trainer", "stepz"), ("sampler", "etaa"), ("unet", "model_chanels"),
                                       ("diffusion", "linear_strat"), ("metrics", "fid_samples"),
                                       ("dataset", "resolutoin"), ("autoencoder", "embed_dims")])
def test_mistyped_group_key_is_rejected_with_its_name(group, key):
    cfg = compose(["experiment=smoke"])
    OmegaConf.set_struct(cfg, False)
    cfg[group][key] = 1
    with pytest.raises(ConfigError, match=key):
        validate_config(cfg)


def test_command_line_override_of_unknown_key_fails():
    from hydra.errors import ConfigCompositionException

    with pytest.raises(ConfigCompositionException, match="stepz"):
        compose(["experiment=smoke", "trainer.stepz=3"])


def test_bad_enum_value_lists_allowed_values():
    cfg = compose(["experiment=smoke", "trainer.precision=fp16"])
    with pytest.raises(ConfigError, match="fp32"):
        validate_config(cfg)


@pytest.mark.parametrize("key", ["trainer.compile_mode", "sampling_speed.compile_mode"])
def test_compile_modes_are_checked_when_the_config_is_read(key):
    """A mistyped torch.compile mode fails at once, naming the key, not on the first GPU compile hours later
    (on a CPU the sampler never compiles, so the value would not be looked at)."""
    with pytest.raises(ConfigError, match=rf"{key}.*reduce-overhead.*'reduce_overhead'"):
        validate_config(compose(["experiment=smoke", f"{key}=reduce_overhead"]))
    typed = validate_config(compose(["experiment=smoke", f"{key}=reduce-overhead"]))
    section = typed.trainer if key.startswith("trainer.") else typed.root.sampling_speed
    assert section.compile_mode == "reduce-overhead"


def test_unknown_stage_name_rejected():
    cfg = compose(["experiment=smoke", "force=[trian_ldm]"])
    with pytest.raises(ConfigError, match="trian_ldm"):
        validate_config(cfg)


def test_experiment_files_hold_only_overrides():
    """Experiment files change groups and a few keys; they never restate a whole group."""
    for path in (CONFIG_DIR / "experiment").glob("*.yaml"):
        data = yaml.safe_load(path.read_text())
        for group in ("unet", "autoencoder", "dataset", "metrics"):
            assert group not in data or len(data[group]) <= 3, f"{path.name} restates group {group}"


# the *_release experiments apply released weights to images and train nothing here (inpainting_big's batch and
# iterations are stated nowhere)
@pytest.mark.parametrize("name", [e for e in EXPERIMENTS if not e.startswith(("ae_", "smoke")) and not e.endswith("_release")])
def test_experiments_train_with_the_papers_batch_and_learning_rate(name):
    """On one process, each paper row's trainer gives the global batch and the effective learning rate its
    paper_protocol states (Tab. 12-15), as the report will check them."""
    from replication.diffusion.lr_schedule import effective_lr

    typed = validate_config(compose([f"experiment={name}"]))
    trainer, paper = typed.trainer, typed.root.paper_protocol
    assert paper.train_global_batch is not None and paper.train_lr is not None, name
    assert trainer.batch_size * trainer.accumulate_grad_batches == paper.train_global_batch
    lr = effective_lr(trainer.base_lr, trainer.batch_size, 1, trainer.accumulate_grad_batches, trainer.scale_lr)
    assert lr == pytest.approx(paper.train_lr, rel=1e-9)


def test_first_line_of_an_error_message():
    from replication.utils.errors import first_line

    assert first_line(RuntimeError("Connection closed by peer\n  context\n  more")) == "Connection closed by peer"
    assert first_line(KeyError()) == "KeyError" and first_line(ValueError(" \n")) == "ValueError"
