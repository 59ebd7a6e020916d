# The measuring tools of the benchmark: FLOP counting with torch.utils.flop_counter, a bf16 matrix-multiply peak
# measured in the same process, timing with warm-up and device synchronisation, peak memory, torch.profiler
# breakdowns, and the numerical comparison of a fast path with its eager fp32 baseline.
"""How fast, how much work, how much memory, and how close: the measurements every benchmark row is made of."""
from __future__ import annotations

import gc
import math
import re
import statistics
import time
from contextlib import nullcontext
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Callable, Optional, Sequence

import torch
from torch import nn

from replication.bench.settings import DEFAULT_REPEATS, NOISE_THRESHOLD
from replication.perf import FastPath

GIB = 2 ** 30


class MeasurementError(ValueError):
    """A measurement request is invalid; the message names the offending value."""


def nonzero_init_(module: nn.Module, seed: int = 0) -> nn.Module:
    """Redraw every all-zero weight (ndim >= 2) from N(0, 1/fan_in). The U-Net's zero-initialised output
    layers (ADM `zero_module`) make a fresh network return exactly 0, which would hide any numerical
    difference between paths; trained weights are never zero, so numerics tests use this."""
    gen = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for p in module.parameters():
            if p.dim() >= 2 and not bool(p.any()):
                fan_in = p[0].numel()
                p.copy_(torch.randn(p.shape, generator=gen, dtype=torch.float32).to(p) / math.sqrt(fan_in))
    return module


def relative_error(value: torch.Tensor, reference: torch.Tensor) -> float:
    """||value - reference||_2 / ||reference||_2 over all entries, in float64."""
    if value.shape != reference.shape:
        raise MeasurementError(f"cannot compare shapes {tuple(value.shape)} and {tuple(reference.shape)}")
    ref = reference.detach().double().cpu()
    diff = value.detach().double().cpu() - ref
    denom = ref.norm().item()
    if denom == 0.0:
        raise MeasurementError("reference tensor is all zeros: relative error is undefined (use nonzero_init_)")
    return diff.norm().item() / denom


# ---------------------------------------------------------------------------------------------- FLOP counting

def _sdpa_cpu_flops(query_shape, key_shape, value_shape, *args, out_shape=None, **kwargs) -> int:
    from torch.utils.flop_counter import sdpa_flop_count

    return sdpa_flop_count(query_shape, key_shape, value_shape)


def _sdpa_cpu_backward_flops(grad_out_shape, query_shape, key_shape, value_shape, *args, out_shape=None,
                             **kwargs) -> int:
    from torch.utils.flop_counter import sdpa_backward_flop_count

    return sdpa_backward_flop_count(grad_out_shape, query_shape, key_shape, value_shape)


def flop_counter() -> "torch.utils.flop_counter.FlopCounterMode":
    """FlopCounterMode that also counts the CPU flash-attention kernels, which torch's table leaves out
    (there, CPU SDPA counts as 0 FLOP). Counts are 2 x multiply-accumulates of matmuls, convolutions and attention."""
    from torch.utils.flop_counter import FlopCounterMode

    aten = torch.ops.aten
    mapping = {aten._scaled_dot_product_flash_attention_for_cpu: _sdpa_cpu_flops,
               aten._scaled_dot_product_flash_attention_for_cpu_backward: _sdpa_cpu_backward_flops}
    return FlopCounterMode(display=False, custom_mapping=mapping)


def count_flops(build: Callable[[], Any], run: Callable[[Any], Any], fake: bool = True) -> int:
    """FLOP of `run(build())`. With `fake` (default) counted on fake tensors: shapes only, no memory and no
    arithmetic, so paper-size networks are counted in seconds on any machine; `fake=False` runs for real (for
    modules whose construction fake tensors cannot follow). `build` makes the module(s), `run` does the work to
    count (a forward, or forward + backward for a training step)."""
    from torch._subclasses.fake_tensor import FakeTensorMode

    with FakeTensorMode(allow_non_fake_inputs=True) if fake else nullcontext():
        built = build()
        with flop_counter() as counter:
            run(built)
    return int(counter.get_total_flops())


# ---------------------------------------------------------------------------------------------- timing, memory

def synchronize(device: torch.device | str) -> None:
    device = torch.device(device)
    if device.type == "cuda":
        torch.cuda.synchronize(device)


@dataclass
class Timing:
    seconds_per_iter: float
    iters: int
    warmup_seconds: float  # includes compilation for compiled paths


def time_fn(fn: Callable[[], Any], device: torch.device | str, iters: int, warmup: int = 1) -> Timing:
    """Mean wall time of `fn()` over `iters` calls after `warmup` calls, with the device synchronised around both."""
    if iters < 1 or warmup < 0:
        raise MeasurementError(f"need iters >= 1 and warmup >= 0, got iters={iters}, warmup={warmup}")
    synchronize(device)
    t0 = time.perf_counter()
    for _ in range(warmup):
        fn()
    synchronize(device)
    t1 = time.perf_counter()
    for _ in range(iters):
        fn()
    synchronize(device)
    return Timing((time.perf_counter() - t1) / iters, iters, t1 - t0)


# Kernel (GPU) or operator (CPU) names -> where the time goes, first match wins. cuDNN convolution kernels carry
# "implicit_gemm"/"fprop"/"dgrad"/"wgrad" in their names, so convolution is matched before matmul; inductor's
# Triton templates for matmuls are "triton_tem_*", its fused pointwise/reduction kernels "triton_poi/red/per_*".
PROFILE_CATEGORIES: tuple[tuple[str, str], ...] = (
    ("attention", r"flash|fmha|attention|sdpa|softmax"),
    ("convolution", r"conv(?!ert)|cudnn|implicit_gemm|fprop|dgrad|wgrad|winograd"),
    ("matmul", r"gemm|cublas|cutlass|nvjet|matmul|aten::mm\b|aten::addmm|aten::bmm|aten::linear|triton_tem"),
    # eager GroupNorm on CUDA: RowwiseMoments + ComputeFusedParams forward, GammaBeta/InternalGradients backward
    ("normalization", r"norm|rowwisemoments|fusedparams|gammabeta|internalgradients"),
    ("optimizer", r"adam|multi_tensor|foreach"),
    ("copy", r"memcpy|memset|copy|contiguous|aten::cat\b|nchwtonhwc|nhwctonchw|transpose"),
    ("fused (inductor)", r"triton"),
)
OTHER_CATEGORY = "elementwise and other"


def profile_category(name: str) -> str:
    """The PROFILE_CATEGORIES bucket of a kernel or operator name (case-insensitive), else OTHER_CATEGORY."""
    low = name.lower()
    for category, pattern in PROFILE_CATEGORIES:
        if re.search(pattern, low):
            return category
    return OTHER_CATEGORY


def profile_breakdown(fn: Callable[[], Any], device: torch.device | str, iters: int,
                      seconds_per_iter: Optional[float] = None, top: int = 8) -> dict[str, Any]:
    """Where the time of `fn()` goes, from torch.profiler over `iters` calls: on CUDA the kernels' GPU time, on the
    CPU the operators' self time summed over threads. Per category (PROFILE_CATEGORIES) and the `top` names, as
    ms per call and share. On CUDA, `busy_fraction` = kernel time per call / `seconds_per_iter` (the unprofiled
    wall time): well below 1 means the GPU waits for the host (launch-bound: CUDA graphs help). Kernels replayed
    inside CUDA graphs (compile mode reduce-overhead) may be missing from the trace, so read that path's numbers
    as a lower bound."""
    from torch.autograd import DeviceType
    from torch.profiler import ProfilerActivity, profile

    if iters < 1:
        raise MeasurementError(f"need iters >= 1 to profile, got {iters}")
    device = torch.device(device)
    cuda = device.type == "cuda"
    activities = [ProfilerActivity.CPU] + ([ProfilerActivity.CUDA] if cuda else [])
    synchronize(device)
    with profile(activities=activities) as prof:
        for _ in range(iters):
            fn()
        synchronize(device)
    events = prof.key_averages()
    if cuda:
        timed = [(e.key, e.self_device_time_total, e.count) for e in events if e.device_type == DeviceType.CUDA]
        if not timed:  # kernels folded into their operators
            timed = [(e.key, e.self_device_time_total, e.count) for e in events if e.self_device_time_total > 0]
    else:
        timed = [(e.key, e.self_cpu_time_total, e.count) for e in events
                 if e.self_cpu_time_total > 0 and not e.key.startswith(("ProfilerStep", "[memory]"))]
    total_us = sum(t for _, t, _ in timed)
    if total_us <= 0:
        raise MeasurementError("the profiler recorded no timed kernels or operators")
    categories: dict[str, float] = {}
    for name, t, _ in timed:
        category = profile_category(name)
        categories[category] = categories.get(category, 0.0) + t
    ms_per_iter = total_us / 1e3 / iters
    busy = ms_per_iter / 1e3 / seconds_per_iter if cuda and seconds_per_iter else None
    return {
        "iters": iters, "time_kind": "GPU kernel time" if cuda else "CPU operator self time (all threads)",
        "ms_per_iter": ms_per_iter, "busy_fraction": busy,
        "categories": {k: v / total_us for k, v in sorted(categories.items(), key=lambda kv: -kv[1])},
        "top": [{"name": name, "share": t / total_us, "ms_per_iter": t / 1e3 / iters, "calls_per_iter": n / iters}
                for name, t, n in sorted(timed, key=lambda x: -x[1])[:top]],
    }


class PeakMemory:
    """Peak memory since `reset()`: CUDA `max_memory_allocated`, or on a Linux CPU the process's peak resident
    set (VmHWM, reset through /proc/self/clear_refs). `peak_gib()` is None where neither is available."""

    def __init__(self, device: torch.device | str):
        self.device = torch.device(device)
        self.kind = "cuda_max_allocated" if self.device.type == "cuda" else "cpu_peak_rss"

    def reset(self) -> None:
        if self.device.type == "cuda":
            torch.cuda.reset_peak_memory_stats(self.device)
            return
        try:
            Path("/proc/self/clear_refs").write_text("5")
        except OSError:
            self.kind = "unavailable"

    def peak_gib(self) -> Optional[float]:
        if self.device.type == "cuda":
            return torch.cuda.max_memory_allocated(self.device) / GIB
        try:
            for line in Path("/proc/self/status").read_text().splitlines():
                if line.startswith("VmHWM:"):
                    return int(line.split()[1]) * 1024 / GIB  # the kernel reports kB
        except OSError:
            pass
        return None


def free_device_memory(device: torch.device | str) -> None:
    """Drop compiled graphs and cached blocks between measurements so one does not inherit the other's memory."""
    torch._dynamo.reset()
    gc.collect()
    if torch.device(device).type == "cuda":
        torch.cuda.empty_cache()


def matmul_peak_tflops(device: torch.device | str, dtype: torch.dtype = torch.bfloat16,
                       sizes: Optional[Sequence[int]] = None, seconds: float = 0.25) -> float:
    """Best achieved TFLOP/s of square n x n x n matrix multiplies in `dtype` over `sizes`: the denominator of MFU,
    measured in the same run rather than read from a datasheet. Sizes default to 4096 and 8192 on CUDA (8192
    saturates H100/H200 tensor cores) and 256 and 512 on the CPU (a CPU without native bf16 emulates it at about
    1 GFLOP/s: one 2048-cube product takes 20 s there, and a CPU 'MFU' is only a sanity figure)."""
    device = torch.device(device)
    sizes = tuple(sizes) if sizes else ((4096, 8192) if device.type == "cuda" else (256, 512))
    return max(_matmul_tflops(device, dtype, n, seconds) for n in sizes)


def _matmul_tflops(device: torch.device, dtype: torch.dtype, n: int, seconds: float) -> float:
    gen = torch.Generator(device=device).manual_seed(0)
    a = torch.randn(n, n, device=device, dtype=dtype, generator=gen)
    b = torch.randn(n, n, device=device, dtype=dtype, generator=gen)
    for _ in range(2):
        torch.mm(a, b)
    synchronize(device)
    iters, t0 = 0, time.perf_counter()
    while True:
        torch.mm(a, b)
        iters += 1
        if iters % 4 == 0:
            synchronize(device)
            if time.perf_counter() - t0 >= seconds:
                break
    dt = time.perf_counter() - t0
    return 2.0 * n ** 3 * iters / dt / 1e12


# ---------------------------------------------------------------------------------------------- one path

def release_memory(device: torch.device) -> None:
    """Free what a failed measurement left (its tensors, cached device blocks) before the next one."""
    gc.collect()
    if device.type == "cuda":
        torch.cuda.empty_cache()


def error_line(exc: BaseException) -> str:
    """An exception as one line for a result's `error`: its type and first message line."""
    first_line = str(exc).splitlines()[0] if str(exc) else ""
    return f"{type(exc).__name__}: {first_line}"[:300]


def spread_of(rates: Sequence[float]) -> float:
    """(max - min) / median of repeated rates: 0 when they agree; above NOISE_THRESHOLD the path is noisy."""
    middle = statistics.median(rates)
    return (max(rates) - min(rates)) / middle if middle > 0 else float("inf")


def measure(step: Callable[[], Any], device: torch.device, warmup: int, iters: int, images_per_call: float,
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
        result["error"] = error_line(exc)
    if result["error"] is not None:
        # outside the except block, the traceback (and the failed step's tensors) is gone: free the memory
        # before the next path is measured
        release_memory(device)
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
            result["profile_error"] = error_line(exc)
    return result
