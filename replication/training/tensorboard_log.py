"""Training curves as TensorBoard event files, beside the stage's stats.jsonl (which stays the source of truth).

Written when the `tensorboard` package is importable (`pip install -e ".[tensorboard]"`); otherwise skipped with
one log line that says how to enable it. Only the process that writes stats (rank 0) writes curves.

    tensorboard --logdir runs/          # every run's train_autoencoder/ and train_ldm/ curves
"""
from __future__ import annotations

import logging
import math
from pathlib import Path
from typing import Any, Optional

log = logging.getLogger("replication")

ENABLE_HINT = 'pip install -e ".[tensorboard]" (or pip install tensorboard) to also write them'


def tensorboard_available() -> bool:
    try:
        import tensorboard  # noqa: F401
        from torch.utils.tensorboard import SummaryWriter  # noqa: F401
    except ImportError:
        return False
    return True


class TrainingCurves:
    """`add(step, prefix, values)` writes each finite number of `values` as the scalar `<prefix>/<key>` at `step`
    into event files in `log_dir`; a no-op when TensorBoard is not installed (one log line says so)."""

    def __init__(self, log_dir: Path, what: str, enabled: bool = True, flush_secs: int = 30) -> None:
        self.log_dir = Path(log_dir)
        self.writer: Optional[Any] = None
        if not enabled:
            return
        if not tensorboard_available():
            log.info("%s: TensorBoard curves skipped (the tensorboard package is not installed); %s in %s, beside "
                     "stats.jsonl", what, ENABLE_HINT, self.log_dir)
            return
        from torch.utils.tensorboard import SummaryWriter

        self.log_dir.mkdir(parents=True, exist_ok=True)
        self.writer = SummaryWriter(log_dir=str(self.log_dir), flush_secs=flush_secs)
        log.info("%s: TensorBoard curves in %s (tensorboard --logdir %s)", what, self.log_dir, self.log_dir)

    @property
    def enabled(self) -> bool:
        return self.writer is not None

    def add(self, step: int, prefix: str, values: dict[str, Any]) -> None:
        if self.writer is None:
            return
        for key, value in values.items():
            if isinstance(value, bool) or not isinstance(value, (int, float)):
                continue
            if math.isfinite(float(value)):
                self.writer.add_scalar(f"{prefix}/{key}", float(value), global_step=step)

    def flush(self) -> None:
        if self.writer is not None:
            self.writer.flush()

    def close(self) -> None:
        if self.writer is not None:
            self.writer.close()
            self.writer = None
