"""The benchmark's rows, each timing the code the pipeline runs, for the eager fp32 baseline and for the fast
path on the same weights and inputs: the training step of training/step.py, the sampler with the sample stage's
denoiser (diffusion/denoiser.py), the first stage's encoder and decoder, and the FID feature extractor."""
from __future__ import annotations

import copy
import dataclasses
from dataclasses import dataclass
from typing import Any, Callable, Optional

import torch
from torch import nn

from replication.bench.measurement import free_device_memory, measure, relative_error
from replication.bench.networks import (class_labels, feature_flops, feature_module, first_stage_flops,
                                        image_resolution, sampler_denoiser, unet_flops)
from replication.bench.settings import NOISE_THRESHOLD, SAMPLE_QUOTE_STEPS, BenchSettings
from replication.bench.targets import TARGETS, verdict
from replication.config import TypedConfig
from replication.perf import FastForward, FastPath


def train_inputs(typed: TypedConfig, batch: int, device: torch.device, seed: int):
    """Fixed latents x0, then t, then eps, drawn in that order from one generator seeded with `seed` (the order
    train_loop draws them for a batch), and the batch's class labels: (x0, t, eps, labels) on `device`."""
    from replication.diffusion.objective import sample_timesteps

    c = typed.unet
    g = torch.Generator().manual_seed(seed)
    x0 = torch.randn(batch, c.in_channels, c.image_size, c.image_size, generator=g)
    t = sample_timesteps(batch, typed.diffusion.make_schedule().num_timesteps, generator=g)
    noise = torch.randn(x0.shape, generator=g)
    return x0.to(device), t.to(device), noise.to(device), class_labels(typed, batch, device)


def measure_train(typed: TypedConfig, base: nn.Module, fast: FastPath, s: BenchSettings, gflop: float,
                  peak: float) -> tuple[dict[str, Any], Optional[torch.Tensor]]:
    """`TrainStep.step` of training/step.py, the step train_loop runs (forward, loss, backward, gradient clip,
    AdamW, LR schedule, EMA), on fixed latents, one micro-batch per step and one process, with the losses read
    one step late as the loop reads them. Also returns the first step's loss (the row's numerics)."""
    from replication.models.conditioning import ema_scope
    from replication.models.ema import EMA
    from replication.training import step as train_step
    from replication.training.loss_reader import DeferredLossReader

    trainer, diffusion, device = typed.trainer, typed.diffusion, s.device
    model = copy.deepcopy(base).to(device).train()
    ema = EMA(model, decay=trainer.ema_decay, scope=ema_scope(model)) if trainer.use_ema else None
    stepper = train_step.TrainStep(model, ema, diffusion.make_schedule(), diffusion.loss(), fast, device,
                                   lr=trainer.base_lr, betas=tuple(trainer.adam_betas),
                                   weight_decay=trainer.weight_decay, lr_lambda=diffusion.lr_multiplier(),
                                   grad_clip=trainer.grad_clip)
    stepper.wrap()
    batch = train_step.MicroBatch(*train_inputs(typed, s.batch, device, s.seed))
    reader = DeferredLossReader()
    reads: list[Any] = []  # the steps' losses as the reader hands them back (the first is the row's numerics)

    def step() -> None:
        reads.extend(reader.push(len(reads), stepper.step(lambda: batch)))

    result = measure(step, device, s.warmup, s.iters, s.batch, gflop, peak, fast, s.profile, s.repeats)
    reads.extend(reader.flush())
    del model, ema, stepper
    free_device_memory(device)
    return result, (torch.tensor(reads[0].values[:1]) if reads else None)


def measure_sample(typed: TypedConfig, base: nn.Module, fast: FastPath, s: BenchSettings, gflop_step: float,
                   peak: float) -> tuple[dict[str, Any], Optional[torch.Tensor]]:
    """`--sample-steps` steps of the configured sampler; img/s and TFLOP/s quoted at SAMPLE_QUOTE_STEPS steps."""
    from replication.diffusion.config import run_sampler
    from replication.diffusion.ddim import ddim_timesteps
    from replication.utils.rng import StackedRandomGenerator

    device = s.device
    unet = copy.deepcopy(base).eval().requires_grad_(False)
    call = FastForward(unet, fast.only("bf16", "channels_last", "compile"), device)
    c = typed.unet
    seeds = list(range(s.seed, s.seed + s.sample_batch))
    denoiser = sampler_denoiser(typed, call, class_labels(typed, s.sample_batch, device))
    schedule = typed.diffusion.make_schedule()
    out: list[torch.Tensor] = []

    def run(steps: int) -> int:
        cfg = dataclasses.replace(typed.sampler, steps=steps)
        rng = StackedRandomGenerator(seeds, device=device)
        x_T = rng.randn((s.sample_batch, c.in_channels, c.image_size, c.image_size))
        with torch.no_grad():
            result = run_sampler(cfg, denoiser, x_T, schedule, rng=rng)
        out[:] = [result.x]
        return result.num_steps

    n_quote = len(ddim_timesteps(SAMPLE_QUOTE_STEPS, schedule.num_timesteps, typed.sampler.spacing))
    n_run = len(ddim_timesteps(s.sample_steps, schedule.num_timesteps, typed.sampler.spacing))
    # one call of n_run steps = n_run / n_quote of a quoted sample set; as images/call that is batch * n_run / n_quote
    result = measure(lambda: run(s.sample_steps), device, min(s.warmup, 1), 1, s.sample_batch * n_run / n_quote,
                     gflop_step * n_quote, peak, fast.only("bf16", "channels_last", "compile"), min(s.profile, 1),
                     s.repeats)
    result.update(steps_run=n_run, steps_quoted=n_quote)
    final = out[0].float().cpu() if out else None
    del unet, call, denoiser
    free_device_memory(device)
    return result, final


def measure_first_stage(typed: TypedConfig, base: nn.Module, fast: FastPath, s: BenchSettings, what: str,
                        gflop: float, peak: float) -> tuple[dict[str, Any], Optional[torch.Tensor]]:
    device = s.device
    ae = copy.deepcopy(base).eval().requires_grad_(False)
    levers = ("bf16", "channels_last", "compile") if s.compile_autoencoder else ("bf16", "channels_last")
    fast = fast.only(*levers)
    method = "encode_moments" if what == "encode" else "decode"
    call = FastForward(ae, fast, device, method=method)
    res = typed.autoencoder.ddconfig.resolution
    g = torch.Generator().manual_seed(s.seed)
    if what == "encode":
        x = (torch.rand(s.ae_batch, 3, res, res, generator=g) * 2 - 1).to(device)
    else:
        h = res // ae.downsampling_factor
        x = torch.randn(s.ae_batch, ae.latent_channels, h, h, generator=g).to(device)
    out: list[torch.Tensor] = []

    def step() -> None:
        with torch.no_grad():
            out[:] = [call(x)]

    result = measure(step, device, s.warmup, s.iters, s.ae_batch, gflop, peak, fast, s.profile, s.repeats)
    final = out[0].float().cpu() if out else None
    del ae, call
    free_device_memory(device)
    return result, final


def measure_features(typed: TypedConfig, fast: FastPath, s: BenchSettings, gflop: float,
                     peak: float) -> tuple[dict[str, Any], Optional[torch.Tensor], str]:
    device = s.device
    module, label = feature_module(typed, device)
    fast = fast.only("channels_last")
    call = FastForward(module, fast, device)
    res = image_resolution(typed)
    g = torch.Generator().manual_seed(s.seed)
    images = torch.randint(0, 256, (s.feature_batch, 3, res, res), generator=g, dtype=torch.uint8).to(device)
    out: list[Any] = []

    def step() -> None:
        with torch.no_grad():
            out[:] = [call(images)]

    result = measure(step, device, s.warmup, s.iters, s.feature_batch, gflop, peak, fast, s.profile, s.repeats)
    final = None
    if out:
        first = out[0]
        pool = first["pool"] if isinstance(first, dict) else first[0]
        final = pool.float().cpu()
    del module, call
    free_device_memory(device)
    return result, final, label


# ---------------------------------------------------------------------------------------------- one row

def make_row(name: str, what: str, batch: int, gflop: float, baseline: dict[str, Any], fast: dict[str, Any],
             experiment: str, device: dict[str, Any], rel_err: Optional[float] = None, **extra: Any) -> dict[str, Any]:
    """A result row: both paths' measurements, the speed-up of the medians with the range the repeats allow, the
    noise note, the target and the verdict."""
    speedup = speedup_range = None
    if baseline.get("img_per_s") and fast.get("img_per_s"):
        speedup = fast["img_per_s"] / baseline["img_per_s"]  # of the medians
        # the extremes the repeats allow: slowest fast over fastest baseline, fastest fast over slowest baseline
        lo_b = baseline.get("img_per_s_min", baseline["img_per_s"])
        hi_b = baseline.get("img_per_s_max", baseline["img_per_s"])
        lo_f, hi_f = fast.get("img_per_s_min", fast["img_per_s"]), fast.get("img_per_s_max", fast["img_per_s"])
        speedup_range = [lo_f / hi_b, hi_f / lo_b]
    noise = noise_note(baseline, fast)
    row = {"row": name, "what": what, "batch": batch, "gflop_per_img": gflop, "baseline": baseline, "fast": fast,
           "speedup": speedup, "speedup_range": speedup_range, "noisy": noise is not None, "noise": noise,
           "fast_vs_baseline_rel_err": rel_err, **extra}
    target = TARGETS.get((experiment, name))
    row["target"] = dataclasses.asdict(target) if target else None
    row["verdict"] = verdict(experiment, name, fast, speedup, device["name"], device["type"])
    return row


def noise_note(baseline: dict[str, Any], fast: dict[str, Any]) -> Optional[str]:
    """Why a row's numbers are not to be trusted (a path's repeats disagree), or None."""
    noisy = [f"{label} spread {mode['spread']:.0%}" for label, mode in (("eager fp32", baseline), ("fast", fast))
             if mode.get("noisy")]
    if not noisy:
        return None
    return (f"NOISY: repeats disagree ({', '.join(noisy)} of the median, over {NOISE_THRESHOLD:.0%}); remeasure "
            "on a quiet machine before trusting this row")


@dataclass
class BenchRun:
    """What every row of one benchmark run shares."""

    typed: TypedConfig
    s: BenchSettings
    device_info: dict[str, Any]
    peak: float
    unet: Optional[nn.Module]
    first_stage: Optional[nn.Module]
    counted: dict[str, float]
    # called with (row name, what, batch, GFLOP/img, baseline result) once a row's baseline is measured, so that a
    # run cut while the fast path compiles still keeps that row's baseline
    on_baseline: Callable[..., None] = lambda *args: None

    @property
    def experiment(self) -> str:
        return self.typed.root.name


def _compare(a: Optional[torch.Tensor], b: Optional[torch.Tensor]) -> Optional[float]:
    return relative_error(a, b) if a is not None and b is not None else None


def _row_train(r: BenchRun) -> dict[str, Any]:
    gflop = r.counted["train"] = unet_flops(r.typed, train=True) / 1e9
    what = "forward+backward+AdamW+EMA per latent"
    base, loss_b = measure_train(r.typed, r.unet, FastPath(), r.s, gflop, r.peak)
    r.on_baseline("train", what, r.s.batch, gflop, base)
    fast, loss_f = measure_train(r.typed, r.unet, r.s.fast, r.s, gflop, r.peak)
    return make_row("train", what, r.s.batch, gflop, base, fast, r.experiment, r.device_info,
                    _compare(loss_f, loss_b))


def _row_sample(r: BenchRun) -> dict[str, Any]:
    gflop_step = r.counted["unet_forward"]
    base, x_b = measure_sample(r.typed, r.unet, FastPath(), r.s, gflop_step, r.peak)
    quoted = base.get("steps_quoted", SAMPLE_QUOTE_STEPS)
    what = f"{r.typed.sampler.kind} at {quoted} steps per image"
    r.on_baseline("sample", what, r.s.sample_batch, gflop_step * quoted, base)
    fast, x_f = measure_sample(r.typed, r.unet, r.s.fast, r.s, gflop_step, r.peak)
    return make_row("sample", what, r.s.sample_batch, gflop_step * quoted, base, fast, r.experiment, r.device_info,
                    _compare(x_f, x_b), steps_run=base.get("steps_run"))


def _row_first_stage(r: BenchRun, what: str) -> Optional[dict[str, Any]]:
    if r.first_stage is None or not any(True for _ in r.first_stage.parameters()):
        return None  # pixel-space LDM: no first stage to time
    gflop = r.counted[what] = first_stage_flops(r.typed, what) / 1e9
    base, y_b = measure_first_stage(r.typed, r.first_stage, FastPath(), r.s, what, gflop, r.peak)
    described = f"first stage {what} at {r.typed.autoencoder.ddconfig.resolution}px"
    r.on_baseline(what, described, r.s.ae_batch, gflop, base)
    fast, y_f = measure_first_stage(r.typed, r.first_stage, r.s.fast, r.s, what, gflop, r.peak)
    return make_row(what, described, r.s.ae_batch, gflop, base, fast, r.experiment, r.device_info,
                    _compare(y_f, y_b))


def _row_features(r: BenchRun) -> dict[str, Any]:
    gflop = r.counted["features"] = feature_flops(r.typed) / 1e9
    base, f_b, label = measure_features(r.typed, FastPath(), r.s, gflop, r.peak)
    what = f"FID features: {label}"
    r.on_baseline("features", what, r.s.feature_batch, gflop, base)
    fast, f_f, _ = measure_features(r.typed, r.s.fast, r.s, gflop, r.peak)
    return make_row("features", what, r.s.feature_batch, gflop, base, fast, r.experiment, r.device_info,
                    _compare(f_f, f_b))


ROW_MEASURES: dict[str, Callable[[BenchRun], Optional[dict[str, Any]]]] = {
    "train": _row_train, "sample": _row_sample, "decode": lambda r: _row_first_stage(r, "decode"),
    "encode": lambda r: _row_first_stage(r, "encode"), "features": _row_features}
