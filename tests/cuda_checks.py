"""Helper of the CUDA-only tests: a window of a loop's steps in which any host-device sync raises."""
from __future__ import annotations

from typing import Any, Callable

import torch


class SyncCheckedSteps:
    """Wraps a function a loop calls once per step (a training loop's data function, a sampler's callback). From
    its `start`-th call (after a full synchronize, so the earlier steps' work is done) until its `stop`-th call,
    torch.cuda's sync debug mode is "error": any host-device sync in those steps raises where it happens. As a
    context manager it resets the mode on exit, also when a sync raised. `calls` counts the calls."""

    def __init__(self, fn: Callable[..., Any], start: int = 2, stop: int = 5):
        self.fn, self.start, self.stop, self.calls = fn, start, stop, 0

    def __call__(self, *args: Any) -> Any:
        self.calls += 1
        if self.calls == self.start:
            torch.cuda.synchronize()
            torch.cuda.set_sync_debug_mode("error")
        elif self.calls == self.stop:
            torch.cuda.set_sync_debug_mode("default")
        return self.fn(*args)

    def __enter__(self) -> "SyncCheckedSteps":
        return self

    def __exit__(self, *exc: Any) -> None:
        torch.cuda.set_sync_debug_mode("default")
