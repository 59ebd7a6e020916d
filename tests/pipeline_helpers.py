"""Helpers for tests that run the real pipeline in subprocesses inside a temporary folder."""
from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

from replication.reliability import REPO, child_env as env, paths_overrides  # noqa: F401 (re-exported for tests)


def run_module(module: str, overrides: list[str], cwd: Path | None = None, timeout: float = 600,
               check: bool = True) -> subprocess.CompletedProcess:
    cmd = [sys.executable, "-m", module, *overrides]
    proc = subprocess.run(cmd, cwd=cwd or REPO, env=env(), capture_output=True, text=True, timeout=timeout)
    if check and proc.returncode != 0:
        raise AssertionError(f"{' '.join(cmd)} failed ({proc.returncode}):\n{proc.stdout[-4000:]}\n{proc.stderr[-6000:]}")
    return proc


def read_jsonl(path: Path) -> list[dict]:
    return [json.loads(line) for line in path.read_text().splitlines() if line.strip()]
