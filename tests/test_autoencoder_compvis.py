"""Parameter names and shapes of our first stages equal the original release's, so its checkpoints load with
strict=True. References: tests/reference/compvis_modules/{ae,cfg,ldm}-*.json (name -> shape of every tensor)."""
from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch
from omegaconf import OmegaConf

from replication.models.autoencoder import VQModel, build_autoencoder, load_first_stage_state
from replication.models.autoencoder_config import AEKind, validate_autoencoder_cfg

ROOT = Path(__file__).resolve().parents[1]
REF = ROOT / "tests" / "reference" / "compvis_modules"
AE_DIR = ROOT / "experiments" / "autoencoder"

# Released first stage -> our yaml.
AE_REFERENCES = {
    "ae-kl-f4": "kl_f4", "ae-kl-f8": "kl_f8", "ae-kl-f16": "kl_f16", "ae-kl-f32": "kl_f32",
    "ae-vq-f4": "vq_f4", "ae-vq-f4-noattn": "vq_f4_noattn", "ae-vq-f8": "vq_f8", "ae-vq-f8-n256": "vq_f8_n256",
    "ae-vq-f16": "vq_f16",
}
# Released LDM (config or checkpoint) -> the first stage it embeds (autoencoders.csv / hyperparameters.csv).
LDM_REFERENCES = {
    "cfg-celebahq-ldm-vq-4": "vq_f4", "cfg-cin-ldm-vq-f8": "vq_f8", "cfg-cin256-v2": "vq_f4",
    "cfg-ffhq-ldm-vq-4": "vq_f4", "cfg-lsun_bedrooms-ldm-vq-4": "vq_f4", "cfg-lsun_churches-ldm-kl-8": "kl_f8",
    "cfg-txt2img-1p4B-eval": "kl_f8", "ldm-bsr_sr": "vq_f4", "ldm-celeba256": "vq_f4", "ldm-cin256": "vq_f8",
    "ldm-ffhq256": "vq_f4", "ldm-inpainting_big": "vq_f4_noattn", "ldm-layout2img-openimages256": "vq_f4",
    "ldm-lsun_beds256": "vq_f4", "ldm-lsun_churches256": "kl_f8", "ldm-semantic_synthesis256": "vq_f4",
    "ldm-semantic_synthesis512": "vq_f4", "ldm-text2img256": "vq_f4",
}


pytestmark = pytest.mark.usefixtures("no_network")  # tests/conftest.py

def reference_shapes(name: str, prefix: str) -> dict[str, tuple[int, ...]]:
    data = json.loads((REF / f"{name}.json").read_text())
    return {k[len(prefix):]: tuple(v) for k, v in data["state_dict"].items() if k.startswith(prefix)}


def build_on_meta(yaml_name: str):
    cfg = validate_autoencoder_cfg(OmegaConf.load(AE_DIR / f"{yaml_name}.yaml"))
    with torch.device("meta"):  # shapes only: no 100M-parameter init on the CPU
        return cfg, build_autoencoder(cfg)


def compare_and_load(model, ref: dict[str, tuple[int, ...]], label: str) -> None:
    own = {k: tuple(v.shape) for k, v in model.state_dict().items() if k.startswith(("encoder.", "decoder."))}
    only_ours, only_ref = sorted(set(own) - set(ref)), sorted(set(ref) - set(own))
    assert not only_ours and not only_ref, f"{label}: keys only in ours {only_ours}; only in reference {only_ref}"
    mismatched = [f"{k}: ours {own[k]} vs ref {ref[k]}" for k in sorted(own) if own[k] != ref[k]]
    assert not mismatched, f"{label}: shape mismatches {mismatched}"
    for part in ("encoder", "decoder"):
        zeros = {k[len(part) + 1:]: torch.zeros(s, device="meta") for k, s in ref.items() if k.startswith(part + ".")}
        getattr(model, part).load_state_dict(zeros, strict=True)


def test_every_reference_file_is_covered():
    files = {p.stem for p in REF.glob("*.json")} - {"SUMMARY"}
    ae_files = {f for f in files if f.startswith("ae-")}
    ldm_files = {f for f in files if f.startswith(("cfg-", "ldm-"))}
    assert ae_files == set(AE_REFERENCES), ae_files ^ set(AE_REFERENCES)
    assert ldm_files == set(LDM_REFERENCES), ldm_files ^ set(LDM_REFERENCES)


@pytest.mark.parametrize("ref_name", sorted(AE_REFERENCES))
def test_released_autoencoder_names_and_shapes(ref_name):
    cfg, model = build_on_meta(AE_REFERENCES[ref_name])
    ref = reference_shapes(ref_name, "")
    compare_and_load(model, ref, ref_name)
    data = json.loads((REF / f"{ref_name}.json").read_text())
    ours = sum(v.numel() for k, v in model.state_dict().items() if k.startswith(("encoder.", "decoder.")))
    assert ours == data["num_elements"]

    # Not listed in the reference but present in the checkpoints: shapes of the original 1x1 convs / codebook.
    extra = {k: tuple(v.shape) for k, v in model.state_dict().items() if not k.startswith(("encoder.", "decoder."))}
    z, e = cfg.ddconfig.z_channels, cfg.embed_dim
    if cfg.kind is AEKind.kl:
        expected = {
            "quant_conv.weight": (2 * e, 2 * z, 1, 1), "quant_conv.bias": (2 * e,),
            "post_quant_conv.weight": (z, e, 1, 1), "post_quant_conv.bias": (z,),
        }
    else:
        expected = {
            "quant_conv.weight": (e, z, 1, 1), "quant_conv.bias": (e,),
            "post_quant_conv.weight": (z, e, 1, 1), "post_quant_conv.bias": (z,),
            "quantize.embedding.weight": (cfg.n_embed, e),
        }
    assert extra == expected


@pytest.mark.parametrize("ref_name", sorted(LDM_REFERENCES))
def test_first_stage_inside_released_ldms(ref_name):
    _, model = build_on_meta(LDM_REFERENCES[ref_name])
    ref = reference_shapes(ref_name, "first_stage_model.")
    compare_and_load(model, ref, ref_name)


def test_original_style_checkpoint_loads_through_helper():
    _, model = build_on_meta("vq_f4_noattn")
    state = {f"first_stage_model.{k}": torch.zeros(v.shape, device="meta") for k, v in model.state_dict().items()}
    state["first_stage_model.loss.discriminator.main.0.weight"] = torch.zeros(64, 3, 4, 4, device="meta")
    state["model.diffusion_model.input_blocks.0.0.weight"] = torch.zeros(1, device="meta")
    assert isinstance(model, VQModel)
    load_first_stage_state(model, state, prefix="first_stage_model.")
    state.pop("first_stage_model.decoder.conv_out.bias")
    with pytest.raises(ValueError, match=r"missing \(1\):\s+decoder\.conv_out\.bias"):
        load_first_stage_state(model, state, prefix="first_stage_model.")
