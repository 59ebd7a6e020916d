"""The Table 2 path end to end (experiment=smoke_txt2img through python -m replication.run): captions and their
vocabulary prepared, carried into the latent cache, tokenized for training with the encoder trained jointly and kept
out of the EMA, guided samples from the validation captions, FID/IS and the probe record, the report next to Tab. 2;
then python -m replication.txt2img on that run's weights."""
from __future__ import annotations

import json
import math
import subprocess
import sys

import numpy as np
import pytest
from PIL import Image

from pipeline_helpers import REPO, env, paths_overrides, run_module

pytestmark = pytest.mark.e2e
SMOKE = ["experiment=smoke_txt2img", "cpu_threads=1", "autoencoder.train.steps=40", "trainer.steps=80",
         "trainer.ckpt_every=40", "sampler.num_samples=32", "conditioning.probe_samples=8"]


@pytest.fixture(scope="module")
def txt_run(tmp_path_factory):
    work = tmp_path_factory.mktemp("txt2img")
    run_module("replication.run", [*SMOKE, *paths_overrides(work)], timeout=900)
    return work


def test_captions_flow_from_the_data_to_the_samples_and_the_metrics(txt_run):
    from safetensors.numpy import load_file

    from replication.data.builtin import builtin_vocabulary, make_builtin_captioned
    from replication.utils.verify import file_sha256

    runs = txt_run / "runs"
    prepared = runs / "prepared" / "smoke_txt"
    expected = make_builtin_captioned(256, 32, seed=0, style="simple")[2]
    assert json.loads((prepared / "train" / "captions.json").read_text()) == expected
    assert (prepared / "train" / "vocab.txt").read_text().split() == builtin_vocabulary()
    run = runs / "smoke_txt2img"
    assert json.loads((run / "encode_latents" / "train.latents" / "captions.json").read_text()) == expected

    raw = load_file(str(run / "train_ldm" / "model.safetensors"))
    ema = load_file(str(run / "train_ldm" / "ema.safetensors"))
    encoder = [k for k in raw if k.startswith("cond_stage_model.")]
    assert "cond_stage_model.transformer.token_emb.weight" in encoder
    for k in encoder:  # trained jointly, exported with its raw weights
        np.testing.assert_array_equal(ema[k], raw[k])
    meta = json.loads((run / "train_ldm" / "meta.json").read_text())
    assert meta["text"]["vocab_sha256"] == file_sha256(prepared / "train" / "vocab.txt")
    assert meta["text"]["caption_drop_prob"] == 0.1 and meta["text"]["captions"] == 256

    metrics = json.loads((run / "metrics.json").read_text())
    for key in ("FID", "IS"):
        assert math.isfinite(metrics["metrics"][key]["value"]), key
    assert metrics["protocol"]["guidance_scale"] == 1.5 and metrics["comparable"] is False
    task = metrics["task"]
    assert task["task"] == "text-to-image" and task["caption_drop_prob"] == 0.1
    probes = task["probes"]
    assert [p["prompt"] for p in probes["prompts"]] == ["a white disc on a red and yellow gradient",
                                                        "a white disc on a blue and green gradient"]
    assert isinstance(probes["captions_matter"], bool) and len(probes["unconditional_mean_rgb"]) == 3
    examples = np.load(run / task["examples"])
    assert examples["prompt_00"].shape == (8, 32, 32, 3) and examples["unconditional"].dtype == np.uint8
    table = (txt_run / "reports" / "smoke_txt2img.md").read_text()
    assert "Table 2, MS-COCO (val, 30k), LDM-KL-8-G" in table and "NOT COMPARABLE" in table


def test_txt2img_command_on_the_smoke_run(txt_run, tmp_path):
    run = txt_run / "runs" / "smoke_txt2img"
    vocab = txt_run / "runs" / "prepared" / "smoke_txt" / "train" / "vocab.txt"
    out = tmp_path / "out"
    args = [sys.executable, "-m", "replication.txt2img", "a red square on a blue and green gradient", "--checkpoint",
            str(run), "--vocab", str(vocab), "--out", str(out), "--steps", "4", "--n-samples", "3", "--batch", "2",
            "--scale", "2.0", "--device", "cpu", "--no-progress"]
    first = subprocess.run(args, cwd=REPO, env=env(), capture_output=True, text=True, timeout=600)
    assert first.returncode == 0, first.stderr[-3000:]
    images = [np.asarray(Image.open(out / f"{i:04d}.png")) for i in range(3)]
    assert all(im.shape == (32, 32, 3) for im in images)
    grid = np.asarray(Image.open(out / "grid.png"))
    assert grid.shape == (64, 64, 3)
    np.testing.assert_array_equal(grid[:32, 32:], images[1])
    record = json.loads((out / "apply.json").read_text())
    assert record["guidance_scale"] == 2.0 and record["steps"] == 4 and record["prompt"].startswith("a red square")
    # a rerun keeps the images; one more sample is made from its own seed, the same as in a fresh folder
    (out / "0001.png").unlink()
    again = subprocess.run(args, cwd=REPO, env=env(), capture_output=True, text=True, timeout=600)
    assert again.returncode == 0 and "1 image(s) made, 2 kept" in again.stdout
    np.testing.assert_array_equal(np.asarray(Image.open(out / "0001.png")), images[1])
    other = subprocess.run([*args, "--steps", "5"], cwd=REPO, env=env(), capture_output=True, text=True, timeout=600)
    assert other.returncode == 2 and "other settings" in other.stderr


def test_txt2img_command_names_a_missing_vocabulary(tmp_path):
    proc = subprocess.run([sys.executable, "-m", "replication.txt2img", "a prompt", "--checkpoint", str(tmp_path),
                           "--vocab", str(tmp_path / "nowhere" / "vocab.txt"), "--out", str(tmp_path / "o")],
                          cwd=REPO, env=env(), capture_output=True, text=True, timeout=300)
    assert proc.returncode == 2
    assert proc.stderr.count("\n") == 1 and "bert-base-uncased" in proc.stderr and "nowhere" in proc.stderr
