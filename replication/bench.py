# Benchmark: how fast this code trains and samples the paper's LDMs, measured side by side against an
# eager fp32 baseline of the same networks in the same run (speed-ups are ratios, never cross-run comparisons).
"""Throughput benchmark for one experiment's shapes.

    python -m replication.bench experiment=lsun_churches_ldm8 --device cuda --batch 96 --sample-batch 256
    python -m replication.bench experiment=smoke --device cpu --threads 1      # tiny shapes, about a minute
    python -m replication.bench --merge a.json b.json --tag nvidia-h200         # one table for several runs

Rows (each measured for the eager fp32 baseline and for the fast path, same weights, same inputs):
- train:    one training step as `training/ldm_trainer.train_loop` runs it on cached latents: forward, eps loss,
            backward, AdamW, EMA update, the loss read back one step late (no encoder: the latent cache feeds training).
- sample:   DDIM steps of the experiment's sampler at `--sample-batch`, timed over `--sample-steps` steps and
            reported per image at 200 steps (each step is one U-Net call plus the same elementwise update, so
            the time is linear in the step count).
- decode / encode: the first stage at the dataset resolution (levers: bf16 + channels_last; compile with
            --compile-autoencoder).
- features: the FID feature extractor on uint8 images (lever: channels_last only; features stay fp32 because
            bf16 features would move FID).
For each: GFLOP per image (torch.utils.flop_counter on fake tensors), img/s, achieved TFLOP/s, MFU against the
bf16 matrix-multiply peak measured in this run, peak memory, and the fast/baseline ratio. Each path is timed
`--repeats` times (each `--steps` calls): the rate is the median, with the range of the repeats beside it, and a
row whose repeats disagree by more than NOISE_THRESHOLD of the median is flagged as noisy (on a shared CPU, say):
its speed-up is not to be trusted, remeasure it. With --profile N, N more
calls of each path run under torch.profiler: GPU kernel time (CPU: operator time) per category (convolution,
matmul, attention, normalization, ...) and, on CUDA, how busy the GPU is. Output:
<out>/<tag>.json and <out>/<tag>.md, rewritten after every row so a run cut short keeps what it measured.
"""
from __future__ import annotations

import argparse
import copy
import dataclasses
import datetime as _dt
import os
import platform
import re
import statistics
import subprocess
import sys
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Callable, Optional, Sequence
from unittest import mock

import torch
from torch import nn

from replication.perf import (OTHER_CATEGORY, PROFILE_CATEGORIES, FastForward, FastPath, PeakMemory, autocast,
                              count_flops, cuda_flags, free_device_memory, make_adamw, matmul_peak_tflops,
                              nonzero_init_, prepare_module, profile_breakdown, relative_error, time_fn,
                              to_memory_format)
from replication.utils.io import atomic_write_json, atomic_write_text, read_json

ROWS = ("train", "sample", "decode", "encode", "features")
SCHEMA_VERSION = 1
# Paper Tab. 1: sampling throughput is quoted for 200 DDIM steps.
SAMPLE_QUOTE_STEPS = 200
# On either card, training must run at least this many times the eager fp32 baseline of the same run.
MIN_TRAIN_SPEEDUP = 4.0
TARGET_CARD = "H200"
# A path whose repeated timings span more than this fraction of their median ((max - min) / median) is flagged noisy.
NOISE_THRESHOLD = 0.2
DEFAULT_REPEATS = 3


@dataclass(frozen=True)
class Target:
    """Issue 7's target for one row at paper shapes on one H200, next to the original code's speed there."""

    original_img_per_s: float  # CompVis/latent-diffusion on one H200 (shared/ANCHORS.md)
    min_img_per_s: float
    max_mem_gib: Optional[float] = None
    original_mem_gib: Optional[float] = None


TARGETS: dict[tuple[str, str], Target] = {
    ("lsun_churches_ldm8", "train"): Target(original_img_per_s=326.0, min_img_per_s=1300.0),
    ("celebahq_ldm4", "train"): Target(original_img_per_s=136.5, min_img_per_s=400.0, max_mem_gib=40.0,
                                       original_mem_gib=84.7),
    ("lsun_churches_ldm8", "sample"): Target(original_img_per_s=8.6, min_img_per_s=30.0),
    ("celebahq_ldm4", "sample"): Target(original_img_per_s=3.0, min_img_per_s=9.0),
}
# GFLOP per image of the original networks, counted independently (shared/ANCHORS.md); ours must agree.
ORIGINAL_GFLOP: dict[tuple[str, str], float] = {
    ("lsun_churches_ldm8", "unet_forward"): 41.85,
    ("celebahq_ldm4", "unet_forward"): 202.4,
    ("lsun_churches_ldm8", "encode"): 272.7,
    ("lsun_churches_ldm8", "decode"): 622.2,
}


@dataclass
class BenchSettings:
    device: torch.device
    batch: int  # training batch
    sample_batch: int
    ae_batch: int
    feature_batch: int
    iters: int  # timed iterations per measurement
    warmup: int  # untimed iterations first (compilation happens here)
    sample_steps: int  # DDIM steps actually run for the sampling row
    fast: FastPath
    rows: tuple[str, ...] = ROWS
    compile_autoencoder: bool = False
    seed: int = 0
    profile: int = 0  # >0: torch.profiler over this many extra calls of each path (the sampling row: one run)
    repeats: int = DEFAULT_REPEATS  # timings of `iters` calls per path: median, range, noisy flag


class BenchError(ValueError):
    """Bad benchmark arguments; the message names the offending value."""


# ---------------------------------------------------------------------------------------------- environment

def device_name(device: torch.device) -> str:
    if device.type == "cuda":
        return torch.cuda.get_device_name(device)
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                return "CPU " + line.split(":", 1)[1].strip()
    except OSError:
        pass
    return "CPU " + (platform.processor() or platform.machine())


def slug(text: str) -> str:
    return re.sub(r"[^a-z0-9]+", "-", text.lower()).strip("-")


def device_slug(device: torch.device) -> str:
    return slug(device_name(device)) if device.type == "cuda" else "cpu"


def _git_commit() -> Optional[str]:
    try:
        out = subprocess.run(["git", "rev-parse", "HEAD"], cwd=Path(__file__).resolve().parents[1],
                             capture_output=True, text=True, timeout=10)
    except (OSError, subprocess.SubprocessError):
        return None
    return out.stdout.strip() or None


def environment(device: torch.device) -> dict[str, Any]:
    info: dict[str, Any] = {"type": device.type, "name": device_name(device), "torch": torch.__version__,
                            "python": platform.python_version(), "threads": torch.get_num_threads(),
                            "cpu_count": os.cpu_count()}
    if device.type == "cuda":
        props = torch.cuda.get_device_properties(device)
        info.update(cuda=torch.version.cuda, memory_gib=props.total_memory / 2 ** 30,
                    multiprocessors=props.multi_processor_count)
    return info


def resolve_device(spec: str) -> torch.device:
    """The stages' device rule ("auto" = CUDA when present), with the error phrased for the --device flag."""
    from replication.stages.context import StageError
    from replication.stages.context import resolve_device as resolve_stage_device

    try:
        return resolve_stage_device(spec)
    except StageError as exc:
        raise BenchError(f"--device {spec!r}: {exc}") from None


# ---------------------------------------------------------------------------------------------- networks

def compose_typed(overrides: Sequence[str]) -> dict[str, Any]:
    from replication.config import validate_config
    from replication.stages.entry import compose

    return validate_config(compose(list(overrides)))


def _build_unet(typed: dict[str, Any]) -> nn.Module:
    from replication.stages.artifacts import build_unet

    return build_unet(typed)


def _build_first_stage(typed: dict[str, Any]) -> nn.Module:
    from replication.stages.artifacts import build_first_stage

    return build_first_stage(typed)


def _labels(typed: dict[str, Any], n: int, device: torch.device) -> Optional[torch.Tensor]:
    from replication.stages.artifacts import num_label_classes

    classes = num_label_classes(typed)
    return None if not classes else (torch.arange(n, device=device) % classes).long()


def _denoiser(typed: dict[str, Any], call: Callable[..., torch.Tensor], labels: Optional[torch.Tensor]):
    """eps(x, t) as stages/sample.Generator builds it: plain, class-conditional, or classifier-free guided."""
    from replication.diffusion.guidance import classifier_free

    if labels is None:
        return lambda x, t: call(x, t)
    scale = typed["sampler"].guidance_scale
    null_class = typed["diffusion"].null_class
    null = torch.full_like(labels, null_class if null_class is not None else 0)
    return classifier_free(lambda x, t, y: call(x, t, y=y), labels, null, scale)


def random_inception() -> nn.Module:
    """torch-fidelity's FID Inception-v3 architecture with random weights: the same FLOPs and kernels as the real
    extractor, for throughput only. Nothing is downloaded: the weight loader is replaced for this construction."""
    import torch_fidelity.feature_extractor_inceptionv3 as tfi

    with mock.patch.object(tfi, "load_state_dict_from_url", lambda *a, **k: {}), \
            mock.patch.object(tfi.FeatureExtractorInceptionV3, "load_state_dict", lambda self, *a, **k: None):
        return tfi.FeatureExtractorInceptionV3("inception-v3-compat", ["2048", "logits_unbiased"])


def feature_module(typed: dict[str, Any], device: torch.device, for_counting: bool = False) -> tuple[nn.Module, str]:
    """The module `evaluate` would run: the real Inception when metrics.inception_weights is set, the labelled
    stand-in where allowed (smoke), else the Inception architecture with random weights."""
    from replication.metrics.features import StandinExtractor, build_extractor

    metrics = typed["metrics"]
    weights = getattr(metrics, "inception_weights", None)
    if weights and not for_counting:
        return build_extractor("inception-v3-compat", weights, device=device)._module, "inception-v3-compat"
    if getattr(metrics, "allow_standin", False) and not weights:
        return StandinExtractor(seed=0, device=device), "stand-in (smoke only)"
    return random_inception().to(device), "inception-v3-compat architecture, random weights"


# ---------------------------------------------------------------------------------------------- FLOP counts

def unet_flops(typed: dict[str, Any], train: bool) -> int:
    """FLOP per image of one U-Net forward (with guidance, as the sampler calls it), or of a training step."""
    from replication.diffusion.objective import per_sample_error

    c = typed["unet"]
    diffusion = typed["diffusion"]

    def run(unet: nn.Module) -> None:
        x = torch.randn(1, c.in_channels, c.image_size, c.image_size)
        t = torch.zeros(1, dtype=torch.long)
        labels = _labels(typed, 1, torch.device("cpu"))
        if not train:
            _denoiser(typed, unet, labels)(x, t)
            return
        # q_sample is elementwise (no counted FLOP) and checks t data-dependently, which fake tensors cannot do
        pred = unet(x, t) if labels is None else unet(x, t, y=labels)
        per_sample_error(pred, torch.randn_like(x), diffusion.loss()).mean().backward()

    return count_flops(lambda: _build_unet(typed), run)


def first_stage_flops(typed: dict[str, Any], what: str) -> int:
    res = typed["autoencoder"].ddconfig.resolution

    def run(ae: nn.Module) -> None:
        if what == "encode":
            ae.encode_moments(torch.randn(1, 3, res, res))
        else:
            h = res // ae.downsampling_factor
            ae.decode(torch.randn(1, ae.latent_channels, h, h))

    return count_flops(lambda: _build_first_stage(typed), run)


def feature_flops(typed: dict[str, Any]) -> int:
    res = typed["autoencoder"].ddconfig.resolution if typed["autoencoder"].ddconfig else typed["dataset"].resolution
    images = torch.zeros(1, 3, res, res, dtype=torch.uint8)
    # counted for real on the CPU at batch 1 (the stand-in's seeded construction does not run on fake tensors)
    with torch.no_grad():
        return count_flops(lambda: feature_module(typed, torch.device("cpu"), for_counting=True)[0],
                           lambda m: m(images), fake=False)


# ---------------------------------------------------------------------------------------------- measurements

def _release_memory(device: torch.device) -> None:
    import gc

    gc.collect()
    if device.type == "cuda":
        torch.cuda.empty_cache()


def _first_line(exc: BaseException) -> str:
    first_line = str(exc).splitlines()[0] if str(exc) else ""
    return f"{type(exc).__name__}: {first_line}"[:300]


def spread_of(rates: Sequence[float]) -> float:
    """(max - min) / median of repeated rates: 0 when they agree; above NOISE_THRESHOLD the path is noisy."""
    middle = statistics.median(rates)
    return (max(rates) - min(rates)) / middle if middle > 0 else float("inf")


def _measure(step: Callable[[], Any], device: torch.device, warmup: int, iters: int, images_per_call: int,
             gflop_per_image: float, peak_tflops: float, fast: FastPath, profile_iters: int = 0,
             repeats: int = DEFAULT_REPEATS) -> dict[str, Any]:
    """Warm up (compilation happens here), reset the memory peak, time `iters` calls `repeats` times: the steady
    state. The rate is the median of the repeats (`img_per_s`, from the median `seconds_per_iter`), with their
    range (`img_per_s_min`/`_max`, each repeat in `img_per_s_repeats`), `spread` = range / median and `noisy` when
    the spread exceeds NOISE_THRESHOLD. A failure (out of memory, a compile error) is recorded in the result's
    `error` instead of ending the run. With `profile_iters`, that many more calls run under torch.profiler (after
    the timing and the memory peak): the result's `profile` says where the time goes."""
    mem = PeakMemory(device)
    result: dict[str, Any] = {"levers": fast.levers() or ["eager fp32"], "error": None}
    try:
        warm = time_fn(step, device, iters=max(warmup, 1), warmup=0) if warmup else None
        mem.reset()
        timings = [time_fn(step, device, iters=iters, warmup=0) for _ in range(max(repeats, 1))]
    except torch.OutOfMemoryError as exc:
        first_line = str(exc).splitlines()[0] if str(exc) else "CUDA out of memory"
        result["error"] = f"out of memory: {first_line}"
    except Exception as exc:  # noqa: BLE001 - one failed path (e.g. a compile error) must not lose the other rows
        result["error"] = _first_line(exc)
    if result["error"] is not None:
        # outside the except block, the traceback (and the failed step's tensors) is gone: free the memory
        # before the next path is measured
        _release_memory(device)
        return result
    seconds = statistics.median(t.seconds_per_iter for t in timings)
    img_per_s = images_per_call / seconds
    rates = [images_per_call / t.seconds_per_iter for t in timings]
    tflops = gflop_per_image * img_per_s / 1e3
    spread = spread_of(rates)
    result.update(img_per_s=img_per_s, seconds_per_iter=seconds, iters=timings[0].iters, repeats=len(timings),
                  img_per_s_repeats=rates, img_per_s_min=min(rates), img_per_s_max=max(rates), spread=spread,
                  noisy=spread > NOISE_THRESHOLD,
                  warmup_seconds=(warm.seconds_per_iter * warm.iters) if warm else 0.0, tflops=tflops,
                  mfu=tflops / peak_tflops, peak_mem_gib=mem.peak_gib(), peak_mem_kind=mem.kind)
    if profile_iters:
        try:
            result["profile"] = profile_breakdown(step, device, profile_iters, seconds)
        except Exception as exc:  # noqa: BLE001 - a profiler failure (e.g. no CUPTI) keeps the measured timing
            result["profile_error"] = _first_line(exc)
    return result


def _train_inputs(typed: dict[str, Any], batch: int, device: torch.device, seed: int):
    from replication.diffusion.objective import sample_timesteps

    c = typed["unet"]
    g = torch.Generator().manual_seed(seed)
    x0 = torch.randn(batch, c.in_channels, c.image_size, c.image_size, generator=g)
    t = sample_timesteps(batch, typed["diffusion"].make_schedule().num_timesteps, generator=g)
    noise = torch.randn(x0.shape, generator=g)
    return x0.to(device), t.to(device), noise.to(device), _labels(typed, batch, device)


def measure_train(typed: dict[str, Any], base: nn.Module, fast: FastPath, s: BenchSettings, gflop: float,
                  peak: float) -> tuple[dict[str, Any], Optional[torch.Tensor]]:
    """One train_loop step (forward, loss, backward, AdamW, EMA, the loss read one step late) on fixed latents."""
    from replication.diffusion.objective import diffusion_loss
    from replication.models.conditioning import ema_scope
    from replication.models.ema import EMA
    from replication.training.loss_reader import DeferredLossReader

    trainer, diffusion, device = typed["trainer"], typed["diffusion"], s.device
    reader = DeferredLossReader()
    model = copy.deepcopy(base).train()
    forward = prepare_module(model, fast, device)
    ema = EMA(model, decay=trainer.ema_decay, scope=ema_scope(model)) if trainer.use_ema else None
    optimizer = make_adamw(model.parameters(), fast, device, lr=trainer.base_lr, betas=tuple(trainer.adam_betas),
                           weight_decay=trainer.weight_decay)
    x0, t, noise, labels = _train_inputs(typed, s.batch, device, s.seed)
    schedule, loss_type = diffusion.make_schedule(), diffusion.loss()
    reads: list[Any] = []  # the steps' losses as the reader hands them back (the first is the row's numerics)

    def denoise(x_t: torch.Tensor, tt: torch.Tensor) -> torch.Tensor:
        x_in = to_memory_format(x_t, fast)
        return forward(x_in, tt) if labels is None else forward(x_in, tt, y=labels)

    def step() -> None:
        if fast.compile:  # as the loop: a new iteration for CUDA graph trees
            torch.compiler.cudagraph_mark_step_begin()
        with autocast(fast, device):
            loss = diffusion_loss(denoise, x0, schedule, t, noise, loss_type).mean()
        optimizer.zero_grad(set_to_none=True)
        loss.backward()
        optimizer.step()
        if ema is not None:
            ema.update(model)
        # as the loop: the step's loss is read one step late, so the host never waits for the GPU
        reads.extend(reader.push(len(reads), loss.detach().float().reshape(1)))

    result = _measure(step, device, s.warmup, s.iters, s.batch, gflop, peak, fast, s.profile, s.repeats)
    reads.extend(reader.flush())
    del model, forward, ema, optimizer
    free_device_memory(device)
    return result, (torch.tensor(reads[0].values[:1]) if reads else None)


def measure_sample(typed: dict[str, Any], base: nn.Module, fast: FastPath, s: BenchSettings, gflop_step: float,
                   peak: float) -> tuple[dict[str, Any], Optional[torch.Tensor]]:
    """`--sample-steps` steps of the configured sampler; img/s and TFLOP/s quoted at SAMPLE_QUOTE_STEPS steps."""
    from replication.diffusion.config import run_sampler
    from replication.utils.rng import StackedRandomGenerator

    device = s.device
    unet = copy.deepcopy(base).eval().requires_grad_(False)
    call = FastForward(unet, fast.only("bf16", "channels_last", "compile"), device)
    c = typed["unet"]
    seeds = list(range(s.seed, s.seed + s.sample_batch))
    labels = _labels(typed, s.sample_batch, device)
    denoiser = _denoiser(typed, call, labels)
    schedule = typed["diffusion"].make_schedule()
    out: list[torch.Tensor] = []

    def run(steps: int) -> int:
        cfg = dataclasses.replace(typed["sampler"], steps=steps)
        rng = StackedRandomGenerator(seeds, device=device)
        x_T = rng.randn((s.sample_batch, c.in_channels, c.image_size, c.image_size))
        with torch.no_grad():
            result = run_sampler(cfg, denoiser, x_T, schedule, rng=rng)
        out[:] = [result.x]
        return result.num_steps

    from replication.diffusion.ddim import ddim_timesteps

    n_quote = len(ddim_timesteps(SAMPLE_QUOTE_STEPS, schedule.num_timesteps, typed["sampler"].spacing))
    n_run = len(ddim_timesteps(s.sample_steps, schedule.num_timesteps, typed["sampler"].spacing))
    # one call of n_run steps = n_run / n_quote of a quoted sample set; as images/call that is batch * n_run / n_quote
    result = _measure(lambda: run(s.sample_steps), device, min(s.warmup, 1), 1, s.sample_batch * n_run / n_quote,
                      gflop_step * n_quote, peak, fast.only("bf16", "channels_last", "compile"), min(s.profile, 1),
                      s.repeats)
    result.update(steps_run=n_run, steps_quoted=n_quote)
    final = out[0].float().cpu() if out else None
    del unet, call, denoiser
    free_device_memory(device)
    return result, final


def measure_first_stage(typed: dict[str, Any], base: nn.Module, fast: FastPath, s: BenchSettings, what: str,
                        gflop: float, peak: float) -> tuple[dict[str, Any], Optional[torch.Tensor]]:
    device = s.device
    ae = copy.deepcopy(base).eval().requires_grad_(False)
    levers = ("bf16", "channels_last", "compile") if s.compile_autoencoder else ("bf16", "channels_last")
    fast = fast.only(*levers)
    method = "encode_moments" if what == "encode" else "decode"
    call = FastForward(ae, fast, device, method=method)
    res = typed["autoencoder"].ddconfig.resolution
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

    result = _measure(step, device, s.warmup, s.iters, s.ae_batch, gflop, peak, fast, s.profile, s.repeats)
    final = out[0].float().cpu() if out else None
    del ae, call
    free_device_memory(device)
    return result, final


def measure_features(typed: dict[str, Any], fast: FastPath, s: BenchSettings, gflop: float,
                     peak: float) -> tuple[dict[str, Any], Optional[torch.Tensor], str]:
    device = s.device
    module, label = feature_module(typed, device)
    fast = fast.only("channels_last")
    call = FastForward(module, fast, device)
    res = typed["autoencoder"].ddconfig.resolution if typed["autoencoder"].ddconfig else typed["dataset"].resolution
    g = torch.Generator().manual_seed(s.seed)
    images = torch.randint(0, 256, (s.feature_batch, 3, res, res), generator=g, dtype=torch.uint8).to(device)
    out: list[Any] = []

    def step() -> None:
        with torch.no_grad():
            out[:] = [call(images)]

    result = _measure(step, device, s.warmup, s.iters, s.feature_batch, gflop, peak, fast, s.profile, s.repeats)
    final = None
    if out:
        first = out[0]
        pool = first["pool"] if isinstance(first, dict) else first[0]
        final = pool.float().cpu()
    del module, call
    free_device_memory(device)
    return result, final, label


# ---------------------------------------------------------------------------------------------- one run

def _row(name: str, what: str, batch: int, gflop: float, baseline: dict[str, Any], fast: dict[str, Any],
         experiment: str, device: dict[str, Any], rel_err: Optional[float] = None, **extra: Any) -> dict[str, Any]:
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


def verdict(experiment: str, row: str, fast: dict[str, Any], speedup: Optional[float], device: str,
            device_type: str = "cuda") -> str:
    """'met' / 'missed' per check: the 4x training ratio on any GPU, the H200 targets on an H200 only.
    The CPU runs tiny shapes to test the benchmark itself; there is no CPU target."""
    checks = []
    if device_type != "cuda":
        return "no target on the CPU"
    if row == "train":
        ok = speedup is not None and speedup >= MIN_TRAIN_SPEEDUP
        checks.append(f">= {MIN_TRAIN_SPEEDUP:g}x eager fp32: {'met' if ok else 'missed'}")
    target = TARGETS.get((experiment, row))
    if target is not None:
        if TARGET_CARD.lower() not in device.lower():
            checks.append(f"{TARGET_CARD} target: not applicable on this device")
        else:
            rate = fast.get("img_per_s") or 0.0
            checks.append(f">= {target.min_img_per_s:g} img/s: {'met' if rate >= target.min_img_per_s else 'missed'}")
            if target.max_mem_gib is not None:
                mem = fast.get("peak_mem_gib")
                ok = mem is not None and mem <= target.max_mem_gib
                checks.append(f"<= {target.max_mem_gib:g} GiB: {'met' if ok else 'missed'}")
    return "; ".join(checks)


def gflop_checks(experiment: str, counted: dict[str, float]) -> dict[str, Any]:
    checks = {}
    for (exp, key), original in ORIGINAL_GFLOP.items():
        if exp == experiment and key in counted:
            checks[key] = {"counted": counted[key], "original_code": original,
                           "rel_diff": abs(counted[key] - original) / original}
    return checks


@dataclass
class _Run:
    """What every row of one benchmark run shares."""

    typed: dict[str, Any]
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
        return self.typed["root"].name


def _compare(a: Optional[torch.Tensor], b: Optional[torch.Tensor]) -> Optional[float]:
    return relative_error(a, b) if a is not None and b is not None else None


def _row_train(r: _Run) -> dict[str, Any]:
    gflop = r.counted["train"] = unet_flops(r.typed, train=True) / 1e9
    what = "forward+backward+AdamW+EMA per latent"
    base, loss_b = measure_train(r.typed, r.unet, FastPath(), r.s, gflop, r.peak)
    r.on_baseline("train", what, r.s.batch, gflop, base)
    fast, loss_f = measure_train(r.typed, r.unet, r.s.fast, r.s, gflop, r.peak)
    return _row("train", what, r.s.batch, gflop, base, fast, r.experiment, r.device_info, _compare(loss_f, loss_b))


def _row_sample(r: _Run) -> dict[str, Any]:
    gflop_step = r.counted["unet_forward"]
    base, x_b = measure_sample(r.typed, r.unet, FastPath(), r.s, gflop_step, r.peak)
    quoted = base.get("steps_quoted", SAMPLE_QUOTE_STEPS)
    what = f"{r.typed['sampler'].kind} at {quoted} steps per image"
    r.on_baseline("sample", what, r.s.sample_batch, gflop_step * quoted, base)
    fast, x_f = measure_sample(r.typed, r.unet, r.s.fast, r.s, gflop_step, r.peak)
    return _row("sample", what, r.s.sample_batch, gflop_step * quoted, base, fast, r.experiment, r.device_info,
                _compare(x_f, x_b), steps_run=base.get("steps_run"))


def _row_first_stage(r: _Run, what: str) -> Optional[dict[str, Any]]:
    if r.first_stage is None or not any(True for _ in r.first_stage.parameters()):
        return None  # pixel-space LDM: no first stage to time
    gflop = r.counted[what] = first_stage_flops(r.typed, what) / 1e9
    base, y_b = measure_first_stage(r.typed, r.first_stage, FastPath(), r.s, what, gflop, r.peak)
    described = f"first stage {what} at {r.typed['autoencoder'].ddconfig.resolution}px"
    r.on_baseline(what, described, r.s.ae_batch, gflop, base)
    fast, y_f = measure_first_stage(r.typed, r.first_stage, r.s.fast, r.s, what, gflop, r.peak)
    return _row(what, described, r.s.ae_batch, gflop, base, fast, r.experiment, r.device_info, _compare(y_f, y_b))


def _row_features(r: _Run) -> dict[str, Any]:
    gflop = r.counted["features"] = feature_flops(r.typed) / 1e9
    base, f_b, label = measure_features(r.typed, FastPath(), r.s, gflop, r.peak)
    what = f"FID features: {label}"
    r.on_baseline("features", what, r.s.feature_batch, gflop, base)
    fast, f_f, _ = measure_features(r.typed, r.s.fast, r.s, gflop, r.peak)
    return _row("features", what, r.s.feature_batch, gflop, base, fast, r.experiment, r.device_info,
                _compare(f_f, f_b))


ROW_MEASURES: dict[str, Callable[[_Run], Optional[dict[str, Any]]]] = {
    "train": _row_train, "sample": _row_sample, "decode": lambda r: _row_first_stage(r, "decode"),
    "encode": lambda r: _row_first_stage(r, "encode"), "features": _row_features}


def run_bench(overrides: Sequence[str], s: BenchSettings, out_dir: Optional[Path] = None,
              tag: Optional[str] = None, progress: bool = True) -> dict[str, Any]:
    """Measure every row of `s.rows`; write <out_dir>/<tag>.json/.md after each row (when out_dir is given)."""
    unknown = [r for r in s.rows if r not in ROWS]
    if unknown:
        raise BenchError(f"unknown row(s) {unknown}; allowed: {', '.join(ROWS)}")
    typed = compose_typed(overrides)
    experiment, device = typed["root"].name, s.device
    say = print if progress else (lambda *a, **k: None)
    tag = tag or f"{device_slug(device)}-{slug(experiment)}"
    report: dict[str, Any] = {
        "schema": SCHEMA_VERSION, "experiment": experiment, "overrides": list(overrides),
        "created": _dt.datetime.now(_dt.timezone.utc).isoformat(timespec="seconds"), "git_commit": _git_commit(),
        "device": environment(device), "settings": _settings_dict(s), "baseline": FastPath().describe(),
        "fast_path": s.fast.describe(), "rows": [], "numerics": {}, "gflop_check": {}, "counted_gflop": {},
        "complete": False}

    def save() -> None:
        if out_dir is not None:
            atomic_write_json(Path(out_dir) / f"{tag}.json", report)
            atomic_write_text(Path(out_dir) / f"{tag}.md", render_markdown([report]))

    with cuda_flags(benchmark=True) as flags:
        report["device"]["flags"] = flags if device.type == "cuda" else {}
        say(f"[bench] {experiment} on {report['device']['name']}: measuring the bf16 matmul peak")
        report["peak_bf16_tflops"] = peak = matmul_peak_tflops(device, torch.bfloat16)
        report["peak_fp32_tflops"] = matmul_peak_tflops(device, torch.float32)
        save()  # a run cut short still leaves its header and every finished row
        needs_unet = any(r in s.rows for r in ("train", "sample"))
        torch.manual_seed(s.seed)
        def on_baseline(name: str, what: str, batch: int, gflop: float, base: dict[str, Any]) -> None:
            report["pending"] = {"row": name, "what": what, "batch": batch, "gflop_per_img": gflop, "baseline": base}
            save()

        run = _Run(typed, s, report["device"], peak,
                   unet=nonzero_init_(_build_unet(typed), s.seed) if needs_unet else None,
                   first_stage=_build_first_stage(typed) if any(r in s.rows for r in ("encode", "decode")) else None,
                   counted=report["counted_gflop"], on_baseline=on_baseline)
        if needs_unet:
            run.counted["unet_forward"] = unet_flops(typed, train=False) / 1e9
        for name in s.rows:
            say(f"[bench] row {name}: eager fp32 baseline, then {s.fast.describe()}")
            row = ROW_MEASURES[name](run)
            if row is None:
                say(f"[bench]   {name}: skipped (the experiment has no first stage with weights)")
                continue
            report.pop("pending", None)
            report["rows"].append(row)
            report["numerics"][name] = row["fast_vs_baseline_rel_err"]
            report["gflop_check"] = gflop_checks(experiment, run.counted)
            save()
            say(_row_line(row))
    report["complete"] = True
    save()
    return report


def _settings_dict(s: BenchSettings) -> dict[str, Any]:
    d = dataclasses.asdict(s)
    d["device"] = str(s.device)
    d["fast"] = s.fast.describe()
    d["rows"] = list(s.rows)
    return d


# ---------------------------------------------------------------------------------------------- rendering

def _fmt(value: Any, digits: int = 1) -> str:
    if value is None:
        return "-"
    if isinstance(value, float):
        if value != 0 and abs(value) < 10 ** (-digits):
            return f"{value:.2g}"
        return f"{value:,.{digits}f}"
    return str(value)


def _rate(mode: dict[str, Any]) -> str:
    """The median rate, with the range of the repeats when there were several: '120.5 (98.2-131.0)'."""
    if mode.get("error"):
        return mode["error"]
    text = _fmt(mode.get("img_per_s"))
    if (mode.get("repeats") or 1) > 1 and mode.get("img_per_s_min") is not None:
        text += f" ({_fmt(mode['img_per_s_min'])}-{_fmt(mode['img_per_s_max'])})"
    return text


def _speedup(row: dict[str, Any]) -> str:
    text = _fmt(row["speedup"], 2)
    spread = row.get("speedup_range")
    if spread and row["speedup"] is not None and spread[1] - spread[0] > 1e-12:
        text += f" ({_fmt(spread[0], 2)}-{_fmt(spread[1], 2)})"
    return text


def _row_line(row: dict[str, Any]) -> str:
    line = (f"[bench]   {row['row']}: eager fp32 {_rate(row['baseline'])} img/s, fast {_rate(row['fast'])} img/s, "
            f"x{_speedup(row)}, MFU {_fmt((row['fast'].get('mfu') or 0) * 100)}%")
    return line + (f"; {row['noise']}" if row.get("noise") else "")


INTRO = ("Eager fp32 baseline and fast path measured side by side in the same run; speed-ups are ratios of the two. "
         "MFU = achieved TFLOP/s / the bf16 matrix-multiply peak measured in the same run (on a shared CPU that "
         "peak is noisy and MFU can exceed 100%). GFLOP counted with torch.utils.flop_counter (2 per "
         "multiply-accumulate; matmuls, convolutions, attention). Sampling is quoted per image at "
         f"{SAMPLE_QUOTE_STEPS} DDIM steps. Rates are the median of the repeated timings (the settings' `repeats`), "
         "with their range in brackets; a speed-up's range pairs the extremes. A row whose repeats span more than "
         f"{NOISE_THRESHOLD:.0%} of their median is marked NOISY: remeasure it before trusting it. "
         "Regenerate: `python -m replication.bench experiment=NAME` with the JSON's `settings`.")
TABLE_HEAD = ("| row | what | batch | GFLOP/img | eager fp32 img/s | fast img/s | speed-up | fast levers | fast TFLOP/s "
              "| MFU eager | MFU fast | peak GiB eager / fast | fast warm-up s | original code (H200) | verdict |\n"
              "|---|---|---|---|---|---|---|---|---|---|---|---|---|---|---|")


def _pct(mode: dict[str, Any]) -> str:
    return f"{_fmt(mode['mfu'] * 100)}%" if mode.get("mfu") is not None else "-"


def _table_row(row: dict[str, Any]) -> str:
    b, f, t = row["baseline"], row["fast"], row.get("target")
    original = "-"
    if t:
        original = f"{_fmt(t['original_img_per_s'])} img/s"
        if t.get("original_mem_gib"):
            original += f", {_fmt(t['original_mem_gib'])} GiB"
    memory = f"{_fmt(b.get('peak_mem_gib'), 2)} / {_fmt(f.get('peak_mem_gib'), 2)}"
    cells = [row["row"], row["what"], row["batch"], _fmt(row["gflop_per_img"], 2), _rate(b), _rate(f),
             _speedup(row), "+".join(f.get("levers", [])), _fmt(f.get("tflops"), 2), _pct(b), _pct(f),
             memory, _fmt(f.get("warmup_seconds")), original,
             "; ".join(v for v in (row.get("verdict"), row.get("noise")) if v) or "-"]
    return "| " + " | ".join(str(c) for c in cells) + " |"


def _section(rep: dict[str, Any]) -> list[str]:
    dev = rep["device"]
    lines = [f"## {rep['experiment']} on {dev['name']}", "",
             f"{rep['created']}, torch {dev['torch']}, commit {rep.get('git_commit') or '-'}, {dev.get('threads')} "
             f"threads. bf16 matmul peak measured: {_fmt(rep.get('peak_bf16_tflops'), 2)} TFLOP/s (fp32 "
             f"{_fmt(rep.get('peak_fp32_tflops'), 2)}). Fast path: {rep['fast_path']}.", "", TABLE_HEAD]
    lines += [_table_row(row) for row in rep["rows"]]
    if not rep.get("complete", True):
        lines += ["", f"INCOMPLETE: the run stopped (time limit or error) before rows "
                  f"{', '.join(r for r in rep['settings']['rows'] if r not in {x['row'] for x in rep['rows']})}."]
        pending = rep.get("pending")
        if pending:
            b = pending["baseline"]
            lines += [f"Row {pending['row']} ({pending['what']}, batch {pending['batch']}): the eager fp32 baseline "
                      f"finished ({_rate(b)} img/s, MFU {_pct(b)}, peak {_fmt(b.get('peak_mem_gib'), 2)} GiB); the "
                      f"fast path ({rep['fast_path']}) did not (still compiling or running when the run stopped)."]
    lines += _profile_lines(rep["rows"])
    if rep.get("numerics"):
        errors = ", ".join(f"{k} {_fmt(v, 4)}" for k, v in rep["numerics"].items())
        lines += ["", "Fast path vs eager fp32 on the same weights and inputs, relative L2 error (train: of the first "
                  f"step's loss; sample: of the latents after the timed steps; others: of the outputs): {errors}."]
    if rep.get("gflop_check"):
        checks = ", ".join(f"{k} {_fmt(v['counted'], 2)} vs {_fmt(v['original_code'], 2)}"
                           for k, v in rep["gflop_check"].items())
        lines += ["", f"GFLOP/img against the original networks' count (shared/ANCHORS.md): {checks}."]
    kinds = sorted({m["peak_mem_kind"] for r in rep["rows"] for m in (r["baseline"], r["fast"])
                    if m.get("peak_mem_kind")})
    if kinds:
        lines += ["", f"Peak memory: {', '.join(kinds)} during the timed iterations."]
    return lines + [""]


PROFILE_COLUMNS = tuple(name for name, _ in PROFILE_CATEGORIES) + (OTHER_CATEGORY,)


def _profile_lines(rows: Sequence[dict[str, Any]]) -> list[str]:
    """The rows' torch.profiler breakdowns (bench --profile), one table line per measured path."""
    paths = (("baseline", "eager fp32"), ("fast", "fast"))
    profiled = [(row, label, row[path]) for row in rows for path, label in paths
                if row[path].get("profile") or row[path].get("profile_error")]
    if not profiled:
        return []
    kinds = sorted({m["profile"]["time_kind"] for _, _, m in profiled if m.get("profile")})
    lines = ["", f"Where the time goes (torch.profiler, share of the {' / '.join(kinds) or 'profiled time'} per "
             "category; busy = GPU kernel time / unprofiled wall time per call, well below 100% means the GPU "
             "waits for the host):", "",
             "| row | path | ms/call profiled | busy | " + " | ".join(PROFILE_COLUMNS) + " | top 3 |",
             "|---|---|---|---|" + "---|" * len(PROFILE_COLUMNS) + "---|"]
    for row, label, mode in profiled:
        prof = mode.get("profile")
        if not prof:
            lines.append(f"| {row['row']} | {label} | profiler failed: {mode['profile_error']} |")
            continue
        busy = f"{_fmt(prof['busy_fraction'] * 100)}%" if prof.get("busy_fraction") is not None else "-"
        shares = [f"{_fmt(prof['categories'].get(c, 0.0) * 100)}%" for c in PROFILE_COLUMNS]
        top = "; ".join(f"{t['name'][:60]} {_fmt(t['share'] * 100)}%" for t in prof["top"][:3]).replace("|", "/")
        lines.append("| " + " | ".join([row["row"], label, _fmt(prof["ms_per_iter"], 2), busy, *shares, top]) + " |")
    return lines


def target_summary(reports: Sequence[dict[str, Any]]) -> list[dict[str, Any]]:
    """The four target rows against the fastest fast path measured for each across `reports` (GPU runs only),
    with the eager fp32 baseline of that same run (speed-ups are never taken across runs). A target row that no
    run measured is listed as not measured."""
    summary = []
    for (experiment, name), target in TARGETS.items():
        best: Optional[tuple[dict[str, Any], dict[str, Any]]] = None
        for rep in reports:
            if rep["experiment"] != experiment or rep["device"].get("type") != "cuda":
                continue
            for row in rep["rows"]:
                rate = row["fast"].get("img_per_s")
                if row["row"] == name and rate and (best is None or rate > best[1]["fast"]["img_per_s"]):
                    best = (rep, row)
        entry: dict[str, Any] = {"experiment": experiment, "row": name, "target": dataclasses.asdict(target),
                                 "measured": best is not None}
        if best is not None:
            rep, row = best
            entry.update(device=rep["device"]["name"], run_created=rep["created"], batch=row["batch"],
                         levers=row["fast"].get("levers"), fast_img_per_s=row["fast"]["img_per_s"],
                         eager_img_per_s=row["baseline"].get("img_per_s"), speedup=row["speedup"],
                         mfu=row["fast"].get("mfu"), peak_mem_gib=row["fast"].get("peak_mem_gib"),
                         verdict=row.get("verdict"), noisy=bool(row.get("noisy")), noise=row.get("noise"))
        summary.append(entry)
    return summary


def _summary_lines(summary: Sequence[dict[str, Any]]) -> list[str]:
    lines = [f"## Targets (one {TARGET_CARD}, paper shapes): the fastest measured fast path per row", "",
             "| experiment | row | original code | target | eager fp32 img/s | fast img/s | speed-up (same run) | MFU "
             "| peak GiB | fast levers | run | verdict |", "|---|---|---|---|---|---|---|---|---|---|---|---|"]
    for e in summary:
        t = e["target"]
        original = f"{_fmt(t['original_img_per_s'])} img/s" + (
            f", {_fmt(t['original_mem_gib'])} GiB" if t.get("original_mem_gib") else "")
        goal = f">= {_fmt(t['min_img_per_s'])} img/s" + (f", <= {_fmt(t['max_mem_gib'])} GiB"
                                                         if t.get("max_mem_gib") else "")
        if e["measured"]:
            cells = [_fmt(e["eager_img_per_s"]), _fmt(e["fast_img_per_s"]), _fmt(e["speedup"], 2),
                     f"{_fmt((e['mfu'] or 0) * 100)}%", _fmt(e["peak_mem_gib"], 2), "+".join(e["levers"] or []),
                     e["run_created"], "; ".join(v for v in (e["verdict"], e.get("noise")) if v) or "-"]
        else:
            cells = ["-", "-", "-", "-", "-", "-", "-", "not measured"]
        lines.append("| " + " | ".join([e["experiment"], e["row"], original, goal, *map(str, cells)]) + " |")
    return lines + [""]


def render_markdown(reports: Sequence[dict[str, Any]]) -> str:
    lines = ["# Throughput benchmark", "", INTRO, ""]
    if len(reports) > 1 and any(rep["device"].get("type") == "cuda" for rep in reports):
        lines += _summary_lines(target_summary(reports))
    for rep in reports:
        lines += _section(rep)
    return "\n".join(lines)


def merge_reports(paths: Sequence[Path], out_dir: Path, tag: Optional[str] = None) -> dict[str, Any]:
    """One JSON ({"reports": [...]}) and one markdown table for several single-experiment runs."""
    reports = []
    for path in paths:
        path = Path(path)
        if not path.exists():
            raise BenchError(f"benchmark result {path} does not exist (did that run fail or time out?)")
        data = read_json(path)
        # a merged file (of an earlier --merge) contributes its reports
        reports.extend(data["reports"] if "reports" in data else [data])
    if not reports:
        raise BenchError("--merge needs at least one result JSON")
    if tag is None:
        first = reports[0]["device"]
        tag = slug(first["name"]) if first["type"] == "cuda" else "cpu"
    merged = {"schema": SCHEMA_VERSION, "device": reports[0]["device"], "reports": reports}
    if any(rep["device"].get("type") == "cuda" for rep in reports):
        merged["targets"] = target_summary(reports)
    atomic_write_json(Path(out_dir) / f"{tag}.json", merged)
    text = render_markdown(reports)
    atomic_write_text(Path(out_dir) / f"{tag}.md", text)
    merged["markdown"] = text
    return merged


# ---------------------------------------------------------------------------------------------- CLI

def _defaults(device: torch.device) -> dict[str, int]:
    """Iteration counts and side batches: short on the CPU (tiny shapes), enough for steady state on a GPU."""
    if device.type == "cuda":
        return {"iters": 5, "warmup": 2, "sample_steps": 10, "ae_batch": 16, "feature_batch": 100,
                "repeats": DEFAULT_REPEATS}
    return {"iters": 3, "warmup": 1, "sample_steps": 2, "ae_batch": 4, "feature_batch": 8, "repeats": DEFAULT_REPEATS}


def parse_args(argv: Optional[Sequence[str]] = None) -> argparse.Namespace:
    p = argparse.ArgumentParser(prog="python -m replication.bench", description=__doc__.split("\n\n")[0],
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("overrides", nargs="*", help="Hydra overrides, e.g. experiment=lsun_churches_ldm8")
    p.add_argument("--device", default="auto", help="auto | cpu | cuda | cuda:N")
    p.add_argument("--batch", type=int, default=None, help="training batch (default: trainer.batch_size)")
    p.add_argument("--sample-batch", type=int, default=None, help="sampling batch (default: sampler.batch_size)")
    p.add_argument("--ae-batch", type=int, default=None, help="encoder/decoder batch")
    p.add_argument("--feature-batch", type=int, default=None, help="feature-extraction batch")
    p.add_argument("--steps", type=int, default=None, help="timed iterations per measurement")
    p.add_argument("--repeats", type=int, default=None,
                   help=f"measurements per path (default {DEFAULT_REPEATS}): median, range, and a NOISY flag when "
                        f"they span more than {NOISE_THRESHOLD:.0%} of the median")
    p.add_argument("--warmup", type=int, default=None, help="untimed iterations before timing (compilation)")
    p.add_argument("--sample-steps", type=int, default=None, help="DDIM steps actually run for the sampling row")
    p.add_argument("--fast", default=None, help="levers of the fast path: bf16,channels_last,compile,fused_adam | "
                   "all | none (default: on where they help on this device)")
    p.add_argument("--rows", default=",".join(ROWS), help=f"comma-separated subset of {','.join(ROWS)}")
    p.add_argument("--compile-autoencoder", action="store_true", help="also torch.compile the encoder/decoder")
    p.add_argument("--profile", type=int, default=0, metavar="N",
                   help="after timing, N more calls of each path under torch.profiler: where the time goes "
                        "(GPU kernel time per category, and how busy the GPU is); the sampling row profiles one run")
    p.add_argument("--threads", type=int, default=None, help="torch CPU threads")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--out", default="reports/benchmarks", help="output folder")
    p.add_argument("--tag", default=None, help="output file stem (default: <device>-<experiment>)")
    p.add_argument("--merge", nargs="+", default=None, metavar="JSON", help="merge result files instead of measuring")
    p.add_argument("--quiet", action="store_true", help="no progress lines and no table")
    p.add_argument("--no-table", action="store_true", help="progress lines only; the table is in <out>/<tag>.md")
    return p.parse_args(argv)


def settings_from_args(args: argparse.Namespace, typed: dict[str, Any]) -> BenchSettings:
    device = resolve_device(args.device)
    d = _defaults(device)

    def pick(value: Optional[int], default: int, name: str) -> int:
        value = default if value is None else value
        if value < 1:
            raise BenchError(f"--{name} must be >= 1, got {value}")
        return value

    fast = FastPath.parse(args.fast) if args.fast is not None else FastPath.for_device(device)
    rows = tuple(r.strip() for r in args.rows.split(",") if r.strip())
    return BenchSettings(
        device=device, batch=pick(args.batch, typed["trainer"].batch_size, "batch"),
        sample_batch=pick(args.sample_batch, typed["sampler"].batch_size, "sample-batch"),
        ae_batch=pick(args.ae_batch, d["ae_batch"], "ae-batch"),
        feature_batch=pick(args.feature_batch, d["feature_batch"], "feature-batch"),
        iters=pick(args.steps, d["iters"], "steps"),
        warmup=d["warmup"] if args.warmup is None else max(0, args.warmup),
        sample_steps=pick(args.sample_steps, d["sample_steps"], "sample-steps"), fast=fast, rows=rows,
        compile_autoencoder=args.compile_autoencoder, seed=args.seed, profile=max(0, args.profile),
        repeats=pick(args.repeats, d["repeats"], "repeats"))


def main(argv: Optional[Sequence[str]] = None) -> int:
    args = parse_args(argv)
    if args.threads:
        torch.set_num_threads(args.threads)
    out = Path(args.out)
    if args.merge:
        merged = merge_reports([Path(p) for p in args.merge], out, args.tag)
        print(merged["markdown"])
        return 0
    overrides = list(args.overrides) or ["experiment=smoke"]
    bad = [o for o in overrides if "=" not in o]
    if bad:
        raise BenchError(f"overrides must look like key=value, got {bad}")
    typed = compose_typed(overrides)
    settings = settings_from_args(args, typed)
    report = run_bench(overrides, settings, out, args.tag, progress=not args.quiet)
    if not (args.quiet or args.no_table):
        print(render_markdown([report]))
    return 0


if __name__ == "__main__":
    sys.exit(main())
