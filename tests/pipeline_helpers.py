"""Helpers for tests that run the real pipeline in subprocesses inside a temporary folder."""
from __future__ import annotations

import json
import shutil
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


def git_copy_of_repo(dest: Path) -> Path:
    """The repository's tracked and untracked-but-not-ignored files (without runs/ and tests/) copied to `dest` and
    committed there, so `dvc repro` runs in a tree of its own."""
    dest.mkdir(parents=True)
    files = subprocess.run(["git", "ls-files", "-co", "--exclude-standard"], cwd=REPO, capture_output=True,
                           text=True, check=True).stdout.split()
    for rel in files:
        src = REPO / rel
        if src.is_file() and not rel.startswith(("runs/", "tests/")):
            (dest / rel).parent.mkdir(parents=True, exist_ok=True)
            shutil.copy2(src, dest / rel)
    e = env()
    subprocess.run(["git", "init", "-q"], cwd=dest, check=True, env=e)
    subprocess.run(["git", "add", "-A"], cwd=dest, check=True, env=e)
    subprocess.run(["git", "-c", "user.name=t", "-c", "user.email=t@t", "commit", "-qm", "copy"], cwd=dest, check=True,
                   env=e)
    return dest
