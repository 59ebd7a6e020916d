"""The prepare stage's work: raw files present (downloaded, verified, extracted, or placed by hand) -> one split
read in its on-disk format -> the paper's preprocessing -> prepared images with a dataset card."""
from __future__ import annotations

import logging
import multiprocessing as mp
import sys
from dataclasses import asdict
from functools import lru_cache
from itertools import islice
from pathlib import Path
from typing import Iterator, Optional

from replication.data.builtin import builtin_vocabulary, make_builtin_captioned
from replication.data.config import FAMILY_SECTIONS, DatasetConfig, Family, FidReference, OnCorrupt, Split
from replication.data.download import (DownloadError, ManualDownloadRequired, download, manual_instructions, require_manual,
                                       safe_extract, verify_checksum)
from replication.data.prepared import CARD, PreparedImages, SkippedImage, write_alias, write_prepared
from replication.data.preprocess import PreprocessSpec, crop_rng, preprocess_fn_for_spec, spec_dict, spec_for, spec_hash
from replication.data.families import iter_records
from replication.data.sources import CorruptImageError, RawRecord, decode_record, downloads_hint, find_list_file
from replication.data.tokenizer import VOCAB_FILE
from replication.utils.io import read_json, sha256_json
from replication.utils.verify import verify_records

REFERENCE = "reference"
log = logging.getLogger("replication")
EXTRACTED_SUFFIX = ".extracted"
_WINDOW_PER_WORKER = 64  # records in flight per worker: bounds memory when LMDB bytes are sent to workers


def split_dir(cfg: DatasetConfig, name: str) -> Path:
    return Path(cfg.prepared_dir) / name


def split_folder(cfg: DatasetConfig, split: Split) -> str:
    """The folder of a prepared split: its name, except Places validation, whose folder names its evaluation list
    (val_test, val_ablation), so Tab. 6's and Tab. 7's experiments keep both lists prepared side by side."""
    if cfg.family is Family.places and split is Split.val:
        return f"{split.value}_{cfg.places.eval_list.value}"
    return split.value


# ---------------------------------------------------------------------------------------------------------
# Raw files
# ---------------------------------------------------------------------------------------------------------
def ensure_raw(cfg: DatasetConfig, progress: bool = True) -> list[dict]:
    """Make the raw files exist under `root`: stop with instructions for manual datasets, otherwise download
    (resumable), verify and extract. Returns one record per configured file for the dataset card."""
    root = Path(cfg.root)
    missing_manual = [
        f.name for f in cfg.download.files
        if f.url is None and not (root / f.name).exists() and not (f.done_marker and find_list_file(root, f.done_marker))
    ]
    if cfg.download.manual_instructions:
        require_manual(root, list(cfg.download.required) + missing_manual, cfg.download.manual_instructions, cfg.name)
    elif missing_manual:
        require_manual(root, missing_manual, "Place these files by hand; they have no download URL.", cfg.name)
    records = []
    for f in cfg.download.files:
        target = root / f.name
        rec = {"name": f.name, "url": f.url, "expected_sha256": f.sha256, "expected_md5": f.md5}
        if f.done_marker and find_list_file(root, f.done_marker) is not None:
            rec["status"] = f"present ({f.done_marker} exists); not re-verified"
            records.append(rec)
            continue
        if f.url is not None:
            try:
                info = download(f.url, target, sha256=f.sha256, md5=f.md5, progress=progress)
            except DownloadError as exc:  # offline, say: name every file of the dataset to place by hand
                raise DownloadError(f"{exc}\n{downloads_hint(cfg)}") from exc
        else:
            info = {"sha256": verify_checksum(target, f.sha256, "sha256")}
            if f.md5 is not None:
                info["md5"] = verify_checksum(target, f.md5, "md5")
        rec.update(sha256=info["sha256"], md5=info.get("md5"), status="verified" if (f.sha256 or f.md5) else "checksum unknown; computed")
        marker = target.with_name(target.name + EXTRACTED_SUFFIX)
        if f.extract and not marker.exists():
            safe_extract(target, root)
            marker.write_text(info["sha256"] + "\n")
        records.append(rec)
    return records


# ---------------------------------------------------------------------------------------------------------
# Decode + preprocess, in worker processes
# ---------------------------------------------------------------------------------------------------------
@lru_cache(maxsize=8)
def _fn(spec: PreprocessSpec):
    return preprocess_fn_for_spec(spec)


def _process(job: tuple[RawRecord, PreprocessSpec, int]):
    rec, spec, index = job
    try:
        arr = _fn(spec)(decode_record(rec), crop_rng(spec, index))
    except CorruptImageError as exc:
        return ("corrupt", rec.name, exc.reason)
    return ("ok", rec.key, arr, rec.label, rec.caption)


def _jobs(records: Iterator[RawRecord], spec: PreprocessSpec) -> Iterator[tuple]:
    for index, rec in enumerate(records):
        yield rec, spec, index


def _processed(records: Iterator[RawRecord], spec: PreprocessSpec, workers: int) -> Iterator[tuple]:
    jobs = _jobs(records, spec)
    if workers <= 1:
        yield from map(_process, jobs)
        return
    ctx = mp.get_context("fork" if sys.platform.startswith("linux") else "spawn")
    with ctx.Pool(workers) as pool:
        while window := list(islice(jobs, workers * _WINDOW_PER_WORKER)):
            yield from pool.imap(_process, window, chunksize=8)


def _items(results: Iterator[tuple], on_corrupt: OnCorrupt):
    for res in results:
        if res[0] == "corrupt":
            _, name, reason = res
            if on_corrupt is OnCorrupt.error:
                raise CorruptImageError(name, reason + " (set on_corrupt: skip to leave such files out)")
            yield SkippedImage(name, reason)
        else:
            yield res[1], res[2], res[3], res[4]


# ---------------------------------------------------------------------------------------------------------
# Stage entry
# ---------------------------------------------------------------------------------------------------------
def _base_card(cfg: DatasetConfig, split: str, spec: PreprocessSpec, train_mode: bool) -> dict:
    return {
        "dataset": cfg.name,
        "family": cfg.family.value,
        "split": split,
        "mode": "train" if train_mode else "eval",
        "source": cfg.source,
        "raw_root": str(cfg.root),
        "preprocess_spec": spec_dict(spec),
        "spec_hash": spec_hash(spec),
        "flip_train": bool(cfg.flip_train and train_mode),
        "max_images": cfg.max_images,
        "on_corrupt": cfg.on_corrupt.value,
        "config_hash": config_hash(cfg, Split(split)),
    }


def config_hash(cfg: DatasetConfig, split: Optional[Split] = None) -> str:
    """Hash of every config field that can change the prepared pixels or their selection: not the worker count,
    not where the folders are (a moved data or runs folder keeps its prepared splits), not the sections of other
    families (FAMILY_SECTIONS), and for the Places training split not the `places` section, which chooses and
    crops the evaluation images only (switching the evaluation list must not prepare 1.8M training images again)."""
    fields = asdict(cfg)
    for location in ("num_workers", "root", "prepared_dir"):
        fields.pop(location)
    for section, family in FAMILY_SECTIONS.items():
        if cfg.family is not family or (family is Family.places and split is Split.train):
            fields.pop(section)
    if not cfg.builtin.captions:  # the captions switch counts only where it is on
        fields["builtin"].pop("captions")
    return sha256_json(fields)


def _is_current(out_dir: Path, card: dict) -> bool:
    """The folder holds a finished preparation for these settings, and every file its card lists still has the
    recorded SHA-256 (a damaged file is named in the log, and the split is prepared again)."""
    if not (out_dir / CARD).is_file():
        return False
    old = read_json(out_dir / CARD)
    if not all(old.get(k) == card[k] for k in ("dataset", "spec_hash", "config_hash", "split", "mode")):
        return False
    records = {str(out_dir / name): {"size": (out_dir / name).stat().st_size if (out_dir / name).exists() else -1,
                                     "sha256": digest} for name, digest in old.get("files", {}).items()}
    if not records:
        return False
    problems = verify_records(records, full=True)
    if problems:
        log.warning("prepared split %s no longer matches its card, so it is prepared again:\n  %s", out_dir,
                    "\n  ".join(problems))
        return False
    return True


def _summary(out_dir: Path, card: dict, reused: bool) -> dict:
    return {
        "path": str(out_dir),
        "dir": str(out_dir),
        "images": str(out_dir / "images.npy") if "parts" not in card else None,
        "card": str(out_dir / CARD),
        "count": card["count"],
        "num_skipped": card.get("num_skipped", 0),
        "spec_hash": card["spec_hash"],
        "reused": reused,
    }


def _prepare_split(cfg: DatasetConfig, split: Split, train_mode: bool, out_name: str, progress: bool, overwrite: bool) -> dict:
    spec = spec_for(cfg, train_mode)
    out_dir = split_dir(cfg, out_name)
    card = _base_card(cfg, split.value, spec, train_mode)
    if not overwrite and _is_current(out_dir, card):
        return _summary(out_dir, read_json(out_dir / CARD), reused=True)
    if cfg.family is Family.builtin:
        b = cfg.builtin
        n, start = (b.num_train, 0) if split is Split.train else (b.num_val, b.num_train)
        if cfg.max_images is not None:
            n = min(n, cfg.max_images)
        images, labels, captions = make_builtin_captioned(n, cfg.resolution, b.seed, start=start, style=b.style)
        card["split_origin"] = {"kind": "builtin", "rule": f"images {start}..{start + n - 1} of seed {b.seed}, style {b.style}",
                                "listed": n}
        if b.labels:
            card["split_origin"]["labels"] = "kind of the first shape: 0 disc, 1 square, 2 ring"
        extra = {}
        if b.captions:
            card["split_origin"]["captions"] = "what was drawn: 'a COLOUR SHAPE on a COLOUR and COLOUR gradient'"
            vocab = builtin_vocabulary()
            card["vocabulary"] = {"file": VOCAB_FILE, "tokens": len(vocab),
                                  "rule": "BERT's special tokens, then every word of the built-in captions"}
            extra[VOCAB_FILE] = "".join(t + "\n" for t in vocab)
        items = ((f"{start + i:06d}", images[i], int(labels[i]) if b.labels else None,
                  captions[i] if b.captions else None) for i in range(n))
        final = write_prepared(items, out_dir, card, progress=progress, total=n, extra_files=extra)
        return _summary(out_dir, final, reused=False)
    card["downloads"] = ensure_raw(cfg, progress)
    try:
        split_records = iter_records(cfg, split, progress)
    except FileNotFoundError as exc:
        if not cfg.download.manual_instructions:
            raise
        raise ManualDownloadRequired(f"{exc}\n\n{manual_instructions(cfg.download.manual_instructions, cfg.root)}") from exc
    card["split_origin"] = split_records.origin
    results = _processed(split_records.records, spec, cfg.num_workers)
    final = write_prepared(_items(results, cfg.on_corrupt), out_dir, card, progress=progress, total=split_records.count)
    return _summary(out_dir, final, reused=False)


def reference_splits(cfg: DatasetConfig) -> list[Split]:
    return {FidReference.train: [Split.train], FidReference.val: [Split.val], FidReference.all: [Split.train, Split.val]}[
        cfg.fid_reference
    ]


def prepare_dataset(cfg: DatasetConfig, split: str, progress: bool = True, overwrite: bool = False) -> dict:
    """Prepare `split` ('train', 'val' or 'reference') under `cfg.prepared_dir/<split>` (Places validation:
    `val_<evaluation list>`) and return a summary
    {dir, images, card, count, num_skipped, spec_hash, reused}. 'train' is stored with the training
    preprocessing (ImageNet: one random crop per image); 'val' with the evaluation one. 'reference' is the
    FID reference set named by `fid_reference`, always with evaluation preprocessing and no flips: a card
    that points at the train/val folders when their pixels are already the evaluation ones (no copy),
    otherwise a separately prepared `<split>_eval` folder."""
    if split == REFERENCE:
        parts = []
        for s in reference_splits(cfg):
            same = spec_for(cfg, train=s is Split.train) == spec_for(cfg, train=False)
            name = split_folder(cfg, s) if same else f"{split_folder(cfg, s)}_eval"
            parts.append(_prepare_split(cfg, s, train_mode=s is Split.train and same, out_name=name, progress=progress, overwrite=overwrite))
        out_dir = split_dir(cfg, REFERENCE)
        card = {
            "dataset": cfg.name,
            "split": REFERENCE,
            "fid_reference": cfg.fid_reference.value,
            "source": cfg.source,
            "note": "FID reference images: evaluation preprocessing, no flips (paper Sec. E.3.1: statistics of the training set)",
        }
        final = write_alias(out_dir, [p["dir"] for p in parts], card)
        return _summary(out_dir, final, reused=all(p["reused"] for p in parts))
    s = Split(split)
    return _prepare_split(cfg, s, train_mode=s is Split.train, out_name=split_folder(cfg, s), progress=progress,
                          overwrite=overwrite)


def open_prepared(cfg: DatasetConfig, split: str) -> PreparedImages:
    """A prepared split ('train', 'val' or 'reference'), or any prepared folder by its name."""
    names = {s.value: split_folder(cfg, s) for s in Split}
    return PreparedImages(split_dir(cfg, names.get(split, split)))
