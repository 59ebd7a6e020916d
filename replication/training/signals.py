"""Preemption: clusters send SIGTERM (or SIGINT) before killing a job. The loop checks the flag after each
step, writes a full-state checkpoint and exits, so nothing but the current step is lost."""
from __future__ import annotations

import logging
import os
import signal
import sys
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


def _signal_name(signum: int | None) -> str:
    try:
        return signal.Signals(signum).name if signum is not None else "a stop request from another process"
    except ValueError:
        return f"signal {signum}"


def _logger_reaches_stderr(logger: logging.Logger) -> bool:
    """Whether a console handler of `logger` or of its ancestors writes to this process's stderr."""
    current: logging.Logger | None = logger
    while current is not None:
        for handler in current.handlers:
            stream = getattr(handler, "stream", None)
            if not isinstance(handler, logging.FileHandler) and stream is not None and stream in (sys.stderr,
                                                                                                   sys.__stderr__):
                return True
        current = current.parent if current.propagate else None
    return False


def preempted_message(what: str, signum: int | None, step: int, path: str | os.PathLike) -> str:
    return (f"{what} stopped by {_signal_name(signum)} at step {step}: the full training state is saved in {path}; "
            "rerun the same command to resume from that step")


def announce_preempted(what: str, signum: int | None, step: int, path: str | os.PathLike,
                       logger: logging.Logger | None = None) -> str:
    """Say where the state of a stopped training run was saved and how to resume: a warning on the `replication`
    logger (the stage's log.txt, and Hydra's console) and one line on stderr (unless a handler already writes
    the log there), so that an interrupted run never ends without a word. Returns the message."""
    logger = logger or logging.getLogger("replication")
    message = preempted_message(what, signum, step, path)
    logger.warning("%s", message)
    if not _logger_reaches_stderr(logger):
        print(message, file=sys.stderr, flush=True)
    return message
