"""The demo experiment (`experiment=smoke_demo`): its config composes with the settings it is tuned with, the built-in
"simple" style draws what it claims, and (slow) the whole run visibly learns within 5 minutes on a CPU."""
from __future__ import annotations

import itertools
import json
import os
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import pytest

from replication.config import validate_config
from replication.data.builtin import _PALETTE, BUILTIN_STYLES, NUM_BUILTIN_CLASSES, make_builtin_images, make_builtin_labelled
from replication.stages.entry import compose

ROOT = Path(__file__).resolve().parents[1]
DEMO = "smoke_demo"


def test_demo_config_composes_with_its_tuned_settings():
    typed = validate_config(compose([f"experiment={DEMO}"]))
    root, dataset, ae, trainer = typed.root, typed.dataset, typed.autoencoder, typed.trainer
    assert root.name == DEMO and not root.comparable
    assert dataset.family.value == "builtin" and dataset.builtin.style == "simple"
    assert ae.kind.value == "kl" and 2 ** (len(ae.ddconfig.ch_mult) - 1) == 4  # f = 4: 32x32 images, 8x8 latent
    assert ae.loss.perceptual_weight == 0 and ae.loss.disc_start > ae.train.steps  # L1 + KL only
    assert trainer.ema_decay <= 0.99  # averages over ~100 steps, not the paper's ~10k
    assert 0 < trainer.eval_every < trainer.steps and trainer.eval_num_samples > 0  # FID-vs-steps snapshots
    smoke = validate_config(compose(["experiment=smoke"])).dataset
    assert smoke.builtin.style == "full"  # the smoke data is the default style, unchanged


def test_default_style_is_full_and_unknown_style_is_refused():
    np.testing.assert_array_equal(make_builtin_images(4, 16, seed=2), make_builtin_images(4, 16, seed=2, style="full"))
    assert not np.array_equal(make_builtin_images(4, 16, seed=2), make_builtin_images(4, 16, seed=2, style="simple"))
    with pytest.raises(ValueError, match="builtin style must be one of full, simple .got 'plain'."):
        make_builtin_images(1, 16, seed=0, style="plain")
    assert BUILTIN_STYLES == ("full", "simple")


def _on_segment(pixels: np.ndarray, a: np.ndarray, b: np.ndarray, tol: float = 1.0) -> np.ndarray:
    """Per pixel: within `tol` grey levels (max over channels) of the segment from colour a to colour b."""
    d = b - a
    t = np.clip(((pixels - a) @ d) / float(d @ d), 0.0, 1.0)
    return np.abs(pixels - (a + t[:, None] * d)).max(axis=1) <= tol


def test_simple_style_is_a_palette_gradient_with_one_large_palette_shape():
    images, labels = make_builtin_labelled(24, 32, seed=5, style="simple")
    again, _ = make_builtin_labelled(4, 32, seed=5, start=20, style="simple")
    np.testing.assert_array_equal(images[20:], again)  # image i depends on (seed, i) only
    assert set(labels.tolist()) == set(range(NUM_BUILTIN_CLASSES))
    for img in images:
        pixels = img.reshape(-1, 3).astype(np.float64)
        explained = []
        for i0, i1 in itertools.combinations(range(len(_PALETTE)), 2):
            gradient = _on_segment(pixels, _PALETTE[i0].astype(np.float64), _PALETTE[i1].astype(np.float64))
            for c in set(range(len(_PALETTE))) - {i0, i1}:
                shape = np.all(pixels == _PALETTE[c], axis=1) & ~gradient
                if np.all(gradient | shape) and shape.sum() >= 100:  # a ring of radius 0.22 covers ~110 pixels
                    explained.append((i0, i1, c))
        assert explained, "image is not a two-colour palette gradient plus one palette-coloured shape"


def _demo_overrides(tmp_path: Path) -> list[str]:
    return [f"runs_root={tmp_path / 'runs'}", f"reports_dir={tmp_path / 'reports'}", f"data_root={tmp_path / 'data'}"]


def test_demo_dataset_prepares_the_simple_style(tmp_path):
    """The prepare stage draws the style the dataset config names."""
    from replication.data.config import validate_dataset_cfg
    from replication.data.prepare import open_prepared, prepare_dataset

    typed = validate_config(compose([f"experiment={DEMO}", *_demo_overrides(tmp_path), "dataset.builtin.num_train=6",
                                     "dataset.builtin.num_val=2"]))
    cfg = validate_dataset_cfg(typed.dataset)
    prepare_dataset(cfg, "val", progress=False)
    got = open_prepared(cfg, "val").get_batch(np.arange(2))
    np.testing.assert_array_equal(got, make_builtin_images(2, 32, seed=0, start=6, style="simple"))


@pytest.mark.slow
def test_demo_learns_within_five_minutes(tmp_path):
    """The whole demo on the CPU: autoencoder PSNR >= 24 dB on the validation images, FID (stand-in extractor)
    lower at the last training snapshot than at the first, all in under 300 s of wall time."""
    import torch

    from replication.data.prepare import open_prepared, prepare_dataset
    from replication.data.prepared import to_model_input
    from replication.metrics.reconstruction import psnr
    from replication.stages.artifacts import load_first_stage, to_uint8

    env = {**os.environ, "DVC_NO_ANALYTICS": "1", "HF_HUB_OFFLINE": "1"}
    cmd = [sys.executable, "-m", "replication.run", f"experiment={DEMO}", "progress=false", "device=cpu",
           *_demo_overrides(tmp_path)]
    start = time.monotonic()
    proc = subprocess.run(cmd, cwd=ROOT, env=env, capture_output=True, text=True, timeout=900)
    wall = time.monotonic() - start
    assert proc.returncode == 0, proc.stderr[-3000:]

    typed = validate_config(compose([f"experiment={DEMO}", *_demo_overrides(tmp_path)]))
    run_dir = tmp_path / "runs" / DEMO
    prepare_dataset(typed.dataset, "val", progress=False)  # an LDM run prepares train (the FID reference) only
    val = open_prepared(typed.dataset, "val")
    batch = val.get_batch(np.arange(len(val)))
    model = load_first_stage(run_dir, typed, torch.device("cpu"))
    with torch.no_grad():
        rec, _ = model(to_model_input(batch), sample_posterior=False)
    original = torch.from_numpy(np.ascontiguousarray(batch)).permute(0, 3, 1, 2)
    val_psnr = float(psnr(original, to_uint8(rec)).mean())

    curve = json.loads((run_dir / "metrics.json").read_text())["curves"]["fid_vs_train_steps"]
    fids = [p["FID"] for p in sorted(curve, key=lambda p: p["train_step"])]
    summary = f"wall {wall:.0f} s, PSNR {val_psnr:.2f} dB, FID by snapshot {[round(f, 1) for f in fids]}"
    assert val_psnr >= 24.0, summary
    assert len(fids) >= 2 and fids[-1] < fids[0], summary
    assert wall < 300, summary
    assert (tmp_path / "reports" / "figures" / f"{DEMO}_samples.png").is_file()
