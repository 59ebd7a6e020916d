# Speed levers for training and sampling, and the tools that measure them: FLOP counting with
# torch.utils.flop_counter, a bf16 matrix-multiply peak measured in the same process, timing with warm-up and
# device synchronisation, and peak memory. The levers compute the same function within stated bounds
# (tests/test_numerics.py).
"""Fast paths, and how fast they are.

`FastPath` holds the switches {bf16, channels_last, compile, fused_adam}; `prepare_module`, `make_adamw`,
`autocast` and `FastForward` apply them the same way the training loop and the sampler do:
- bf16: `torch.autocast(bfloat16)` around the forward, fp32 master weights and optimizer state;
- channels_last: module and 4-D inputs in NHWC memory format (cuDNN's fast conv layout);
- compile: `torch.compile(module)` (the original module keeps the parameters, the state_dict is unchanged);
- fused_adam: `torch.optim.AdamW(fused=True)`: one kernel for the whole update.
"""
from __future__ import annotations

import dataclasses
import math
import re
import time
from contextlib import contextmanager, nullcontext
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Callable, ContextManager, Iterable, Iterator, Optional, Sequence

import torch
from torch import nn

from replication.config import ConfigError, check_compile_mode

LEVERS = ("bf16", "channels_last", "compile", "fused_adam")
GIB = 2 ** 30


class PerfError(ValueError):
    """A fast-path specification or measurement request is invalid; the message names the offending value."""


@dataclass(frozen=True)
class FastPath:
    """Which speed levers are on. All off is the eager fp32 baseline."""

    bf16: bool = False
    channels_last: bool = False
    compile: bool = False
    fused_adam: bool = False
    compile_mode: Optional[str] = None  # torch.compile mode; None is inductor's default (no autotuning)

    @classmethod
    def eager_fp32(cls) -> "FastPath":
        return cls()

    @classmethod
    def for_device(cls, device: torch.device | str) -> "FastPath":
        """Levers on by default where they help: every lever on CUDA (bf16 where the card supports it);
        on the CPU channels_last, fused AdamW, and bf16 only with native bf16 matmul units (AMX / AVX512-BF16)."""
        device = torch.device(device)
        if device.type == "cuda":
            return cls(bf16=torch.cuda.is_bf16_supported(), channels_last=True, compile=True, fused_adam=True)
        return cls(bf16=cpu_has_native_bf16(), channels_last=True, compile=False, fused_adam=True)

    @classmethod
    def from_trainer(cls, trainer: Any) -> "FastPath":
        """The levers of a typed TrainerConfig (precision bf16, compile and its mode, channels_last, fused_adam)."""
        precision = getattr(trainer.precision, "value", trainer.precision)
        return cls(bf16=precision == "bf16", channels_last=bool(trainer.channels_last), compile=bool(trainer.compile),
                   fused_adam=bool(trainer.fused_adam), compile_mode=trainer.compile_mode if trainer.compile else None)

    @classmethod
    def parse(cls, spec: str) -> "FastPath":
        """'bf16,channels_last,compile,fused_adam' (any subset), 'all', or 'none'. 'compile:MODE' sets the mode."""
        spec = spec.strip()
        if spec in ("", "none"):
            return cls()
        names = list(LEVERS) if spec == "all" else [s.strip() for s in spec.split(",") if s.strip()]
        values: dict[str, Any] = {}
        for name in names:
            if name.startswith("compile:"):
                name, values["compile_mode"] = "compile", name.split(":", 1)[1]
                try:
                    check_compile_mode(values["compile_mode"], f"the mode in {spec!r}")
                except ConfigError as exc:
                    raise PerfError(str(exc)) from None
            if name not in LEVERS:
                raise PerfError(f"unknown speed lever {name!r} in {spec!r}; "
                                f"allowed: {', '.join(LEVERS)}, 'all', 'none'")
            values[name] = True
        return cls(**values)

    def levers(self) -> list[str]:
        return [name for name in LEVERS if getattr(self, name)]

    def describe(self) -> str:
        names = self.levers()
        if self.compile and self.compile_mode:
            names[names.index("compile")] = f"compile:{self.compile_mode}"
        return "+".join(names) if names else "eager fp32"

    def only(self, *names: str) -> "FastPath":
        """A copy keeping only the named levers (e.g. no fused_adam when there is no optimizer)."""
        unknown = [n for n in names if n not in LEVERS]
        if unknown:
            raise PerfError(f"unknown speed lever(s) {unknown}; allowed: {', '.join(LEVERS)}")
        return dataclasses.replace(self, **{n: getattr(self, n) and n in names for n in LEVERS})


def cpu_has_native_bf16() -> bool:
    """True where the CPU advertises bf16 matrix units (Linux /proc/cpuinfo flags amx_bf16 or avx512_bf16)."""
    try:
        flags = Path("/proc/cpuinfo").read_text()
    except OSError:
        return False
    return "amx_bf16" in flags or "avx512_bf16" in flags


# ---------------------------------------------------------------------------------------------- applying levers

def autocast(fast: FastPath, device: torch.device | str) -> ContextManager:
    """bf16 autocast for the forward (weights stay fp32), or a no-op."""
    device = torch.device(device)
    return torch.autocast(device_type=device.type, dtype=torch.bfloat16) if fast.bf16 else nullcontext()


def to_memory_format(x: torch.Tensor, fast: FastPath) -> torch.Tensor:
    """4-D tensors in channels_last when that lever is on; anything else unchanged."""
    if fast.channels_last and x.dim() == 4:
        return x.contiguous(memory_format=torch.channels_last)
    return x


def prepare_module(module: nn.Module, fast: FastPath, device: torch.device | str) -> nn.Module:
    """Move `module` to `device` (in place) in the lever's memory format; return what to call: the module or
    its compiled wrapper. Parameters and state_dict keys stay those of `module`."""
    module = module.to(device)
    if fast.channels_last:
        module = module.to(memory_format=torch.channels_last)
    if fast.compile:
        return torch.compile(module, mode=fast.compile_mode)  # type: ignore[return-value]
    return module


def make_adamw(params: Iterable[nn.Parameter], fast: FastPath, device: torch.device | str, lr: float,
               betas: tuple[float, float] = (0.9, 0.999), weight_decay: float = 0.01) -> torch.optim.AdamW:
    """AdamW as the original (torch defaults: betas 0.9/0.999, weight decay 0.01); one fused kernel with fused_adam."""
    device = torch.device(device)
    extra = {"fused": True} if fast.fused_adam and device.type in ("cuda", "cpu") else {}
    return torch.optim.AdamW(params, lr=lr, betas=tuple(betas), weight_decay=weight_decay, **extra)


class FastForward:
    """`module.<method>(x, ...)` with the levers applied: channels_last input, bf16 autocast, compiled call.
    Tensor outputs come back as float32 in the default (contiguous) layout, the same tensor type eager fp32
    gives. For sampling, wrap the U-Net once and pass `lambda x, t: fast_forward(x, t)` to the sampler;
    `method="decode"` wraps a first stage's decoder the same way."""

    def __init__(self, module: nn.Module, fast: FastPath, device: torch.device | str, method: str = "forward"):
        self.module, self.fast, self.device = module, fast, torch.device(device)
        if method == "forward":
            self.call = prepare_module(module, fast, self.device)
        else:
            if not callable(getattr(module, method, None)):
                raise PerfError(f"{type(module).__name__} has no method {method!r}")
            prepare_module(module, dataclasses.replace(fast, compile=False), self.device)
            bound = getattr(module, method)
            self.call = torch.compile(bound, mode=fast.compile_mode) if fast.compile else bound

    def __call__(self, x: torch.Tensor, *args: Any, **kwargs: Any) -> Any:
        with autocast(self.fast, self.device):
            out = self.call(to_memory_format(x, self.fast), *args, **kwargs)
        if isinstance(out, torch.Tensor) and out.is_floating_point():
            out = out.float().contiguous()
            if self.fast.compile and "reduce-overhead" in (self.fast.compile_mode or ""):
                out = out.clone()  # CUDA-graph outputs are overwritten by the next replay (PLMS keeps old eps)
        return out


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
        raise PerfError(f"cannot compare shapes {tuple(value.shape)} and {tuple(reference.shape)}")
    ref = reference.detach().double().cpu()
    diff = value.detach().double().cpu() - ref
    denom = ref.norm().item()
    if denom == 0.0:
        raise PerfError("reference tensor is all zeros: relative error is undefined (use nonzero_init_)")
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
        raise PerfError(f"need iters >= 1 and warmup >= 0, got iters={iters}, warmup={warmup}")
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
        raise PerfError(f"need iters >= 1 to profile, got {iters}")
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
        raise PerfError("the profiler recorded no timed kernels or operators")
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
    import gc

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


@contextmanager
def cuda_flags(benchmark: bool = True) -> Iterator[dict[str, Any]]:
    """cuDNN autotuning on for both the baseline and the fast path (so the speed-up is the levers' alone);
    yields the precision flags in force, recorded with every benchmark."""
    old = torch.backends.cudnn.benchmark
    torch.backends.cudnn.benchmark = benchmark
    try:
        yield {"cudnn_benchmark": benchmark, "cudnn_allow_tf32": torch.backends.cudnn.allow_tf32,
               "matmul_allow_tf32": torch.backends.cuda.matmul.allow_tf32}
    finally:
        torch.backends.cudnn.benchmark = old
