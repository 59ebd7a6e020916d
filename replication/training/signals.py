"""Preemption: clusters send SIGTERM (or SIGINT) before killing a job. The loop checks the flag after each
step, writes a full-state checkpoint and exits, so nothing but the current step is lost."""
from __future__ import annotations

import signal
from types import FrameType


class StopRequested:
    def __init__(self) -> None:
        self.signum: int | None = None
        self._previous: dict[int, object] = {}

    def __enter__(self) -> "StopRequested":
        for sig in (signal.SIGTERM, signal.SIGINT):
            try:
                self._previous[sig] = signal.signal(sig, self._handle)
            except ValueError:  # not the main thread: signals cannot be caught here
                pass
        return self

    def _handle(self, signum: int, frame: FrameType | None) -> None:
        self.signum = signum

    def __bool__(self) -> bool:
        return self.signum is not None

    def __exit__(self, *exc: object) -> None:
        for sig, handler in self._previous.items():
            signal.signal(sig, handler)  # type: ignore[arg-type]


class Preempted(SystemExit):
    """Raised after the checkpoint on a signal was written; exit code 128 + signal number."""

    def __init__(self, signum: int, step: int, path: str):
        super().__init__(128 + signum)
        self.signum, self.step, self.path = signum, step, path


class TrainingDiverged(RuntimeError):
    """The loss became NaN or Inf; the last good checkpoint is kept untouched."""
