"""Content records of artifacts, and their verification before anything trusts them.

A stage that finishes records, for every file it wrote, the size and SHA-256 (`content_records`). Whoever later
trusts those files (a skipped stage, a linked baseline, a downstream stage, `python -m replication.verify`)
checks them against the record first (`verify_records`): a size check always, the full hash whenever the files are
about to be reused. A file that does not match is never used: it is named, and the stage that owns it runs again.

Hashes of files this process has already hashed (or verified) are remembered by (device, inode, size, mtime), which
a rename keeps and any rewrite changes, so a pipeline that writes or verifies an artifact and then records or reads
it does not hash it twice.
"""
from __future__ import annotations

import hashlib
import os
from pathlib import Path
from typing import Any, Iterable, Mapping

from replication.utils.io import atomic_write_text, sha256_json

CHUNK = 1 << 22
# files a stage folder holds beside its outputs that are not themselves artifacts (rewritten on every run)
IGNORED_NAMES = frozenset({"log.txt", "stats.jsonl", "manifest.json", "done.json", ".lock"})

_known: dict[tuple[int, int, int, int], str] = {}


def _stamp(st: os.stat_result) -> tuple[int, int, int, int]:
    return (st.st_dev, st.st_ino, st.st_size, st.st_mtime_ns)


def file_sha256(path: str | os.PathLike, use_known: bool = True) -> str:
    """SHA-256 of a file, streamed; remembered for this process while the file's size, mtime and inode stay."""
    path = Path(path)
    stamp = _stamp(path.stat())
    if use_known and stamp in _known:
        return _known[stamp]
    h = hashlib.sha256()
    with open(path, "rb") as fh:
        while chunk := fh.read(CHUNK):
            h.update(chunk)
    digest = h.hexdigest()
    _known[stamp] = digest
    return digest


HASH_SUFFIX = ".sha256"


def hash_beside(path: str | os.PathLike) -> Path:
    """Where a file's own recorded hash lives: `<name>.sha256` beside it (checkpoints, sample shards, FID
    reference statistics), written after the file, so that the two agreeing means the file is complete and intact."""
    path = Path(path)
    return path.with_name(path.name + HASH_SUFFIX)


def write_hash_beside(path: str | os.PathLike) -> str:
    """Hash a finished file and write its hash beside it; returns the hash."""
    digest = file_sha256(path)
    atomic_write_text(hash_beside(path), digest + "\n")
    return digest


def recorded_hash(path: str | os.PathLike) -> str | None:
    """The hash written beside `path`, or None when there is none."""
    recorded = hash_beside(path)
    return recorded.read_text().strip() if recorded.exists() else None


def remember(path: str | os.PathLike, digest: str) -> None:
    """Record a hash computed while writing `path`, so that recording its content does not read it again."""
    _known[_stamp(Path(path).stat())] = digest


def _files_of(path: Path) -> Iterable[tuple[str, Path]]:
    """(name, file) for an output: a file is named by its own name, a folder's files by `folder/relative/path`.
    Temporary files (`.name.tmp`, `.partial` folders) and a folder's bookkeeping files are left out."""
    if path.is_file():
        yield path.name, path
        return
    if not path.is_dir():
        return
    for sub in sorted(path.rglob("*")):
        rel = sub.relative_to(path)
        if any(part.startswith(".") for part in rel.parts) or not sub.is_file() or sub.name in IGNORED_NAMES:
            continue
        yield f"{path.name}/{rel.as_posix()}", sub


def _key(path: Path, root: Path | None) -> str:
    """A file's record key: relative to `root` (the runs root) when it lies below it, so that a runs folder that
    is moved or copied elsewhere still verifies against its own files; absolute otherwise."""
    path = path.absolute()
    if root is not None and path.is_relative_to(root.absolute()):
        return path.relative_to(root.absolute()).as_posix()
    return str(path)


def resolve(key: str, root: str | os.PathLike | None) -> Path:
    """The file a record key names (see `_key`)."""
    p = Path(key)
    return p if p.is_absolute() or root is None else Path(root) / p


def content_records(outputs: Iterable[str | os.PathLike], root: str | os.PathLike | None = None) -> dict[str, dict[str, Any]]:
    """{file key: {"size", "sha256", "name"}} for every file of `outputs` (files or folders); keys are relative to
    `root` where they can be. `name` is the path relative to the output the file belongs to, which is what a content
    id hashes (not where the run lives)."""
    records: dict[str, dict[str, Any]] = {}
    for out in outputs:
        for name, f in _files_of(Path(out)):
            records[_key(f, Path(root) if root is not None else None)] = {
                "name": name, "size": f.stat().st_size, "sha256": file_sha256(f)}
    return records


# Dataset cards also say where things were on this machine; those entries are not part of what the data is, so a
# runs folder prepared again elsewhere (or moved) has the same content id
CARD_NAME = "card.json"
CARD_LOCATION_KEYS = frozenset({"raw_root", "config_hash", "source_images"})


def _without_locations(obj: Any) -> Any:
    if isinstance(obj, dict):
        return {k: _without_locations(v) for k, v in obj.items() if k not in CARD_LOCATION_KEYS}
    if isinstance(obj, list):
        return [_without_locations(v) for v in obj]
    return obj


def _meaning(key: str, record: Mapping[str, Any], root: str | os.PathLike | None) -> str:
    """What a file contributes to a content id: its hash, or for a dataset card its content without locations."""
    if record["name"].rsplit("/", 1)[-1] != CARD_NAME:
        return record["sha256"]
    import json

    try:
        card = json.loads(resolve(key, root).read_text())
    except (OSError, ValueError):
        return record["sha256"]
    return sha256_json(_without_locations(card))


def content_id(records: Mapping[str, Mapping[str, Any]], upstream: Mapping[str, Any] | None = None,
               root: str | os.PathLike | None = None) -> str:
    """One hash for what a stage produced: its files' names and hashes (dataset cards without the machine's
    paths). A stage that wrote no files (the latent cache switched off, say) passes its inputs on: its id is then
    that of its upstream stages, so that what reads through it still changes when they change."""
    files = sorted((r["name"], _meaning(k, r, root)) for k, r in records.items())
    if files:
        return sha256_json({"files": files})
    return sha256_json({"files": [], "upstream": dict(sorted((upstream or {}).items()))})


def verify_records(records: Mapping[str, Mapping[str, Any]], full: bool = True,
                   root: str | os.PathLike | None = None) -> list[str]:
    """Problems found, one line each ('PATH: missing' / 'PATH: N bytes, recorded M' / 'PATH: content differs
    from its record (sha256 ...)'); empty when every file matches. `full=False` checks sizes only. Relative keys
    are read below `root`."""
    problems = []
    for key, rec in records.items():
        p = resolve(key, root)
        path = str(p)
        try:
            size = p.stat().st_size
        except OSError:
            problems.append(f"{path}: missing")
            continue
        if size != rec["size"]:
            problems.append(f"{path}: {size} bytes, recorded {rec['size']} (truncated or replaced)")
            continue
        if full:
            digest = file_sha256(p)
            if digest != rec["sha256"]:
                problems.append(f"{path}: content differs from its record (sha256 {digest[:12]}..., recorded "
                                f"{rec['sha256'][:12]}...)")
    return problems


def hashing_speed(num_bytes: int = 256 << 20) -> float:
    """Measured SHA-256 throughput of this machine in bytes per second (for the verification time estimate)."""
    import time

    block = os.urandom(1 << 20)
    h = hashlib.sha256()
    start = time.perf_counter()
    for _ in range(max(1, num_bytes >> 20)):
        h.update(block)
    return num_bytes / (time.perf_counter() - start)
