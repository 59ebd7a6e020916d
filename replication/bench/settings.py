"""What one benchmark run measures and how often: the rows, the batches, the iteration counts and the fast path."""
from __future__ import annotations

import dataclasses
from dataclasses import dataclass
from typing import Any

import torch

from replication.perf import FastPath

ROWS = ("train", "sample", "decode", "encode", "features")
SCHEMA_VERSION = 1
# Paper Tab. 1: sampling throughput is quoted for 200 DDIM steps.
SAMPLE_QUOTE_STEPS = 200
# A path whose repeated timings span more than this fraction of their median ((max - min) / median) is flagged noisy.
NOISE_THRESHOLD = 0.2
DEFAULT_REPEATS = 3


class BenchError(ValueError):
    """Bad benchmark arguments; the message names the offending value."""


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


def default_counts(device: torch.device) -> dict[str, int]:
    """Iteration counts and side batches: short on the CPU (tiny shapes), enough for steady state on a GPU."""
    if device.type == "cuda":
        return {"iters": 5, "warmup": 2, "sample_steps": 10, "ae_batch": 16, "feature_batch": 100,
                "repeats": DEFAULT_REPEATS}
    return {"iters": 3, "warmup": 1, "sample_steps": 2, "ae_batch": 4, "feature_batch": 8, "repeats": DEFAULT_REPEATS}


def settings_dict(s: BenchSettings) -> dict[str, Any]:
    """The settings as the result JSON records them (enough to regenerate the run)."""
    d = dataclasses.asdict(s)
    d["device"] = str(s.device)
    d["fast"] = s.fast.describe()
    d["rows"] = list(s.rows)
    return d
