"""Training curves as TensorBoard event files beside stats.jsonl (replication/training/tensorboard_log.py): written
and readable when the tensorboard package is installed, skipped with one line saying how to enable it when not."""
from __future__ import annotations

import logging
import sys

import pytest
import torch
from torch import nn

from replication.diffusion.schedule import Schedule
from replication.training.ldm_trainer import LoopSettings, train_loop
from replication.training.tensorboard_log import TrainingCurves

pytestmark = pytest.mark.usefixtures("one_thread")  # tests/conftest.py


class _Tiny(nn.Module):
    def __init__(self):
        super().__init__()
        self.conv = nn.Conv2d(2, 2, 3, padding=1)

    def forward(self, x, t):
        return self.conv(x)


def _train(stage_dir, steps=6):
    torch.manual_seed(0)
    data = torch.randn(8, 2, 4, 4)
    records: list[dict] = []
    settings = LoopSettings(steps=steps, batch_size=2, lr=1e-3, lr_lambda=lambda s: 1.0, weight_decay=0.0,
                            adam_betas=(0.9, 0.999), loss_type="l2", grad_clip=None, log_every=2, ckpt_every=1000,
                            keep_last=1, seed=0, progress=False, progress_interval_s=0)
    train_loop(_Tiny(), None, Schedule.make("linear", 1000, 0.0015, 0.0195), lambda idx, g: (data[idx], None), 8,
               settings, stage_dir / "state", lambda **r: records.append(r), torch.device("cpu"))
    return [r for r in records if r.get("event") == "train"]


def test_training_writes_readable_event_files_beside_the_stats(tmp_path):
    pytest.importorskip("tensorboard", reason="the tensorboard extra is not installed (pip install -e '.[tensorboard]')")
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    stage = tmp_path / "train_ldm"
    logged = _train(stage)
    assert [r["step"] for r in logged] == [1, 2, 4, 6]
    events = list(stage.glob("events.out.tfevents.*"))
    assert len(events) == 1
    acc = EventAccumulator(str(stage))
    acc.Reload()
    assert {"train/loss", "train/lr", "train/epoch"} <= set(acc.Tags()["scalars"])
    curve = acc.Scalars("train/loss")
    assert [e.step for e in curve] == [r["step"] for r in logged]
    assert [e.value for e in curve] == pytest.approx([r["loss"] for r in logged], rel=1e-6)  # float32 in the file
    assert [e.value for e in acc.Scalars("train/lr")] == pytest.approx([1e-3] * 4)


def test_without_tensorboard_one_line_says_how_to_enable_it(tmp_path, monkeypatch, caplog):
    monkeypatch.setitem(sys.modules, "tensorboard", None)  # how Python marks a package that is not installed
    caplog.set_level(logging.INFO, logger="replication")
    curves = TrainingCurves(tmp_path / "train_ldm", "train LDM")
    curves.add(1, "train", {"loss": 0.5})
    curves.close()
    assert not curves.enabled and not (tmp_path / "train_ldm").exists()
    lines = [r.getMessage() for r in caplog.records if "TensorBoard" in r.getMessage()]
    assert lines == [f'train LDM: TensorBoard curves skipped (the tensorboard package is not installed); pip install -e '
                     f'".[tensorboard]" (or pip install tensorboard) to also write them in {tmp_path / "train_ldm"}, '
                     'beside stats.jsonl']


def test_only_finite_numbers_become_scalars(tmp_path):
    pytest.importorskip("tensorboard", reason="the tensorboard extra is not installed (pip install -e '.[tensorboard]')")
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    curves = TrainingCurves(tmp_path, "x")
    curves.add(3, "train", {"loss": 0.25, "nan": float("nan"), "name": "adam", "flag": True, "epoch": 2})
    curves.close()
    acc = EventAccumulator(str(tmp_path))
    acc.Reload()
    assert sorted(acc.Tags()["scalars"]) == ["train/epoch", "train/loss"]
