"""Where a stage's result came from, written beside it as manifest.json: the git commit of the code, the package
versions, the device, the process count, the seeds, the input and output files with their hashes, the config
subset the stage depends on and the command line."""
from __future__ import annotations

import datetime as _dt
import importlib.metadata
import os
import platform
import subprocess
import sys
from pathlib import Path
from typing import Any

import torch

from replication.stages.context import StageContext
from replication.stages.fingerprint import STAGE_DEPS, config_value
from replication.utils.io import atomic_write_json

REPO_ROOT = Path(__file__).resolve().parents[2]
MANIFEST_FILE = "manifest.json"
PACKAGES = ("torch", "torchvision", "numpy", "hydra-core", "omegaconf", "dvc", "torch-fidelity", "lpips",
            "safetensors", "pandas", "matplotlib", "replication")


def git_commit() -> str | None:
    """The checked-out commit of this repository, with "-dirty" when tracked files differ from it; None outside
    a git checkout."""
    try:
        out = subprocess.run(["git", "rev-parse", "HEAD"], cwd=REPO_ROOT, capture_output=True, text=True, timeout=10)
        dirty = subprocess.run(["git", "status", "--porcelain", "--untracked-files=no"], cwd=REPO_ROOT,
                               capture_output=True, text=True, timeout=10)
    except (OSError, subprocess.SubprocessError):
        return None
    if out.returncode != 0:
        return None
    return out.stdout.strip() + ("-dirty" if dirty.stdout.strip() else "")


def package_versions() -> dict[str, str | None]:
    versions: dict[str, str | None] = {}
    for pkg in PACKAGES:
        try:
            versions[pkg] = importlib.metadata.version(pkg)
        except importlib.metadata.PackageNotFoundError:
            versions[pkg] = None
    return versions


def device_info(device: torch.device) -> dict[str, Any]:
    info: dict[str, Any] = {"device": str(device), "platform": platform.platform(), "python": sys.version.split()[0],
                            "cpu_count": os.cpu_count(), "torch_threads": torch.get_num_threads()}
    if device.type == "cuda":
        info["gpu"] = torch.cuda.get_device_name(device)
        info["cuda"] = torch.version.cuda
    return info


def write_manifest(ctx: StageContext, seconds: float, processes: int, outputs: list[str],
                   files: dict[str, Any]) -> None:
    """The manifest of the stage `ctx` ran: `outputs` and their records `files` (utils.verify.content_records)."""
    root = ctx.root
    manifest = {
        "stage": ctx.name,
        "experiment": root.name,
        "finished": _dt.datetime.now(_dt.timezone.utc).isoformat(),
        "seconds": round(seconds, 3),
        "git_commit": git_commit(),
        "packages": package_versions(),
        "device": device_info(ctx.device),
        "processes": processes,
        "seeds": {"seed": root.seed, "sampler_seed": config_value(ctx.cfg, "sampler.seed")},
        "inputs": ctx.inputs,
        "outputs": outputs,
        "config_choices": dict(root.choices),
        "config": {k: config_value(ctx.cfg, k) for k in STAGE_DEPS[ctx.name][0]},
        "argv": sys.argv,
        "outputs_sha256": {path: rec["sha256"] for path, rec in files.items()},
    }
    atomic_write_json(ctx.stage_dir / MANIFEST_FILE, manifest)
