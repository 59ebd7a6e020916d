"""Several processes, one pipeline: SLURM's variables (srun, Hydra's submitit launcher with tasks_per_node > 1)
become torchrun's, and `python -m replication.run` in N processes runs single-process stages once on rank 0
while the others wait, the DDP/sharded stages on all, and ends every process when one fails. Real gloo
processes on the CPU."""
from __future__ import annotations

import json
import signal
import socket
import subprocess
import sys
import time
from pathlib import Path

import pytest

from pipeline_helpers import REPO, env, paths_overrides, read_jsonl
from replication.training.distributed import first_slurm_host, torch_env_from_slurm

STEP = {"SLURM_JOB_ID": "4242", "SLURM_STEP_ID": "0", "SLURM_PROCID": "1", "SLURM_LOCALID": "1",
        "SLURM_STEP_NUM_TASKS": "8", "SLURM_STEP_TASKS_PER_NODE": "4(x2)", "SLURM_STEP_NODELIST": "gpu[017-018]"}


@pytest.mark.parametrize("nodelist, first", [("gpu[003-004,010],cpu1", "gpu003"), ("node7", "node7"),
                                             ("n1,n2", "n1"), ("rack-a[09]", "rack-a09"), ("x[1-2]y", "x1")])
def test_first_host_of_a_slurm_node_list(nodelist, first):
    assert first_slurm_host(nodelist) == first


def test_srun_task_variables_become_torchrun_variables():
    out = torch_env_from_slurm(STEP)
    assert out == {"RANK": "1", "WORLD_SIZE": "8", "LOCAL_RANK": "1", "LOCAL_WORLD_SIZE": "4",
                   "MASTER_ADDR": "gpu017", "MASTER_PORT": str(20000 + (4242 * 7) % 20000)}
    assert torch_env_from_slurm({**STEP, "MASTER_PORT": "12345"})["MASTER_PORT"] == "12345"


@pytest.mark.parametrize("change", [
    {"WORLD_SIZE": "8"},                   # torchrun inside the step already said it
    {"SLURM_STEP_NUM_TASKS": "1"},         # one task: nothing to join
    {"REPLICATION_SLURM_DIST": "0"},       # switched off
])
def test_no_translation_where_it_would_be_wrong(change):
    assert torch_env_from_slurm({**STEP, **change}) is None


def test_a_batch_script_is_not_mistaken_for_a_multi_task_step():
    """sbatch's own shell has SLURM_PROCID 0 and SLURM_NTASKS N but no step: a plain `python` there is one
    process, not rank 0 of N waiting forever."""
    batch = {k: v for k, v in STEP.items() if not k.startswith("SLURM_STEP")}
    assert torch_env_from_slurm({**batch, "SLURM_NTASKS": "8", "SLURM_PROCID": "0"}) is None


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _start_two(overrides: list[str], logs: Path) -> list[subprocess.Popen]:
    """What srun starts for a 2-task step: the same command twice with per-task SLURM variables. Each task's
    output (stdout and stderr) goes to logs/rank<r>.log."""
    port = str(_free_port())
    logs.mkdir(parents=True, exist_ok=True)
    procs = []
    for rank in range(2):
        e = env()
        for k in ("WORLD_SIZE", "RANK", "LOCAL_RANK", "MASTER_ADDR"):
            e.pop(k, None)
        e.update({"SLURM_JOB_ID": "77", "SLURM_STEP_ID": "0", "SLURM_PROCID": str(rank), "SLURM_LOCALID": str(rank),
                  "SLURM_STEP_NUM_TASKS": "2", "SLURM_STEP_TASKS_PER_NODE": "2", "SLURM_STEP_NODELIST": "localhost",
                  "MASTER_PORT": port, "OMP_NUM_THREADS": "1"})
        with open(logs / f"rank{rank}.log", "w") as out:
            procs.append(subprocess.Popen([sys.executable, "-m", "replication.run", *overrides], cwd=REPO, env=e,
                                          stdout=out, stderr=subprocess.STDOUT, text=True))
    return procs


def _launch_two(overrides: list[str], logs: Path) -> list[subprocess.CompletedProcess]:
    procs = _start_two(overrides, logs)
    out = []
    for rank, p in enumerate(procs):
        p.wait(timeout=600)
        text = (logs / f"rank{rank}.log").read_text()
        out.append(subprocess.CompletedProcess(p.args, p.returncode, text, text))
    return out


@pytest.mark.e2e
def test_two_srun_tasks_run_the_whole_pipeline_once(tmp_path):
    overrides = ["experiment=smoke", *paths_overrides(tmp_path), "autoencoder.train.steps=20",
                 "trainer.steps=10", "trainer.ckpt_every=5", "trainer.eval_every=0", "sampler.num_samples=64",
                 "curves.ddim_steps=[]", "cpu_threads=1", "progress=false"]
    results = _launch_two(overrides, tmp_path / "logs")
    for rank, r in enumerate(results):
        assert r.returncode == 0, f"rank {rank}:\n{r.stdout[-2000:]}\n{r.stderr[-4000:]}"
    run = tmp_path / "runs" / "smoke"
    for stage in ("prepare", "train_autoencoder", "encode_latents", "train_ldm", "sample", "evaluate", "report"):
        done = [r for r in read_jsonl(run / stage / "stats.jsonl") if r.get("event") == "stage_done"]
        assert len(done) == 1, stage  # once, by rank 0, not once per process
        assert json.loads((run / stage / "manifest.json").read_text())["processes"] == 2
    assert json.loads((run / "train_ldm" / "meta.json").read_text())["world_size"] == 2  # DDP really had 2
    assert (run / "train_ldm" / "log.rank1.txt").is_file() and not (run / "evaluate" / "log.rank1.txt").exists()
    assert "waits for rank 0, which runs it alone" in results[1].stderr + results[1].stdout
    metrics = json.loads((run / "metrics.json").read_text())
    assert metrics["metrics"]["FID"]["value"] > 0 and metrics["metrics"]["FID"]["n_samples"] == 64

    # a stage that fails on rank 0 ends rank 1 too, with rank 0's message, instead of leaving it waiting
    bad = overrides + ["metrics.inception_weights=/nonexistent/pt_inception.pth", "metrics.allow_standin=false"]
    results = _launch_two(bad, tmp_path / "logs_bad")
    assert results[0].returncode != 0 and results[1].returncode != 0
    assert "failed on rank 0" in results[1].stderr and "/nonexistent/pt_inception.pth" in results[1].stderr


@pytest.mark.reliability
@pytest.mark.parametrize("stage, victim", [("train_autoencoder", 0), ("train_autoencoder", 1), ("train_ldm", 1)])
def test_a_process_killed_outright_ends_the_other_with_a_message(tmp_path, stage, victim):
    """SIGKILL (the OOM killer, a node failure) gives no process a chance to say goodbye. While rank 0 trains the
    autoencoder alone and rank 1 waits: kill rank 0, and rank 1 ends at once saying rank 0 is gone; kill rank 1,
    and rank 0 finishes (and keeps) its stage, then ends saying another process is gone. In DDP training, the
    survivor ends at its next exchange. Nobody waits forever (the waiting group's timeout is 30 days) or ends with
    a bare gloo traceback."""
    if stage == "train_autoencoder":
        steps = ["autoencoder.train.steps=100000" if victim == 0 else "autoencoder.train.steps=12",
                 "autoencoder.train.log_every=1"]  # rank 0 must outlive the kill, or finish soon after it
    else:
        steps = ["autoencoder.train.steps=2", "trainer.steps=100000", "trainer.log_every=1", "trainer.eval_every=0"]
    overrides = ["experiment=smoke", *paths_overrides(tmp_path), *steps, "cpu_threads=1", "progress=false"]
    procs = _start_two(overrides, tmp_path / "logs")
    stats = tmp_path / "runs" / "smoke" / stage / "stats.jsonl"
    try:
        deadline = time.monotonic() + 300
        while not (stats.is_file() and '"step": 2,' in stats.read_text()):  # training; the other rank is past
            assert time.monotonic() < deadline and all(p.poll() is None for p in procs), \
                (tmp_path / "logs" / "rank0.log").read_text()[-3000:]
            time.sleep(0.2)
        procs[victim].send_signal(signal.SIGKILL)
        survivor = procs[1 - victim]
        survivor.wait(timeout=240)
    finally:
        for p in procs:
            p.kill()
    log = (tmp_path / "logs" / f"rank{1 - victim}.log").read_text()
    assert survivor.returncode == 2, log[-3000:]  # a user-facing StageError, not a crash
    if stage == "train_ldm":
        assert "stage train_ldm: another process of this 2-process job is gone" in log
    elif victim == 0:
        assert "stage train_autoencoder: rank 0 ended without a word while process 1 waited" in log
    else:
        assert "stage train_autoencoder finished on rank 0, but another process of this 2-process job is gone" in log
        assert (stats.parent / "done.json").is_file()  # the finished stage is kept for the rerun
    assert "Traceback" not in log


@pytest.fixture
def one_process_group(tmp_path):
    """A real gloo group of one process (FileStore), plus the long-timeout waiting group made from it."""
    import torch.distributed as dist

    from replication.training import distributed

    dist.init_process_group("gloo", store=dist.FileStore(str(tmp_path / "store"), 1), rank=0, world_size=1)
    distributed._waiting_group()
    yield dist
    if dist.is_initialized():
        dist.destroy_process_group()
    distributed._wait_group = None


def _entry_main(monkeypatch, tmp_path, run):
    from replication.stages.entry import hydra_entry

    monkeypatch.setattr(sys, "argv", ["stage", f"hydra.run.dir={tmp_path / 'hydra'}", "hydra.output_subdir=null",
                                      "experiment=smoke"])
    hydra_entry(run)()


def test_a_stage_that_ends_normally_destroys_its_process_groups(one_process_group, monkeypatch, tmp_path, capsys):
    """gloo's threads must not outlive the interpreter: without destroy_process_group, 8 of 30 two-process torchrun
    exits aborted here ("terminate called without an active exception"), which failed CI once."""
    from replication.training import distributed

    seen = []
    _entry_main(monkeypatch, tmp_path, lambda cfg: seen.append(one_process_group.is_initialized()) or {"ok": 1})
    assert seen == [True]
    assert not one_process_group.is_initialized() and distributed._wait_group is None
    assert '"ok": 1' in capsys.readouterr().out
    distributed.shutdown_distributed()  # a second call (nothing left) is a no-op


def test_an_agreed_user_error_destroys_the_groups_but_an_unexpected_one_keeps_them(one_process_group, monkeypatch,
                                                                                   tmp_path):
    from replication.config import ConfigError

    def bad_input(cfg):
        raise ConfigError("trainer.lr: not a number")

    with pytest.raises(SystemExit) as exit_info:
        _entry_main(monkeypatch, tmp_path, bad_input)
    assert exit_info.value.code == 2 and not one_process_group.is_initialized()

    one_process_group.init_process_group("gloo", store=one_process_group.FileStore(str(tmp_path / "store2"), 1),
                                         rank=0, world_size=1)

    def crash(cfg):
        raise RuntimeError("a bug, possibly on one rank only")

    with pytest.raises(SystemExit) as exit_info:  # Hydra prints the traceback and exits 1
        _entry_main(monkeypatch, tmp_path, crash)
    assert exit_info.value.code == 1 and one_process_group.is_initialized()  # another rank may still be in a collective: not waited on
