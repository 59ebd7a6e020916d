"""Per-step training losses read back one step late, so that the training loop never waits for the GPU.

Reading a loss (`.item()`, `.tolist()`) right after a step's work is queued waits until the GPU has finished
that step: the GPU then idles while the host prepares and launches the next one. Instead, the loop hands each
step's losses to `push`, which starts an asynchronous copy to pinned host memory and returns the losses of the
step before, whose copy has finished by the time the GPU is busy with the current step. `flush` waits for the
last copy; the loop calls it before anything is written (checkpoint, Fig. 6 snapshot) and at the end, so a
non-finite loss is still caught before it can reach a file. On the CPU the values are at hand at once.
"""
from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any, Optional

import torch


@dataclass
class StepLosses:
    step: int
    values: list[float]
    meta: dict[str, Any] = field(default_factory=dict)  # what the loop logs with the step (LR, epoch), as of push


class DeferredLossReader:
    def __init__(self) -> None:
        self._pending: Optional[tuple[int, torch.Tensor, Optional[Any], dict[str, Any]]] = None

    def push(self, step: int, losses: torch.Tensor, **meta: Any) -> list[StepLosses]:
        """Start reading `step`'s losses (a 1-D tensor); return the steps read completely by now (the one before)."""
        done = self.flush()
        losses = losses.detach()
        if losses.device.type == "cuda":
            host = torch.empty(losses.shape, dtype=losses.dtype, pin_memory=True)
            host.copy_(losses, non_blocking=True)
            event = torch.cuda.Event()
            event.record()
            self._pending = (step, host, event, meta)
        else:
            self._pending = (step, losses, None, meta)
        return done

    def flush(self) -> list[StepLosses]:
        """Wait for the step being read, if any, and return it."""
        if self._pending is None:
            return []
        step, host, event, meta = self._pending
        self._pending = None
        if event is not None:
            event.synchronize()
        return [StepLosses(step, [float(v) for v in host.tolist()], meta)]
