"""First-stage training (paper App. G): reconstruction (L1 + LPIPS) + regulariser (KL or codebook) +
patch-GAN, generator and discriminator optimised alternately with Adam(0.5, 0.9) as the original."""
from __future__ import annotations

import logging
import math
from pathlib import Path
from typing import Any, Callable, Optional

import torch

from replication.models.losses import LOG_DISC
from replication.training.checkpoint import (RESUME_KEY, check_state_dict_fits, describe_kept, load_resumable_state, rng_state, save_state,
                                              set_rng_state)
from replication.training.ldm_trainer import DataOrder
from replication.training.loss_reader import DeferredLossReader, StepLosses
from replication.training.signals import Preempted, StopRequested, TrainingDiverged, announce_preempted
from replication.training.tensorboard_log import TrainingCurves
from replication.utils.progress import ProgressLog
from replication.utils.transfer import to_device

log = logging.getLogger("replication")
_LOSS_G = "__generator_loss"  # the generator's total loss among a step's read-back values (logged as `loss`)


def train_autoencoder_loop(
    model: torch.nn.Module,
    loss_fn: torch.nn.Module,
    images_fn: Callable[[torch.Tensor, torch.Generator], torch.Tensor],
    num_items: int,
    steps: int,
    batch_size: int,
    lr: float,
    betas: tuple[float, float],
    seed: int,
    state_dir: Path,
    stats: Callable[..., None],
    device: torch.device,
    log_every: int = 50,
    ckpt_every: int = 500,
    keep_last: int = 2,
    progress: bool = True,
    train_logvar: bool = False,
    accumulate: int = 1,
    disc_fresh_forward: bool = True,
    resume_key: Optional[str] = None,
    pin_memory: bool = False,
    progress_interval_s: Optional[float] = None,
) -> dict[str, Any]:
    """`steps` counts optimizer steps (Lightning's global_step, which the discriminator start compares with); with
    `accumulate` > 1 each step averages the gradients of that many micro-batches of `batch_size` (loss / N), as
    Lightning's accumulate_grad_batches in the original autoencoder trainer (its configs use 2).

    Order within a micro-batch, as Lightning's loop over the two optimisers: generator pass, loss and backward;
    the generator's optimizer step if this micro-batch ends the step; then (`disc_fresh_forward`, while the
    discriminator's weight is non-zero) a new no-grad pass of the autoencoder for the discriminator's loss. Before
    the discriminator starts its loss is exactly zero: its passes are skipped and its Adam steps on zero gradients,
    as the original's does (weights unchanged, step count advancing); its logits are logged from disc_start on,
    and its BatchNorm running statistics, which nothing reads (it only ever runs in training mode), start then.

    Progress: a log line every `progress_interval_s` seconds (None: utils.progress's default) with the step,
    loss, rate and ETA, with or without a terminal; `progress` adds the tqdm bar."""
    if accumulate < 1:
        raise ValueError(f"accumulate (accumulate_grad_batches) must be >= 1, got {accumulate}")
    generator = torch.Generator().manual_seed(seed)
    # the original's generator optimiser holds the autoencoder only (loss.logvar stays at its init, 0)
    params_g = list(model.parameters()) + ([loss_fn.logvar] if train_logvar and hasattr(loss_fn, "logvar") else [])
    params_d = list(loss_fn.discriminator_parameters())
    opt_g = torch.optim.Adam(params_g, lr=lr, betas=betas)
    opt_d = torch.optim.Adam(params_d, lr=lr, betas=betas) if params_d else None
    order = DataOrder(num_items, batch_size, seed=seed)
    step = 0
    state = load_resumable_state(state_dir, resume_key)
    if state is not None:
        check_state_dict_fits(model, state["model"], f"autoencoder full-state checkpoint in {state_dir}")
        model.load_state_dict(state["model"])
        loss_fn.load_state_dict(state["loss"], strict=False)  # the frozen LPIPS network is not stored
        opt_g.load_state_dict(state["opt_g"])
        if opt_d is not None and state.get("opt_d") is not None:
            opt_d.load_state_dict(state["opt_d"])
        order.load_state_dict(state["data_order"])
        set_rng_state(state["rng"], generator)
        step = int(state["step"])
        log.info("autoencoder: resumed from step %d", step)

    def full_state() -> dict[str, Any]:
        trainable_loss = {k: v for k, v in loss_fn.state_dict().items() if not k.startswith("perceptual_loss.")}
        return {"model": model.state_dict(), "loss": trainable_loss, "opt_g": opt_g.state_dict(),
                "opt_d": opt_d.state_dict() if opt_d is not None else None, "step": step,
                "data_order": order.state_dict(), "rng": rng_state(generator), RESUME_KEY: resume_key}

    model.train()
    loss_fn.train()
    # the curves of stats.jsonl also as TensorBoard events in the stage folder (state_dir's parent), when installed
    curves = TrainingCurves(state_dir.parent, "train autoencoder")
    report = ProgressLog("train autoencoder", total=steps, initial=step, interval_s=progress_interval_s, bar=progress)
    last = math.nan
    # Losses and logs are read one step late (loss_reader.py), so the host never waits for the GPU; every read is
    # checked before anything after it is written, so a non-finite loss still leaves the last checkpoint good.
    reader = DeferredLossReader()

    def settle(done: list[StepLosses]) -> None:
        nonlocal last
        for read in done:
            keys, micro = read.meta["keys"], read.meta["micro"]
            rows = [read.values[i * len(keys):(i + 1) * len(keys)] for i in range(micro)]
            values = {k: sum(r[j] for r in rows) / micro for j, k in enumerate(keys)}  # mean over micro-batches
            loss = values.pop(_LOSS_G)
            if not math.isfinite(loss):
                curves.close()  # the curves up to the last good step stay readable
                raise TrainingDiverged(f"autoencoder loss is {loss} at step {read.step}; stopped, nothing of this step "
                                       f"written. {describe_kept(state_dir)}")
            last = loss
            if read.step % log_every == 0 or read.step == 1:
                logs = {**values, **read.meta["host_logs"]}
                stats(event="train_autoencoder", step=read.step, loss=loss,
                      **{k: v for k, v in logs.items() if k != "loss"})
                curves.add(read.step, "train_autoencoder", {**logs, "loss": loss})
            report.set(loss=loss)
    with StopRequested() as stop:
        while step < steps:
            opt_g.zero_grad(set_to_none=True)
            if opt_d is not None:
                opt_d.zero_grad(set_to_none=True)
            step_d, micro_logs, micro_host_logs = False, [], []
            disc_on = loss_fn.disc_factor_at(step) > 0
            for micro in range(accumulate):
                # with pin_memory on CUDA, page-locked non-blocking copies (a pageable copy waits for the GPU)
                x = to_device(images_fn(order.next(), generator), device, pin_memory)
                latent_shape = (x.shape[0], model.latent_channels, x.shape[2] // model.downsampling_factor,
                                x.shape[3] // model.downsampling_factor)
                noise = to_device(torch.randn(latent_shape, generator=generator), device, pin_memory)
                x_rec, aux = model(x, sample_posterior=True, noise=noise)
                loss_g, logs_g = loss_fn.generator_loss(x, x_rec, aux, step, model.last_layer())
                # gradients of each loss reach its own optimiser's parameters only (Lightning's toggle_optimizer)
                torch.autograd.backward(loss_g / accumulate if accumulate > 1 else loss_g, inputs=params_g)
                logs = {_LOSS_G: loss_g.detach(), **logs_g}
                if micro == accumulate - 1:
                    opt_g.step()
                if opt_d is not None and not disc_on:
                    # before disc_start the discriminator's loss is 0 * hinge, so its gradients are exact zeros:
                    # its two passes are skipped (on a CPU they cost about a third of a small model's step)
                    logs[LOG_DISC] = torch.zeros((), device=loss_g.device)
                elif opt_d is not None:
                    x_fake = x_rec.detach()
                    if disc_fresh_forward:
                        with torch.no_grad():
                            x_fake, _ = model(x, sample_posterior=True,
                                              noise=to_device(torch.randn(latent_shape, generator=generator),
                                                              device, pin_memory))
                    loss_d, logs_d = loss_fn.discriminator_loss(x, x_fake, step)
                    if loss_d.requires_grad:
                        torch.autograd.backward(loss_d / accumulate if accumulate > 1 else loss_d, inputs=params_d)
                        step_d = True
                    logs.update(logs_d)
                # device values travel in one tensor, read later; values already on the host are read now
                on_device = {k: v for k, v in logs.items() if torch.is_tensor(v) and v.device == loss_g.device}
                micro_logs.append(on_device)
                micro_host_logs.append({k: float(v) for k, v in logs.items() if k not in on_device})
            if opt_d is not None and not disc_on:
                # zero gradients step the discriminator's Adam as the original's 0 * loss does: its weights stay,
                # its step count (the bias correction once the GAN starts) advances
                for p in params_d:
                    p.grad = torch.zeros_like(p)
                step_d = True
            if step_d:
                opt_d.step()
            keys = list(micro_logs[0])
            host_logs = {k: sum(m[k] for m in micro_host_logs) / len(micro_host_logs) for k in micro_host_logs[0]}
            device_values = torch.stack([torch.stack([m[k].float().reshape(()) for k in keys]) for m in micro_logs])
            settle(reader.push(step + 1, device_values.reshape(-1), keys=keys, micro=len(micro_logs),
                               host_logs=host_logs))
            step += 1
            report.update(1)
            if step % ckpt_every == 0 or step == steps:
                settle(reader.flush())
                save_state(state_dir, step, full_state(), keep_last)
            if stop:
                settle(reader.flush())
                path = save_state(state_dir, step, full_state(), keep_last)
                report.close(done=False)
                curves.close()
                stats(event="preempted", step=step, signal=stop.signum, checkpoint=str(path))
                announce_preempted("autoencoder training", stop.signum, step, path)
                raise Preempted(stop.signum, step, str(path))
        settle(reader.flush())
    report.close()
    curves.close()
    return {"step": step, "last_loss": last}
