"""Nothing lost: training killed with SIGKILL/SIGTERM and resumed equals an uninterrupted run
step for step; a killed sampling job resumes to the same images; bad inputs give clear errors without
damaging what was written."""
from __future__ import annotations

import json
import os
import pickle
import signal
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import pytest
import shutil

from pipeline_helpers import REPO, env, paths_overrides, read_jsonl, run_module
from replication import reliability as rel

pytestmark = pytest.mark.reliability

EXP = "smoke"
TRAIN = rel.TRAIN_OVERRIDES


@pytest.fixture(scope="module")
def prepared(tmp_path_factory):
    """A smoke run folder with data, autoencoder and latent cache ready (the stages before train_ldm)."""
    tmp = tmp_path_factory.mktemp("reliability")
    rel.prepare_inputs(tmp, EXP)
    return tmp


def _clone_run(src: Path, dst: Path) -> None:
    rel.clone_inputs(src, dst, EXP)


def _train_cmd(tmp: Path) -> list[str]:
    return rel.train_cmd(tmp, EXP)


@pytest.fixture(scope="module")
def uninterrupted(prepared, tmp_path_factory):
    tmp = tmp_path_factory.mktemp("uninterrupted")
    _clone_run(prepared, tmp / "w")
    rel.train_uninterrupted(tmp / "w", EXP)
    return tmp / "w"


def test_sigkill_at_random_points_then_resume_matches_uninterrupted(prepared, uninterrupted, tmp_path):
    work = tmp_path / "w"
    _clone_run(prepared, work)
    kill_steps = rel.train_with_kills(work, EXP, kills=3, sig=signal.SIGKILL, seed=1234)
    assert len(kill_steps) == 3 and all(0 < k < 60 for k in kill_steps)
    result = rel.compare(work, uninterrupted, EXP)
    assert result["steps"] == 60 and result["same_steps"]
    assert result["losses_identical"], result  # bit-identical loss sequence on the CPU
    assert result["weights_identical"], result


def test_sigterm_writes_a_checkpoint_and_resume_matches(prepared, uninterrupted, tmp_path):
    work = tmp_path / "w"
    _clone_run(prepared, work)
    proc = subprocess.Popen(_train_cmd(work), env=env(), cwd=REPO, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True)
    rel.wait_for_step(work, EXP, 7, proc)
    proc.send_signal(signal.SIGTERM)
    _, err = proc.communicate(timeout=120)
    assert proc.returncode == 128 + signal.SIGTERM, err[-2000:]
    events = read_jsonl(rel.stats_path(work, EXP))
    pre = [e for e in events if e.get("event") == "preempted"]
    assert pre and Path(pre[-1]["checkpoint"]).exists()
    assert Path(pre[-1]["checkpoint"]).name == f"state_{pre[-1]['step']:09d}.pt"  # written at the signal's step
    subprocess.run(_train_cmd(work), env=env(), cwd=REPO, check=True, capture_output=True, timeout=600)
    result = rel.compare(work, uninterrupted, EXP)
    assert result["losses_identical"] and result["weights_identical"], result


def test_reliability_tool_writes_report_and_figure(tmp_path, monkeypatch):
    """The user-facing check (python -m replication.reliability) on a shortened run: 1 kill."""
    monkeypatch.setattr(rel, "TRAIN_OVERRIDES", ["trainer.steps=20", "trainer.ckpt_every=5", "trainer.log_every=1",
                                                 "trainer.eval_every=0"])
    result = rel.run_check(EXP, kills=1, sig=signal.SIGKILL, out=tmp_path / "out", seed=7)
    assert result["losses_identical"] and result["weights_identical"] and len(result["kill_steps"]) == 1
    from PIL import Image

    with Image.open(tmp_path / "out" / "kill_resume.png") as im:
        assert im.size[0] > 300
    assert "bit-identical | True" in (tmp_path / "out" / "kill_resume.md").read_text()


def test_killed_sampling_resumes_to_identical_images(uninterrupted, tmp_path):
    """Killed mid-way and rerun, only the missing shards are made and the set equals an uninterrupted run
    bit for bit. With another batch size, per-sample seeds give the same images up to float rounding: CPU
    kernels block batches of different sizes differently, which can move a pixel by one grey level."""
    import shutil

    from replication.samples import load_samples

    shutil.copytree(uninterrupted, tmp_path / "w")
    w = tmp_path / "w"
    common = ["experiment=smoke", *paths_overrides(w), *TRAIN, "sampler.num_samples=96", "sample_shard_size=16"]
    shards = w / "runs" / "smoke" / "sample" / "samples"
    run_module("replication.stages.sample", common + ["sampler.batch_size=8"])
    reference = load_samples(shards)
    shutil.rmtree(w / "runs" / "smoke" / "sample")
    proc = subprocess.Popen([sys.executable, "-m", "replication.stages.sample", *common, "sampler.batch_size=8"],
                            env=env(), cwd=REPO, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    deadline = time.time() + 120
    while time.time() < deadline and len(list(shards.glob("shard_*.npy"))) < 2 and proc.poll() is None:
        time.sleep(0.05)
    proc.send_signal(signal.SIGKILL)
    proc.wait(timeout=60)
    made_before = {p.name: p.stat().st_mtime_ns for p in shards.glob("shard_*.npy")}
    assert 0 < len(made_before) < 6
    run_module("replication.stages.sample", common + ["sampler.batch_size=8"])
    for name, mtime in made_before.items():
        assert (shards / name).stat().st_mtime_ns == mtime, f"{name} was remade"
    resumed = load_samples(shards)
    assert resumed.shape == reference.shape and np.array_equal(resumed, reference)
    # another batch size: the same images up to one grey level on a tiny fraction of pixels
    shutil.rmtree(w / "runs" / "smoke" / "sample")
    run_module("replication.stages.sample", common + ["sampler.batch_size=12"])
    other = load_samples(shards)
    diff = np.abs(other.astype(int) - reference.astype(int))
    assert diff.max() <= 1 and (diff > 0).mean() < 1e-4, (diff.max(), (diff > 0).mean())


def test_a_diverging_training_keeps_the_good_checkpoint_and_says_where(prepared, tmp_path):
    """A learning rate that makes the loss non-finite stops training at that step. The good checkpoint of the
    original settings is never lost: it is kept (byte for byte) under its resume key, the message says where, and
    rerunning with the original settings resumes from it."""
    tmp_path = tmp_path / "w"
    _clone_run(prepared, tmp_path)
    subprocess.run(_train_cmd(tmp_path), env=env(), cwd=REPO, check=True, capture_output=True, timeout=600)
    train_dir = tmp_path / "runs" / "smoke" / "train_ldm"
    before = {p.name: p.read_bytes() for p in (train_dir / "state").iterdir()}
    proc = subprocess.run(_train_cmd(tmp_path) + ["trainer.steps=80", "trainer.base_lr=1e30"], env=env(), cwd=REPO,
                          capture_output=True, text=True, timeout=600)
    assert proc.returncode == 2 and "Traceback" not in proc.stderr, proc.stderr[-2000:]
    assert "loss is nan" in proc.stderr.lower() or "loss is inf" in proc.stderr.lower(), proc.stderr[-2000:]
    kept = [d for d in (train_dir / "state.stale").iterdir() if (d / next(iter(before))).exists()]
    assert len(kept) == 1 and str(kept[0]) in proc.stderr, proc.stderr[-2000:]  # the message names where it is
    assert {p.name: p.read_bytes() for p in kept[0].iterdir()} == before
    # the original settings, trained 5 steps further: they continue from the kept checkpoint, not from step 0
    again = subprocess.run(_train_cmd(tmp_path) + ["trainer.steps=65"], env=env(), cwd=REPO, capture_output=True,
                           text=True, timeout=600)
    assert again.returncode == 0, again.stderr[-2000:]
    result = json.loads((train_dir / "done.json").read_text())["result"]
    assert result["resumed_from"] == 60 and result["steps"] == 65, result


def test_mismatched_checkpoint_names_the_tensors(prepared, tmp_path):
    """A checkpoint written for this configuration (its resume key matches) whose tensors do not fit the model, as
    a checkpoint from a changed model definition would be: the error names the tensors. (A changed model config
    changes the resume key instead: that checkpoint is set aside, see test_pipeline.)"""
    import torch

    from replication.training.checkpoint import list_states

    tmp_path = tmp_path / "w"
    _clone_run(prepared, tmp_path)
    subprocess.run(_train_cmd(tmp_path)[:-len(TRAIN)] + [*TRAIN[1:], "trainer.steps=5"], env=env(), cwd=REPO,
                   check=True, capture_output=True, timeout=600)
    _, latest = list_states(tmp_path / "runs" / EXP / "train_ldm" / "state")[-1]
    state = torch.load(latest, weights_only=True)
    weight = state["model"]["input_blocks.0.0.weight"]
    state["model"]["input_blocks.0.0.weight"] = torch.zeros(weight.shape[0] * 2, *weight.shape[1:])
    torch.save(state, latest)
    # a well-formed checkpoint of another model definition: its recorded hash is its own (a file changed without
    # one is refused as damaged before its tensors are looked at)
    from replication.utils.io import sha256_file

    latest.with_name(latest.name + ".sha256").write_text(sha256_file(latest) + "\n")
    proc = subprocess.run(_train_cmd(tmp_path)[:-len(TRAIN)] + [*TRAIN[1:], "trainer.steps=10"],
                          env=env(), cwd=REPO, capture_output=True, text=True, timeout=600)
    assert proc.returncode != 0
    assert "does not fit the configured model" in proc.stderr and "shape mismatch" in proc.stderr
    assert "input_blocks.0.0.weight" in proc.stderr


def test_pickle_that_would_run_code_is_refused(tmp_path):
    from replication.utils.io import ArtifactError, torch_load_safe

    marker = tmp_path / "pwned"

    class Evil:
        def __reduce__(self):
            return (os.system, (f"touch {marker}",))

    bad = tmp_path / "evil.pt"
    with open(bad, "wb") as fh:
        pickle.dump({"state_dict": Evil()}, fh)
    with pytest.raises(ArtifactError, match="refusing to load"):
        torch_load_safe(bad)
    assert not marker.exists()


def test_malformed_config_names_the_key(tmp_path):
    proc = run_module("replication.run", ["experiment=smoke", *paths_overrides(tmp_path), "+trainer.lr=0.1"], check=False)
    assert proc.returncode != 0 and "lr" in proc.stderr and "Allowed keys" in proc.stderr
    assert not (tmp_path / "runs" / "smoke" / "train_ldm").exists()


def test_atomic_write_leaves_old_file_when_writer_dies(tmp_path):
    target = tmp_path / "metrics.json"
    target.write_text('{"old": true}')
    code = (f"import os\nfrom replication.utils.io import atomic_path\n"
            f"with atomic_path({str(target)!r}) as tmp:\n"
            f"    tmp.write_text('{{\"new\": tru')\n"
            f"    os._exit(9)\n")
    proc = subprocess.run([sys.executable, "-c", code], env=env(), cwd=REPO)
    assert proc.returncode == 9
    assert json.loads(target.read_text()) == {"old": True}


def _torchrun(module: str, overrides: list[str]) -> subprocess.CompletedProcess:
    cmd = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node", "2", "-m", module,
           *overrides]
    proc = subprocess.run(cmd, cwd=REPO, env=env(), capture_output=True, text=True, timeout=600)
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-5000:]
    return proc


def test_torchrun_two_processes_train_resume_and_sample(prepared, tmp_path):
    """torchrun on the CPU (gloo): two processes really start (latent-diffusion #209: flags that silently start
    one), train on disjoint slices of each global batch, checkpoint, resume; sampling splits shards between
    ranks and gives the same images as one process (per-sample seeds)."""
    work = tmp_path / "w"
    _clone_run(prepared, work)
    train = ["experiment=smoke", *paths_overrides(work), "trainer.ckpt_every=5", "trainer.log_every=1",
             "trainer.eval_every=0", "trainer.batch_size=8", "cpu_threads=1"]
    _torchrun("replication.stages.train_ldm", train + ["trainer.steps=6"])
    run_dir = work / "runs" / "smoke"
    meta = (run_dir / "train_ldm" / "meta.json").read_text()
    assert '"world_size": 2' in meta  # two processes, not one silently
    # resume with two processes from the step-6 checkpoint to step 10
    _torchrun("replication.stages.train_ldm", train + ["trainer.steps=10"])
    steps = [r["step"] for r in read_jsonl(run_dir / "train_ldm" / "stats.jsonl") if r.get("event") == "train"]
    assert steps == list(range(1, 11))
    sample = ["experiment=smoke", *paths_overrides(work), "sampler.num_samples=48", "sample_shard_size=16",
              "curves.ddim_steps=[]", "trainer.eval_num_samples=0", "cpu_threads=1"]
    _torchrun("replication.stages.sample", train[1:] + sample)
    from replication.samples import load_samples

    two = load_samples(run_dir / "sample" / "samples")
    shutil.rmtree(run_dir / "sample")
    run_module("replication.stages.sample", train[1:] + sample)
    one = load_samples(run_dir / "sample" / "samples")
    assert two.shape == (48, 32, 32, 3) and np.array_equal(two, one)
