"""Gradient accumulation (`trainer.accumulate_grad_batches`, Lightning semantics as the release's trainer): the
accumulated gradient is the mean-loss gradient of all micro-batches, steps count optimizer steps, the EMA follows
the release's per-micro-batch update (or per step), the LR schedule steps per optimizer step, and resume stays
exact. Small real models, real train loops."""
from __future__ import annotations

import copy
import shutil
from pathlib import Path

import pytest
import torch
from torch import nn

from replication.diffusion.objective import diffusion_loss, sample_timesteps
from replication.diffusion.schedule import Schedule
from replication.models.ema import EMA
from replication.training.ldm_trainer import DataOrder, LoopSettings, train_loop

ITEMS, BATCH, SHAPE = 24, 4, (2, 4, 4)
pytestmark = pytest.mark.usefixtures("one_thread")  # tests/conftest.py


class TinyDenoiser(nn.Module):
    def __init__(self):
        super().__init__()
        self.conv = nn.Conv2d(2, 8, 3, padding=1)
        self.t_emb = nn.Embedding(1000, 8)
        self.out = nn.Conv2d(8, 2, 3, padding=1)

    def forward(self, x, t):
        return self.out(torch.tanh(self.conv(x) + self.t_emb(t)[:, :, None, None]))


def _data() -> torch.Tensor:
    return torch.randn(ITEMS, *SHAPE, generator=torch.Generator().manual_seed(7))


def _settings(steps: int, accumulate: int, **over) -> LoopSettings:
    kw = dict(steps=steps, batch_size=BATCH, lr=1e-2, lr_lambda=lambda s: 1.0 / (1 + s), weight_decay=0.01,
              adam_betas=(0.9, 0.999), loss_type="l2", grad_clip=None, log_every=1, ckpt_every=1000, keep_last=1,
              seed=3, progress=False, accumulate=accumulate)
    kw.update(over)
    return LoopSettings(**kw)


def _model() -> TinyDenoiser:
    torch.manual_seed(0)
    return TinyDenoiser()


def _train(tmp, steps, accumulate, ema=None, stop_after=None, model=None, resume_key=None, **over):
    data = _data()
    model = model or _model()
    records: list[dict] = []
    schedule = Schedule.make("linear", 1000, 0.0015, 0.0195)
    summary = train_loop(model, ema, schedule, lambda idx, g: (data[idx], None), ITEMS,
                         _settings(steps, accumulate, **over), tmp, lambda **r: records.append(r), torch.device("cpu"),
                         stop_after=stop_after, resume_key=resume_key)
    return model, [r for r in records if r.get("event") == "train"], summary


def test_the_loop_compiles_with_the_configured_mode(tmp_path):
    """trainer.compile_mode reaches torch.compile (e.g. "reduce-overhead" for CUDA graphs on a GPU). An unknown mode
    is refused by torch.compile itself as the loop wraps the model, before any step (the config check stops it
    earlier in a real run); with the mode dropped, this loop would compile and train instead."""
    with pytest.raises(RuntimeError, match="Unrecognized mode=no-such-mode"):
        _train(tmp_path / "bad", 1, 1, compile=True, compile_mode="no-such-mode")
    # the compiled loop (inductor's default mode, a new CUDA-graph iteration marked per micro-batch) trains the
    # same: fp32 arithmetic reordered only (tests/test_numerics.py's bound)
    _, compiled, _ = _train(tmp_path / "compiled", 3, 2, compile=True, compile_mode="default")
    _, eager, _ = _train(tmp_path / "eager", 3, 2)
    assert [r["step"] for r in compiled] == [r["step"] for r in eager] == [1, 2, 3]
    assert [r["loss"] for r in compiled] == pytest.approx([r["loss"] for r in eager], rel=1e-5)


def _replayed_mean_loss(model: nn.Module, micro: int, rank: int = 0, world: int = 1) -> torch.Tensor:
    """The first step's loss replayed by hand with the loop's draws in its documented order: per micro-batch the
    data order's indices (this rank's slice), then t, then eps, from the rank's generator (seed * world + rank)."""
    data, schedule = _data(), Schedule.make("linear", 1000, 0.0015, 0.0195)
    order, gen = DataOrder(ITEMS, BATCH, rank, world, seed=3), torch.Generator().manual_seed(3 * world + rank)
    losses = []
    for _ in range(micro):
        idx = order.next()
        t = sample_timesteps(BATCH, 1000, generator=gen)
        eps = torch.randn(BATCH, *SHAPE, generator=gen)
        losses.append(diffusion_loss(model, data[idx], schedule, t, eps, "l2").mean())
    return torch.stack(losses).mean()


def test_accumulated_gradient_is_the_mean_loss_gradient_of_all_micro_batches(tmp_path):
    start = _model()
    trained, records, summary = _train(tmp_path / "a", steps=1, accumulate=3, model=copy.deepcopy(start))
    assert summary["step"] == 1 and len(records) == 1
    mean_loss = _replayed_mean_loss(start, micro=3)
    mean_loss.backward()
    for (name, p_ref), p in zip(start.named_parameters(), trained.parameters()):
        torch.testing.assert_close(p.grad, p_ref.grad, rtol=1e-5, atol=1e-7, msg=name)
    assert records[0]["loss"] == pytest.approx(float(mean_loss.detach()), rel=1e-6)  # logged: mean over micro-batches


def test_one_micro_batch_is_the_plain_loop_bit_for_bit(tmp_path):
    a, rec_a, _ = _train(tmp_path / "a", steps=3, accumulate=1)
    b, rec_b, _ = _train(tmp_path / "b", steps=3, accumulate=1, ema_every_micro_batch=False)
    for p, q in zip(a.parameters(), b.parameters()):
        assert torch.equal(p, q)
    assert [r["loss"] for r in rec_a] == [r["loss"] for r in rec_b]


@pytest.mark.parametrize("per_micro, expected", [(True, 8), (False, 2)])
def test_ema_updates_per_micro_batch_as_the_release_or_per_step(tmp_path, per_micro, expected):
    model = _model()
    ema = EMA(model)
    _train(tmp_path / "e", steps=2, accumulate=4, ema=ema, model=model, ema_every_micro_batch=per_micro)
    assert int(ema.num_updates) == expected


def test_steps_and_lr_schedule_count_optimizer_steps(tmp_path):
    _, records, summary = _train(tmp_path / "s", steps=3, accumulate=2)
    assert summary["step"] == 3 and [r["step"] for r in records] == [1, 2, 3]
    assert [r["lr"] for r in records] == pytest.approx([1e-2 / 2, 1e-2 / 3, 1e-2 / 4])  # lambda(s) after s+1 steps
    # 3 steps x 2 micro-batches x 4 = 24 items: exactly one epoch of the data order
    assert records[-1]["epoch"] == 0


def test_resume_with_accumulation_is_exact(tmp_path):
    straight, rec, _ = _train(tmp_path / "straight", steps=4, accumulate=2)
    state = tmp_path / "resumed"
    first, _, s1 = _train(state, steps=4, accumulate=2, stop_after=2, ckpt_every=2)
    assert s1["step"] == 2
    resumed, rec2, s2 = _train(state, steps=4, accumulate=2)
    assert s2["resumed_from"] == 2 and s2["step"] == 4
    for p, q in zip(straight.parameters(), resumed.parameters()):
        assert torch.equal(p, q)
    assert [r["loss"] for r in rec2] == [r["loss"] for r in rec[2:]]


def test_accumulation_below_one_is_refused(tmp_path):
    with pytest.raises(ValueError, match="accumulate"):
        _train(tmp_path / "bad", steps=1, accumulate=0)


def _ddp_worker(rank: int, world: int, init_file: str, out_dir: str) -> None:
    import torch.distributed as dist

    from replication.training.distributed import DistInfo

    torch.set_num_threads(1)
    dist.init_process_group("gloo", init_method=f"file://{init_file}", rank=rank, world_size=world)
    try:
        data, model = _data(), _model()
        schedule = Schedule.make("linear", 1000, 0.0015, 0.0195)
        train_loop(model, None, schedule, lambda idx, g: (data[idx], None), ITEMS, _settings(1, 2), Path(out_dir) / "state",
                   lambda **r: None, torch.device("cpu"), DistInfo(rank=rank, world_size=world))
        torch.save({n: p.grad for n, p in model.named_parameters()}, Path(out_dir) / f"grad{rank}.pt")
    finally:
        dist.destroy_process_group()


def test_ddp_syncs_the_accumulated_gradient_once_per_step(tmp_path):
    """Two gloo processes, 2 micro-batches each: DDP skips the all-reduce on the first micro-batch (no_sync) and
    averages on the last, so every rank holds the mean over ranks of its accumulated gradient."""
    import torch.multiprocessing as mp

    mp.spawn(_ddp_worker, args=(2, str(tmp_path / "init"), str(tmp_path)), nprocs=2, join=True)
    grads = [torch.load(tmp_path / f"grad{r}.pt") for r in range(2)]
    expected = []
    for rank in range(2):
        model = _model()
        _replayed_mean_loss(model, micro=2, rank=rank, world=2).backward()
        expected.append({n: p.grad for n, p in model.named_parameters()})
    for name in expected[0]:
        mean = (expected[0][name] + expected[1][name]) / 2
        torch.testing.assert_close(grads[0][name], mean, rtol=1e-5, atol=1e-7, msg=name)
        torch.testing.assert_close(grads[1][name], mean, rtol=1e-5, atol=1e-7, msg=name)
        assert not torch.allclose(expected[0][name], expected[1][name])  # the ranks really saw different data


def test_pinned_copy_is_a_plain_copy_off_cuda_and_keeps_values(tmp_path):
    from replication.utils.transfer import to_device

    x = torch.randn(3, 2)
    y = to_device(x, torch.device("cpu"), pin_memory=True)  # no CUDA: nothing to pin, nothing fails
    assert torch.equal(x, y) and y.device.type == "cpu"
    a, rec_a, _ = _train(tmp_path / "a", steps=2, accumulate=1, pin_memory=True)
    b, rec_b, _ = _train(tmp_path / "b", steps=2, accumulate=1, pin_memory=False)
    assert [r["loss"] for r in rec_a] == [r["loss"] for r in rec_b]


@pytest.mark.skipif(not torch.cuda.is_available(), reason="page-locked memory needs CUDA")
def test_pinned_copy_on_cuda_is_exact():
    from replication.utils.transfer import to_device

    x = torch.randn(64, 8)
    y = to_device(x, torch.device("cuda"), pin_memory=True)
    assert y.device.type == "cuda" and torch.equal(y.cpu(), x)


def _ddp_train_worker(rank: int, world: int, init_file: str, state_dir: str, steps: int) -> None:
    import torch.distributed as dist

    from replication.training.distributed import DistInfo

    torch.set_num_threads(1)
    dist.init_process_group("gloo", init_method=f"file://{init_file}", rank=rank, world_size=world)
    try:
        data = _data()
        train_loop(_model(), None, Schedule.make("linear", 1000, 0.0015, 0.0195), lambda idx, g: (data[idx], None),
                   ITEMS, _settings(steps, 1, ckpt_every=2), Path(state_dir), lambda **r: None, torch.device("cpu"),
                   DistInfo(rank=rank, world_size=world))
    finally:
        dist.destroy_process_group()


def test_resume_with_another_process_count_is_refused_unless_allowed(tmp_path):
    """A 2-process checkpoint resumed by 1 process: refused by default (it would silently change the run), and
    with allow_world_size_change it continues deterministically from the same step and data position."""
    import torch.multiprocessing as mp

    state = tmp_path / "state"
    mp.spawn(_ddp_train_worker, args=(2, str(tmp_path / "init"), str(state), 2), nprocs=2, join=True)
    with pytest.raises(ValueError, match=r"written by 2 process\(es\).*allow_world_size_change"):
        _train(state, steps=4, accumulate=1)
    runs = []
    for k in range(2):
        work = tmp_path / f"copy{k}"
        shutil.copytree(state, work)
        model, records, summary = _train(work, steps=4, accumulate=1, allow_world_size_change=True)
        assert summary["resumed_from"] == 2 and summary["step"] == 4 and [r["step"] for r in records] == [3, 4]
        runs.append((model, [r["loss"] for r in records]))
    assert runs[0][1] == runs[1][1]  # deterministic continuation
    assert all(torch.equal(p, q) for p, q in zip(runs[0][0].parameters(), runs[1][0].parameters()))


def test_a_checkpoint_of_another_configuration_is_set_aside_not_resumed(tmp_path):
    """Resuming a finished run after changing, say, the learning rate would hand back the old model unchanged:
    a checkpoint written under another resume key is moved to <state>.stale and training starts from step 0."""
    state = tmp_path / "state"
    _, _, first = _train(state, steps=2, accumulate=1, ckpt_every=2, resume_key="config-a")
    assert first["step"] == 2
    model_b, records, summary = _train(state, steps=2, accumulate=1, ckpt_every=2, lr=5e-3, resume_key="config-b")
    assert summary["resumed_from"] is None and [r["step"] for r in records] == [1, 2]  # trained afresh
    assert (tmp_path / "state.stale").is_dir() and any((tmp_path / "state.stale").iterdir())
    fresh_b, _, _ = _train(tmp_path / "fresh", steps=2, accumulate=1, ckpt_every=2, lr=5e-3, resume_key="config-b")
    assert all(torch.equal(p, q) for p, q in zip(model_b.parameters(), fresh_b.parameters()))
    _, _, again = _train(state, steps=3, accumulate=1, ckpt_every=2, lr=5e-3, resume_key="config-b")
    assert again["resumed_from"] == 2 and again["step"] == 3  # the same configuration resumes as before


def _ddp_signal_worker(rank: int, world: int, init_file: str, state_dir: str, out_dir: str) -> None:
    import json
    import os
    import signal

    import torch.distributed as dist

    from replication.training.distributed import DistInfo
    from replication.training.signals import Preempted

    torch.set_num_threads(1)
    dist.init_process_group("gloo", init_method=f"file://{init_file}", rank=rank, world_size=world)
    calls = {"n": 0}
    data = _data()

    def batch_fn(idx, g):
        calls["n"] += 1
        if rank == 1 and calls["n"] == 3:
            os.kill(os.getpid(), signal.SIGTERM)  # the scheduler preempts one task of the job
        return data[idx], None

    result = {"rank": rank, "preempted_at": None}
    try:
        train_loop(_model(), None, Schedule.make("linear", 1000, 0.0015, 0.0195), batch_fn, ITEMS,
                   _settings(10, 1, ckpt_every=100), Path(state_dir), lambda **r: None, torch.device("cpu"),
                   DistInfo(rank=rank, world_size=world))
    except Preempted as exc:
        result["preempted_at"] = exc.step
    finally:
        Path(out_dir, f"rank{rank}.json").write_text(json.dumps(result))
        dist.destroy_process_group()


def test_a_signal_to_one_rank_stops_every_rank_at_the_same_step_with_a_checkpoint(tmp_path):
    """SIGTERM reaches one process of two: both stop at the same step (the stop flag travels with the step's
    losses, read one step late), and the checkpoint written there is the last state on disk."""
    import json

    import torch.multiprocessing as mp

    from replication.training.checkpoint import list_states

    state = tmp_path / "state"
    mp.spawn(_ddp_signal_worker, args=(2, str(tmp_path / "init"), str(state), str(tmp_path)), nprocs=2, join=True)
    steps = [json.loads((tmp_path / f"rank{r}.json").read_text())["preempted_at"] for r in range(2)]
    assert steps[0] is not None and steps[0] == steps[1], steps
    assert steps[0] == 4  # the signal came during step 3; its flag is read with step 3's losses, during step 4
    assert [s for s, _ in list_states(state)] == [steps[0]]
