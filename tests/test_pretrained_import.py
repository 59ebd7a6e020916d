"""Released weights through our pipeline: an original-layout LDM checkpoint (Lightning pickle of tensors with
model.diffusion_model.*, model_ema.*, first_stage_model.*, betas, scale_factor) is imported by the
train_autoencoder and train_ldm stages, then sampled and evaluated; a schedule mismatch is refused."""
from __future__ import annotations

import json

import pytest
import torch

from pipeline_helpers import paths_overrides, run_module
from replication.config import validate_config
from replication.models.ema import shadow_name
from replication.stages.artifacts import build_first_stage, build_unet
from replication.stages.entry import compose
from replication.utils.io import load_tensors


def _fake_original_checkpoint(path, betas_scale: float = 1.0):
    typed = validate_config(compose(["experiment=smoke"]))
    torch.manual_seed(0)
    unet, first = build_unet(typed), build_first_stage(typed)
    sd = {f"model.diffusion_model.{k}": v for k, v in unet.state_dict().items()}
    ema = {k: v + 0.5 for k, v in unet.state_dict().items()}  # distinguishable from the raw weights
    sd.update({f"model_ema.{shadow_name('diffusion_model.' + k)}": v for k, v in ema.items()})
    sd.update({"model_ema.decay": torch.tensor(0.9999), "model_ema.num_updates": torch.tensor(1234)})
    sd.update({f"first_stage_model.{k}": v for k, v in first.state_dict().items()})
    sd["betas"] = typed.diffusion.make_schedule().betas.float() * betas_scale
    sd["scale_factor"] = torch.tensor(0.75)
    torch.save({"state_dict": sd, "global_step": 5, "epoch": 1}, path)
    return ema, first.state_dict()


def test_original_checkpoint_runs_through_sample_and_evaluate(tmp_path):
    ckpt = tmp_path / "last.ckpt"
    ema, first = _fake_original_checkpoint(ckpt)
    over = ["experiment=smoke", *paths_overrides(tmp_path), f"autoencoder.pretrained={ckpt}",
            f"trainer.pretrained={ckpt}", "stages=[prepare,train_autoencoder,encode_latents,train_ldm,sample,evaluate]",
            "sampler.num_samples=32", "curves.ddim_steps=[]", "trainer.eval_num_samples=0"]
    run_module("replication.run", over)
    run = tmp_path / "runs" / "smoke"
    imported = load_tensors(run / "train_ldm" / "ema.safetensors")
    assert imported.keys() == ema.keys() and all(torch.equal(imported[k], ema[k]) for k in ema)
    ae = load_tensors(run / "train_autoencoder" / "model.safetensors")
    assert all(torch.equal(ae[k], first[k]) for k in first)
    meta = json.loads((run / "train_ldm" / "meta.json").read_text())
    assert meta["scale_factor"] == pytest.approx(0.75) and meta["ema"] is True
    assert not (run / "encode_latents" / "train.latents").exists()  # no latents needed to import
    metrics = json.loads((run / "metrics.json").read_text())
    assert metrics["metrics"]["FID"]["n_samples"] == 32


def test_checkpoint_trained_with_another_schedule_is_refused(tmp_path):
    ckpt = tmp_path / "last.ckpt"
    _fake_original_checkpoint(ckpt, betas_scale=1.1)
    over = ["experiment=smoke", *paths_overrides(tmp_path), f"autoencoder.pretrained={ckpt}",
            f"trainer.pretrained={ckpt}", "stages=[prepare,train_autoencoder,encode_latents,train_ldm]"]
    proc = run_module("replication.run", over, check=False)
    assert proc.returncode != 0 and "another noise schedule" in proc.stderr
