"""Where a benchmark ran: the device and its name, the software versions and the code's commit (`git_commit`, the
stages' own helper), recorded with every result so that two runs are compared knowing what differed."""
from __future__ import annotations

import os
import platform
import re
from pathlib import Path
from typing import Any

import torch

from replication.bench.settings import BenchError
from replication.stages.provenance import git_commit  # the commit the stages record in their manifests


def device_name(device: torch.device) -> str:
    if device.type == "cuda":
        return torch.cuda.get_device_name(device)
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                return "CPU " + line.split(":", 1)[1].strip()
    except OSError:
        pass
    return "CPU " + (platform.processor() or platform.machine())


def slug(text: str) -> str:
    return re.sub(r"[^a-z0-9]+", "-", text.lower()).strip("-")


def device_slug(device: torch.device) -> str:
    return slug(device_name(device)) if device.type == "cuda" else "cpu"


def environment(device: torch.device) -> dict[str, Any]:
    info: dict[str, Any] = {"type": device.type, "name": device_name(device), "torch": torch.__version__,
                            "python": platform.python_version(), "threads": torch.get_num_threads(),
                            "cpu_count": os.cpu_count()}
    if device.type == "cuda":
        props = torch.cuda.get_device_properties(device)
        info.update(cuda=torch.version.cuda, memory_gib=props.total_memory / 2 ** 30,
                    multiprocessors=props.multi_processor_count)
    return info


def resolve_device(spec: str) -> torch.device:
    """The stages' device rule ("auto" = CUDA when present), with the error phrased for the --device flag."""
    from replication.stages.context import StageError
    from replication.stages.context import resolve_device as resolve_stage_device

    try:
        return resolve_stage_device(spec)
    except StageError as exc:
        raise BenchError(f"--device {spec!r}: {exc}") from None
