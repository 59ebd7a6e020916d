"""Places365 for the inpainting experiments (paper Sec. 4.5, Tab. 6 and 7; PROTOCOL.md section 7).

On disk, as the publisher's high-resolution tars extract (places2.csail.mit.edu, "Places365-Standard, high resolution",
shorter side 512 or more): `data_large/<letter>/<category>[/<sub>]/<n>.jpg` for training and
`val_large/Places365_val_<n>.jpg` (36,500 images) for validation. LaMa evaluates on 30k images drawn from the
validation set and the paper's ablation (Tab. 6) on 2k more. LaMa drew its list without a seed, so it cannot be made
again; here the two lists are drawn from the sorted validation file names with a recorded seed, disjoint, and
written into the dataset card, so every machine evaluates the same images. `split_records` reads a split for the
prepare stage: every training image, or the evaluation list the dataset config names (`places.eval_list`).
"""
from __future__ import annotations

import hashlib
from dataclasses import dataclass
from pathlib import Path

import numpy as np

from replication.data.config import DatasetConfig, EvalList, Split
from replication.data.sources import PayloadKind, RawRecord, SplitRecords, evenly_spaced, raw_dir

TRAIN_DIR = "data_large"
VAL_DIR = "val_large"
IMAGE_SUFFIXES = (".jpg", ".jpeg", ".png")
PLACES_VAL_COUNT = 36_500  # Places365-Standard validation: 100 images x 365 categories
LAMA_TEST_COUNT = 30_000
LDM_ABLATION_COUNT = 2_000


class PlacesLayoutError(FileNotFoundError):
    """The Places folders are missing or hold fewer images than asked for."""


def _images(folder: Path) -> list[str]:
    return sorted(p.relative_to(folder).as_posix() for p in folder.rglob("*")
                  if p.is_file() and p.suffix.lower() in IMAGE_SUFFIXES)


def _published_folder(root: Path, sub: str, tar: str, example: str) -> Path:
    folder = Path(root) / sub
    if not folder.is_dir():
        raise PlacesLayoutError(
            f"no Places folder at {folder}: extract {tar} (Places365-Standard, high resolution, from "
            f"places2.csail.mit.edu) into {root} ({folder}/{example} ...)")
    return folder


def train_files(root: Path) -> list[str]:
    return _images(_published_folder(root, TRAIN_DIR, "train_large_places365standard.tar", "a/airfield/00000001.jpg"))


def val_files(root: Path) -> list[str]:
    return _images(_published_folder(root, VAL_DIR, "val_large.tar", "Places365_val_00000001.jpg"))


@dataclass(frozen=True)
class EvaluationLists:
    """The fixed evaluation subsets of the validation images: `test` (LaMa's 30k protocol) and `ablation`
    (the 2k of Tab. 6), disjoint, each sorted by file name; `list_sha256` identifies both for the card."""

    seed: int
    test: tuple[str, ...]
    ablation: tuple[str, ...]

    @property
    def list_sha256(self) -> str:
        text = "\n".join(["# test"] + list(self.test) + ["# ablation"] + list(self.ablation)) + "\n"
        return hashlib.sha256(text.encode()).hexdigest()

    def card(self) -> dict:
        return {"seed": self.seed, "test_count": len(self.test), "ablation_count": len(self.ablation),
                "lists_sha256": self.list_sha256, "rule": "seeded permutation of the sorted validation file names; "
                "the first test_count are the test list, the next ablation_count the ablation list"}


def evaluation_lists(names: list[str], seed: int, test_count: int = LAMA_TEST_COUNT,
                     ablation_count: int = LDM_ABLATION_COUNT) -> EvaluationLists:
    """Draw the two lists: a permutation of the sorted names from `seed`, first `test_count` then `ablation_count`.
    The result depends only on the set of names and the seed, not on their order or the machine."""
    ordered = sorted(set(names))
    if len(ordered) != len(names):
        raise PlacesLayoutError("the validation file names are not unique")
    if test_count < 0 or ablation_count < 0:
        raise ValueError("list sizes must be >= 0")
    if test_count + ablation_count > len(ordered):
        raise PlacesLayoutError(f"{len(ordered)} validation images, fewer than the {test_count} + {ablation_count} the "
                                "evaluation lists need")
    order = np.random.default_rng(seed).permutation(len(ordered))
    test = tuple(sorted(ordered[i] for i in order[:test_count]))
    ablation = tuple(sorted(ordered[i] for i in order[test_count:test_count + ablation_count]))
    return EvaluationLists(seed, test, ablation)


def split_records(cfg: DatasetConfig, split: Split) -> SplitRecords:
    """Training: every image under data_large, sorted by path. Validation: the evaluation list `places.eval_list`
    (test or ablation) of `evaluation_lists(val images, places.list_seed, places.test_count, places.ablation_count)`,
    whose seed, counts and hash the card records. A capped split (max_images) is evenly spaced over its list. Keys are
    the paths below the published folder without the suffix."""
    root = raw_dir(cfg)
    if split is Split.train:
        names = train_files(root)
        folder = root / TRAIN_DIR
        origin: dict = {"kind": "folders", "format": f"{TRAIN_DIR}/<letter>/<category>/*.jpg", "all_images": len(names)}
    else:
        all_names = val_files(root)
        folder = root / VAL_DIR
        p = cfg.places
        lists = evaluation_lists(all_names, p.list_seed, p.test_count, p.ablation_count)
        names = list(lists.test if p.eval_list is EvalList.test else lists.ablation)
        origin = {"kind": "evaluation_list", "format": f"{VAL_DIR}/*.jpg", "eval_list": p.eval_list.value,
                  "all_images": len(all_names), "evaluation_lists": lists.card()}
    names = evenly_spaced(names, cfg.max_images)
    origin["listed"] = len(names)
    records = (RawRecord(key=Path(n).with_suffix("").as_posix(), name=str(folder / n), payload=str(folder / n),
                         kind=PayloadKind.IMAGE) for n in names)
    return SplitRecords(len(names), records, origin)
