"""The one LDM training step (paper Eq. 2 on latents): train_loop runs it for every optimizer step, and the
benchmark's train row times it, so the speed the benchmark reports is the speed of the code that trains.

`TrainStep` owns the optimizer (AdamW of the release, fused with the fused_adam lever) and the LR scheduler and
applies the speed levers through replication.perf: the module in the lever's memory format, 4-D inputs likewise,
bf16 autocast around the forward, torch.compile around the (DistributedDataParallel-wrapped) module.
`TrainStep.step(next_micro_batch)` is one optimizer step over `accumulate` micro-batches with the release's
Lightning semantics (loss / accumulate per micro-batch, the EMA after every micro-batch, gradients all-reduced
on the last micro-batch only).
"""
from __future__ import annotations

from contextlib import nullcontext
from dataclasses import dataclass
from typing import Any, Callable, Optional

import torch
from torch import nn

from replication.diffusion.objective import Denoiser, diffusion_loss
from replication.diffusion.schedule import Schedule
from replication.perf import FastPath, autocast, compile_call, make_adamw, prepare_module, to_memory_format


@dataclass
class MicroBatch:
    """One micro-batch on the training device: scaled latents, the timesteps and noise drawn for them, and the
    conditioning (class labels or token ids as an integer tensor, a cross-attention context as a float tensor, or
    None)."""

    x0: torch.Tensor
    t: torch.Tensor
    noise: torch.Tensor
    cond: Optional[torch.Tensor] = None


class TrainStep:
    """Optimizer, scheduler and speed levers of LDM training around `model` (moved to `device` in place).

    Wrapping for the forward (DistributedDataParallel, then torch.compile) happens in `wrap()`, after a resumed
    state has been loaded into the model and the optimizer: DDP broadcasts rank 0's weights as it wraps."""

    def __init__(self, model: nn.Module, ema: Any, schedule: Schedule, loss_type: Any, fast: FastPath,
                 device: torch.device, lr: float, betas: tuple[float, float], weight_decay: float,
                 lr_lambda: Optional[Callable[[int], float]] = None, grad_clip: Optional[float] = None,
                 accumulate: int = 1, ema_every_micro_batch: bool = True):
        if accumulate < 1:
            raise ValueError(f"accumulate (accumulate_grad_batches) must be >= 1, got {accumulate}")
        self.model, self.ema, self.schedule, self.loss_type = model, ema, schedule, loss_type
        self.fast, self.device = fast, torch.device(device)
        self.grad_clip, self.accumulate, self.ema_every_micro_batch = grad_clip, accumulate, ema_every_micro_batch
        prepare_module(model, fast.only("channels_last"), self.device)  # compile: in wrap(), around DDP
        self.optimizer = make_adamw(model.parameters(), fast, self.device, lr=lr, betas=betas,
                                    weight_decay=weight_decay)
        self.scheduler = (torch.optim.lr_scheduler.LambdaLR(self.optimizer, lr_lambda)
                          if lr_lambda is not None else None)
        # a float condition is a cross-attention context, or the image a concat-conditioned model joins to z_t
        self.float_condition = getattr(model, "float_condition", "context")
        # an integer condition is class labels (`y`), or token ids for a text-conditional model (`tokens`)
        self.integer_condition = getattr(model, "integer_condition", "y")
        self.ddp: Optional[nn.parallel.DistributedDataParallel] = None
        self.forward: Optional[Callable[..., torch.Tensor]] = None

    def wrap(self, distributed: bool = False) -> None:
        """Build the forward the steps call: the model, in DDP when `distributed`, compiled with the compile lever."""
        module: nn.Module = self.model
        if distributed:
            ids = [self.device.index] if self.device.type == "cuda" else None
            module = self.ddp = nn.parallel.DistributedDataParallel(self.model, device_ids=ids)
        self.forward = compile_call(module, self.fast)

    def denoiser(self, cond: Optional[torch.Tensor]) -> Denoiser:
        """eps(x_t, t) of the wrapped model under `cond`: labels go to `y` (token ids to `tokens` for a
        text-conditional model), a float tensor to `context` (or to `c_concat` for a concat-conditioned model)."""
        forward = self.forward
        if forward is None:
            raise RuntimeError("TrainStep.wrap() must run before the first step")

        def denoise(x_t: torch.Tensor, t: torch.Tensor) -> torch.Tensor:
            x_in = to_memory_format(x_t, self.fast)
            if cond is None:
                return forward(x_in, t)
            if cond.dtype in (torch.int64, torch.int32):
                return forward(x_in, t, **{self.integer_condition: cond})
            return forward(x_in, t, **{self.float_condition: cond})
        return denoise

    def step(self, next_micro_batch: Callable[[], MicroBatch]) -> torch.Tensor:
        """One optimizer step over `accumulate` micro-batches, each fetched by `next_micro_batch()` when its turn
        comes (so only one is on the device at a time, and the random draws keep their order). Returns the
        micro-batches' mean losses, stacked and detached ([accumulate], float32), for the deferred read."""
        self.optimizer.zero_grad(set_to_none=True)
        micro_losses = []
        for micro in range(self.accumulate):
            batch = next_micro_batch()
            last_micro = micro == self.accumulate - 1
            if self.fast.compile:  # a new iteration for CUDA graph trees (compile modes with CUDA graphs)
                torch.compiler.cudagraph_mark_step_begin()
            # DDP all-reduces gradients on the last micro-batch of a step only
            with (self.ddp.no_sync() if self.ddp is not None and not last_micro else nullcontext()):
                with autocast(self.fast, self.device):
                    loss = diffusion_loss(self.denoiser(batch.cond), batch.x0, self.schedule, batch.t, batch.noise,
                                          self.loss_type).mean()
                (loss / self.accumulate if self.accumulate > 1 else loss).backward()
            micro_losses.append(loss.detach().float())
            if self.ema is not None and self.ema_every_micro_batch and not last_micro:
                self.ema.update(self.model)  # on_train_batch_end of a micro-batch without an optimizer step
        if self.grad_clip:
            torch.nn.utils.clip_grad_norm_(self.model.parameters(), self.grad_clip)
        self.optimizer.step()
        if self.scheduler is not None:
            self.scheduler.step()
        if self.ema is not None:
            self.ema.update(self.model)
        return torch.stack(micro_losses)
