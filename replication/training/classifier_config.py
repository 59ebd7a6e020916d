"""The `classifier` config group (experiments/classifier/*.yaml): the noisy-latent classifier of classifier
guidance (LDM-8-G, paper Tab. 10) and how the train_classifier stage trains it.

`model: null` (classifier=none, the default) is no classifier: the stage records itself disabled and
`sampler.classifier_scale` must stay 0. Otherwise `model` holds the classifier's sizes (`NoisyClassifierConfig`,
checked by `validate_noisy_classifier_cfg`) and the training keys are required. The checks that need other groups
(the latent the classifier reads, the class labels it guides toward, the cache it trains on) are in
`check_classifier_fits`, which `replication.config.validate_config` calls on the whole typed config."""
from __future__ import annotations

from dataclasses import dataclass
from typing import Any, Mapping, Optional

from omegaconf import DictConfig

from replication.models.noisy_classifier import NoisyClassifierConfig, validate_noisy_classifier_cfg
from replication.training.classifier_trainer import CLASSIFIER_LR, CLASSIFIER_WEIGHT_DECAY
from replication.utils.schema import ConfigError, check_range, merge_into_schema

# the training keys, which mean nothing without a classifier (a value there would be silently ignored)
TRAINING_KEYS = ("steps", "batch_size")


@dataclass
class ClassifierGroupConfig:
    """Schema of the `classifier` group. lr, weight_decay and anneal_lr default to guided-diffusion's ImageNet
    classifier flags (classifier_trainer.py); steps and batch_size have no default: each config says them."""

    name: str = "none"
    model: Optional[NoisyClassifierConfig] = None  # null: no classifier
    steps: Optional[int] = None
    batch_size: Optional[int] = None
    lr: float = CLASSIFIER_LR
    weight_decay: float = CLASSIFIER_WEIGHT_DECAY
    anneal_lr: bool = True  # the learning rate falls linearly to 0 over `steps`
    log_every: int = 100  # a stats.jsonl record every this many steps
    source: str = ""

    @property
    def enabled(self) -> bool:
        return self.model is not None


def validate_classifier_group_cfg(cfg: Mapping[str, Any] | DictConfig | None) -> ClassifierGroupConfig:
    """Check the `classifier` group; None (a config without the group) is classifier=none. Raises ConfigError
    naming the key."""
    if cfg is None:
        return ClassifierGroupConfig()
    group = merge_into_schema(ClassifierGroupConfig, cfg, "classifier", key_prefix="classifier.")
    if group.model is None:
        given = [k for k in TRAINING_KEYS if getattr(group, k) is not None]
        if given:
            raise ConfigError(f"classifier.{given[0]} is set but classifier.model is null (no classifier to train); "
                              "choose a classifier (classifier=ldm8, classifier=smoke) or leave it out")
        return group
    try:
        group.model = validate_noisy_classifier_cfg(group.model)
    except ConfigError as exc:  # its keys live under classifier.model here
        raise ConfigError(str(exc).replace("classifier.", "classifier.model.")) from None
    for key in TRAINING_KEYS:
        if getattr(group, key) is None:
            raise ConfigError(f"classifier.{key} is required when classifier.model is set")
        check_range(getattr(group, key), f"classifier.{key}", low=1)
    check_range(group.lr, "classifier.lr", low=0.0, low_open=True)
    check_range(group.weight_decay, "classifier.weight_decay", low=0.0)
    check_range(group.log_every, "classifier.log_every", low=1)
    return group


def check_classifier_fits(typed: Any) -> None:
    """The classifier against the rest of the typed config (`replication.config.TypedConfig`):

    - it reads the LDM's latent: its image_size and in_channels are the U-Net's latent side and channels;
    - it guides a class-conditional model toward the sampled labels: conditioning.kind class_label or
      class_embed, and the same number of classes;
    - it trains on the encode_latents cache, which exists only when train_ldm trains on it (trainer.use_latent_cache
      and no trainer.pretrained);
    - sampler.classifier_scale > 0 needs a classifier."""
    group, scale = typed.classifier, typed.sampler.classifier_scale
    if scale > 0.0 and not group.enabled:
        raise ConfigError(f"sampler.classifier_scale={scale:g} guides with a noisy-latent classifier, but classifier "
                          "is none: choose one (classifier=ldm8, classifier=smoke) or set sampler.classifier_scale=0")
    if not group.enabled:
        return
    model, unet, cond = group.model, typed.unet, typed.root.conditioning
    if (model.image_size, model.in_channels) != (unet.image_size, unet.out_channels):
        raise ConfigError(f"classifier.model reads {model.in_channels}x{model.image_size}x{model.image_size} latents "
                          f"but the LDM's latent is {unet.out_channels}x{unet.image_size}x{unet.image_size} (unet."
                          "out_channels, unet.image_size): set classifier.model.in_channels and image_size to match")
    if cond.kind.value not in ("class_label", "class_embed"):
        raise ConfigError(f"classifier guidance steers a class-conditional LDM toward its sampled labels: "
                          f"conditioning.kind must be class_label or class_embed, got {cond.kind.value}")
    if model.num_classes != cond.num_classes:
        raise ConfigError(f"classifier.model.num_classes={model.num_classes} but conditioning.num_classes="
                          f"{cond.num_classes}: the classifier must score the classes the LDM samples")
    trainer = typed.trainer
    if trainer.pretrained or not trainer.use_latent_cache:
        raise ConfigError("the classifier trains on the encode_latents cache, which is written only when train_ldm "
                          "trains on it: it needs trainer.use_latent_cache=true and no trainer.pretrained")
