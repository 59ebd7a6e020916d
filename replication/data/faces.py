"""Face datasets in their distributed layouts.
FFHQ: NVlabs ffhq-dataset `images1024x1024/00000/00000.png` (70,000 PNGs), with per-file MD5s in the published
`ffhq-dataset-v2.json`. CelebA-HQ: PGGAN's reconstruction as `imgHQ00000.npy` (uint8 1x3x1024x1024, read by
taming NumpyPaths), or the widely used JPEG mirror `CelebA-HQ-img/0.jpg` (CelebAMask-HQ), whose pixels differ
from the .npy files by JPEG compression. Splits: taming's data/{ffhq,celebahq}{train,validation}.txt."""
from __future__ import annotations

import json
import os
import re
from pathlib import Path
from typing import Optional

from tqdm import tqdm

from replication.data.config import DatasetConfig, Split
from replication.data.download import download
from replication.data.sources import PayloadKind, RawRecord, SplitListError, SplitRecords, raw_dir, split_keys

FFHQ_METADATA = "ffhq-dataset-v2.json"
_TRAILING_INT = re.compile(r"(\d+)$")


def ffhq_key(name: str) -> str:
    """'images1024x1024/00000/00123.png' or '00123.png' -> '00123'."""
    return os.path.splitext(Path(name.strip()).name)[0]


def celebahq_key(name: str) -> str:
    """'imgHQ00012.npy' and '12.jpg' both -> '00012': the CelebA-HQ index, zero-padded so it sorts."""
    stem = os.path.splitext(Path(name.strip()).name)[0]
    match = _TRAILING_INT.search(stem)
    if match is None:
        raise SplitListError(f"CelebA-HQ file name '{name}' has no image index")
    return f"{int(match.group(1)):05d}"


def _index(where: Path, suffixes: tuple[str, ...], key_of) -> dict[str, Path]:
    index: dict[str, Path] = {}
    for dirpath, _dirs, files in os.walk(where):
        for f in files:
            if f.lower().endswith(suffixes):
                key = key_of(f)
                if key in index:
                    raise SplitListError(f"two files for image '{key}': {index[key]} and {Path(dirpath) / f}")
                index[key] = Path(dirpath) / f
    return index


def ffhq_md5s(root: Path) -> Optional[dict[str, str]]:
    """key -> published file MD5, from ffhq-dataset-v2.json (entries: {"image": {"file_path", "file_md5"}})."""
    path = root / FFHQ_METADATA
    if not path.is_file():
        return None
    meta = json.loads(path.read_text())
    return {ffhq_key(e["image"]["file_path"]): e["image"]["file_md5"] for e in meta.values()}


def _records(cfg: DatasetConfig, split: Split, index: dict[str, Path], keys: list[str], origin: dict, kind_of,
             md5s=None) -> SplitRecords:
    missing = [k for k in keys if k not in index]
    if missing:
        raise SplitListError(
            f"dataset '{cfg.name}': {len(missing)} images of the '{split.value}' list are not under {raw_dir(cfg)}, "
            f"e.g. '{missing[0]}'"
        )
    records = (
        RawRecord(key=k, name=str(index[k]), payload=str(index[k]), kind=kind_of(index[k]), md5=(md5s or {}).get(k))
        for k in keys
    )
    return SplitRecords(len(keys), records, origin)


def fetch_ffhq_images(root: Path, keys: set[str], progress: bool = True) -> int:
    """Download the listed images from the URLs in ffhq-dataset-v2.json into root/<file_path>, each checked
    against its published MD5 (resumable, one file at a time). Returns how many were fetched."""
    meta = json.loads((root / FFHQ_METADATA).read_text())
    todo = [e["image"] for e in meta.values() if ffhq_key(e["image"]["file_path"]) in keys]
    todo = [im for im in todo if not (root / im["file_path"]).exists()]
    for im in tqdm(todo, desc="fetch FFHQ", unit="img", disable=not progress):
        download(im["file_url"], root / im["file_path"], md5=im["file_md5"], progress=False)
    return len(todo)


def ffhq_split_records(cfg: DatasetConfig, split: Split, progress: bool = True) -> SplitRecords:
    where, root = raw_dir(cfg), Path(cfg.root)
    index = _index(where, (".png",), ffhq_key) if where.is_dir() else {}
    md5s = ffhq_md5s(root) if (cfg.verify_checksums or not index) else None
    keys, origin = split_keys(cfg, split, ffhq_key, lambda: list(index) or list(md5s or {}))
    missing = {k for k in keys if k not in index}
    if missing and (root / FFHQ_METADATA).is_file():
        origin["fetched_from_metadata"] = fetch_ffhq_images(root, missing, progress)
        index = _index(where, (".png",), ffhq_key)
    if not index:
        raise FileNotFoundError(
            f"dataset '{cfg.name}': no FFHQ PNGs under {where} and no {FFHQ_METADATA} in {root}: place "
            f"{root / FFHQ_METADATA} (the images of a split are then fetched from its URLs), or the images as "
            f"{where / '00000' / '00000.png'} ... {where / '69000' / '69999.png'}")
    out = _records(cfg, split, index, keys, origin, lambda p: PayloadKind.IMAGE, md5s if cfg.verify_checksums else None)
    out.origin["format"] = "png_tree"
    out.origin["per_file_md5"] = (
        "verified against " + FFHQ_METADATA if (md5s is not None and cfg.verify_checksums) else "not verified (no metadata)"
    )
    return out


def _celebahq_files(where: Path) -> str:
    return (f"place the PGGAN arrays as {where / 'imgHQ00000.npy'} ... {where / 'imgHQ29999.npy'}, or the "
            f"CelebAMask-HQ JPEGs as {where / 'CelebA-HQ-img' / '0.jpg'} ... {where / 'CelebA-HQ-img' / '29999.jpg'}")


def celebahq_split_records(cfg: DatasetConfig, split: Split) -> SplitRecords:
    where = raw_dir(cfg)
    if not where.is_dir():
        raise FileNotFoundError(f"dataset '{cfg.name}': no CelebA-HQ folder at {where}: {_celebahq_files(where)}")
    index = _index(where, (".npy",), celebahq_key)
    fmt = "pggan_npy"
    if not index:
        index = _index(where, (".jpg", ".jpeg", ".png"), celebahq_key)
        fmt = "image_files"
    if not index:
        raise FileNotFoundError(f"dataset '{cfg.name}': no imgHQ*.npy or CelebA-HQ-img/*.jpg files under {where}: "
                                f"{_celebahq_files(where)}")
    kind_of = lambda p: PayloadKind.NPY if p.suffix.lower() == ".npy" else PayloadKind.IMAGE  # noqa: E731
    keys, origin = split_keys(cfg, split, celebahq_key, lambda: list(index))
    out = _records(cfg, split, index, keys, origin, kind_of)
    out.origin["format"] = fmt
    return out
