# Speed levers for training and sampling, decided in one place: bf16 autocast, channels_last, torch.compile and
# fused AdamW. The levers compute the same function within stated bounds (tests/test_numerics.py); how fast they
# are is measured by replication/bench.
"""Fast paths.

`FastPath` holds the switches {bf16, channels_last, compile, fused_adam}; `prepare_module`, `compile_call`,
`make_adamw`, `autocast`, `to_memory_format` and `FastForward` apply them, and the training step
(training/step.py), the sampler and the benchmark all go through them:
- bf16: `torch.autocast(bfloat16)` around the forward, fp32 master weights and optimizer state;
- channels_last: module and 4-D inputs in NHWC memory format (cuDNN's fast conv layout);
- compile: `torch.compile(module)` (the original module keeps the parameters, the state_dict is unchanged);
- fused_adam: `torch.optim.AdamW(fused=True)`: one kernel for the whole update.
"""
from __future__ import annotations

import dataclasses
from contextlib import contextmanager, nullcontext
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Callable, ContextManager, Iterable, Iterator, Optional, TypeVar

import torch
from torch import nn

from replication.config import ConfigError, check_compile_mode

LEVERS = ("bf16", "channels_last", "compile", "fused_adam")
F = TypeVar("F", bound=Callable[..., Any])


class PerfError(ValueError):
    """A fast-path specification is invalid; the message names the offending value."""


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
    return compile_call(module, fast)


def compile_call(fn: F, fast: FastPath) -> F:
    """`fn` (a module, a wrapper such as DistributedDataParallel, or a bound method) compiled in the lever's mode,
    or `fn` itself without the compile lever."""
    if fast.compile:
        return torch.compile(fn, mode=fast.compile_mode)  # type: ignore[return-value]
    return fn


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
            self.call = compile_call(getattr(module, method), fast)

    def __call__(self, x: torch.Tensor, *args: Any, **kwargs: Any) -> Any:
        with autocast(self.fast, self.device):
            out = self.call(to_memory_format(x, self.fast), *args, **kwargs)
        if isinstance(out, torch.Tensor) and out.is_floating_point():
            out = out.float().contiguous()
            if self.fast.compile and "reduce-overhead" in (self.fast.compile_mode or ""):
                out = out.clone()  # CUDA-graph outputs are overwritten by the next replay (PLMS keeps old eps)
        return out


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
