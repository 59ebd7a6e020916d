"""Where each stage's artifacts live, and how later stages load them. Stages meet only at these files."""
from __future__ import annotations

from pathlib import Path
from typing import Any

import torch

from replication.config import CONCAT_KINDS, ConditioningKind, TypedConfig
from replication.training.checkpoint import check_state_dict_fits
from replication.utils.io import ArtifactError, load_tensors, read_json

AE_WEIGHTS = "train_autoencoder/model.safetensors"
AE_META = "train_autoencoder/meta.json"
LDM_EMA = "train_ldm/ema.safetensors"
LDM_RAW = "train_ldm/model.safetensors"
LDM_META = "train_ldm/meta.json"
LDM_STATE_DIR = "train_ldm/state"
LDM_SNAPSHOTS = "train_ldm/snapshots"
CLASSIFIER_WEIGHTS = "train_classifier/classifier.safetensors"
CLASSIFIER_META = "train_classifier/classifier.json"
SAMPLES_DIR = "sample/samples"
CURVES_DIR = "sample/curves"
METRICS_FILE = "metrics.json"
RECON_METRICS_FILE = "recon_metrics.json"


def build_first_stage(typed: TypedConfig) -> torch.nn.Module:
    from replication.models.autoencoder import build_autoencoder

    return build_autoencoder(typed.autoencoder)


def load_first_stage(run_dir: Path, typed: TypedConfig, device: torch.device) -> torch.nn.Module:
    model = build_first_stage(typed)
    path = run_dir / AE_WEIGHTS
    if any(True for _ in model.parameters()):
        if not path.exists():
            raise ArtifactError(f"autoencoder weights {path} are missing: run the train_autoencoder stage first")
        state = load_tensors(path)
        check_state_dict_fits(model, state, f"autoencoder weights {path}")
        model.load_state_dict(state)
    return model.to(device).eval().requires_grad_(False)


def build_unet(typed: TypedConfig) -> torch.nn.Module:
    """The denoiser eps(x, t[, y]); class_embed experiments wrap the U-Net with the original's ClassEmbedder."""
    from replication.models.unet_config import build_unet as build_unet_model

    unet = build_unet_model(typed.unet)
    cond = typed.root.conditioning
    if cond.kind == ConditioningKind.class_embed:
        from replication.models.conditioning import ClassConditionalUNet, ClassEmbedder

        if not typed.unet.context_dim:
            raise ArtifactError("conditioning.kind=class_embed needs a U-Net with context_dim (cross-attention)")
        return ClassConditionalUNet(unet, ClassEmbedder(typed.unet.context_dim, n_classes=cond.n_embed_classes))
    if cond.kind == ConditioningKind.text:
        from replication.config import text_encoder_config
        from replication.models.text_encoder import TextConditionalUNet, build_text_embedder

        # the release's BERTEmbedder, trained jointly with the U-Net from scratch (cond_stage_trainable)
        return TextConditionalUNet(unet, build_text_embedder(text_encoder_config(cond)))
    if cond.kind in CONCAT_KINDS:
        from replication.models.concat_conditioning import ConcatConditionalUNet

        # both tasks build their condition outside the network (the release's cond_stage is the identity for SR;
        # for inpainting the first stage itself encodes the masked image)
        return ConcatConditionalUNet(unet)
    return unet


def num_label_classes(typed: TypedConfig) -> int | None:
    """How many real classes the denoiser is conditioned on (None: unconditional)."""
    cond = typed.root.conditioning
    if cond.kind in CONCAT_KINDS or cond.kind == ConditioningKind.text:
        return None
    if cond.kind == ConditioningKind.none:
        if typed.unet.num_classes:
            raise ArtifactError(f"unet.num_classes={typed.unet.num_classes} but conditioning.kind=none; "
                                "set conditioning.kind=class_label")
        return None
    return cond.num_classes


def caption_tokenizer(typed: TypedConfig):
    """The tokenizer of a text experiment (`conditioning.vocab_path`), refused when its vocabulary has more entries
    than the text encoder has token embeddings (an id past the table would fail only in the first forward)."""
    from replication.config import text_encoder_config
    from replication.data.tokenizer import CaptionTokenizer

    cond = typed.root.conditioning
    tokenizer = CaptionTokenizer(cond.vocab_path)
    encoder = text_encoder_config(cond)
    if tokenizer.vocab_size > encoder.vocab_size:
        raise ArtifactError(f"{tokenizer.vocab_path} holds {tokenizer.vocab_size} tokens but the text encoder embeds "
                            f"{encoder.vocab_size} (conditioning.text_encoder.vocab_size): use the vocabulary the "
                            "encoder was built for (bert-base-uncased: 30522)")
    return tokenizer


def load_unet_weights(unet: torch.nn.Module, path: Path) -> None:
    """Our safetensors weights into `unet`, in place (its tensors keep their identity: a compiled call stays valid);
    a file of another model is refused naming the tensors."""
    state = load_tensors(path)
    check_state_dict_fits(unet, state, f"LDM weights {path}")
    unet.load_state_dict(state)


def load_ldm(run_dir: Path, typed: TypedConfig, device: torch.device, weights: str | Path | None = None,
             use_ema: bool = True) -> tuple[torch.nn.Module, dict[str, Any]]:
    unet = build_unet(typed)
    path = Path(weights) if weights else run_dir / (LDM_EMA if use_ema else LDM_RAW)
    if not path.exists():
        raise ArtifactError(f"LDM weights {path} are missing: run the train_ldm stage first")
    load_unet_weights(unet, path)
    meta = read_json(run_dir / LDM_META)
    return unet.to(device).eval().requires_grad_(False), meta


def load_classifier(run_dir: Path, typed: TypedConfig, device: torch.device) -> torch.nn.Module:
    """The train_classifier stage's noisy-latent classifier, in eval mode, fp32 and frozen (guidance takes the
    gradient with respect to its input only). Refused when it was trained for other classifier settings than the
    config's (the stage must run again first)."""
    from replication.config import to_container
    from replication.models.noisy_classifier import build_noisy_classifier

    group = typed.classifier
    if not group.enabled:
        raise ArtifactError("classifier guidance needs a classifier, and the config's classifier group is none")
    path, meta_path = run_dir / CLASSIFIER_WEIGHTS, run_dir / CLASSIFIER_META
    if not path.exists() or not meta_path.exists():
        raise ArtifactError(f"classifier weights {path} are missing: run the train_classifier stage first")
    trained = read_json(meta_path).get("classifier")
    if trained != to_container(group):
        raise ArtifactError(f"{path} was trained with other classifier settings than classifier={group.name} gives "
                            "now: run the train_classifier stage again (python -m replication.run does)")
    classifier = build_noisy_classifier(group.model)
    state = load_tensors(path)
    check_state_dict_fits(classifier, state, f"classifier weights {path}")
    classifier.load_state_dict(state)
    return classifier.to(device=device, dtype=torch.float32).eval().requires_grad_(False)


def to_uint8(x: torch.Tensor) -> torch.Tensor:
    """[-1, 1] float NCHW -> uint8 NCHW, rounding as the original's sample export ((x+1)*127.5)."""
    return ((x.float().clamp(-1, 1) + 1) * 127.5).round().to(torch.uint8)
