"""The spine end to end: `python -m replication.run experiment=smoke`, stage skipping and forced reruns,
the manifest, and the same chain through `dvc repro` in a temporary copy of the repository."""
from __future__ import annotations

import json
import math
import shutil
import subprocess
from pathlib import Path

import pytest
from PIL import Image

from pipeline_helpers import env, git_copy_of_repo, paths_overrides, read_jsonl, run_module

pytestmark = pytest.mark.e2e
STAGES = ["prepare", "train_autoencoder", "encode_latents", "train_ldm", "sample", "evaluate", "report"]


@pytest.fixture(scope="module")
def smoke_run(finished_smoke, tmp_path_factory):
    """A copy of the session's finished smoke run, which this module's tests change."""
    from conftest import copy_smoke

    return copy_smoke(finished_smoke, tmp_path_factory.mktemp("smoke") / "w"), None


def test_smoke_run_leaves_grid_metrics_table_and_figure(smoke_run):
    tmp, _ = smoke_run
    metrics = json.loads((tmp / "runs" / "smoke" / "metrics.json").read_text())
    assert metrics["comparable"] is False and metrics["not_comparable_reasons"]
    fid = metrics["metrics"]["FID"]["value"]
    assert math.isfinite(fid) and fid >= 0
    assert metrics["protocol"]["feature_extractor"]  # which extractor was used is recorded
    table = (tmp / "reports" / "smoke.md").read_text()
    assert "NOT COMPARABLE" in table.upper()
    psnr = metrics["first_stage"]["psnr"]  # the autoencoder's reconstruction quality, stated on the page
    assert math.isfinite(psnr["value"]) and psnr["images"] > 0
    from replication.report.tables import fmt

    assert f"reconstruction PSNR {fmt(psnr['value'])} dB (mean over {psnr['images']} images" in table, table[:1500]
    assert "4.02" in table  # placed next to the paper's Table 1 LSUN-Churches row
    grid = tmp / "reports" / "figures" / "smoke_samples.png"
    with Image.open(grid) as im:
        assert im.size[0] >= 64 and im.size[1] >= 64
    figures = list((tmp / "reports" / "figures").glob("*.png"))
    assert len(figures) >= 2
    train_grid = tmp / "reports" / "figures" / "smoke_train_images.png"  # what the samples should resemble
    with Image.open(train_grid) as im, Image.open(grid) as samples:
        assert im.size == samples.size
    assert "(figures/smoke_samples.png)" in table and "(figures/smoke_train_images.png)" in table


def test_manifest_records_commit_versions_device_seeds_and_input_hashes(smoke_run):
    tmp, _ = smoke_run
    run_dir = tmp / "runs" / "smoke"
    assert (run_dir / "config.yaml").exists()
    for stage in STAGES:
        manifest = json.loads((run_dir / stage / "manifest.json").read_text())
        assert manifest["stage"] == stage
        assert manifest["packages"]["torch"].startswith("2.14.1")
        assert manifest["device"]["device"] == "cpu"
        assert manifest["seeds"]["seed"] == 0
        assert "git_commit" in manifest
        assert (run_dir / stage / "log.txt").exists()
        assert (run_dir / stage / "stats.jsonl").exists()
    inputs = json.loads((run_dir / "train_ldm" / "manifest.json").read_text())["inputs"]
    assert any(p.endswith("card.json") and "encode_latents" in p and len(h) == 64 for p, h in inputs.items())
    assert json.loads((run_dir / "train_ldm" / "manifest.json").read_text())["config_choices"]["unet"] == "smoke"


def test_second_run_skips_every_stage_and_force_reruns(smoke_run):
    tmp, _ = smoke_run
    from replication.run import run
    from replication.stages.entry import compose

    overrides = ["experiment=smoke", *paths_overrides(tmp)]
    results = run(compose(overrides))
    assert [s for s in STAGES if results[s]["skipped"]] == STAGES
    # forcing a stage reruns it, and its dependents become stale and rerun too; upstream stays skipped
    results = run(compose(overrides + ["force=[sample]"]))
    assert results["train_ldm"]["skipped"] and results["prepare"]["skipped"]
    assert not results["sample"]["skipped"] and not results["evaluate"]["skipped"] and not results["report"]["skipped"]
    # a config change of one stage makes exactly that stage and its dependents stale
    results = run(compose(overrides + ["sampler.num_samples=32"]))
    assert results["train_ldm"]["skipped"] and not results["sample"]["skipped"]


def test_single_stage_entry_point(smoke_run):
    tmp, _ = smoke_run
    proc = run_module("replication.stages.report", ["experiment=smoke", *paths_overrides(tmp)])
    assert '"skipped"' in proc.stdout


def test_cfg_job_prints_resolved_config():
    proc = run_module("replication.run", ["experiment=lsun_churches_ldm8", "--cfg", "job"])
    assert "name: lsun_churches_ldm8" in proc.stdout and "model_channels: 192" in proc.stdout


def test_mistyped_override_fails_with_key_name():
    proc = run_module("replication.run", ["experiment=smoke", "trainer.stepz=3"], check=False)
    assert proc.returncode != 0 and "stepz" in (proc.stderr + proc.stdout)


def test_dvc_repro_after_a_run_keeps_the_training_in_a_copy(finished_smoke, tmp_path):
    """A finished `python -m replication.run` (the session's, copied into the tree), then `dvc repro` in the same
    tree (a fresh clone has no dvc.lock, so DVC reruns every stage with force=[stage]): the re-made data are
    identical, so both trainings are kept (resumed at their last step, nothing moved to state.stale) and the samples
    are verified and kept."""
    repo = git_copy_of_repo(tmp_path / "repo")
    e = env()
    shutil.copytree(finished_smoke / "runs", repo / "runs", symlinks=True)
    run_dir = repo / "runs" / "smoke"
    kept = {p: p.read_bytes() for p in [run_dir / "train_ldm" / "ema.safetensors",
                                        run_dir / "train_autoencoder" / "model.safetensors",
                                        run_dir / "sample" / "samples" / "shard_000000.npy"]}
    proc = subprocess.run(["dvc", "repro", "report@smoke"], cwd=repo, env=e, capture_output=True, text=True, timeout=900)
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    for path, data in kept.items():
        assert path.read_bytes() == data, path
    assert not (run_dir / "train_ldm" / "state.stale").exists() and not (run_dir / "train_autoencoder" / "state.stale").exists()
    train = json.loads((run_dir / "train_ldm" / "done.json").read_text())["result"]
    assert train["resumed_from"] == train["steps"]  # resumed at its end: not one step trained again
    assert (repo / "reports" / "smoke.md").exists()
    assert (repo / "runs" / "smoke" / "metrics.json").exists()
    assert (repo / "dvc.lock").exists()
    shown = subprocess.run(["dvc", "metrics", "show", "--json"], cwd=repo, env=e, capture_output=True, text=True)
    assert shown.returncode == 0 and "FID" in shown.stdout
    status = subprocess.run(["dvc", "status", "report@smoke"], cwd=repo, env=e, capture_output=True, text=True)
    assert "changed" not in status.stdout, status.stdout


def test_autoencoder_experiment_end_to_end(tmp_path):
    """The Table 8 chain (prepare -> train first stage -> reconstruction metrics -> report) on the smoke data."""
    run_module("replication.run", ["experiment=smoke_ae", *paths_overrides(tmp_path)])
    recon = json.loads((tmp_path / "runs" / "smoke_ae" / "recon_metrics.json").read_text())
    assert recon["comparable"] is False and recon["paper"] == {"name": "kl-f4"} and recon["f"] == 4
    for key in ("rFID", "PSNR", "SSIM", "LPIPS"):
        assert math.isfinite(recon["metrics"][key]["value"]), key
    assert recon["metrics"]["PSNR"]["std"] >= 0 and recon["n_images"] == 64
    table = (tmp_path / "reports" / "smoke_ae.md").read_text()
    assert "NOT COMPARABLE" in table.upper() and "kl-f4" in table and "27.53" in table  # Tab. 8 PSNR of kl-f4
    assert not (tmp_path / "runs" / "smoke_ae" / "train_ldm").exists()


def test_class_conditional_experiment_end_to_end(tmp_path):
    """The Table 3 path (experiment=smoke_cin): labelled data -> latent cache with labels -> ClassEmbedder +
    cross-attention U-Net trained with label dropout -> guided DDIM with balanced labels -> metrics incl. IS ->
    report next to Table 3 LDM-4-G, with one class per row of the sample figure."""
    import numpy as np
    from safetensors.numpy import load_file

    from replication.data.builtin import make_builtin_labelled

    run_module("replication.run", ["experiment=smoke_cin", "trainer.steps=120", "trainer.ckpt_every=60",
                                   *paths_overrides(tmp_path)])
    runs = tmp_path / "runs"
    _, expected = make_builtin_labelled(256, 32, seed=0)
    prepared = np.load(next((runs / "prepared" / "smoke_cin").glob("train*/labels.npy")))
    np.testing.assert_array_equal(prepared, expected)
    assert set(np.unique(expected)) == {0, 1, 2}
    cached = np.load(runs / "smoke_cin" / "encode_latents" / "train.latents" / "labels.npy")
    np.testing.assert_array_equal(cached, expected)

    # EMA covers the U-Net only, as the release's LitEma: the class embedder is exported with its raw weights
    raw = load_file(str(runs / "smoke_cin" / "train_ldm" / "model.safetensors"))
    ema = load_file(str(runs / "smoke_cin" / "train_ldm" / "ema.safetensors"))
    assert set(raw) == set(ema)
    np.testing.assert_array_equal(ema["cond_stage_model.embedding.weight"], raw["cond_stage_model.embedding.weight"])
    assert raw["cond_stage_model.embedding.weight"].shape[0] == 4  # 3 classes + the null label
    unet_keys = [k for k in raw if k.startswith("diffusion_model.") and raw[k].dtype == np.float32]
    assert any(not np.array_equal(raw[k], ema[k]) for k in unet_keys)

    metrics = json.loads((runs / "smoke_cin" / "metrics.json").read_text())
    assert metrics["comparable"] is False
    for key in ("FID", "IS", "precision", "recall"):
        assert math.isfinite(metrics["metrics"][key]["value"]), key
    assert metrics["protocol"]["guidance_scale"] == 1.5
    table = (tmp_path / "reports" / "smoke_cin.md").read_text()
    assert "Table 3, ImageNet, LDM-4-G" in table and "NOT COMPARABLE" in table
    assert "![samples](figures/smoke_cin_samples.png)" in table
    grid = Image.open(tmp_path / "reports" / "figures" / "smoke_cin_samples.png")
    assert "rows = classes 0..2" in grid.text["Title"]


def test_change_one_thing_reuses_the_unchanged_stages(smoke_run):
    """`name=NEW reuse_from=OLD` + one changed sampler value: the stages before sampling are linked from OLD (no
    retraining), sampling and evaluation run for NEW, OLD's files are untouched, and the summary shows both. A
    later forced rerun of a linked stage runs in NEW's own folder, never inside OLD's."""
    import hashlib

    tmp, _ = smoke_run
    runs = tmp / "runs"

    def digest(path: Path) -> str:
        return hashlib.sha256(path.read_bytes()).hexdigest()

    common = ["experiment=smoke", *paths_overrides(tmp)]  # the base run's own config ...
    run_module("replication.run", common)  # (earlier tests of this module left it sampled with other settings)
    base_files = {p: digest(p) for p in (runs / "smoke").rglob("*") if p.is_file() and "hydra" not in p.parts}
    run_module("replication.run", [*common, "name=smoke_eta1", "reuse_from=smoke", "sampler.eta=1.0",
                                   "curves.ddim_steps=[]"])  # ... but for the sampler (and no Fig. 7 curve)
    new = runs / "smoke_eta1"
    for stage in ("prepare", "train_autoencoder", "encode_latents", "train_ldm"):
        assert (new / stage).is_symlink() and (new / stage).resolve() == (runs / "smoke" / stage).resolve(), stage
    for stage in ("sample", "evaluate", "report"):
        assert (new / stage).is_dir() and not (new / stage).is_symlink(), stage
    metrics = json.loads((new / "metrics.json").read_text())
    assert metrics["protocol"]["eta"] == 1.0 and math.isfinite(metrics["metrics"]["FID"]["value"])
    summary = (tmp / "reports" / "summary.md").read_text()
    assert "[smoke](smoke.md)" in summary and "[smoke_eta1](smoke_eta1.md)" in summary

    # nothing changed: even sampling is linked; forcing it then runs in the new run's own folder
    run_module("replication.run", [*common, "name=smoke_same", "reuse_from=smoke", "stages=[prepare,train_autoencoder,"
                                   "encode_latents,train_ldm,sample]"])
    assert (runs / "smoke_same" / "sample").is_symlink()
    run_module("replication.run", [*common, "name=smoke_same", "reuse_from=smoke", "stages=[sample]", "force=[sample]"])
    assert not (runs / "smoke_same" / "sample").is_symlink() and (runs / "smoke_same" / "sample" / "done.json").exists()
    changed = [str(p) for p, h in base_files.items() if not p.exists() or digest(p) != h]
    assert not changed, changed  # the base run is exactly as it was


def test_changing_the_learning_rate_retrains_instead_of_resuming_the_old_model(smoke_run):
    """(Runs last in this module: it changes the shared smoke run.) With the old full-state checkpoint at its final
    step, a changed trainer.base_lr must not 'resume' straight to the end and hand back the old model: the
    checkpoint of the other settings is set aside and the stage trains from step 0; a changed step count alone still resumes."""
    tmp, _ = smoke_run
    run = tmp / "runs" / "smoke" / "train_ldm"
    old_weights = (run / "ema.safetensors").read_bytes()
    common = ["experiment=smoke", *paths_overrides(tmp), "stages=[train_ldm]", "trainer.ckpt_every=10",
              "trainer.log_every=5"]
    run_module("replication.run", [*common, "trainer.base_lr=5e-4", "trainer.steps=20"])
    records = [r for r in read_jsonl(run / "stats.jsonl") if r.get("event") == "train"]
    assert [r["step"] for r in records[-5:]] == [1, 5, 10, 15, 20]  # logged from step 1 again: trained afresh
    assert (run / "state.stale").is_dir() and (run / "ema.safetensors").read_bytes() != old_weights
    assert not list((run / "snapshots").glob("*.safetensors"))  # the old run's Fig. 6 snapshots are gone
    run_module("replication.run", [*common, "trainer.base_lr=5e-4", "trainer.steps=30"])
    summary = json.loads((run / "done.json").read_text())["result"]
    assert summary["resumed_from"] == 20 and summary["steps"] == 30
    # and the samples follow the new model: shards made by the old one are not reused
    shard = tmp / "runs" / "smoke" / "sample" / "samples" / "shard_000000.npy"
    old_samples = shard.read_bytes()
    trained = ["trainer.base_lr=5e-4", "trainer.steps=30", "trainer.ckpt_every=10", "trainer.log_every=5"]
    run_module("replication.run", ["experiment=smoke", *paths_overrides(tmp), "stages=[sample]", *trained,
                                   "curves.ddim_steps=[]"])
    assert shard.read_bytes() != old_samples
    assert (shard.parent / "key.json").is_file()
