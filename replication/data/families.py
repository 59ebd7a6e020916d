"""Which reader turns a dataset's raw files into records: one per dataset family with raw files (`READERS`).
The family modules (lsun.py, faces.py, imagenet.py, places.py, captioned.py) read their on-disk layouts with the
records, split lists and decoding of sources.py; this module sits above all of them and picks one by `cfg.family`."""
from __future__ import annotations

from typing import Callable, Iterator

from PIL import Image

from replication.data import captioned, faces, imagenet, lsun, places
from replication.data.config import DatasetConfig, Family, Split
from replication.data.sources import SplitRecords, decode_record

# (cfg, split, progress) -> the split's records; `progress` matters where listing a split downloads (FFHQ)
READERS: dict[Family, Callable[[DatasetConfig, Split, bool], SplitRecords]] = {
    Family.lsun: lambda cfg, split, progress: lsun.split_records(cfg, split),
    Family.ffhq: faces.ffhq_split_records,
    Family.celebahq: lambda cfg, split, progress: faces.celebahq_split_records(cfg, split),
    Family.imagenet: lambda cfg, split, progress: imagenet.split_records(cfg, split),
    Family.imagenet_sr: imagenet.sr_split_records,
    Family.places: lambda cfg, split, progress: places.split_records(cfg, split),
    Family.captioned: lambda cfg, split, progress: captioned.split_records(cfg, split),
}


def iter_records(cfg: DatasetConfig, split: Split | str, progress: bool = True) -> SplitRecords:
    """Records of one split in the family's on-disk format."""
    split = Split(split)
    reader = READERS.get(cfg.family)
    if reader is None:
        raise ValueError(f"family '{cfg.family.value}' has no raw files (builtin images are generated)")
    return reader(cfg, split, progress)


def iter_images(cfg: DatasetConfig, split: Split | str) -> Iterator[tuple[str, Image.Image]]:
    """(key, PIL image) for each image of the split; a corrupt file raises CorruptImageError naming it."""
    for rec in iter_records(cfg, split).records:
        yield rec.key, decode_record(rec)
