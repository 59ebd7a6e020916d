"""Image-caption datasets for text-to-image (paper Sec. 4.3.1, Tab. 2): records that carry a caption beside the
image, read in one of three layouts (`dataset.captions.format`), each split in its own folder under the raw root:

- folder: `<split>/**/NAME.{jpg,png,...}` with the caption in `NAME.txt` beside it (UTF-8); keys are the paths
  relative to the split folder, in sorted order;
- webdataset: `<split>/*.tar` shards as LAION-400M is distributed (img2dataset): each sample an image (jpg, jpeg,
  png or webp) and its `txt`, read with the `webdataset` library, shards in sorted order;
- coco: MS-COCO as its publisher lays it out, `annotations/captions_<split><year>.json` and the images in
  `<split><year>/`. Tab. 2 evaluates on 30,000 validation images after DALL-E, without saying which year, which
  of each image's five captions or which 30,000: the year, the caption rule (`first`: lowest annotation id,
  `random`: drawn from (caption_seed, image id)) and the subset (`subset` images drawn from caption_seed, kept in
  image-id order) are config values, and the dataset card records them with the annotation file's SHA-256.

A record without a caption, or with an empty one, is an error naming the file: a text-conditioned model must not
train on an image whose caption was lost.
"""
from __future__ import annotations

import json
from itertools import islice
from pathlib import Path
from typing import Iterator

import numpy as np

from replication.data.config import CaptionChoice, CaptionFormat, DatasetConfig, Split
from replication.data.sources import RawRecord, SplitRecords, raw_dir
from replication.utils.io import sha256_file

IMAGE_SUFFIXES = (".jpg", ".jpeg", ".png", ".webp")
WDS_IMAGE_KEYS = ("jpg", "jpeg", "png", "webp")


class CaptionDataError(RuntimeError):
    """Image-caption data that cannot be read as configured; the message names the file and the fix."""


def split_records(cfg: DatasetConfig, split: Split) -> SplitRecords:
    """Records of one split, each with its caption, in the configured layout."""
    fmt = cfg.captions.format
    if fmt is CaptionFormat.coco:
        return _coco_records(cfg, split)
    folder = raw_dir(cfg) / split.value
    if not folder.is_dir():
        raise FileNotFoundError(f"dataset '{cfg.name}': no folder {folder} for the {split.value} split of the "
                                f"{fmt.value} captions layout (see replication/data/captioned.py)")
    if fmt is CaptionFormat.folder:
        return _folder_records(cfg, folder)
    return _webdataset_records(cfg, folder)


def _caption_text(text: str, name: str) -> str:
    caption = " ".join(text.split())
    if not caption:
        raise CaptionDataError(f"{name}: the caption is empty")
    return caption


def _folder_records(cfg: DatasetConfig, folder: Path) -> SplitRecords:
    images = sorted(p for p in folder.rglob("*") if p.is_file() and p.suffix.lower() in IMAGE_SUFFIXES)
    if cfg.max_images is not None:
        images = images[: cfg.max_images]
    if not images:
        raise FileNotFoundError(f"dataset '{cfg.name}': no images ({', '.join(IMAGE_SUFFIXES)}) under {folder}")
    missing = [p for p in images if not p.with_suffix(".txt").is_file()]
    if missing:
        raise CaptionDataError(f"{len(missing)} image(s) under {folder} have no caption file beside them, e.g. "
                               f"{missing[0].with_suffix('.txt')}")

    def records() -> Iterator[RawRecord]:
        for p in images:
            key = p.relative_to(folder).with_suffix("").as_posix()
            caption = _caption_text(p.with_suffix(".txt").read_text(encoding="utf-8"), str(p.with_suffix(".txt")))
            yield RawRecord(key=key, name=str(p), payload=str(p), caption=caption)

    origin = {"kind": "captions folder", "folder": str(folder), "listed": len(images), "max_images": cfg.max_images}
    return SplitRecords(len(images), records(), origin)


def _webdataset_records(cfg: DatasetConfig, folder: Path) -> SplitRecords:
    import webdataset as wds

    shards = sorted(str(p) for p in folder.glob("*.tar"))
    if not shards:
        raise FileNotFoundError(f"dataset '{cfg.name}': no WebDataset shards (*.tar) in {folder}")

    def records() -> Iterator[RawRecord]:
        # no shuffling and no caching: the shards are read once, in order, from the local disk
        samples = wds.WebDataset(shards, shardshuffle=False, empty_check=False, nodesplitter=_all_shards,
                                 workersplitter=_all_shards)
        for sample in samples:
            key, url = sample["__key__"], sample.get("__url__", folder)
            name = f"{url}:{key}"
            image = next((sample[k] for k in WDS_IMAGE_KEYS if k in sample), None)
            if image is None:
                raise CaptionDataError(f"{name}: the sample has no image ({', '.join(WDS_IMAGE_KEYS)})")
            if "txt" not in sample:
                raise CaptionDataError(f"{name}: the sample has no caption (txt)")
            caption = _caption_text(sample["txt"].decode("utf-8"), name)
            yield RawRecord(key=f"{Path(str(url)).stem}/{key}", name=name, payload=image, caption=caption)

    shown = records() if cfg.max_images is None else islice(records(), cfg.max_images)
    origin = {"kind": "webdataset", "folder": str(folder), "shards": [Path(s).name for s in shards],
              "max_images": cfg.max_images}
    return SplitRecords(None, shown, origin)


def _all_shards(urls):
    """Every shard to this reader: prepare reads a split in one process, whatever torch.distributed says."""
    return urls


def coco_caption_choice(captions: list[tuple[int, str]], choice: CaptionChoice, seed: int, image_id: int) -> str:
    """One caption of an image's (annotation id, caption) pairs: the lowest id's, or one drawn from (seed, image id)."""
    ordered = sorted(captions)
    if choice is CaptionChoice.first:
        return ordered[0][1]
    return ordered[int(np.random.default_rng([seed, image_id]).integers(len(ordered)))][1]


def _coco_records(cfg: DatasetConfig, split: Split) -> SplitRecords:
    c = cfg.captions
    name = f"{split.value}{c.coco_year}"
    root = raw_dir(cfg)
    ann_path = root / "annotations" / f"captions_{name}.json"
    image_dir = root / name
    if not ann_path.is_file() or not image_dir.is_dir():
        raise FileNotFoundError(f"dataset '{cfg.name}': MS-COCO {name} needs {ann_path} (from "
                                f"annotations_trainval{c.coco_year}.zip) and the images in {image_dir} (from "
                                f"{name}.zip), both from cocodataset.org")
    ann = json.loads(ann_path.read_text(encoding="utf-8"))
    files = {int(im["id"]): im["file_name"] for im in ann["images"]}
    by_image: dict[int, list[tuple[int, str]]] = {}
    for a in ann["annotations"]:
        by_image.setdefault(int(a["image_id"]), []).append((int(a["id"]), a["caption"]))
    ids = sorted(i for i in files if i in by_image)
    if c.subset is not None:
        if c.subset > len(ids):
            raise CaptionDataError(f"captions.subset={c.subset} but {ann_path} has {len(ids)} captioned images")
        keep = np.random.default_rng(c.caption_seed).choice(len(ids), size=c.subset, replace=False)
        ids = [ids[i] for i in sorted(keep)]
    if cfg.max_images is not None:
        ids = ids[: cfg.max_images]

    def records() -> Iterator[RawRecord]:
        for image_id in ids:
            path = image_dir / files[image_id]
            caption = coco_caption_choice(by_image[image_id], c.caption_choice, c.caption_seed, image_id)
            yield RawRecord(key=str(image_id), name=str(path), payload=str(path),
                            caption=_caption_text(caption, f"{ann_path} image {image_id}"))

    origin = {"kind": "coco", "annotations": str(ann_path), "annotations_sha256": sha256_file(ann_path),
              "year": c.coco_year, "caption_choice": c.caption_choice.value, "caption_seed": c.caption_seed,
              "subset": c.subset, "listed": len(ids)}
    return SplitRecords(len(ids), records(), origin)
