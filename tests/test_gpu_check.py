"""The prepared GPU script, rehearsed on the CPU: the one shot a GPU session gets must not fail on its bash
(argument handling, per-experiment time limit, merge, copy-out). The rehearsal runs the same script with the smoke
experiment's shapes and checks the merged table it writes."""
from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
from pathlib import Path

import pytest

from conftest import slow_without_native_bf16  # the rehearsal runs the bf16 fast path
import torch

from replication.bench.settings import ROWS

REPO = Path(__file__).resolve().parents[1]
SCRIPT = REPO / "replication" / "gpu_check.sh"
# every lever but compile (~45 s of inductor on this CPU); one timed iteration of each row
REHEARSAL_ARGS = ("--steps 1 --warmup 1 --sample-batch 2 --sample-steps 1 --ae-batch 2 --feature-batch 2 "
                  "--fast bf16,channels_last,fused_adam --threads 1")

pytestmark = pytest.mark.skipif(shutil.which("bash") is None or shutil.which("timeout") is None,
                                reason="needs bash and coreutils timeout")


def _env(**extra: str) -> dict[str, str]:
    env = dict(os.environ, PYTHON=sys.executable, **extra)
    env["PATH"] = f"{Path(sys.executable).parent}{os.pathsep}{env.get('PATH', '')}"
    return env


# the CPU stand-ins for the GPU run's trainer=default levers in the extras' smoke run
SMOKE_OVERRIDES = ("trainer.compile=false trainer.precision=fp32 trainer.channels_last=false trainer.fused_adam=false "
                   "sampling_speed.compile=false cpu_threads=1")


# two plan entries in the script's grammar NAME:BATCH[@ROWS[@FAST]][=SECONDS]: rows split between them, the second
# with its own levers and time limit
PLAN = "smoke:4@train,sample smoke:4@decode,encode,features@channels_last=300"


@slow_without_native_bf16
def test_rehearsal_on_the_cpu_writes_the_merged_table(tmp_path):
    out, copy = tmp_path / "bench", tmp_path / "copied"
    copy.mkdir()
    proc = subprocess.run(["bash", str(SCRIPT)], cwd=REPO, capture_output=True, text=True, timeout=900,
                          env=_env(DEVICE="cpu", EXPERIMENTS=PLAN, BENCH_ARGS=REHEARSAL_ARGS, OUT_DIR=str(out),
                                   MERGE_TAG="rehearsal", COPY_TO=str(copy), PER_EXPERIMENT_S="400", EXTRAS="1",
                                   EXTRAS_BUDGET_S="800", SMOKE_OVERRIDES=SMOKE_OVERRIDES))
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    assert "== smoke, train batch 4, rows train,sample (limit 400s)" in proc.stdout
    assert "== smoke, train batch 4, rows decode,encode,features, fast channels_last (limit 300s)" in proc.stdout
    assert "gpu_check: done" in proc.stdout
    merged = json.loads((out / "rehearsal.json").read_text())
    first, second = merged["reports"]  # one per plan entry, in the plan's order
    for report in (first, second):
        assert report["experiment"] == "smoke" and report["device"]["type"] == "cpu" and report["complete"] is True
    assert [row["row"] for row in first["rows"] + second["rows"]] == list(ROWS)
    assert first["fast_path"] == "bf16+channels_last+fused_adam" and second["fast_path"] == "channels_last"
    assert {row["batch"] for row in first["rows"] if row["row"] == "train"} == {4}
    for row in first["rows"] + second["rows"]:
        assert row["baseline"]["error"] is None and row["fast"]["error"] is None, row
        assert row["fast"]["img_per_s"] > 0 and row["baseline"]["img_per_s"] > 0
    table = (out / "rehearsal.md").read_text()
    assert "| train |" in table and table.strip() in proc.stdout  # the script ends by printing the table
    assert (copy / "rehearsal.json").read_bytes() == (out / "rehearsal.json").read_bytes()
    # the copy-out is made as results appear: the whole log, and no unmerged partial file once merged
    assert "gpu_check: done" in (copy / "gpu_check.log").read_text()
    assert not list(copy.glob("partial-*.json"))
    # the extras: the CUDA-only tests (skipped on this CPU, not failed) and the smoke chain through the real stages
    extras = out / "rehearsal-extras"
    assert "6 skipped" in (extras / "cuda-tests.log").read_text()
    assert "== smoke experiment through the real stages" in proc.stdout
    assert f"exit status 0 (log: {extras / 'smoke-default-trainer.log'})" in proc.stdout
    losses = [json.loads(line) for line in (extras / "train_ldm-stats.jsonl").read_text().splitlines()]
    assert max(r["step"] for r in losses if r.get("event") == "train") == 40
    assert json.loads((extras / "smoke-metrics.json").read_text())["metrics"]["FID"]["value"] > 0
    assert (copy / "rehearsal-extras" / "smoke-metrics.json").is_file()


@pytest.mark.parametrize("plan,bad", [("smoke", "smoke"), ("smoke:4 smoke:x", "smoke:x"),
                                      ("smoke:4@train=soon", "smoke:4@train=soon"),
                                      ("smoke:4 smoke:4@Train", "smoke:4@Train")])
def test_a_malformed_experiment_list_is_refused_before_any_work(tmp_path, plan, bad):
    proc = subprocess.run(["bash", str(SCRIPT)], cwd=REPO, capture_output=True, text=True, timeout=60,
                          env=_env(DEVICE="cpu", EXPERIMENTS=plan, OUT_DIR=str(tmp_path)))
    assert proc.returncode == 2
    assert f"EXPERIMENTS entries are NAME:BATCH[@ROWS[@FAST]][=SECONDS], got '{bad}'" in proc.stderr
    assert "==" not in proc.stdout and not any(tmp_path.iterdir())  # nothing ran, even for the good entries


def test_an_experiment_that_fails_leaves_no_results_and_says_so(tmp_path):
    proc = subprocess.run(["bash", str(SCRIPT)], cwd=REPO, capture_output=True, text=True, timeout=120,
                          env=_env(DEVICE="cpu", EXPERIMENTS="no_such_experiment:4", BENCH_ARGS=REHEARSAL_ARGS,
                                   OUT_DIR=str(tmp_path / "bench")))
    assert proc.returncode == 1
    assert "no_such_experiment: exit status" in proc.stdout
    assert "no experiment produced results" in proc.stderr
    assert not (tmp_path / "bench").exists()


@pytest.mark.skipif(torch.cuda.is_available(), reason="checks the refusal on a machine without a GPU")
def test_without_a_gpu_the_paper_shape_run_refuses_with_the_rehearsal_hint(tmp_path):
    proc = subprocess.run(["bash", str(SCRIPT)], cwd=REPO, capture_output=True, text=True, timeout=60,
                          env=_env(OUT_DIR=str(tmp_path)))
    assert proc.returncode == 2
    assert "no CUDA device visible" in proc.stderr and "DEVICE=cpu" in proc.stderr


def test_the_default_plan_names_real_experiments_rows_and_levers():
    """The plan the next GPU session runs as is (PLAN_ONLY=1 prints it parsed, before any import or GPU probe)."""
    from replication.perf import FastPath

    proc = subprocess.run(["bash", str(SCRIPT)], cwd=REPO, capture_output=True, text=True, timeout=60,
                          env=_env(PLAN_ONLY="1"))
    assert proc.returncode == 0, proc.stderr
    entries = [line.removeprefix("plan: ").split("|") for line in proc.stdout.splitlines() if line.startswith("plan: ")]
    assert len(entries) >= 2
    for name, batch, rows, fast, limit in entries:
        assert (REPO / "experiments" / "experiment" / f"{name}.yaml").is_file(), name
        assert int(batch) > 0 and 30 <= int(limit) <= 600
        assert rows and set(rows.split(",")) <= set(ROWS)
        if fast:
            FastPath.parse(fast)  # raises on an unknown lever
    # the fourth H200 target row, left unmeasured on 2026-11-27, comes first
    assert entries[0][:3] == ["celebahq_ldm4", "48", "sample"]
