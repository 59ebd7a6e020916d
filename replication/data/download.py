"""Resumable HTTP download with checksum verification, safe archive extraction, and the stop-with-instructions
check for datasets that need a login or a licence."""
from __future__ import annotations

import hashlib
import http.client
import os
import re
import shutil
import socket
import stat
import tarfile
import time
import urllib.error
import urllib.request
import zipfile
from pathlib import Path, PurePosixPath
from typing import Iterable, Optional

from tqdm import tqdm

DEFAULT_CHUNK = 1 << 20
DEFAULT_TIMEOUT_S = 60.0
DEFAULT_RETRIES = 5
DEFAULT_RETRY_WAIT_S = 1.0
ARCHIVE_SUFFIXES = (".zip", ".tar", ".tar.gz", ".tgz", ".tar.bz2", ".tar.xz")
_RETRYABLE = (urllib.error.URLError, http.client.HTTPException, ConnectionError, socket.timeout, TimeoutError)


class ChecksumError(RuntimeError):
    """A file's checksum differs from the expected one."""


class DownloadError(RuntimeError):
    """A download failed after its retries."""


class UnsafeArchiveError(RuntimeError):
    """An archive member would be written outside the target folder."""


class ManualDownloadRequired(RuntimeError):
    """A dataset that needs a login or a licence is not where the config says."""


def file_digest(path: str | os.PathLike, algorithm: str = "sha256", chunk: int = DEFAULT_CHUNK) -> str:
    h = hashlib.new(algorithm)
    with open(path, "rb") as fh:
        while block := fh.read(chunk):
            h.update(block)
    return h.hexdigest()


def verify_checksum(path: str | os.PathLike, expected: Optional[str], algorithm: str = "sha256") -> str:
    """Return the file's digest; raise ChecksumError naming expected and actual when `expected` is set and differs."""
    actual = file_digest(path, algorithm)
    if expected is not None and actual.lower() != expected.lower():
        raise ChecksumError(f"{algorithm} mismatch for {path}: expected {expected.lower()}, actual {actual}")
    return actual


def _open_range(url: str, offset: int, timeout: float):
    headers = {"User-Agent": "replication-ldm/1.0"}
    if offset > 0:
        headers["Range"] = f"bytes={offset}-"
    return urllib.request.urlopen(urllib.request.Request(url, headers=headers), timeout=timeout)


def _total_size(resp, offset: int) -> Optional[int]:
    content_range = resp.headers.get("Content-Range")  # "bytes 100-199/200"
    if content_range and "/" in content_range:
        tail = content_range.rsplit("/", 1)[1].strip()
        if tail.isdigit():
            return int(tail)
    length = resp.headers.get("Content-Length")
    if length is not None and length.isdigit():
        return int(length) + (offset if resp.status == 206 else 0)
    return None


def download(
    url: str,
    dest: str | os.PathLike,
    sha256: Optional[str] = None,
    progress: bool = True,
    chunk: int = DEFAULT_CHUNK,
    md5: Optional[str] = None,
    retries: Optional[int] = None,
    timeout: float = DEFAULT_TIMEOUT_S,
    retry_wait_s: Optional[float] = None,
) -> dict:
    """Fetch `url` to `dest` through `dest.part`, resuming with an HTTP Range request after an interruption
    (in this call's retries or in a later call). Verify the checksum(s) before the final rename; on a mismatch
    the partial file is removed (it cannot be resumed into a correct one) and the error names both values.
    Returns {"path", "sha256", "md5", "bytes"}; an existing `dest` is verified, not fetched again, so a file
    fetched elsewhere and placed at `dest` is used as is (every DownloadError says so, naming `dest`).
    `retries` / `retry_wait_s` default to DEFAULT_RETRIES / DEFAULT_RETRY_WAIT_S."""
    retries = DEFAULT_RETRIES if retries is None else retries
    retry_wait_s = DEFAULT_RETRY_WAIT_S if retry_wait_s is None else retry_wait_s
    dest = Path(dest)
    dest.parent.mkdir(parents=True, exist_ok=True)
    if dest.exists():
        return _verified(dest, sha256, md5)
    part = dest.with_name(dest.name + ".part")
    attempt = 0
    bar = None
    try:
        while True:
            offset = part.stat().st_size if part.exists() else 0
            try:
                resp = _open_range(url, offset, timeout)
            except urllib.error.HTTPError as exc:
                if exc.code == 416 and offset > 0:  # nothing left to send: the part file is complete
                    break
                if exc.code in (408, 429, 500, 502, 503, 504) and attempt < retries:
                    attempt += 1
                    time.sleep(retry_wait_s)
                    continue
                raise DownloadError(f"HTTP {exc.code} for {url}: {exc.reason}. {place_by_hand(url, dest)}") from exc
            except _RETRYABLE as exc:
                if attempt >= retries:
                    raise DownloadError(f"could not reach {url} after {retries} retries ({_reason(exc)}). "
                                        f"{place_by_hand(url, dest)}") from exc
                attempt += 1
                time.sleep(retry_wait_s)
                continue
            with resp:
                if offset > 0 and resp.status != 206:  # the server ignored Range: start over
                    offset = 0
                total = _total_size(resp, offset)
                if bar is None and progress:
                    bar = tqdm(total=total, initial=offset, unit="B", unit_scale=True, desc=dest.name)
                elif bar is not None:
                    bar.reset(total=total)
                    bar.update(offset)
                try:
                    with open(part, "ab" if offset > 0 else "wb") as fh:
                        while block := resp.read(chunk):
                            fh.write(block)
                            if bar is not None:
                                bar.update(len(block))
                except _RETRYABLE as exc:
                    if attempt >= retries:
                        raise DownloadError(
                            f"download of {url} kept failing ({_reason(exc)}); {part} is kept, run again to resume. "
                            f"{place_by_hand(url, dest)}"
                        ) from exc
                    attempt += 1
                    time.sleep(retry_wait_s)
                    continue
            size = part.stat().st_size
            if total is not None and size < total:  # connection closed early without an exception
                if attempt >= retries:
                    raise DownloadError(f"download of {url} stopped at {size} of {total} bytes; run again to resume. "
                                        f"{place_by_hand(url, dest)}")
                attempt += 1
                continue
            break
    finally:
        if bar is not None:
            bar.close()
    try:
        info = _verified(part, sha256, md5)
    except ChecksumError as exc:
        part.unlink(missing_ok=True)
        raise ChecksumError(f"{exc} (downloaded from {url}; the partial file was removed)") from exc
    os.replace(part, dest)
    info["path"] = str(dest)
    return info


def _reason(exc: BaseException) -> str:
    """'[Errno 111] Connection refused' rather than '<urlopen error [Errno 111] Connection refused>'."""
    reason = getattr(exc, "reason", None)
    return str(reason if reason is not None else exc) or type(exc).__name__


def place_by_hand(url: str, dest: Path) -> str:
    """What to do without network: the exact file to place, and for an archive where it is extracted."""
    text = (f"Without network access here, fetch {url} elsewhere and place it as {dest} (that exact name); the next "
            "run checks it and uses it instead of downloading")
    if dest.name.lower().endswith(ARCHIVE_SUFFIXES):
        text += f" (the archive is then extracted into {dest.parent})"
    return text + "."


def _verified(path: Path, sha256: Optional[str], md5: Optional[str]) -> dict:
    info = {"path": str(path), "sha256": verify_checksum(path, sha256, "sha256"), "bytes": path.stat().st_size}
    info["md5"] = verify_checksum(path, md5, "md5") if md5 is not None else None
    return info


# ---------------------------------------------------------------------------------------------------------
# Safe extraction
# ---------------------------------------------------------------------------------------------------------
def _inside(dest: Path, member_name: str) -> Path:
    pure = PurePosixPath(member_name.replace("\\", "/"))
    if pure.is_absolute() or (pure.parts and pure.parts[0].endswith(":")):
        raise UnsafeArchiveError(f"archive member '{member_name}' has an absolute path")
    target = (dest / Path(*pure.parts)).resolve() if pure.parts else dest
    if target != dest and dest not in target.parents:
        raise UnsafeArchiveError(f"archive member '{member_name}' would be written outside {dest}")
    return target


def _link_inside(dest: Path, member_name: str, link: str) -> None:
    if os.path.isabs(link) or link.startswith("/"):
        raise UnsafeArchiveError(f"archive member '{member_name}' links to the absolute path '{link}'")
    parent = PurePosixPath(member_name.replace("\\", "/")).parent
    _inside(dest, str(parent / link)) if str(parent) != "." else _inside(dest, link)


def safe_extract(archive: str | os.PathLike, dest: str | os.PathLike) -> list[str]:
    """Extract a zip or tar into `dest`, refusing (before writing anything) members with absolute paths, '..'
    components, links pointing out of `dest`, or device files. Returns the member names."""
    archive, dest = Path(archive), Path(dest)
    dest.mkdir(parents=True, exist_ok=True)
    dest = dest.resolve()
    if zipfile.is_zipfile(archive):
        with zipfile.ZipFile(archive) as zf:
            infos = zf.infolist()
            for info in infos:
                _inside(dest, info.filename)
                mode = info.external_attr >> 16
                if stat.S_ISLNK(mode):
                    raise UnsafeArchiveError(f"archive member '{info.filename}' in {archive} is a symlink; refused")
            for info in infos:
                target = _inside(dest, info.filename)
                if info.is_dir():
                    target.mkdir(parents=True, exist_ok=True)
                    continue
                target.parent.mkdir(parents=True, exist_ok=True)
                with zf.open(info) as src, open(target, "wb") as dst:
                    shutil.copyfileobj(src, dst, DEFAULT_CHUNK)
            return [i.filename for i in infos]
    if tarfile.is_tarfile(archive):
        with tarfile.open(archive) as tf:
            members = tf.getmembers()
            for m in members:
                _inside(dest, m.name)
                if m.issym() or m.islnk():
                    _link_inside(dest, m.name, m.linkname) if m.issym() else _inside(dest, m.linkname)
                elif not (m.isfile() or m.isdir()):
                    raise UnsafeArchiveError(f"archive member '{m.name}' in {archive} is a device or fifo; refused")
            if hasattr(tarfile, "data_filter"):
                tf.extractall(dest, members=members, filter="data")
            else:  # pragma: no cover - Python < 3.11.4
                tf.extractall(dest, members=members)
            return [m.name for m in members]
    raise UnsafeArchiveError(f"{archive} is neither a zip nor a tar archive")


# ---------------------------------------------------------------------------------------------------------
# Manual datasets
# ---------------------------------------------------------------------------------------------------------
def require_manual(root: str | os.PathLike, required: Iterable[str], instructions: str, dataset: str = "") -> None:
    """Raise ManualDownloadRequired listing what is missing under `root` (or that `root` itself is missing),
    followed by `instructions`, in which `<root>` stands for the dataset folder and is replaced by its path."""
    root = Path(root)
    missing = [r for r in required if not (root / r).exists()]
    if missing or not root.exists():
        name = f"dataset '{dataset}'" if dataset else "this dataset"
        if missing:
            listing = "\n".join(f"  - {root / m}" for m in missing)
            head = f"{name} needs a manual download (login or licence). Missing under {root}:\n{listing}"
        else:
            head = f"{name} needs a manual download (login or licence). The dataset folder {root} does not exist."
        raise ManualDownloadRequired(f"{head}\n\n{manual_instructions(instructions, root)}")


def manual_instructions(instructions: str, root: str | os.PathLike) -> str:
    """A dataset's instructions with `<root>` replaced by its folder, so they name the exact paths to fill."""
    text = instructions.strip().replace("<root>", str(root))
    return re.sub(r"the\s+dataset\s+root\s+\(the\s+folder\s+named\s+above\)", f"the dataset folder {root}", text)
