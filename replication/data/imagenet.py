"""ImageNet (ILSVRC2012) as extracted from the academic-download tars: `train/nXXXXXXXX/*.JPEG`, and `val/`
either with the same synset folders or flat with a labels file. Class index = position of the WordNet id in
sorted order (the standard ILSVRC2012 class order, which taming's index_synset.yaml follows)."""
from __future__ import annotations

from pathlib import Path

from replication.data.config import DatasetConfig, Split
from replication.data.sources import PayloadKind, RawRecord, SplitListError, SplitRecords, raw_dir

IMAGE_SUFFIXES = (".jpeg", ".jpg", ".png")
# ldm/data/imagenet.py ImageNetBase._filter_relpaths drops this file from every split.
IGNORED_FILES = frozenset({"n06596364_9591.JPEG"})


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


def split_records(cfg: DatasetConfig, split: Split) -> SplitRecords:
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
        layout = "synset_folders"
    else:
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
        layout = "flat_with_labels"
    if cfg.max_images is not None and cfg.max_images < len(items):
        # evenly spaced over the sorted list, so a capped set still covers all classes
        step = len(items) / cfg.max_images
        items = [items[int(i * step)] for i in range(cfg.max_images)]
    origin = {"kind": "folders", "format": layout, "num_classes": len(names), "listed": len(items)}
    records = (RawRecord(key=k, name=str(p), payload=str(p), kind=PayloadKind.IMAGE, label=y) for k, p, y in items)
    return SplitRecords(len(items), records, origin)
