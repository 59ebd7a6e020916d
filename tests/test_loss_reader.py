"""Losses read one step late (replication/training/loss_reader.py) in the real LDM train loop: every step is still
logged with its own step, LR and epoch, and a non-finite loss still stops training at its own step before anything
after it is written."""
from __future__ import annotations

import math
from pathlib import Path

import pytest
import torch
from torch import nn

from replication.diffusion.schedule import Schedule
from replication.training.checkpoint import list_states
from replication.training.ldm_trainer import DataOrder, LoopSettings, train_loop
from replication.training.loss_reader import DeferredLossReader
from replication.training.signals import TrainingDiverged

try:
    from cuda_checks import SyncCheckedSteps
except ImportError:
    from tests.cuda_checks import SyncCheckedSteps

ITEMS, BATCH, SHAPE, SEED = 24, 4, (2, 4, 4), 3
pytestmark = pytest.mark.usefixtures("one_thread")  # tests/conftest.py


class _Denoiser(nn.Module):
    def __init__(self):
        super().__init__()
        torch.manual_seed(0)
        self.conv = nn.Conv2d(2, 8, 3, padding=1)
        self.t_emb = nn.Embedding(1000, 8)
        self.out = nn.Conv2d(8, 2, 3, padding=1)

    def forward(self, x, t):
        return self.out(torch.tanh(self.conv(x) + self.t_emb(t)[:, :, None, None]))


def _run(tmp_path: Path, steps: int, nan_at_step: int | None = None, ckpt_every: int = 1000):
    data = torch.randn(ITEMS, *SHAPE, generator=torch.Generator().manual_seed(7))
    calls = {"n": 0}

    def batch_fn(idx, g):
        calls["n"] += 1
        x = data[idx].clone()
        if calls["n"] == nan_at_step:
            x[0, 0, 0, 0] = math.nan  # one bad latent, as a corrupt cache entry
        return x, None

    settings = LoopSettings(steps=steps, batch_size=BATCH, lr=1e-2, lr_lambda=lambda s: 1.0 / (1 + s),
                            weight_decay=0.01, adam_betas=(0.9, 0.999), loss_type="l2", grad_clip=None, log_every=1,
                            ckpt_every=ckpt_every, keep_last=10, seed=SEED, progress=False)
    records: list[dict] = []
    summary = train_loop(_Denoiser(), None, Schedule.make("linear", 1000, 0.0015, 0.0195), batch_fn, ITEMS, settings,
                         tmp_path / "state", lambda **r: records.append(r), torch.device("cpu"))
    return [r for r in records if r.get("event") == "train"], summary


def test_every_step_is_logged_with_its_own_step_lr_and_epoch(tmp_path):
    steps = 9  # across an epoch boundary (24 items / batch 4 = 6 steps per epoch)
    train, summary = _run(tmp_path, steps)
    assert [r["step"] for r in train] == list(range(1, steps + 1))
    order = DataOrder(ITEMS, BATCH, 0, 1, seed=SEED)
    for r in train:
        order.next()
        assert r["lr"] == pytest.approx(1e-2 / (1 + r["step"]), rel=1e-12)  # LambdaLR after the step's scheduler.step()
        assert r["epoch"] == order.epoch, r
        assert math.isfinite(r["loss"]) and r["loss"] > 0
    assert {r["epoch"] for r in train} == {0, 1}
    assert summary["step"] == steps and summary["last_loss"] == train[-1]["loss"]


@pytest.mark.parametrize("nan_at_step", [3, 4])
def test_a_nan_stops_at_its_own_step_before_the_next_checkpoint(tmp_path, nan_at_step):
    """Step 3's loss is read during step 4, step 4's (a checkpoint step) just before its checkpoint: either way the
    error names the NaN's step and no checkpoint is written after it."""
    with pytest.raises(TrainingDiverged, match=rf"loss is nan at step {nan_at_step};"):
        _run(tmp_path, steps=8, nan_at_step=nan_at_step, ckpt_every=2)
    assert [step for step, _ in list_states(tmp_path / "state")] == [2]


def test_the_reader_hands_back_the_step_before_and_flush_the_last():
    reader = DeferredLossReader()
    assert reader.push(1, torch.tensor([0.5, 1.5]), lr=0.1) == []
    (first,) = reader.push(2, torch.tensor([2.0]), lr=0.2)
    assert (first.step, first.values, first.meta) == (1, [0.5, 1.5], {"lr": 0.1})
    (second,) = reader.flush()
    assert (second.step, second.values) == (2, [2.0]) and reader.flush() == []


@pytest.mark.skipif(not torch.cuda.is_available(), reason="the pinned asynchronous copy needs CUDA")
def test_the_reader_on_cuda_copies_asynchronously_and_reads_the_right_values():
    reader = DeferredLossReader()
    x = torch.arange(4, dtype=torch.float32, device="cuda")
    assert reader.push(1, (x * 2).sum().reshape(1)) == []
    y = torch.randn(2048, 2048, device="cuda")
    for _ in range(3):
        y = y @ y / 2048  # work queued after the copy
    (first,) = reader.push(2, y.float().norm().reshape(1))
    assert first.values == [12.0]
    (second,) = reader.flush()
    assert second.values == [pytest.approx(float(y.float().norm()), rel=1e-6)]


@pytest.mark.skipif(not torch.cuda.is_available(), reason="host-device syncs exist on CUDA only")
def test_training_steps_on_cuda_make_no_host_device_sync():
    """Steps 2-4 of the real loop on CUDA (pinned input copies, AdamW, EMA, losses read one step late) run under
    torch.cuda's sync debug mode set to raise: no step waits for the GPU. Step 1 (first table copies) and the
    final checkpoint (device-to-host copies) are outside the checked window. The loss read's event wait is not a
    stream sync and is not what the mode checks for."""
    from replication.models.ema import EMA

    data = torch.randn(ITEMS, *SHAPE, generator=torch.Generator().manual_seed(7))
    model = _Denoiser().cuda()
    settings = LoopSettings(steps=6, batch_size=BATCH, lr=1e-2, lr_lambda=lambda s: 1.0, weight_decay=0.01,
                            adam_betas=(0.9, 0.999), loss_type="l2", grad_clip=None, log_every=1, ckpt_every=1000,
                            keep_last=1, seed=SEED, progress=False, fused_adam=True, pin_memory=True)
    import tempfile

    with tempfile.TemporaryDirectory() as tmp, SyncCheckedSteps(lambda idx, g: (data[idx], None)) as batch_fn:
        summary = train_loop(model, EMA(model).cuda(), Schedule.make("linear", 1000, 0.0015, 0.0195), batch_fn,
                             ITEMS, settings, Path(tmp) / "state", lambda **r: None, torch.device("cuda"))
    assert summary["step"] == 6 and math.isfinite(summary["last_loss"]) and batch_fn.calls == 6
