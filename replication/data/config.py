"""Strict schema of the `dataset` config group (experiments/dataset/*.yaml): where the raw files are, how the
paper prepared them (PROTOCOL.md §4), which split lists define train/val, and which set is the FID reference."""
from __future__ import annotations

from dataclasses import dataclass, field
from enum import Enum
from typing import Any, List, Mapping, Optional, Union

from omegaconf import MISSING, DictConfig

from replication.utils.schema import ConfigError, merge_into_schema


class Family(str, Enum):
    """Which on-disk format and which original loader a dataset follows."""

    builtin = "builtin"  # tiny synthetic images for the smoke run (no download)
    lsun = "lsun"  # LSUN LMDB export + ldm/data/lsun.py preprocessing
    ffhq = "ffhq"  # FFHQ images1024x1024 PNG tree + taming faceshq.py preprocessing
    celebahq = "celebahq"  # CelebA-HQ PGGAN .npy (or CelebA-HQ-img/*.jpg) + taming faceshq.py
    imagenet = "imagenet"  # ILSVRC2012 train/val folders + ldm/data/imagenet.py (taming ImagePaths)
    # image-caption pairs (text-to-image, Tab. 2): a folder of images with a .txt caption beside each, WebDataset
    # tar shards (LAION), or MS-COCO's captions annotation file (`captions` section)
    captioned = "captioned"
    # the same ILSVRC2012 folders, SR3-filtered, with ldm/data/imagenet.py ImageNetSR's crop (super-resolution)
    imagenet_sr = "imagenet_sr"
    places = "places"  # Places365-Standard high-resolution folders (inpainting: LaMa's protocol)


class Interpolation(str, Enum):
    """Resize kernel; named after the library call the original loader made."""

    pil_bicubic = "pil_bicubic"  # PIL Image.resize(..., BICUBIC): ldm/data/lsun.py
    cv2_bilinear = "cv2_bilinear"  # cv2.resize INTER_LINEAR, albumentations' default: taming base.py
    cv2_area = "cv2_area"  # cv2.resize INTER_AREA: ImageNetSR's rescaler of the crop (ldm/data/imagenet.py)
    none = "none"  # images are already at the target resolution (builtin)


class OnCorrupt(str, Enum):
    error = "error"  # stop, naming the file
    skip = "skip"  # leave it out; the dataset card lists and counts it


class FidReference(str, Enum):
    """Which prepared images the FID reference statistics come from (paper Sec. E.3.1: 'entire training set')."""

    train = "train"
    val = "val"
    all = "all"  # train + val


class Split(str, Enum):
    train = "train"
    val = "val"


@dataclass
class DownloadFile:
    """One file the dataset needs under `root`. With a `url` the download stage fetches it (resumable); without
    one it must be placed by hand (licence/login). Checksums: null means unknown; the card records the computed
    value. Never fill in a checksum that was not verified against the published one."""

    name: str = MISSING  # path relative to `root`
    url: Optional[str] = None
    sha256: Optional[str] = None
    md5: Optional[str] = None  # only where the publisher lists MD5 (FFHQ metadata, torchvision's ImageNet table)
    extract: bool = False  # zip/tar: extract into `root` after verification (safe_extract)
    # A path under `root` whose presence means the file was already fetched and extracted (skip the download);
    # when not at that path, a file of the same base name anywhere under `root` counts too.
    done_marker: Optional[str] = None


@dataclass
class DownloadConfig:
    files: List[DownloadFile] = field(default_factory=list)
    # Non-empty: the dataset needs a manual step; `required` lists what must exist under `root`.
    manual_instructions: str = ""
    required: List[str] = field(default_factory=list)


@dataclass
class SplitsConfig:
    """Original split lists (one file name per line, relative to the raw image folder). A list path is looked up
    under `root`; if absent there, a file with the same base name anywhere under `root` is used."""

    train_list: Optional[str] = None
    val_list: Optional[str] = None
    # Without the lists: documented deterministic split (sorted keys; the last `fallback_val_count` go to val).
    allow_fallback: bool = False
    fallback_val_count: Optional[int] = None


@dataclass
class BuiltinConfig:
    num_train: int = 256
    num_val: int = 64
    seed: int = 0
    labels: bool = False  # class = kind of the first shape (3 classes), for the class-conditional smoke run
    # "full" (smoke: any colours, one or two shapes) or "simple" (demo: six palette colours, one large shape);
    # see replication/data/builtin.py
    style: str = "full"
    # each image's caption (what was drawn, in words) in captions.json, and the WordPiece vocabulary of those words
    # as vocab.txt beside it, for the text-to-image smoke run
    captions: bool = False


class CaptionFormat(str, Enum):
    folder = "folder"  # <split>/**/NAME.{jpg,png,...} with NAME.txt beside it (the caption, UTF-8)
    webdataset = "webdataset"  # <split>/*.tar shards, each sample an image (jpg/png/webp) and its txt
    coco = "coco"  # MS-COCO: annotations/captions_<split><year>.json and the images of <split><year>/


class CaptionChoice(str, Enum):
    first = "first"  # the caption with the lowest annotation id
    random = "random"  # one of the image's captions drawn from (caption_seed, image id)


@dataclass
class CaptionsConfig:
    """Image-caption data (family captioned). The text-to-image evaluation of Tab. 2 follows DALL-E's protocol on
    30,000 MS-COCO validation images, but neither paper says which COCO year, which of an image's five captions
    or which 30,000 images: here they are config values, recorded in the dataset card."""

    format: CaptionFormat = CaptionFormat.folder
    coco_year: str = "2014"
    caption_choice: CaptionChoice = CaptionChoice.random
    caption_seed: int = 0
    # the split's images kept, drawn without replacement from (caption_seed) in image-id order (null: all)
    subset: Optional[int] = None


@dataclass
class SuperresDataConfig:
    """ImageNet prepared for super-resolution (family imagenet_sr; data/imagenet.py `sr_split_records`). The SR3
    filter keeps images whose shorter side is at least `min_side`: from the release's index files when they are
    under `root` (pickled lists of indices into the sorted file list, as ImageNetSR reads them), otherwise computed
    from every image's size. Each kept image is stored as one crop (data/superres.py `sr_crop`): side
    c * shorter side, c ~ U[min_crop_f, max_crop_f], INTER_AREA to `resolution`, drawn once from (crop_seed, image
    index); the release draws a new crop at every visit. The degradation is not stored: training draws it per
    visit (conditioning.degradation)."""

    train_indices: Optional[str] = "imagenet_train_hr_indices.p"
    val_indices: Optional[str] = "imagenet_val_hr_indices.p"
    min_side: int = 256
    min_crop_f: float = 0.5
    max_crop_f: float = 1.0
    random_crop: bool = True


class EvalList(str, Enum):
    """Which seeded evaluation list of the Places validation images the val split holds (data/places.py)."""

    test = "test"  # LaMa's protocol, Tab. 7 (30k)
    ablation = "ablation"  # Tab. 6 (2k)


@dataclass
class PlacesConfig:
    """Places for inpainting (family places): training images as random `resolution` crops, the evaluation list
    `eval_list` as `eval_resolution` centre crops. The two lists are drawn once from the sorted validation names with
    `list_seed` (test_count, then ablation_count, disjoint) and recorded in the dataset card."""

    eval_list: EvalList = EvalList.test
    list_seed: int = 0
    test_count: int = 30_000
    ablation_count: int = 2_000
    eval_resolution: int = 512


@dataclass
class DatasetConfig:
    name: str = MISSING
    family: Family = MISSING
    root: str = MISSING  # raw files
    prepared_dir: str = MISSING  # prepared/<split>/images.npy + card.json
    resolution: int = 256
    interpolation: Interpolation = MISSING
    flip_train: bool = False  # random horizontal flip p=0.5, training only (applied when reading)
    # Where inside `root` the images are (LSUN: the *_lmdb folder; FFHQ: images1024x1024; ImageNet: the folder
    # holding train/ and val/). null: `root` itself.
    raw_subdir: Optional[str] = None
    # ImageNet val without synset folders: a text file with "<file name> <wnid>" or one wnid per line.
    val_labels: Optional[str] = None
    # ImageNet training crop stored in the prepared set: the original draws a fresh random crop each epoch; a
    # prepared (and latent-cached) set holds one crop per image, drawn from (crop_seed, image index).
    crop_seed: int = 0
    splits: SplitsConfig = field(default_factory=SplitsConfig)
    fid_reference: FidReference = FidReference.train
    max_images: Optional[int] = None  # cap per split (null = all)
    on_corrupt: OnCorrupt = OnCorrupt.error
    verify_checksums: bool = True  # per-image checksums where the publisher lists them (FFHQ metadata)
    download: DownloadConfig = field(default_factory=DownloadConfig)
    num_workers: int = 2
    builtin: BuiltinConfig = field(default_factory=BuiltinConfig)
    superres: SuperresDataConfig = field(default_factory=SuperresDataConfig)  # family imagenet_sr only
    places: PlacesConfig = field(default_factory=PlacesConfig)  # family places only
    captions: CaptionsConfig = field(default_factory=CaptionsConfig)  # family captioned only
    source: str = MISSING  # citation: where the data and the preprocessing come from


# config sections that only one family reads: a dataset of another family leaves them out of its config hash, so
# adding a section does not re-prepare the datasets that ignore it
FAMILY_SECTIONS: dict[str, Family] = {"superres": Family.imagenet_sr, "places": Family.places,
                                      "captions": Family.captioned}


def validate_dataset_cfg(cfg: Union[Mapping[str, Any], DictConfig, DatasetConfig]) -> DatasetConfig:
    """Merge `cfg` into the schema; an unknown/missing/mistyped key raises naming the full key."""
    result = merge_into_schema(DatasetConfig, cfg, "dataset")
    _check_consistency(result)
    return result


def _check_consistency(cfg: DatasetConfig) -> None:
    def fail(msg: str) -> None:
        raise ConfigError(f"dataset config '{cfg.name}': {msg}")

    if cfg.resolution < 1:
        fail(f"'resolution' must be positive (got {cfg.resolution})")
    if cfg.max_images is not None and cfg.max_images < 1:
        fail(f"'max_images' must be positive or null (got {cfg.max_images})")
    if cfg.num_workers < 0:
        fail(f"'num_workers' must be >= 0 (got {cfg.num_workers})")
    if cfg.family is Family.builtin and cfg.interpolation is not Interpolation.none:
        fail("family 'builtin' makes images at the target resolution; set interpolation: none")
    if cfg.family is not Family.builtin and cfg.interpolation is Interpolation.none:
        fail(f"family '{cfg.family.value}' needs a resize interpolation")
    if cfg.splits.fallback_val_count is not None and cfg.splits.fallback_val_count < 0:
        fail(f"'splits.fallback_val_count' must be >= 0 (got {cfg.splits.fallback_val_count})")
    if cfg.captions.subset is not None and cfg.captions.subset < 1:
        fail(f"'captions.subset' must be positive or null (got {cfg.captions.subset})")
    if cfg.family in (Family.builtin, Family.imagenet, Family.imagenet_sr, Family.places, Family.captioned):
        if cfg.splits.train_list or cfg.splits.val_list:
            fail(f"family '{cfg.family.value}' defines splits by folders; remove 'splits.*_list'")
    sr = cfg.superres
    if sr.min_side < 1:
        fail(f"'superres.min_side' must be positive (got {sr.min_side})")
    if not 0.0 < sr.min_crop_f <= sr.max_crop_f <= 1.0:
        fail(f"'superres.min_crop_f' and 'superres.max_crop_f' need 0 < min <= max <= 1 (got {sr.min_crop_f}, "
             f"{sr.max_crop_f})")
    p = cfg.places
    if p.test_count < 0 or p.ablation_count < 0:
        fail(f"'places.test_count' and 'places.ablation_count' must be >= 0 (got {p.test_count}, {p.ablation_count})")
    if p.eval_resolution < 1:
        fail(f"'places.eval_resolution' must be positive (got {p.eval_resolution})")
    for f in cfg.download.files:
        for algo, length in (("sha256", 64), ("md5", 32)):
            value = getattr(f, algo)
            if value is not None and (len(value) != length or any(c not in "0123456789abcdef" for c in value.lower())):
                fail(f"download file '{f.name}': '{algo}' must be {length} hex digits or null (got {value!r})")
        if f.extract and not f.name.endswith((".zip", ".tar", ".tar.gz", ".tgz", ".tar.bz2", ".tar.xz")):
            fail(f"download file '{f.name}' has extract: true but is not a zip/tar archive")
