"""Helpers for tests that run the real pipeline in subprocesses inside a temporary folder."""
from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]


def env() -> dict[str, str]:
    e = dict(os.environ)
    e.update({"DVC_NO_ANALYTICS": "1", "HF_HUB_OFFLINE": "1", "TRANSFORMERS_OFFLINE": "1", "MPLBACKEND": "Agg",
              "PYTHONPATH": str(REPO) + os.pathsep + e.get("PYTHONPATH", ""), "PYTHONUNBUFFERED": "1"})
    return e


def paths_overrides(tmp: Path) -> list[str]:
    return [f"runs_root={tmp / 'runs'}", f"reports_dir={tmp / 'reports'}", f"data_root={tmp / 'data'}",
            "progress=false"]


def run_module(module: str, overrides: list[str], cwd: Path | None = None, timeout: float = 600,
               check: bool = True) -> subprocess.CompletedProcess:
    cmd = [sys.executable, "-m", module, *overrides]
    proc = subprocess.run(cmd, cwd=cwd or REPO, env=env(), capture_output=True, text=True, timeout=timeout)
    if check and proc.returncode != 0:
        raise AssertionError(f"{' '.join(cmd)} failed ({proc.returncode}):\n{proc.stdout[-4000:]}\n{proc.stderr[-6000:]}")
    return proc


def read_jsonl(path: Path) -> list[dict]:
    return [json.loads(line) for line in path.read_text().splitlines() if line.strip()]
