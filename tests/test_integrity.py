"""Artifacts are trusted only when they verify: damaged files on disk are named and re-made (the metrics then equal
a clean run's), the sample set is exactly the configured one, one writer holds a run folder, a re-made stage with
identical content leaves its dependents valid, and checkpoints of other settings are kept, never lost."""
from __future__ import annotations

import json
import logging
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import pytest
import torch

from pipeline_helpers import env, paths_overrides, run_module

pytestmark = pytest.mark.e2e
STAGES = ["prepare", "train_autoencoder", "encode_latents", "train_ldm", "sample", "evaluate", "report"]


def _fid(run_dir: Path) -> float:
    return json.loads((run_dir / "metrics.json").read_text())["metrics"]["FID"]["value"]


@pytest.fixture
def clean(finished_smoke):
    """The session's finished smoke run (pristine: tests work on copies of it)."""
    return finished_smoke


def _copy(clean: Path, dest: Path) -> Path:
    from conftest import copy_smoke

    return copy_smoke(clean, dest)


def _run(tmp: Path, *extra: str):
    from replication.run import run
    from replication.stages.entry import compose

    return run(compose(["experiment=smoke", *paths_overrides(tmp), *extra]))


def test_damaged_files_are_named_and_remade_to_the_clean_result(clean, tmp_path, caplog):
    """A shard overwritten with other pixels of the same shape, prepared images changed on disk and a truncated
    latent cache: a plain rerun names each file, re-makes it, and the FID equals the clean run's."""
    tmp = _copy(clean, tmp_path / "w")
    runs = tmp / "runs"
    shard = runs / "smoke" / "sample" / "samples" / "shard_000000.npy"
    arr = np.load(shard)
    np.save(shard, np.ascontiguousarray(arr[::-1]))  # the same shape, other pixels: only a hash can tell
    images = runs / "prepared" / "smoke" / "train" / "images.npy"
    with open(images, "r+b") as fh:  # flip pixels in the middle of the prepared training images
        fh.seek(images.stat().st_size // 2)
        fh.write(bytes(255 - b for b in fh.read(64)))
    moments = runs / "smoke" / "encode_latents" / "train.latents" / "moments.npy"
    with open(moments, "r+b") as fh:
        fh.truncate(moments.stat().st_size - 4096)
    with caplog.at_level(logging.WARNING, logger="replication"):
        results = _run(tmp)
    log = caplog.text
    assert str(shard) in log and str(images) in log and str(moments) in log, log
    assert not results["prepare"]["skipped"] and not results["sample"]["skipped"]
    assert results["train_ldm"]["skipped"]  # re-made inputs equal the old ones: the trained model stays valid
    assert np.array_equal(np.load(shard), arr)
    assert _fid(runs / "smoke") == pytest.approx(_fid(clean / "runs" / "smoke"), rel=1e-6)
    check = subprocess.run([sys.executable, "-m", "replication.verify", str(runs / "smoke")], env=env(),
                           capture_output=True, text=True)
    assert check.returncode == 0, check.stdout + check.stderr


def test_forced_prepare_does_not_reuse_damaged_images_and_keeps_training(clean, tmp_path, caplog):
    tmp = _copy(clean, tmp_path / "w")
    runs = tmp / "runs"
    images = runs / "prepared" / "smoke" / "train" / "images.npy"
    with open(images, "r+b") as fh:
        fh.seek(200)
        fh.write(b"\x00" * 32)
    state = runs / "smoke" / "train_ldm" / "state"
    before = sorted(p.name for p in state.iterdir())
    with caplog.at_level(logging.WARNING, logger="replication"):
        results = _run(tmp, "force=[prepare]")
    assert str(images) in caplog.text
    assert not any(s["reused"] for name, s in results["prepare"]["splits"].items() if name == "train")
    # identical re-made data: both trainings are kept, nothing moved to stale
    assert results["train_autoencoder"]["skipped"] and results["train_ldm"]["skipped"]
    assert sorted(p.name for p in state.iterdir()) == before and not (state.parent / "state.stale").exists()


def test_verify_command_names_a_damaged_file(clean, tmp_path):
    tmp = _copy(clean, tmp_path / "w")
    weights = tmp / "runs" / "smoke" / "train_ldm" / "ema.safetensors"
    with open(weights, "r+b") as fh:
        fh.seek(weights.stat().st_size - 100)
        fh.write(b"\x01" * 8)
    shard = tmp / "runs" / "smoke" / "sample" / "samples" / "shard_000000.npy"
    images = tmp / "runs" / "prepared" / "smoke" / "train" / "images.npy"
    for truncated in (shard, images):
        with open(truncated, "r+b") as fh:
            fh.truncate(truncated.stat().st_size - 1000)
    proc = subprocess.run([sys.executable, "-m", "replication.verify", str(tmp / "runs" / "smoke")], env=env(),
                          capture_output=True, text=True)
    assert proc.returncode == 1 and str(weights) in proc.stdout and "content differs" in proc.stdout, proc.stdout
    for truncated in (shard, images):
        assert f"{truncated}: " in proc.stdout and "truncated or replaced" in proc.stdout, proc.stdout
    assert "train_autoencoder" in proc.stdout and "ok" in proc.stdout


def test_evaluation_reads_exactly_the_configured_sample_set(clean, tmp_path):
    """After 128 samples, a run with 64 evaluates 64, whatever else is on disk."""
    tmp = _copy(clean, tmp_path / "w")
    runs = tmp / "runs"
    stray = runs / "smoke" / "sample" / "samples" / "shard_000007.npy"  # a file no index lists
    np.save(stray, np.zeros((16, 32, 32, 3), dtype=np.uint8))
    _run(tmp, "sampler.num_samples=64", "sample_shard_size=32")
    metrics = json.loads((runs / "smoke" / "metrics.json").read_text())
    assert metrics["metrics"]["FID"]["n_samples"] == 64 if "n_samples" in metrics["metrics"]["FID"] else True
    index = json.loads((runs / "smoke" / "sample" / "samples" / "index.json").read_text())
    assert [s["file"] for s in index["shards"]] == ["shard_000000.npy", "shard_000001.npy"]
    assert sum(s["count"] for s in index["shards"]) == 64
    flat = json.dumps(metrics)
    assert '"n_samples": 64' in flat or '"num_samples": 64' in flat, flat[:2000]


def test_a_second_run_on_a_busy_folder_is_refused_with_the_holder(clean, tmp_path):
    """A run folder held by another process: the second run stops at once, naming host and process; once that
    process is gone (SIGKILL: no clean-up of its own), its lock is taken over."""
    tmp = _copy(clean, tmp_path / "w")
    run_dir = tmp / "runs" / "smoke"
    holder = subprocess.Popen([sys.executable, "-c", "import sys, time; from replication.stages.lock import folder_lock\n"
                               f"with folder_lock({str(run_dir)!r}, 'sample'):\n    print('held', flush=True); time.sleep(60)"],
                              env=env(), stdout=subprocess.PIPE, text=True)
    try:
        assert holder.stdout.readline().strip() == "held"
        proc = run_module("replication.run", ["experiment=smoke", *paths_overrides(tmp)], check=False)
        assert proc.returncode == 2, proc.stderr[-2000:]
        assert f"process {holder.pid}" in proc.stderr and "in use" in proc.stderr and "Traceback" not in proc.stderr
    finally:
        holder.send_signal(signal.SIGKILL)
        holder.wait()
    results = _run(tmp)
    assert all(results[s]["skipped"] for s in STAGES)


def test_folder_lock_is_exclusive_between_processes_and_reentrant_within_one(tmp_path):
    from replication.stages.lock import folder_lock

    with folder_lock(tmp_path, "a"):
        with folder_lock(tmp_path, "b"):  # the same process: re-entrant
            pass
        other = subprocess.run([sys.executable, "-c", "from replication.stages.lock import folder_lock\n"
                                f"with folder_lock({str(tmp_path)!r}, 'x'): pass"], env=env(), capture_output=True,
                               text=True)
        assert other.returncode != 0 and "FolderBusy" in other.stderr and f"process {os.getpid()}" in other.stderr
    after = subprocess.run([sys.executable, "-c", "from replication.stages.lock import folder_lock\n"
                            f"with folder_lock({str(tmp_path)!r}, 'x'): pass"], env=env(), capture_output=True, text=True)
    assert after.returncode == 0, after.stderr  # released when the holder's block ended


def test_identical_upstream_content_keeps_downstream_valid(clean, tmp_path):
    """`dvc repro` forces every stage; re-made stages with identical files leave training resumed at its end (not
    retrained, not moved aside) and the samples kept."""
    tmp = _copy(clean, tmp_path / "w")
    runs = tmp / "runs" / "smoke"
    ema = (runs / "train_ldm" / "ema.safetensors").read_bytes()
    shard = runs / "sample" / "samples" / "shard_000000.npy"
    shard_mtime = shard.stat().st_mtime_ns
    results = _run(tmp, "force=[prepare,train_autoencoder,encode_latents,train_ldm,sample]")
    assert results["train_ldm"]["resumed_from"] == results["train_ldm"]["steps"]
    assert not (runs / "train_ldm" / "state.stale").exists() and not (runs / "train_autoencoder" / "state.stale").exists()
    assert (runs / "train_ldm" / "ema.safetensors").read_bytes() == ema
    assert shard.stat().st_mtime_ns == shard_mtime  # verified and kept, not sampled again
    assert _fid(runs) == pytest.approx(_fid(clean / "runs" / "smoke"), rel=1e-6)


# --------------------------------------------------------------------------------------------------------------
# Full-state checkpoints (no pipeline needed)
# --------------------------------------------------------------------------------------------------------------
def _state(step: int, key: str) -> dict:
    return {"step": step, "model": {"w": torch.full((64, 64), float(step))}, "resume_key": key}


def test_a_checkpoint_with_flipped_bytes_falls_back_to_the_previous_one(tmp_path, caplog):
    from replication.training.checkpoint import load_latest_state, save_state

    save_state(tmp_path, 10, _state(10, "k"), keep_last=2)
    newest = save_state(tmp_path, 20, _state(20, "k"), keep_last=2)
    data = bytearray(newest.read_bytes())
    middle = len(data) // 2
    data[middle:middle + 16] = bytes(b ^ 0xFF for b in data[middle:middle + 16])
    newest.write_bytes(bytes(data))
    with caplog.at_level(logging.WARNING, logger="replication"):
        state = load_latest_state(tmp_path)
    assert state["step"] == 10 and str(newest) in caplog.text and "recorded hash" in caplog.text


def test_checkpoints_of_other_settings_are_kept_and_resumed_by_those_settings(tmp_path):
    """A run with another learning rate (which then diverges) never loses the good checkpoint: it is kept under
    its key, and the next run with the original settings resumes from it."""
    from replication.training.checkpoint import describe_kept, load_resumable_state, save_state

    state_dir = tmp_path / "state"
    save_state(state_dir, 100, _state(100, "A" * 64))
    assert load_resumable_state(state_dir, "B" * 64) is None  # another configuration starts afresh ...
    message = describe_kept(state_dir)
    assert "steps [100]" in message and "state.stale" in message  # ... and a failure message says where A's is
    save_state(state_dir, 5, _state(5, "B" * 64))  # B trains a little (then, say, diverges)
    resumed = load_resumable_state(state_dir, "A" * 64)
    assert resumed is not None and resumed["step"] == 100
    assert load_resumable_state(state_dir, "B" * 64)["step"] == 5  # and B's is kept the same way


def test_cached_reference_statistics_are_recomputed_when_damaged_or_of_other_images(tmp_path, caplog):
    from replication.metrics.features import build_extractor
    from replication.metrics.reference import load_or_compute_reference

    extractor = build_extractor("standin", None, "cpu", allow_standin=True)
    images = torch.from_numpy(np.random.default_rng(0).integers(0, 256, (12, 3, 32, 32), dtype=np.uint8))
    calls = []

    def batches():
        calls.append(1)
        yield images

    def load(source_id):
        return load_or_compute_reference(tmp_path, "d", "train", "h", extractor, batches, pr_count=8,
                                         expected_images=12, source_id=source_id)

    first = load("images-A")
    assert len(calls) == 1 and load("images-A").mu.tolist() == first.mu.tolist() and len(calls) == 1  # cached
    cached = next(tmp_path.rglob("*.npz"))
    data = bytearray(cached.read_bytes())
    data[len(data) // 2] ^= 0xFF
    cached.write_bytes(bytes(data))
    with caplog.at_level(logging.WARNING, logger="replication"):
        again = load("images-A")
    assert len(calls) == 2 and "differs from the hash" in caplog.text and again.mu.tolist() == first.mu.tolist()
    load("images-B")  # the same preprocessing, other prepared pixels: recomputed
    assert len(calls) == 3 and "other reference images" in caplog.text
