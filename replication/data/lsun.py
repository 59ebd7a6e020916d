"""LSUN scenes (Churches, Bedrooms): the LMDB export from the LSUN download server (keys = image ids, values =
WebP/JPEG bytes; fyu/lsun download.py), or a folder of images exported from it as `<key>.webp`. Splits: the
authors' file lists (ommer-lab lsun.zip, read by ldm/data/lsun.py), one image file name per line."""
from __future__ import annotations

import os
from pathlib import Path
from typing import Iterator

from replication.data.config import DatasetConfig, Split
from replication.data.sources import (PayloadKind, RawRecord, SplitListError, SplitRecords, downloads_hint, raw_dir,
                                      split_keys)

IMAGE_SUFFIXES = (".webp", ".jpg", ".jpeg", ".png")


def key_of(name: str) -> str:
    """'church_outdoor/abc123.webp' -> 'abc123' (an LMDB key has no image suffix)."""
    base = Path(name.strip()).name
    stem, ext = os.path.splitext(base)
    return stem if ext.lower() in IMAGE_SUFFIXES else base


def is_lmdb_dir(path: Path) -> bool:
    return (path / "data.mdb").is_file()


def _open_env(path: Path):
    import lmdb

    return lmdb.open(str(path), readonly=True, lock=False, readahead=False, meminit=False, max_readers=8, subdir=True)


def lmdb_keys(path: Path) -> list[str]:
    env = _open_env(path)
    try:
        with env.begin(write=False) as txn:
            return [k.decode() for k in txn.cursor().iternext(keys=True, values=False)]
    finally:
        env.close()


def _index_folder(path: Path) -> dict[str, Path]:
    """Exported images, flat or nested (fyu/lsun export_images writes either); key = file stem."""
    index: dict[str, Path] = {}
    for dirpath, _dirs, files in os.walk(path):
        for f in files:
            if f.lower().endswith(IMAGE_SUFFIXES):
                index[key_of(f)] = Path(dirpath) / f
    return index


def split_records(cfg: DatasetConfig, split: Split) -> SplitRecords:
    where = raw_dir(cfg)
    if is_lmdb_dir(where):
        keys, origin = split_keys(cfg, split, key_of, lambda: lmdb_keys(where))
        origin["format"] = "lmdb"
        return SplitRecords(len(keys), _lmdb_records(where, keys), origin)
    if where.is_dir():
        index = _index_folder(where)
        keys, origin = split_keys(cfg, split, key_of, lambda: list(index))
        missing = [k for k in keys if k not in index]
        if missing:
            raise SplitListError(f"{len(missing)} listed LSUN images are not under {where}, e.g. '{missing[0]}'")
        origin["format"] = "folder"
        records = (RawRecord(key=k, name=str(index[k]), payload=str(index[k]), kind=PayloadKind.IMAGE) for k in keys)
        return SplitRecords(len(keys), records, origin)
    hint = downloads_hint(cfg)
    raise FileNotFoundError(
        f"dataset '{cfg.name}': no LSUN LMDB or image folder at {where}: place the LSUN LMDB there as "
        f"{where / 'data.mdb'} (with its lock.mdb), or images exported from it as {where}/<key>.webp"
        + (f"\n{hint}" if hint else ""))


def _lmdb_records(where: Path, keys: list[str]) -> Iterator[RawRecord]:
    env = _open_env(where)
    try:
        with env.begin(write=False, buffers=False) as txn:
            for k in keys:
                value = txn.get(k.encode())
                if value is None:
                    raise SplitListError(f"LSUN key '{k}' from the split list is not in the LMDB at {where}")
                yield RawRecord(key=k, name=f"{where}[{k}]", payload=bytes(value), kind=PayloadKind.IMAGE)
    finally:
        env.close()
