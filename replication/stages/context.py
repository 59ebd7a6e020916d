"""What a stage body works with: its `StageContext` (config, run folder, device, stats), the one-line
`StageError` a stage stops with, and where a run's folder is."""
from __future__ import annotations

import os
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch
from omegaconf import DictConfig

from replication.config import RootConfig, TypedConfig
from replication.utils.io import append_jsonl, sha256_file
from replication.utils.paths import contained


class StageError(RuntimeError):
    """A stage cannot run: a missing input, a failed check; the message says what to do."""


@dataclass
class StageContext:
    name: str
    cfg: DictConfig
    typed: TypedConfig
    run_dir: Path
    stage_dir: Path
    device: torch.device
    progress: bool
    inputs: dict[str, str] = field(default_factory=dict)  # path -> sha256, recorded in the manifest
    is_main: bool = True  # rank 0 (or the only process): the one that writes stats, manifest and done.json

    @property
    def root(self) -> RootConfig:
        return self.typed.root

    def stats(self, **record: Any) -> None:
        """Append one record to the stage's append-only stats.jsonl (rank 0 only under torchrun/srun)."""
        if not self.is_main:
            return
        record.setdefault("time", time.time())
        append_jsonl(self.stage_dir / "stats.jsonl", record)

    def stage_path(self, stage: str) -> Path:
        return self.run_dir / stage

    def record_input(self, path: str | os.PathLike) -> None:
        path = Path(path)
        if path.is_file():
            self.inputs[str(path)] = sha256_file(path)


def seed_everything(seed: int) -> None:
    import random

    import numpy as np

    random.seed(seed)
    np.random.seed(seed % (1 << 32))
    torch.manual_seed(seed)


def resolve_device(spec: str) -> torch.device:
    if spec == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    device = torch.device(spec)
    if device.type == "cuda" and not torch.cuda.is_available():
        raise StageError(f"device '{spec}' requested but CUDA is not available; use device=cpu or device=auto")
    return device


def run_dir_for(cfg: DictConfig) -> Path:
    """`<runs_root>/<name>`; a name that would lead outside the runs root stops with a one-line error."""
    contained(cfg.runs_root, cfg.name, what="run folder")
    return Path(cfg.runs_root) / cfg.name
