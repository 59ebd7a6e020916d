"""Progress of long steps as log lines (replication/utils/progress.py): paced by time and by count, with rate and
ETA, and the two training loops writing them to the stage's log.txt with the tqdm bar off (as under DVC)."""
from __future__ import annotations

import logging
import re
from pathlib import Path

import pytest
import torch
from torch import nn

from replication.diffusion.schedule import Schedule
from replication.stages.execute import setup_logging
from replication.training.ldm_trainer import LoopSettings, train_loop
from replication.utils.progress import ENV_INTERVAL, ProgressLog, default_interval_s, format_duration

pytestmark = pytest.mark.usefixtures("one_thread")  # tests/conftest.py


class FakeClock:
    def __init__(self) -> None:
        self.t = 100.0

    def __call__(self) -> float:
        return self.t


def _lines(caplog) -> list[str]:
    return [r.getMessage() for r in caplog.records if r.name == "replication"]


def test_lines_come_on_the_first_update_then_every_interval_with_rate_and_eta(caplog):
    clock = FakeClock()
    caplog.set_level(logging.INFO, logger="replication")
    with ProgressLog("train LDM", total=100, initial=10, interval_s=30, clock=clock) as p:
        clock.t += 2.0
        assert p.update(1, loss=0.5)  # first update: a line at once
        for _ in range(9):  # 9 steps of 1 s each: under the interval, no line
            clock.t += 1.0
            assert not p.update(1)
        logged = []
        for _ in range(21):  # 21 more steps of 1 s: 30 s since the first line on the last one
            clock.t += 1.0
            logged.append(p.update(1, loss=0.25))
        assert logged == [False] * 20 + [True]
    lines = _lines(caplog)
    assert len(lines) == 3, lines
    assert lines[0] == "train LDM: step 11/100 (11%), loss 0.5, 2 s/step, ETA 2m58s, elapsed 2 s"
    # the second line: step 41, 30 steps in 30 s since the first line -> 1 step/s, 59 left -> ETA 59 s
    assert lines[1] == "train LDM: step 41/100 (41%), loss 0.25, 1 step/s, ETA 59 s, elapsed 32 s"
    # this run's 31 steps (the resumed-from 10 do not count) in 32 s
    assert lines[2] == "train LDM: finished at step 41/100, loss 0.25, 31 step(s) in 32 s (1.03 s/step)"


def test_lines_every_n_updates_and_unknown_totals(caplog):
    clock = FakeClock()
    caplog.set_level(logging.INFO, logger="replication")
    p = ProgressLog("encode latents", unit="batch", interval_s=0, every=4, clock=clock)
    logged = []
    for i in range(1, 10):
        clock.t += 0.5
        if p.update(1):
            logged.append(i)
    p.close(done=False)  # stopped early: no 'finished' line
    assert logged == [1, 5, 9]
    lines = _lines(caplog)
    assert lines[1] == "encode latents: batch 5, 2 batch/s, elapsed 2 s"  # no total: no percentage, no ETA
    assert len(lines) == 3


def test_slow_rates_read_as_seconds_per_unit_and_durations_are_readable(caplog):
    clock = FakeClock()
    caplog.set_level(logging.INFO, logger="replication")
    p = ProgressLog("sample", total=1000, unit="img", interval_s=60, clock=clock)
    clock.t += 4.0
    p.update(1)
    clock.t += 3600
    p.update(400)
    assert _lines(caplog)[-1] == "sample: img 401/1000 (40%), 9 s/img, ETA 1h29m, elapsed 1h00m"  # 599 x 9 s
    assert format_duration(125) == "2m05s" and format_duration(float("nan")) == "?"


def test_interval_from_the_environment_and_bad_values(monkeypatch):
    monkeypatch.setenv(ENV_INTERVAL, "2.5")
    assert default_interval_s() == 2.5
    monkeypatch.setenv(ENV_INTERVAL, "soon")
    with pytest.raises(ValueError, match="REPLICATION_PROGRESS_INTERVAL_S='soon' is not a number of seconds"):
        default_interval_s()
    monkeypatch.delenv(ENV_INTERVAL)
    assert default_interval_s() == 30.0
    with pytest.raises(ValueError, match="must be >= 0"):
        ProgressLog("x", interval_s=-1)


class _Tiny(nn.Module):
    def __init__(self):
        super().__init__()
        self.conv = nn.Conv2d(2, 2, 3, padding=1)
        self.t_emb = nn.Embedding(1000, 2)

    def forward(self, x, t):
        return self.conv(x) + self.t_emb(t)[:, :, None, None]


def _log_text(stage_dir: Path, run) -> str:
    handler = setup_logging(stage_dir)  # the stage's own log.txt handler on the `replication` logger
    try:
        run()
    finally:
        logging.getLogger("replication").removeHandler(handler)
        handler.close()
    return (stage_dir / "log.txt").read_text()


STEP_LINE = re.compile(r"train LDM: step (\d+)/12 \(\d+%\), loss [0-9.e-]+, [0-9.]+ (step/s|s/step), ETA [^,]+, elapsed")


def test_ldm_training_with_the_bar_off_logs_steps_loss_rate_and_eta_to_log_txt(tmp_path):
    torch.manual_seed(0)
    data = torch.randn(8, 2, 4, 4)
    settings = LoopSettings(steps=12, batch_size=2, lr=1e-3, lr_lambda=lambda s: 1.0, weight_decay=0.0,
                            adam_betas=(0.9, 0.999), loss_type="l2", grad_clip=None, log_every=100, ckpt_every=1000,
                            keep_last=1, seed=0, progress=False, progress_interval_s=1e-6)
    text = _log_text(tmp_path / "train_ldm", lambda: train_loop(
        _Tiny(), None, Schedule.make("linear", 1000, 0.0015, 0.0195), lambda idx, g: (data[idx], None), 8, settings,
        tmp_path / "train_ldm" / "state", lambda **r: None, torch.device("cpu")))
    steps = [int(m.group(1)) for m in STEP_LINE.finditer(text)]
    # a line at each step (the interval is shorter than a step); the loss is known from the second step on
    assert steps == list(range(2, 13)), text
    assert "train LDM: step 1/12 (8%), " in text
    assert re.search(r"train LDM: finished at step 12/12, loss [0-9.e-]+, 12 step\(s\) in", text), text


def test_autoencoder_training_with_the_bar_off_logs_progress_to_log_txt(tmp_path):
    from test_ae_trainer import _build, _cfg, _images

    from replication.training.ae_trainer import train_autoencoder_loop

    model, loss_fn = _build(_cfg(disc_start=0))
    data = _images()
    text = _log_text(tmp_path / "train_autoencoder", lambda: train_autoencoder_loop(
        model, loss_fn, lambda idx, g: data[idx], 12, 3, 2, lr=1e-3, betas=(0.5, 0.9), seed=4,
        state_dir=tmp_path / "train_autoencoder" / "state", stats=lambda **r: None, device=torch.device("cpu"),
        ckpt_every=1000, progress=False, progress_interval_s=1e-6))
    steps = re.findall(r"train autoencoder: step (\d)/3 \(\d+%\), (?:loss [0-9.e-]+, )?[0-9.]+ (?:step/s|s/step), "
                       r"ETA", text)
    assert steps == ["1", "2", "3"], text
    assert "train autoencoder: finished at step 3/3" in text


def test_the_reliability_check_logs_a_childs_progress_while_it_runs(tmp_path, caplog):
    """python -m replication.reliability waits minutes for its child processes: it logs their progress meanwhile
    (here a real child that counts to 8, read from the file it writes, as the check reads the training step)."""
    import subprocess
    import sys

    from replication.reliability import run_watched

    counter = tmp_path / "count.txt"
    child = ("import time, pathlib\n"
             f"p = pathlib.Path({str(counter)!r})\n"
             "for i in range(1, 9):\n"
             "    p.write_text(str(i)); time.sleep(0.15)\n")
    caplog.set_level(logging.INFO, logger="replication")

    def count() -> int:
        text = counter.read_text() if counter.exists() else ""
        return int(text) if text.strip() else 0

    run_watched([sys.executable, "-c", child], "count", count, 8, "step", interval_s=1e-6, poll_s=0.05)
    lines = [r.getMessage() for r in caplog.records if r.name == "replication.reliability"]
    seen = [int(m.group(1)) for m in (re.match(r"count: step (\d)/8 \(\d+%\), .*ETA", ln) for ln in lines) if m]
    assert seen and seen == sorted(seen) and seen[-1] == 8, lines
    assert lines[-1].startswith("count: finished at step 8/8, 8 step(s) in "), lines
    with pytest.raises(subprocess.CalledProcessError) as err:
        run_watched([sys.executable, "-c", "import sys; sys.exit('no inputs here')"], "fail", lambda: 0, None, "step")
    assert err.value.returncode == 1 and "no inputs here" in err.value.stderr
