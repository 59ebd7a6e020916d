"""ImageNet (ILSVRC2012) as extracted from the academic-download tars: `train/nXXXXXXXX/*.JPEG`, and `val/`
either with the same synset folders or flat with a labels file. Class index = position of the WordNet id in
sorted order (the standard ILSVRC2012 class order, which taming's index_synset.yaml follows). The super-resolution
family (imagenet_sr) reads the same folders through the SR3 filter (`sr_split_records`)."""
from __future__ import annotations

import pickle
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import numpy as np
from PIL import Image

from replication.data.config import DatasetConfig, OnCorrupt, Split
from replication.data.sources import (CorruptImageError, PayloadKind, RawRecord, SplitListError, SplitRecords,
                                      evenly_spaced, find_list_file, raw_dir)
from replication.data.superres import passes_sr3_filter
from replication.utils.io import sha256_file
from replication.utils.progress import ProgressLog

IMAGE_SUFFIXES = (".jpeg", ".jpg", ".png")
# ldm/data/imagenet.py ImageNetBase._filter_relpaths drops this file from every split.
IGNORED_FILES = frozenset({"n06596364_9591.JPEG"})
_SIZE_WINDOW = 4096  # image headers read per batch of the SR3 filter


def _images_in(folder: Path) -> list[Path]:
    return sorted(p for p in folder.iterdir() if p.is_file() and p.name.lower().endswith(IMAGE_SUFFIXES) and p.name not in IGNORED_FILES)


def _synset_dirs(folder: Path) -> list[Path]:
    return sorted(p for p in folder.iterdir() if p.is_dir())


def synsets(cfg: DatasetConfig) -> list[str]:
    train = raw_dir(cfg) / "train"
    found = _synset_dirs(train) if train.is_dir() else []
    if not found:
        raise FileNotFoundError(
            f"dataset '{cfg.name}': no ImageNet train {'synset folders in' if train.is_dir() else 'folder at'} "
            f"{train}: extract ILSVRC2012_img_train.tar there, one folder per synset "
            f"({train / 'n01440764' / 'n01440764_10026.JPEG'} ...)")
    return [p.name for p in found]


def _read_val_labels(path: Path, files: list[Path]) -> dict[str, str]:
    """'<file name> <wnid>' per line, or one wnid per line for the val files in sorted name order."""
    lines = [ln.split() for ln in path.read_text().splitlines() if ln.strip()]
    if all(len(parts) == 2 for parts in lines):
        return {Path(name).name: wnid for name, wnid in lines}
    if all(len(parts) == 1 for parts in lines):
        if len(lines) != len(files):
            raise SplitListError(f"{path} has {len(lines)} labels for {len(files)} val images")
        return {f.name: parts[0] for f, parts in zip(files, lines)}
    raise SplitListError(f"{path}: expected '<file> <wnid>' or '<wnid>' on every line")


def _split_items(cfg: DatasetConfig, split: Split) -> tuple[list[tuple[str, Path, int]], str, list[str]]:
    """Every image of the split as (key, path, class index), uncapped, with the layout found and the synsets."""
    names = synsets(cfg)
    index = {wnid: i for i, wnid in enumerate(names)}
    folder = raw_dir(cfg) / split.value
    if not folder.is_dir():
        raise FileNotFoundError(
            f"dataset '{cfg.name}': no ImageNet {split.value} folder at {folder}: extract "
            f"ILSVRC2012_img_{split.value}.tar there ({folder / 'n01440764'}/*.JPEG per synset, or the files flat "
            "with val_labels set)")
    items: list[tuple[str, Path, int]] = []
    sub = _synset_dirs(folder)
    if sub:
        for d in sub:
            if d.name not in index:
                raise SplitListError(f"{d} is a synset that the train folder does not have")
            items += [(f"{d.name}/{p.stem}", p, index[d.name]) for p in _images_in(d)]
        return items, "synset_folders", names
    files = _images_in(folder)
    if cfg.val_labels is None:
        raise SplitListError(
            f"dataset '{cfg.name}': {folder} has no synset folders; set 'val_labels' to a file with "
            "'<file name> <wnid>' lines"
        )
    labels_path = Path(cfg.val_labels) if Path(cfg.val_labels).is_absolute() else Path(cfg.root) / cfg.val_labels
    labels = _read_val_labels(labels_path, files)
    for p in files:
        wnid = labels.get(p.name)
        if wnid is None or wnid not in index:
            raise SplitListError(f"{labels_path}: no valid label for {p.name} (got {wnid!r})")
        items.append((p.stem, p, index[wnid]))
    return items, "flat_with_labels", names


def _records(items: list[tuple[str, Path, int]], origin: dict) -> SplitRecords:
    records = (RawRecord(key=k, name=str(p), payload=str(p), kind=PayloadKind.IMAGE, label=y) for k, p, y in items)
    return SplitRecords(len(items), records, origin)


def split_records(cfg: DatasetConfig, split: Split) -> SplitRecords:
    items, layout, names = _split_items(cfg, split)
    # a capped split is evenly spaced over the sorted list, so it still covers all classes
    items = evenly_spaced(items, cfg.max_images)
    return _records(items, {"kind": "folders", "format": layout, "num_classes": len(names), "listed": len(items)})


# ---------------------------------------------------------------------------------------------------------
# Super-resolution (family imagenet_sr): the SR3 filter
# ---------------------------------------------------------------------------------------------------------
class IndexFileError(SplitListError):
    """A release index file that is not a list of distinct in-range indices, or holds anything else."""


class _IndexUnpickler(pickle.Unpickler):
    """Reads a pickled list (or numpy array) of integers and nothing else: a pickle can name any callable, and an
    index file placed by hand must not run code."""

    ALLOWED = frozenset({("numpy", "ndarray"), ("numpy", "dtype"), ("numpy.core.multiarray", "_reconstruct"),
                         ("numpy._core.multiarray", "_reconstruct"), ("numpy.core.multiarray", "scalar"),
                         ("numpy._core.multiarray", "scalar")})

    def find_class(self, module: str, name: str):
        if (module, name) not in self.ALLOWED:
            raise IndexFileError(f"the index file names {module}.{name}; it may hold only a list of integers")
        return super().find_class(module, name)


def read_index_file(path: Path, total: int) -> list[int]:
    """The release's imagenet_{train,val}_hr_indices.p: indices into the sorted file list of `total` images, in
    the file's order (as the release's Subset takes them); each must be distinct and in range."""
    try:
        with open(path, "rb") as fh:
            loaded = _IndexUnpickler(fh).load()
    except IndexFileError:
        raise
    except (pickle.UnpicklingError, EOFError, ValueError, TypeError, AttributeError, ImportError) as exc:
        raise IndexFileError(f"{path} is not a readable pickle of indices: {exc}") from None
    values = np.asarray(loaded).reshape(-1) if not isinstance(loaded, (list, tuple)) else loaded
    if not all(isinstance(v, (int, np.integer)) and not isinstance(v, bool) for v in values):
        raise IndexFileError(f"{path} must hold integers (got {type(loaded).__name__})")
    indices = [int(v) for v in values]
    bad = [i for i in indices if not 0 <= i < total]
    if bad:
        raise IndexFileError(f"{path}: {len(bad)} indices outside the {total} images found (first: {bad[0]}); "
                             "the index file belongs to a complete ILSVRC2012 folder")
    if len(set(indices)) != len(indices):
        raise IndexFileError(f"{path} lists an index twice")
    return indices


def _image_size(path: Path) -> tuple[int, int] | str:
    """(height, width) from the file's header (no decoding), or why it cannot be read."""
    try:
        with Image.open(path) as img:
            width, height = img.size
    except (OSError, SyntaxError, ValueError) as exc:
        return f"{type(exc).__name__}: {exc}"
    return height, width


def _sr3_filter(cfg: DatasetConfig, ordered: list[tuple[str, Path, int]], progress: bool) -> tuple[list, list[dict]]:
    """The images whose shorter side is at least superres.min_side, read from every file's header; unreadable
    headers stop the preparation (on_corrupt: error) or are left out and listed (skip)."""
    kept, unreadable = [], []
    with ThreadPoolExecutor(max_workers=max(1, cfg.num_workers)) as pool, \
            ProgressLog(f"SR3 filter of {cfg.name}", total=len(ordered), unit="img", bar=progress) as bar:
        for start in range(0, len(ordered), _SIZE_WINDOW):  # a window at a time: not a million futures at once
            window = ordered[start:start + _SIZE_WINDOW]
            for item, size in zip(window, pool.map(_image_size, [p for _, p, _ in window])):
                if isinstance(size, str):
                    if cfg.on_corrupt is OnCorrupt.error:
                        raise CorruptImageError(str(item[1]), size + " (set on_corrupt: skip to leave such files out)")
                    unreadable.append({"name": str(item[1]), "reason": size})
                elif passes_sr3_filter(*size, min_side=cfg.superres.min_side):
                    kept.append(item)
            bar.update(len(window))
    return kept, unreadable


def sr_split_records(cfg: DatasetConfig, split: Split, progress: bool = True) -> SplitRecords:
    """The SR3-filtered split (family imagenet_sr): the release's index file when it is under `root` (found by its
    base name anywhere below it), otherwise the filter computed from the image sizes. The release indexes the
    sorted relative paths '<wnid>/<file name>' of its synset-folder layout, so the images are put in that order
    first, whichever layout the val folder has. The card's origin records which way the filter was made and the
    number of images kept."""
    items, layout, names = _split_items(cfg, split)
    ordered = sorted(items, key=lambda item: f"{names[item[2]]}/{item[1].name}")
    listed = cfg.superres.train_indices if split is Split.train else cfg.superres.val_indices
    path = find_list_file(Path(cfg.root), listed) if listed else None
    origin: dict = {"kind": "folders", "format": layout, "num_classes": len(names), "all_images": len(ordered)}
    if path is not None:
        kept = [ordered[i] for i in read_index_file(path, len(ordered))]
        origin["sr3_filter"] = {
            "how": "release index file", "file": listed, "file_sha256": sha256_file(path), "kept": len(kept),
            "rule": "indices into the sorted '<wnid>/<file name>' list, in the file's order (ImageNetSR's Subset)"}
    else:
        kept, unreadable = _sr3_filter(cfg, ordered, progress)
        origin["sr3_filter"] = {
            "how": "computed from image sizes", "kept": len(kept), "min_side": cfg.superres.min_side,
            "rule": f"shorter side >= {cfg.superres.min_side} px, read from each file's header, in the sorted "
                    f"'<wnid>/<file name>' order", "index_file_looked_for": listed,
            "unreadable": unreadable, "num_unreadable": len(unreadable)}
    kept = evenly_spaced(kept, cfg.max_images)
    origin["listed"] = len(kept)
    return _records(kept, origin)
