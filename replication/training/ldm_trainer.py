"""The latent diffusion training loop (paper Eq. 2: L_LDM = E ||eps - eps_theta(z_t, t)||^p, with z from the
frozen first stage) with the original's AdamW, EMA and LR rules, and exact resume. Each optimizer step is
training/step.py's `TrainStep.step`, the step the benchmark times; this module draws the data, logs, checkpoints
and stops.

All randomness of a step (data order, posterior noise, t, eps, label dropout) comes from one seeded
torch.Generator whose state travels in the full-state checkpoint, so a resumed run is bit-identical on
the CPU to an uninterrupted one.
"""
from __future__ import annotations

import logging
import math
import signal
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Callable, Optional

import torch

from replication.diffusion.objective import sample_timesteps
from replication.diffusion.schedule import Schedule
from replication.perf import FastPath
from replication.training import step as train_step
from replication.training.checkpoint import (RESUME_KEY, check_state_dict_fits, describe_kept, load_resumable_state, rng_state, save_state,
                                              set_rng_state)
from replication.training.distributed import DistInfo
from replication.training.loss_reader import DeferredLossReader, StepLosses
from replication.training.signals import Preempted, StopRequested, TrainingDiverged, announce_preempted
from replication.training.tensorboard_log import TrainingCurves
from replication.utils.progress import ProgressLog
from replication.utils.transfer import to_device

log = logging.getLogger("replication")

# batch_fn(indices, generator) -> (x0 latents already scaled, conditioning tensor or None)
BatchFn = Callable[[torch.Tensor, torch.Generator], tuple[torch.Tensor, Optional[torch.Tensor]]]


@dataclass
class LoopSettings:
    steps: int
    batch_size: int
    lr: float
    lr_lambda: Callable[[int], float]
    weight_decay: float
    adam_betas: tuple[float, float]
    loss_type: str
    grad_clip: Optional[float]
    log_every: int
    ckpt_every: int
    keep_last: int
    seed: int
    bf16: bool = False
    channels_last: bool = False
    compile: bool = False
    compile_mode: Optional[str] = None  # torch.compile mode (None: inductor's default; "reduce-overhead": CUDA graphs)
    fused_adam: bool = False
    snapshot_every: int = 0  # write EMA weights every N steps (Fig. 6 curve)
    progress: bool = True  # the tqdm bar; the progress lines of utils/progress.py go to the log either way
    progress_interval_s: Optional[float] = None  # seconds between progress lines (None: utils.progress default)
    # Gradient accumulation as Lightning's accumulate_grad_batches (the release's trainer): each optimizer step
    # averages the gradients of `accumulate` micro-batches of `batch_size` (loss / accumulate per micro-batch);
    # `steps` counts optimizer steps (Lightning's global_step), and the LR schedule steps with them.
    accumulate: int = 1
    # The release updates LitEma in on_train_batch_end, which Lightning calls after every micro-batch, so with
    # accumulation the EMA also sees the unchanged weights between optimizer steps. False: once per step.
    ema_every_micro_batch: bool = True
    pin_memory: bool = False  # page-locked, non-blocking copies of each batch to a CUDA device
    # Resume a checkpoint written by another number of processes (a preempted 8-GPU job restarted on 4): the data
    # order continues where it was, each rank's random stream is re-seeded from (seed, step, rank, world). The
    # continuation is deterministic but not the one an uninterrupted run would have taken. Off: refuse.
    allow_world_size_change: bool = False

    def fast_path(self) -> FastPath:
        """The speed levers these settings switch on, applied by training/step.py through replication.perf."""
        return FastPath(bf16=self.bf16, channels_last=self.channels_last, compile=self.compile,
                        fused_adam=self.fused_adam, compile_mode=self.compile_mode)


def _reseed(seed: int, step: int, rank: int, world: int) -> int:
    """A loop-generator seed for a rank after a change of process count (distinct per seed, step, rank, world)."""
    import hashlib

    digest = hashlib.sha256(f"{seed}/{step}/{rank}/{world}".encode()).digest()
    return int.from_bytes(digest[:8], "little") & ((1 << 63) - 1)


class DataOrder:
    """Epoch-wise permutations shared by all ranks (their own generator, seeded alike on every rank), each rank
    taking its slice of every global batch; the position is part of the resumable state."""

    def __init__(self, num_items: int, batch_size: int, rank: int = 0, world: int = 1, seed: int = 0):
        if num_items < batch_size * world:
            raise ValueError(f"dataset has {num_items} items, fewer than one global batch ({batch_size} x {world})")
        self.num_items, self.batch_size, self.rank, self.world = num_items, batch_size, rank, world
        self.generator = torch.Generator().manual_seed(seed)
        self.epoch, self.position, self.perm = -1, 0, None  # epoch counts permutations drawn

    def next(self) -> torch.Tensor:
        global_batch = self.batch_size * self.world
        if self.perm is None or self.position + global_batch > self.num_items:
            self.perm = torch.randperm(self.num_items, generator=self.generator)
            self.epoch += 1
            self.position = 0
        chunk = self.perm[self.position:self.position + global_batch]
        self.position += global_batch
        return chunk[self.rank * self.batch_size:(self.rank + 1) * self.batch_size]

    def state_dict(self) -> dict[str, Any]:
        return {"epoch": self.epoch, "position": self.position, "perm": self.perm, "generator": self.generator.get_state()}

    def load_state_dict(self, state: dict[str, Any]) -> None:
        self.epoch, self.position, self.perm = state["epoch"], state["position"], state["perm"]
        self.generator.set_state(state["generator"])


def train_loop(
    model: torch.nn.Module,
    ema: Any,
    schedule: Schedule,
    batch_fn: BatchFn,
    num_items: int,
    settings: LoopSettings,
    state_dir: Path,
    stats: Callable[..., None],
    device: torch.device,
    dist: DistInfo = DistInfo(),
    extra_state: Optional[dict[str, Any]] = None,
    init_extra: Optional[Callable[[], dict[str, Any]]] = None,
    on_snapshot: Optional[Callable[[int], None]] = None,
    stop_after: Optional[int] = None,
    resume_key: Optional[str] = None,
) -> dict[str, Any]:
    """Train until `settings.steps` (or `stop_after` steps in this call, for tests); resume if a state exists.

    `extra_state` is a mutable dict of run constants that travel with the checkpoint (e.g. scale_factor): on
    resume it is refilled from the checkpoint, on a fresh start from `init_extra()` (computed once, as the
    original computes scale_by_std once on its first batch). Returns {"step", "resumed_from", "last_loss",
    "extra_state"}.
    """
    extra_state = {} if extra_state is None else extra_state
    trainer = train_step.TrainStep(
        model, ema, schedule, settings.loss_type, settings.fast_path(), device, lr=settings.lr,
        betas=settings.adam_betas, weight_decay=settings.weight_decay, lr_lambda=settings.lr_lambda,
        grad_clip=settings.grad_clip, accumulate=settings.accumulate,
        ema_every_micro_batch=settings.ema_every_micro_batch)
    optimizer, scheduler = trainer.optimizer, trainer.scheduler
    generator = torch.Generator().manual_seed(settings.seed * dist.world_size + dist.rank)
    order = DataOrder(num_items, settings.batch_size, dist.rank, dist.world_size, seed=settings.seed)
    step, resumed_from = 0, None
    state = load_resumable_state(state_dir, resume_key)
    if state is not None:
        check_state_dict_fits(model, state["model"], f"full-state checkpoint in {state_dir}")
        model.load_state_dict(state["model"])
        if ema is not None and state.get("ema") is not None:
            ema.load_state_dict(state["ema"])
        optimizer.load_state_dict(state["optimizer"])
        scheduler.load_state_dict(state["scheduler"])
        order.load_state_dict(state["data_order"])
        set_rng_state(state["rng"], generator)
        per_rank = state["rng"].get("generator_per_rank")
        written_by = len(per_rank) if per_rank else 1
        step = resumed_from = int(state["step"])
        if written_by != dist.world_size:
            if not settings.allow_world_size_change:
                raise ValueError(
                    f"checkpoint in {state_dir} was written by {written_by} process(es); resume with the same number "
                    f"of processes ({dist.world_size} now), or set trainer.allow_world_size_change=true to continue "
                    "with this many (deterministic, but not the run an uninterrupted job would have made; keep the "
                    "global batch with trainer.batch_size)")
            generator.manual_seed(_reseed(settings.seed, step, dist.rank, dist.world_size))
            log.warning("resuming a %d-process checkpoint with %d process(es): random streams re-seeded at step %d",
                        written_by, dist.world_size, step)
        elif dist.enabled:  # each rank continues its own stream (seed * world + rank)
            generator.set_state(per_rank[dist.rank])
        extra_state.clear()
        extra_state.update(state.get("extra") or {})
        log.info("resumed from step %d (%s)", step, state_dir)

    elif init_extra is not None:
        extra_state.update(init_extra())
    if dist.is_main:  # marks where this training began, for readers of the append-only stats (loss curves)
        stats(event="train_begin", step=step, resumed_from=resumed_from)

    trainer.wrap(distributed=dist.enabled)

    def full_state() -> dict[str, Any]:
        """Collective under torchrun (every rank's loop generator is gathered); only rank 0 writes it."""
        rng = rng_state(generator)
        if dist.enabled:
            per_rank: list[Any] = [None] * dist.world_size
            torch.distributed.all_gather_object(per_rank, generator.get_state())
            rng["generator_per_rank"] = per_rank
        return {"model": model.state_dict(), "ema": ema.state_dict() if ema is not None else None,
                "optimizer": optimizer.state_dict(), "scheduler": scheduler.state_dict(), "step": step,
                "data_order": order.state_dict(), "rng": rng, "extra": extra_state, RESUME_KEY: resume_key}

    last_loss = math.nan
    reader = DeferredLossReader()

    def push(step_number: int, losses: torch.Tensor) -> list[StepLosses]:
        """Queue the read of a step's losses; with several processes, one all-reduce carries every rank's losses
        and its stop flag (any rank signalled), so all ranks read the same flag at the same step."""
        meta = {"lr": scheduler.get_last_lr()[0], "epoch": order.epoch}
        if not dist.enabled:
            return reader.push(step_number, losses, **meta)
        flag = torch.full((1,), float(bool(stop)), device=losses.device)  # a fill kernel: no host-to-device copy
        both = torch.cat([losses.float(), flag])
        torch.distributed.all_reduce(both)  # sum: losses / world size is the mean, a flag > 0 means any rank
        return reader.push(step_number, both, **meta)

    def settle(done: list[StepLosses]) -> bool:
        """Check and log steps whose losses have been read; True when a rank asked to stop (several processes)."""
        nonlocal last_loss
        stop_seen = False
        for read in done:
            values = read.values
            if dist.enabled:
                stop_seen = stop_seen or values[-1] > 0
                values = [v / dist.world_size for v in values[:-1]]
            if not all(math.isfinite(v) for v in values):
                bad = next(v for v in values if not math.isfinite(v))
                curves.close()  # the curves up to the last good step stay readable
                raise TrainingDiverged(
                    f"loss is {bad} at step {read.step}; stopped, nothing of this step written. {describe_kept(state_dir)}. "
                    "Lower the learning rate or check the data; a rerun with the settings of a kept checkpoint resumes it.")
            last_loss = loss_value = sum(values) / len(values)
            if dist.is_main and (read.step % settings.log_every == 0 or read.step == 1):
                stats(event="train", step=read.step, loss=loss_value, **read.meta)
                curves.add(read.step, "train", {"loss": loss_value, **read.meta})
            if progress is not None:
                progress.set(loss=loss_value)
        return stop_seen
    target = settings.steps if stop_after is None else min(settings.steps, step + stop_after)
    # rank 0 reports progress: a line every progress_interval_s (step, loss, rate, ETA) to the log, with or without
    # a terminal, and the tqdm bar when settings.progress
    progress = (ProgressLog("train LDM", total=settings.steps, initial=step, interval_s=settings.progress_interval_s,
                            bar=settings.progress) if dist.is_main else None)
    # the curves of stats.jsonl also as TensorBoard events in the stage folder (state_dir's parent), when installed
    curves = TrainingCurves(state_dir.parent, "train LDM", enabled=dist.is_main)

    def next_micro_batch() -> train_step.MicroBatch:
        """The next micro-batch of this rank, its draws in a fixed order from the loop generator: the data
        order's indices, the batch (posterior noise, label dropout), t, eps."""
        x0, cond = batch_fn(order.next(), generator)
        x0 = to_device(x0, device, settings.pin_memory)
        if cond is not None:
            cond = to_device(cond, device, settings.pin_memory)
        t = to_device(sample_timesteps(x0.shape[0], schedule.num_timesteps, generator=generator), device,
                      settings.pin_memory)
        noise = to_device(torch.randn(x0.shape, generator=generator), device, settings.pin_memory)
        return train_step.MicroBatch(x0, t, noise, cond)

    model.train()
    with StopRequested() as stop:
        while step < target:
            micro_losses = trainer.step(next_micro_batch)
            # The step's losses are read one step late (loss_reader.py): the host never waits for the GPU here.
            # Each read is checked before anything after it is written (checkpoint, snapshot), so a non-finite
            # loss still stops training with the last checkpoint on disk good.
            # With several processes, every rank stops at the same step, whichever rank got the signal: the one
            # where the flag is read (the next step, or this one where a checkpoint or snapshot flushes the read).
            stopping = settle(push(step + 1, micro_losses))
            step += 1
            if progress is not None:
                progress.update(1)
            if settings.snapshot_every and step % settings.snapshot_every == 0 and on_snapshot:
                stopping = settle(reader.flush()) or stopping
                if dist.is_main:
                    on_snapshot(step)
            if step % settings.ckpt_every == 0 or step == settings.steps:
                stopping = settle(reader.flush()) or stopping
                state_now = full_state()
                if dist.is_main:
                    save_state(state_dir, step, state_now, settings.keep_last)
            if not dist.enabled:
                stopping = bool(stop)
            if stopping:
                settle(reader.flush())
                state_now = full_state()
                if progress is not None:
                    progress.close(done=False)
                curves.close()
                if dist.is_main:
                    path = save_state(state_dir, step, state_now, settings.keep_last)
                    stats(event="preempted", step=step, signal=stop.signum, checkpoint=str(path))
                    announce_preempted("LDM training", stop.signum, step, path)
                raise Preempted(stop.signum or signal.SIGTERM, step, str(state_dir))
        settle(reader.flush())
    if progress is not None:
        progress.close()
    curves.close()
    return {"step": step, "resumed_from": resumed_from, "last_loss": last_loss, "extra_state": extra_state}
