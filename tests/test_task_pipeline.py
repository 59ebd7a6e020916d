"""The image-conditioned smoke experiments end to end: smoke_sr (Tab. 5's chain) and smoke_inpaint (Tab. 7's) through
`python -m replication.run`, their scores recomputed from the files they were computed from, and both through
`dvc repro` in a copy of the repository."""
from __future__ import annotations

import json
import math
import shutil
import subprocess

import numpy as np
import pytest
import torch

from pipeline_helpers import env, git_copy_of_repo, paths_overrides, run_module

pytestmark = pytest.mark.e2e


@pytest.fixture(scope="module")
def task_runs(tmp_path_factory):
    """smoke_sr, then smoke_inpaint linking smoke_sr's prepared data and first stage (same dataset and autoencoder)."""
    tmp = tmp_path_factory.mktemp("tasks")
    run_module("replication.run", ["experiment=smoke_sr", *paths_overrides(tmp)])
    run_module("replication.run", ["experiment=smoke_inpaint", "reuse_from=smoke_sr", *paths_overrides(tmp)])
    return tmp


def _samples(run_dir) -> np.ndarray:
    from replication.samples import verified_shards

    return np.concatenate([np.load(p) for p in verified_shards(run_dir / "sample" / "samples")])


def _reference(tmp):
    from replication.data.prepared import PreparedImages

    return PreparedImages(tmp / "runs" / "prepared" / "smoke_pairs" / "reference")


def test_superres_scores_are_those_of_its_samples_against_their_images(task_runs):
    from replication.metrics.reconstruction import psnr, ssim

    run_dir = task_runs / "runs" / "smoke_sr"
    metrics = json.loads((run_dir / "metrics.json").read_text())
    m = metrics["metrics"]
    assert metrics["comparable"] is False and metrics["task"]["degradation"] == "pil_bicubic"
    for key in ("FID_valsplit_ref", "FID_trainsplit_ref", "IS", "PSNR", "SSIM"):
        assert math.isfinite(m[key]["value"]), key
    assert m["FID_valsplit_ref"]["value"] == m["FID"]["value"]  # the reference set is the validation split
    assert m["FID_trainsplit_ref"]["value"] != m["FID_valsplit_ref"]["value"]
    samples = _samples(run_dir)
    ref = _reference(task_runs)
    assert samples.shape == (64, 32, 32, 3) == (len(ref), 32, 32, 3)  # one sample per evaluation image
    as_nchw = lambda a: torch.from_numpy(np.ascontiguousarray(a)).permute(0, 3, 1, 2)  # noqa: E731
    target = as_nchw(ref.get_batch(np.arange(64)))
    p = psnr(target, as_nchw(samples)).numpy()
    s = ssim(target, as_nchw(samples)).numpy()
    assert m["PSNR"]["value"] == pytest.approx(p.mean()) and m["PSNR"]["std"] == pytest.approx(p.std())
    assert m["SSIM"]["value"] == pytest.approx(s.mean()) and m["SSIM"]["std"] == pytest.approx(s.std())
    examples = np.load(run_dir / metrics["task"]["examples"])
    np.testing.assert_array_equal(examples["output"], samples[:8])
    np.testing.assert_array_equal(examples["target"], ref.get_batch(np.arange(8)))
    assert examples["lowres"].shape == (8, 32, 32, 3)
    assert "PSNR" in (task_runs / "reports" / "smoke_sr.md").read_text()


def test_inpainting_keeps_the_known_pixels_and_bins_every_image(task_runs):
    from replication.data.conditions import EvaluationConditions, Inpainting

    run_dir = task_runs / "runs" / "smoke_inpaint"
    metrics = json.loads((run_dir / "metrics.json").read_text())
    m, task = metrics["metrics"], metrics["task"]
    assert math.isfinite(m["FID_all"]["value"]) and math.isfinite(m["LPIPS_all"]["value"])
    assert sum(b["count"] for b in task["bins"].values()) == task["images"] == 64
    assert m["FID_40-50pct_masked"]["n_samples"] == task["bins"]["40-50%"]["count"]
    samples = _samples(run_dir)
    ref = _reference(task_runs)
    cond = EvaluationConditions(Inpainting("thick"), ref, "reference", 0, lambda x: x, torch.device("cpu"))
    inputs = cond.inputs(np.arange(64))
    known = (inputs["mask"][:, 0] < 0).numpy()
    originals = ref.get_batch(np.arange(64))
    np.testing.assert_array_equal(samples[known], originals[known])  # outside the hole: the input, exactly
    hole = ~known
    assert hole.any() and not np.array_equal(samples[hole], originals[hole])
    np.testing.assert_allclose(hole.reshape(64, -1).mean(1), inputs["area"])
    examples = np.load(run_dir / task["examples"])
    np.testing.assert_array_equal(examples["mask"] > 0, hole[:8])
    # the linked first stage is smoke_sr's: one autoencoder trained for both
    done = json.loads((run_dir / "train_autoencoder" / "done.json").read_text())
    ref_done = json.loads((task_runs / "runs" / "smoke_sr" / "train_autoencoder" / "done.json").read_text())
    assert done["content_id"] == ref_done["content_id"]


def test_both_task_experiments_run_through_dvc_repro(task_runs, tmp_path):
    """`dvc repro` of the two chains in a copy of the repository holding the finished runs: every stage runs under
    DVC, the trainings resume at their end (nothing trained again), and the metrics and pages are written."""
    repo = git_copy_of_repo(tmp_path / "repo")
    e = env()
    shutil.copytree(task_runs / "runs", repo / "runs", symlinks=True)
    weights = {name: (repo / "runs" / name / "train_ldm" / "ema.safetensors").read_bytes()
               for name in ("smoke_sr", "smoke_inpaint")}
    proc = subprocess.run(["dvc", "repro", "report@smoke_sr", "report@smoke_inpaint"], cwd=repo, env=e,
                          capture_output=True, text=True, timeout=900)
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    for name, data in weights.items():
        assert (repo / "runs" / name / "train_ldm" / "ema.safetensors").read_bytes() == data
        train = json.loads((repo / "runs" / name / "train_ldm" / "done.json").read_text())["result"]
        assert train["resumed_from"] == train["steps"]
        assert (repo / "runs" / name / "metrics.json").exists() and (repo / "runs" / "reports" / f"{name}.md").exists()


def test_image_guided_sampling_moves_samples_toward_their_low_resolution_inputs(task_runs, tmp_path):
    """The Tab. 5 "guiding" rows' sampler option through the sample stage: the same 16 samples, guided by the L2
    guider against each sample's low-resolution input (paper App. C), agree better with those inputs."""
    from PIL import Image

    from replication.data.conditions import EvaluationConditions, SuperResolution

    shutil.copytree(task_runs / "runs", tmp_path / "runs", symlinks=True)
    overrides = [f"runs_root={tmp_path / 'runs'}", f"data_root={task_runs / 'data'}",
                 f"reports_dir={tmp_path / 'reports'}", "progress=false", "sampler.num_samples=16",
                 "curves.ddim_steps=[]", "trainer.eval_num_samples=0"]
    run_module("replication.stages.sample", ["experiment=smoke_sr", *overrides, "+sampler.image_guidance_scale=50",
                                             "+sampler.image_guidance_loss=l2"])
    ref = _reference(task_runs)
    lowres = EvaluationConditions(SuperResolution("pil_bicubic", 4), ref, "reference", 0, lambda x: x,
                                  torch.device("cpu")).inputs(np.arange(16))["lowres_uint8"].astype(np.float64)

    def mismatch(samples: np.ndarray) -> float:
        down = np.stack([np.asarray(Image.fromarray(s).resize((8, 8), Image.Resampling.BICUBIC)) for s in samples])
        return float(np.abs(down.astype(np.float64) - lowres).mean())

    guided = _samples(tmp_path / "runs" / "smoke_sr")
    plain = _samples(task_runs / "runs" / "smoke_sr")[:16]
    assert guided.shape == plain.shape and not np.array_equal(guided, plain)
    assert mismatch(guided) < mismatch(plain)
