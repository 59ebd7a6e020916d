"""Reading original CompVis checkpoints (replication/models/compvis.py): splitting, EMA name mapping, CLI, safety."""
from __future__ import annotations

import json
import os
import subprocess
import sys
import types
from pathlib import Path

import pytest
import torch
from omegaconf import OmegaConf
from torch import nn

from replication.models.compvis import (
    BUFFERS,
    COND_STAGE,
    EMA_META,
    EMA_UNET,
    FIRST_STAGE,
    OTHER,
    UNET,
    CheckpointMismatchError,
    UnsafeCheckpointError,
    ema_to_unet_names,
    load_compvis_checkpoint,
    load_into,
    split_ldm_state,
)
from replication.models.unet_config import build_unet
from replication.utils.io import load_tensors

ROOT = Path(__file__).resolve().parents[1]
REF_DIR = ROOT / "tests" / "reference" / "compvis_modules"
SMOKE_UNET = ROOT / "experiments" / "unet" / "smoke.yaml"
AE_DIR = ROOT / "experiments" / "autoencoder"


def _smoke_unet() -> nn.Module:
    torch.manual_seed(0)
    model = build_unet(OmegaConf.load(SMOKE_UNET))
    with torch.no_grad():
        for p in model.parameters():
            p.normal_()
    return model


def _fake_ldm_checkpoint(path: Path) -> tuple[nn.Module, dict[str, torch.Tensor]]:
    """An original-style Lightning checkpoint of a LatentDiffusion module, built from a tiny U-Net.

    EMA keys are written the way LitEma names them (independently of replication.models.ema): the dots of
    'diffusion_model.<param>' removed; their values are the raw weights + 1 so EMA and raw differ.
    """
    unet = _smoke_unet()
    sd: dict[str, torch.Tensor] = {f"model.diffusion_model.{k}": v.clone() for k, v in unet.state_dict().items()}
    for k, v in unet.state_dict().items():
        sd["model_ema." + f"diffusion_model.{k}".replace(".", "")] = v.clone() + 1
    sd["model_ema.decay"] = torch.tensor(0.9999)
    sd["model_ema.num_updates"] = torch.tensor(1234, dtype=torch.int32)
    sd["first_stage_model.encoder.conv_in.weight"] = torch.randn(8, 3, 3, 3)
    sd["first_stage_model.quantize.embedding.weight"] = torch.randn(16, 4)
    sd["cond_stage_model.embedding.weight"] = torch.randn(11, 6)
    betas = torch.linspace(0.0015**0.5, 0.0195**0.5, 1000, dtype=torch.float64) ** 2
    sd["betas"] = betas.float()
    sd["alphas_cumprod"] = torch.cumprod(1 - betas, 0).float()
    sd["scale_factor"] = torch.tensor(0.5)
    ckpt = {
        "epoch": 3,
        "global_step": 1234,
        "pytorch-lightning_version": "1.4.2",
        "state_dict": sd,
        "optimizer_states": [{"state": {}, "param_groups": [{"lr": 1e-4}]}],
        "lr_schedulers": [],
    }
    torch.save(ckpt, path)
    return unet, sd


def test_fake_checkpoint_round_trip(tmp_path):
    unet, sd = _fake_ldm_checkpoint(tmp_path / "last.ckpt")
    loaded = load_compvis_checkpoint(tmp_path / "last.ckpt")
    assert set(loaded) == set(sd)
    parts = split_ldm_state(loaded)
    assert set(parts[UNET]) == set(unet.state_dict())
    assert set(parts[EMA_UNET]) == set(unet.state_dict())
    for name, value in unet.state_dict().items():
        torch.testing.assert_close(parts[UNET][name], value)
        torch.testing.assert_close(parts[EMA_UNET][name], value + 1)
    assert set(parts[FIRST_STAGE]) == {"encoder.conv_in.weight", "quantize.embedding.weight"}
    assert set(parts[COND_STAGE]) == {"embedding.weight"}
    assert set(parts[BUFFERS]) == {"betas", "alphas_cumprod", "scale_factor"}
    assert int(parts[EMA_META]["num_updates"]) == 1234
    assert parts[OTHER] == {}
    target = build_unet(OmegaConf.load(SMOKE_UNET))
    load_into(target, parts[EMA_UNET], what="smoke U-Net (EMA)")
    torch.testing.assert_close(target.out[2].weight, unet.out[2].weight + 1)


def test_released_unet_names_have_unique_ema_names():
    # LitEma removes dots, so e.g. input_blocks.1.1.* and input_blocks.11.* could collide; none do.
    for yaml in sorted((ROOT / "experiments" / "unet").glob("*.yaml")):
        with torch.device("meta"):
            names = list(build_unet(OmegaConf.load(yaml)).state_dict())
        dummy = {("diffusion_model." + n).replace(".", ""): torch.zeros(()) for n in names}
        assert set(ema_to_unet_names(dummy, names)) == set(names), yaml.name


def test_unmapped_ema_key_is_an_error(tmp_path):
    _, sd = _fake_ldm_checkpoint(tmp_path / "a.ckpt")
    sd["model_ema.diffusion_modelnot_a_layerweight"] = torch.zeros(1)
    with pytest.raises(CheckpointMismatchError, match="not_a_layer"):
        split_ldm_state(sd)


def _run_cli(*args: str) -> subprocess.CompletedProcess:
    env = {**os.environ, "PYTHONPATH": str(ROOT) + os.pathsep + os.environ.get("PYTHONPATH", "")}
    return subprocess.run(
        [sys.executable, "-m", "replication.models.compvis", *args], cwd=ROOT, env=env, capture_output=True, text=True, timeout=120
    )


def test_convert_cli_ldm(tmp_path):
    unet, sd = _fake_ldm_checkpoint(tmp_path / "model.ckpt")
    out = tmp_path / "converted"
    proc = _run_cli("convert", str(tmp_path / "model.ckpt"), str(out), "--kind", "ldm", "--use-ema", "--unet-config", str(SMOKE_UNET))
    assert proc.returncode == 0, proc.stderr
    converted = load_tensors(out / "unet.safetensors")
    ema = load_tensors(out / "ema_unet.safetensors")
    for name, value in unet.state_dict().items():
        torch.testing.assert_close(converted[name], value + 1)  # --use-ema: EMA weights as the U-Net
        torch.testing.assert_close(ema[name], value + 1)
    first = load_tensors(out / "autoencoder.safetensors")
    torch.testing.assert_close(first["quantize.embedding.weight"], sd["first_stage_model.quantize.embedding.weight"])
    record = json.loads((out / "conversion.json").read_text())
    assert record["scale_factor"] == pytest.approx(0.5)
    assert record["unet_weights"] == "ema"
    assert record["ema"]["num_updates"] == 1234
    assert len(record["buffers"]["betas"]) == 1000
    assert record["buffers"]["betas"][0] == pytest.approx(0.0015, rel=1e-6)


def test_convert_cli_autoencoder_drops_loss(tmp_path):
    sd = {"encoder.conv_in.weight": torch.randn(4, 3, 3, 3), "quant_conv.weight": torch.randn(2, 2, 1, 1),
          "loss.discriminator.main.0.weight": torch.randn(2, 3, 4, 4), "loss.logvar": torch.zeros(())}
    torch.save({"state_dict": sd, "global_step": 7}, tmp_path / "ae.ckpt")
    proc = _run_cli("convert", str(tmp_path / "ae.ckpt"), str(tmp_path / "out"), "--kind", "autoencoder")
    assert proc.returncode == 0, proc.stderr
    assert set(load_tensors(tmp_path / "out" / "autoencoder.safetensors")) == {"encoder.conv_in.weight", "quant_conv.weight"}
    assert set(load_tensors(tmp_path / "out" / "autoencoder_loss.safetensors")) == {"discriminator.main.0.weight", "logvar"}


class _RunsCode:
    """Pickles as a call to os.system: loading it with plain pickle would create the marker file."""

    def __init__(self, marker: Path):
        self.marker = marker

    def __reduce__(self):
        return (os.system, (f"touch {self.marker}",))


class _RunsEval:
    def __init__(self, marker: Path):
        self.marker = marker

    def __reduce__(self):
        return (eval, (f"open({str(self.marker)!r}, 'w').close()",))


@pytest.mark.parametrize("payload", [_RunsCode, _RunsEval])
def test_code_executing_pickle_is_refused(tmp_path, payload):
    marker = tmp_path / "pwned"
    path = tmp_path / "evil.ckpt"
    torch.save({"state_dict": {"model.diffusion_model.x": torch.zeros(2)}, "hparams": payload(marker)}, path)
    with pytest.raises(UnsafeCheckpointError, match="system|eval"):
        load_compvis_checkpoint(path)
    assert not marker.exists()
    proc = _run_cli("convert", str(path), str(tmp_path / "out"), "--kind", "ldm") if payload is _RunsCode else None
    if proc is not None:
        assert proc.returncode == 1 and "refusing" in proc.stderr
        assert not marker.exists() and not (tmp_path / "out" / "unet.safetensors").exists()


def test_lightning_objects_become_inert_placeholders(tmp_path, monkeypatch):
    """Old Lightning pickles callback states keyed by the callback *class*; weights_only refuses those."""
    import numpy as np

    mod = types.ModuleType("pytorch_lightning.callbacks.model_checkpoint")

    class ModelCheckpoint:
        def __setstate__(self, state):  # would run on a real unpickle; must not run here
            raise AssertionError("checkpoint code was executed")

    ModelCheckpoint.__module__ = mod.__name__
    ModelCheckpoint.__qualname__ = "ModelCheckpoint"
    mod.ModelCheckpoint = ModelCheckpoint
    for name in ("pytorch_lightning", "pytorch_lightning.callbacks"):
        monkeypatch.setitem(sys.modules, name, types.ModuleType(name))
    monkeypatch.setitem(sys.modules, mod.__name__, mod)
    sd = {"model.diffusion_model.w": torch.arange(4.0), "model_ema.num_updates": torch.tensor(3, dtype=torch.int32)}
    obj = ModelCheckpoint.__new__(ModelCheckpoint)
    obj.__dict__["best"] = 1.0
    torch.save({"state_dict": sd, "callbacks": {ModelCheckpoint: {"score": np.float64(1.5)}}, "cb": obj}, tmp_path / "pl.ckpt")
    for name in ("pytorch_lightning", "pytorch_lightning.callbacks", mod.__name__):
        monkeypatch.delitem(sys.modules, name)
    with pytest.raises(Exception):
        torch.load(tmp_path / "pl.ckpt", weights_only=True)  # the plain safe reader cannot handle it
    loaded = load_compvis_checkpoint(tmp_path / "pl.ckpt")
    assert set(loaded) == set(sd)
    torch.testing.assert_close(loaded["model.diffusion_model.w"], sd["model.diffusion_model.w"])
    assert "pytorch_lightning" not in sys.modules


def test_not_a_checkpoint_is_a_clear_error(tmp_path):
    torch.save({"epoch": 1}, tmp_path / "x.ckpt")
    with pytest.raises(Exception, match="state_dict"):
        load_compvis_checkpoint(tmp_path / "x.ckpt")
    with pytest.raises(Exception, match="does not exist"):
        load_compvis_checkpoint(tmp_path / "missing.ckpt")


# ---------------------------------------------------------------- first stage keys of the released LDMs

# Reference dump -> experiments/autoencoder/<name>.yaml of its first stage [cfg: first_stage_config].
FIRST_STAGE_YAML = {
    "cfg-celebahq-ldm-vq-4": "vq_f4",
    "cfg-ffhq-ldm-vq-4": "vq_f4",
    "cfg-lsun_bedrooms-ldm-vq-4": "vq_f4",
    "cfg-cin256-v2": "vq_f4",
    "cfg-lsun_churches-ldm-kl-8": "kl_f8",
    "cfg-cin-ldm-vq-f8": "vq_f8",
    "cfg-txt2img-1p4B-eval": "kl_f8",
    "ldm-celeba256": "vq_f4",
    "ldm-ffhq256": "vq_f4",
    "ldm-lsun_beds256": "vq_f4",
    "ldm-lsun_churches256": "kl_f8",
    "ldm-cin256": "vq_f8",
    "ldm-text2img256": "vq_f4",
    "ldm-bsr_sr": "vq_f4",
    "ldm-inpainting_big": "vq_f4_noattn",
    "ldm-layout2img-openimages256": "vq_f4",
    "ldm-semantic_synthesis256": "vq_f4",
    "ldm-semantic_synthesis512": "vq_f4",
}


@pytest.mark.parametrize("json_name", sorted(FIRST_STAGE_YAML))
def test_first_stage_keys_load_into_our_autoencoder(json_name):
    from replication.models.autoencoder import build_autoencoder

    ref = {
        k[len("first_stage_model."):]: tuple(v)
        for k, v in json.loads((REF_DIR / f"{json_name}.json").read_text())["state_dict"].items()
        if k.startswith("first_stage_model.")
    }
    assert ref, json_name
    with torch.device("meta"):
        model = build_autoencoder(OmegaConf.load(AE_DIR / f"{FIRST_STAGE_YAML[json_name]}.yaml"))
    # The reference dumps list the encoder and decoder (not quant_conv / quantize); check those exactly.
    for part in ("encoder", "decoder"):
        sub = {k[len(part) + 1:]: torch.zeros(()).expand(s) for k, s in ref.items() if k.startswith(part + ".")}
        assert sub, f"{json_name}: no {part}.* keys"
        load_into(getattr(model, part), sub, what=f"{part} of {FIRST_STAGE_YAML[json_name]} for {json_name}", assign=True)
    assert {k.split(".")[0] for k in ref} == {"encoder", "decoder"}
