"""One writer per folder: an exclusive lock file held for as long as a stage writes there.

The lock is an `fcntl.flock` on `<folder>/.lock`: the kernel releases it when its process ends in any way
(SIGKILL included), so the lock of a dead process is taken over safely and there is nothing stale to clean up.
The file also says who holds it (host, process id, stage, since when) so that a second run is told exactly that.
Locks are re-entrant within a process: `python -m replication.run` holds a run's lock across its stages.
"""
from __future__ import annotations

import datetime as _dt
import fcntl
import json
import os
import socket
from contextlib import contextmanager
from pathlib import Path
from typing import Iterator

LOCK_NAME = ".lock"


class FolderBusy(RuntimeError):
    """Another process holds the folder's lock."""


_held: dict[str, tuple[int, int]] = {}  # resolved folder -> (fd, depth)


def _holder(path: Path) -> str:
    try:
        info = json.loads(path.read_text() or "{}")
    except (OSError, ValueError):
        return "another process"
    return (f"process {info.get('pid')} on host {info.get('host')} (stage {info.get('stage')}, since "
            f"{info.get('since')})")


@contextmanager
def folder_lock(folder: str | os.PathLike, what: str) -> Iterator[None]:
    """Hold `folder`'s lock for the duration; raise FolderBusy at once (no waiting) if another process holds it."""
    folder = Path(folder)
    folder.mkdir(parents=True, exist_ok=True)
    key = str(folder.resolve())
    if key in _held:
        fd, depth = _held[key]
        _held[key] = (fd, depth + 1)
        try:
            yield
        finally:
            fd, depth = _held[key]
            _held[key] = (fd, depth - 1)
        return
    path = folder / LOCK_NAME
    fd = os.open(path, os.O_RDWR | os.O_CREAT, 0o644)
    try:
        fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
    except BlockingIOError:
        os.close(fd)
        raise FolderBusy(f"{folder} is in use by {_holder(path)}: one run writes a folder at a time. Wait for it "
                         f"to finish (or stop it); if that process is gone, the lock is released by itself") from None
    info = {"host": socket.gethostname(), "pid": os.getpid(), "stage": what,
            "since": _dt.datetime.now(_dt.timezone.utc).isoformat(timespec="seconds")}
    os.ftruncate(fd, 0)
    os.pwrite(fd, json.dumps(info).encode(), 0)
    _held[key] = (fd, 1)
    try:
        yield
    finally:
        fd, depth = _held.pop(key)
        os.ftruncate(fd, 0)
        fcntl.flock(fd, fcntl.LOCK_UN)
        os.close(fd)
