"""The model zoo: the release's checkpoints (experiments/zoo.csv), fetched once, verified and cached.

Each zoo row names a checkpoint of the CompVis/latent-diffusion release: its URL, what the URL holds (a zip with
the checkpoint inside, or a bare `.ckpt`), the experiment of this harness that builds its networks, and, where
known, its size and SHA-256. Fetching goes through the dataset downloader (`replication.data.download.download`:
resumable, verified), unpacks a zip with `safe_extract`, and keeps `<cache>/<name>/model.ckpt` with a record of
what was fetched (`zoo_record.json`). A row without a SHA-256 is trusted on first use (the hash seen then is
recorded); every later use verifies the cached checkpoint against the record, so a file changed on disk is never
loaded.

Where things are: the zoo file is `experiments/zoo.csv` (or `$REPLICATION_ZOO`), the cache
`$REPLICATION_CACHE`, else `$XDG_CACHE_HOME/replication/pretrained`, else `~/.cache/replication/pretrained`.

CLI: python -m replication.pretrained list | fetch NAME [--cache DIR] [--zoo FILE]
"""
from __future__ import annotations

import argparse
import csv
import datetime as _dt
import logging
import os
import re
import shutil
import sys
from dataclasses import dataclass
from pathlib import Path, PurePosixPath
from typing import Optional

from replication.data.download import ChecksumError, DownloadError, UnsafeArchiveError, download, safe_extract
from replication.stages.lock import folder_lock
from replication.utils.io import atomic_write_json, read_json
from replication.utils.verify import file_sha256

ZOO_FILE = Path(__file__).resolve().parents[1] / "experiments" / "zoo.csv"
EXPERIMENT_DIR = ZOO_FILE.parent / "experiment"
ZOO_ENV = "REPLICATION_ZOO"
CACHE_ENV = "REPLICATION_CACHE"
CHECKPOINT_FILE = "model.ckpt"
RECORD_FILE = "zoo_record.json"
UNPACKED_DIR = "unpacked"  # what the zip held besides the checkpoint (the release's config.yaml, say)
COLUMNS = ("name", "kind", "url", "archive", "member", "experiment", "bytes", "sha256", "source", "notes")
KINDS = ("first_stage", "ldm")
ARCHIVES = ("zip", "ckpt")
log = logging.getLogger("replication")


class PretrainedError(RuntimeError):
    """A zoo entry or a cached checkpoint cannot be used; the message names the file and what to do."""


@dataclass(frozen=True)
class ZooEntry:
    """One released checkpoint. `member`: the checkpoint's name inside a zip (empty: the zip's one `.ckpt`);
    `experiment`: the experiments/experiment/ config that builds its networks (empty: none exists yet);
    `bytes` / `sha256`: what the URL serves (None: not known, recorded on first download)."""

    name: str
    kind: str
    url: str
    archive: str
    member: str
    experiment: Optional[str]
    bytes: Optional[int]
    sha256: Optional[str]
    source: str
    notes: str


def zoo_file(path: str | os.PathLike | None = None) -> Path:
    """The zoo file: `path`, else $REPLICATION_ZOO, else experiments/zoo.csv."""
    return Path(path or os.environ.get(ZOO_ENV) or ZOO_FILE)


def read_zoo(path: str | os.PathLike | None = None) -> dict[str, ZooEntry]:
    """Every entry of the zoo file by name; a malformed row stops with the file, the row and the problem."""
    path = zoo_file(path)
    if not path.is_file():
        raise PretrainedError(f"zoo file {path} does not exist")
    with open(path, newline="", encoding="utf-8") as fh:
        reader = csv.DictReader(fh)
        if tuple(reader.fieldnames or ()) != COLUMNS:
            raise PretrainedError(f"{path}: the columns must be {','.join(COLUMNS)}; got {reader.fieldnames}")
        entries: dict[str, ZooEntry] = {}
        for line, row in enumerate(reader, start=2):
            entry = _entry(row, f"{path}, line {line}")
            if entry.name in entries:
                raise PretrainedError(f"{path}, line {line}: name {entry.name!r} is listed twice")
            entries[entry.name] = entry
    return entries


def _entry(row: dict[str, str], where: str) -> ZooEntry:
    values = {k: (row.get(k) or "").strip() for k in COLUMNS}

    def bad(msg: str) -> PretrainedError:
        return PretrainedError(f"{where} ({values['name'] or 'no name'}): {msg}")

    if not re.fullmatch(r"[A-Za-z0-9][A-Za-z0-9_.-]*", values["name"]):
        raise bad("name must be letters, digits, '_', '.' or '-' (it names the cache folder)")
    if values["kind"] not in KINDS:
        raise bad(f"kind must be one of {', '.join(KINDS)}")
    if values["archive"] not in ARCHIVES:
        raise bad(f"archive must be one of {', '.join(ARCHIVES)}")
    if not values["url"].startswith(("https://", "http://")):
        raise bad("url must be an http(s) URL")
    if values["archive"] == "ckpt" and values["member"]:
        raise bad("a bare checkpoint has no member")
    if values["experiment"] and not (EXPERIMENT_DIR / f"{values['experiment']}.yaml").is_file():
        raise bad(f"experiment {values['experiment']!r} is not in {EXPERIMENT_DIR}")
    if values["bytes"] and not values["bytes"].isdigit():
        raise bad(f"bytes must be a whole number, got {values['bytes']!r}")
    if values["sha256"] and not re.fullmatch(r"[0-9a-fA-F]{64}", values["sha256"]):
        raise bad("sha256 must be 64 hex digits")
    if not values["source"]:
        raise bad("source must say where the entry's facts come from")
    return ZooEntry(name=values["name"], kind=values["kind"], url=values["url"], archive=values["archive"],
                    member=values["member"], experiment=values["experiment"] or None,
                    bytes=int(values["bytes"]) if values["bytes"] else None,
                    sha256=values["sha256"].lower() or None, source=values["source"], notes=values["notes"])


def zoo_entry(name: str, zoo: str | os.PathLike | None = None) -> ZooEntry:
    entries = read_zoo(zoo)
    if name not in entries:
        raise PretrainedError(f"{name!r} is not in the zoo {zoo_file(zoo)}; its models: {', '.join(entries)}")
    return entries[name]


def cache_root(cache_dir: str | os.PathLike | None = None) -> Path:
    """Where fetched checkpoints live: `cache_dir`, else $REPLICATION_CACHE, else the user's cache folder."""
    if cache_dir is not None:
        return Path(cache_dir)
    if os.environ.get(CACHE_ENV):
        return Path(os.environ[CACHE_ENV])
    base = os.environ.get("XDG_CACHE_HOME") or Path.home() / ".cache"
    return Path(base) / "replication" / "pretrained"


def entry_folder(entry: ZooEntry, cache_dir: str | os.PathLike | None = None) -> Path:
    return cache_root(cache_dir) / entry.name


def archive_path(entry: ZooEntry, cache_dir: str | os.PathLike | None = None) -> Path:
    """Where the URL's file is downloaded to (`<name>.zip`, or the checkpoint itself for a bare `.ckpt`); its
    partial download is this path plus `.part`, which the next fetch resumes."""
    folder = entry_folder(entry, cache_dir)
    return folder / (f"{entry.name}.zip" if entry.archive == "zip" else CHECKPOINT_FILE)


def fetch(entry: ZooEntry | str, cache_dir: str | os.PathLike | None = None, zoo: str | os.PathLike | None = None,
          progress: bool = True, retries: Optional[int] = None) -> Path:
    """The verified local checkpoint of a zoo entry (downloaded and unpacked on first use)."""
    if isinstance(entry, str):
        entry = zoo_entry(entry, zoo)
    folder = entry_folder(entry, cache_dir)
    checkpoint, record_path = folder / CHECKPOINT_FILE, folder / RECORD_FILE
    if record_path.is_file():
        return _verified_cached(entry, checkpoint, read_json(record_path))
    with folder_lock(folder, f"fetch {entry.name}"):  # one download per cache folder at a time
        if record_path.is_file():  # another process fetched it meanwhile
            return _verified_cached(entry, checkpoint, read_json(record_path))
        dest = archive_path(entry, cache_dir)
        try:
            info = download(entry.url, dest, sha256=entry.sha256, progress=progress, retries=retries)
        except (ChecksumError, DownloadError) as exc:
            raise PretrainedError(f"zoo model {entry.name!r}: {exc}") from exc
        if entry.bytes is not None and info["bytes"] != entry.bytes:
            dest.unlink()
            raise PretrainedError(f"zoo model {entry.name!r}: {dest} has {info['bytes']} bytes, the zoo lists "
                                  f"{entry.bytes}; it was removed (fetched from {entry.url})")
        if entry.archive == "zip":
            _unpack(entry, dest, checkpoint)
        record = {"name": entry.name, "url": entry.url, "archive_sha256": info["sha256"],
                  "archive_bytes": info["bytes"], "checkpoint": CHECKPOINT_FILE,
                  "checkpoint_sha256": info["sha256"] if entry.archive == "ckpt" else file_sha256(checkpoint),
                  "checkpoint_bytes": checkpoint.stat().st_size,
                  "fetched": _dt.datetime.now(_dt.timezone.utc).isoformat(timespec="seconds")}
        atomic_write_json(record_path, record)
        if entry.archive == "zip":
            dest.unlink()  # the checkpoint is out of it and recorded; keeping both would double the disk use
        if entry.sha256 is None:
            log.info("zoo model %s: the zoo lists no SHA-256; recorded %s (seen now) in %s, and later uses are "
                     "checked against it", entry.name, info["sha256"], record_path)
        return checkpoint


def _unpack(entry: ZooEntry, archive: Path, checkpoint: Path) -> None:
    """Extract the zip beside it and move its checkpoint member to `checkpoint`."""
    unpacked = archive.parent / UNPACKED_DIR
    shutil.rmtree(unpacked, ignore_errors=True)
    try:
        members = [m for m in safe_extract(archive, unpacked) if not m.endswith("/")]
    except (UnsafeArchiveError, OSError) as exc:
        raise PretrainedError(f"zoo model {entry.name!r}: cannot unpack {archive} ({exc}); remove it to download "
                              "it again") from exc
    if entry.member:
        found = [m for m in members if m == entry.member or PurePosixPath(m).name == entry.member]
        wanted = f"a member named {entry.member!r}"
    else:
        found = [m for m in members if m.endswith(".ckpt")]
        wanted = "exactly one .ckpt member"
    if len(found) != 1:
        raise PretrainedError(f"zoo model {entry.name!r}: {archive} should hold {wanted}, it holds {members[:20]}; "
                              "correct the zoo row's member column")
    os.replace(unpacked / found[0], checkpoint)


def _verified_cached(entry: ZooEntry, checkpoint: Path, record: dict) -> Path:
    """The cached checkpoint, after checking it is what was fetched (and what the zoo lists, when it lists it)."""
    again = f"remove {checkpoint.parent} to download it again"
    if entry.sha256 is not None and record.get("archive_sha256") != entry.sha256:
        raise PretrainedError(f"zoo model {entry.name!r}: {checkpoint} was fetched from a file with SHA-256 "
                              f"{record.get('archive_sha256')}, the zoo lists {entry.sha256}; {again}")
    if not checkpoint.is_file():
        raise PretrainedError(f"zoo model {entry.name!r}: {checkpoint} is missing although it was fetched; {again}")
    size = checkpoint.stat().st_size
    if size != record["checkpoint_bytes"] or file_sha256(checkpoint) != record["checkpoint_sha256"]:
        raise PretrainedError(f"zoo model {entry.name!r}: {checkpoint} differs from what was downloaded "
                              f"({size} bytes, recorded {record['checkpoint_bytes']}; SHA-256 recorded "
                              f"{record['checkpoint_sha256']}); it is not loaded: {again}")
    return checkpoint


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m replication.pretrained", description=__doc__.split("\n\n")[0])
    parser.add_argument("--zoo", type=Path, default=None, help=f"zoo file (default ${ZOO_ENV} or {ZOO_FILE})")
    parser.add_argument("--cache", type=Path, default=None, help=f"cache folder (default ${CACHE_ENV} or ~/.cache)")
    sub = parser.add_subparsers(dest="command", required=True)
    sub.add_parser("list", help="the zoo's models, their experiments and whether they are cached")
    get = sub.add_parser("fetch", help="download, verify and cache one model; prints its checkpoint path")
    get.add_argument("name")
    args = parser.parse_args(argv)
    try:
        if args.command == "list":
            for e in read_zoo(args.zoo).values():
                cached = (entry_folder(e, args.cache) / RECORD_FILE).is_file()
                print(f"{e.name:22} {e.kind:12} {e.experiment or '-':24} {'cached' if cached else '':7} {e.url}")
        else:
            print(fetch(args.name, cache_dir=args.cache, zoo=args.zoo))
    except PretrainedError as exc:
        print(f"error: {exc}", file=sys.stderr)
        return 1
    return 0


if __name__ == "__main__":
    sys.exit(main())
