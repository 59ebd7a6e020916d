"""Atomic, tensor-only artifact I/O: a killed process leaves the old file or the new one, never half."""
from __future__ import annotations

import hashlib
import json
import os
import shutil
import tempfile
from contextlib import contextmanager
from pathlib import Path
from typing import Any, Iterator, Mapping

import torch


class ArtifactError(RuntimeError):
    """An artifact on disk is missing, damaged, or does not fit what reads it."""


@contextmanager
def atomic_path(path: str | os.PathLike, suffix: str = "") -> Iterator[Path]:
    """Yield a temporary path beside `path`; on success fsync it and rename it over `path`."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(prefix=f".{path.name}.", suffix=(suffix or path.suffix) + ".tmp", dir=path.parent)
    os.close(fd)
    tmp_path = Path(tmp)
    try:
        yield tmp_path
        with open(tmp_path, "rb+") as fh:
            fh.flush()
            os.fsync(fh.fileno())
        os.replace(tmp_path, path)
        _fsync_dir(path.parent)
    finally:
        if tmp_path.exists():
            tmp_path.unlink()


def _fsync_dir(directory: Path) -> None:
    try:
        fd = os.open(directory, os.O_RDONLY)
    except OSError:
        return
    try:
        os.fsync(fd)
    except OSError:
        pass
    finally:
        os.close(fd)


def atomic_write_bytes(path: str | os.PathLike, data: bytes) -> None:
    with atomic_path(path) as tmp:
        tmp.write_bytes(data)


def atomic_write_text(path: str | os.PathLike, text: str) -> None:
    atomic_write_bytes(path, text.encode("utf-8"))


def atomic_write_json(path: str | os.PathLike, obj: Any) -> None:
    atomic_write_text(path, json.dumps(obj, indent=2, sort_keys=True, default=_json_default) + "\n")


def _json_default(obj: Any) -> Any:
    if hasattr(obj, "item"):
        return obj.item()
    if isinstance(obj, Path):
        return str(obj)
    raise TypeError(f"not JSON serialisable: {type(obj).__name__}")


def read_json(path: str | os.PathLike) -> Any:
    path = Path(path)
    if not path.exists():
        raise ArtifactError(f"{path} does not exist")
    try:
        return json.loads(path.read_text())
    except json.JSONDecodeError as exc:
        raise ArtifactError(f"{path} is not valid JSON: {exc}") from exc


def append_jsonl(path: str | os.PathLike, record: Mapping[str, Any]) -> None:
    """Append one line; a line is written with a single write() so readers never see half a record."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    line = json.dumps(dict(record), sort_keys=True, default=_json_default) + "\n"
    with open(path, "a", encoding="utf-8") as fh:
        fh.write(line)
        fh.flush()
        os.fsync(fh.fileno())


def save_tensors(path: str | os.PathLike, tensors: Mapping[str, torch.Tensor], metadata: Mapping[str, str] | None = None) -> None:
    """Tensors only, via safetensors, written atomically."""
    from safetensors.torch import save_file

    clean = {k: v.detach().contiguous().cpu() for k, v in tensors.items()}
    with atomic_path(path) as tmp:
        save_file(clean, str(tmp), metadata=dict(metadata or {}))


def load_tensors(path: str | os.PathLike, device: str = "cpu") -> dict[str, torch.Tensor]:
    from safetensors.torch import load_file

    path = Path(path)
    if not path.exists():
        raise ArtifactError(f"{path} does not exist")
    try:
        return load_file(str(path), device=device)
    except Exception as exc:  # safetensors raises its own error types
        raise ArtifactError(f"{path} is not a readable safetensors file: {exc}") from exc


def load_tensor_metadata(path: str | os.PathLike) -> dict[str, str]:
    from safetensors import safe_open

    with safe_open(str(path), framework="pt") as fh:
        return dict(fh.metadata() or {})


def torch_save_atomic(path: str | os.PathLike, obj: Any) -> None:
    """torch.save of plain containers of tensors/numbers/strings; load with `torch_load_safe`."""
    with atomic_path(path) as tmp:
        torch.save(obj, tmp)


def unpickling_failure(exc: BaseException) -> str:
    """One line saying why torch.load(weights_only=True) refused a file: the weights-only unpickler's own reason
    (e.g. "Unsupported global: GLOBAL os.system", "Unsupported operand 0"), or the error's first line. PyTorch's
    surrounding advice to retry with weights_only turned off is left out: that would run whatever code the file
    holds."""
    text = str(exc)
    marker = "WeightsUnpickler error:"
    if marker in text:
        text = text.split(marker, 1)[1]
    lines = [ln.strip() for ln in text.splitlines() if ln.strip()]
    reason = next((ln for ln in lines if "weights_only" not in ln and "Weights only load failed" not in ln), "")
    return f"{type(exc).__name__}: {reason}" if reason else type(exc).__name__


def torch_load_safe(path: str | os.PathLike, map_location: str = "cpu") -> Any:
    """Load with weights_only=True: tensors and plain containers, never code."""
    path = Path(path)
    if not path.exists():
        raise ArtifactError(f"{path} does not exist")
    try:
        return torch.load(path, map_location=map_location, weights_only=True)
    except Exception as exc:
        raise ArtifactError(
            f"refusing to load {path}: it is not a tensors-only file ({unpickling_failure(exc)}); this project "
            "never unpickles anything else, which could run code (an original .ckpt is read by "
            "python -m replication.models.compvis convert)"
        ) from exc


def sha256_file(path: str | os.PathLike, chunk: int = 1 << 20) -> str:
    h = hashlib.sha256()
    with open(path, "rb") as fh:
        while True:
            block = fh.read(chunk)
            if not block:
                break
            h.update(block)
    return h.hexdigest()


def sha256_json(obj: Any) -> str:
    """Hash of a JSON-able object in canonical form (sorted keys, no whitespace)."""
    blob = json.dumps(obj, sort_keys=True, separators=(",", ":"), default=_json_default).encode()
    return hashlib.sha256(blob).hexdigest()


def check_free_space(path: str | os.PathLike, needed_bytes: int, what: str = "write") -> None:
    """Fail before a large write instead of leaving a truncated artifact."""
    path = Path(path)
    probe = path if path.exists() else next((p for p in path.parents if p.exists()), Path("."))
    free = shutil.disk_usage(probe).free
    if free < needed_bytes:
        raise ArtifactError(
            f"not enough free disk space for {what} at {path}: need {needed_bytes / 2**30:.2f} GiB, "
            f"have {free / 2**30:.2f} GiB"
        )


def read_jsonl(path: str | os.PathLike) -> list[dict[str, Any]]:
    """Records of an append-only .jsonl file; a torn last line (killed writer) is ignored."""
    records = []
    for line in Path(path).read_text().splitlines():
        if line.strip():
            try:
                records.append(json.loads(line))
            except json.JSONDecodeError:
                continue
    return records
