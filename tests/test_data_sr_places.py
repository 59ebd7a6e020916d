"""The super-resolution and inpainting datasets prepared end to end from tiny folders in the publishers' layouts:
ImageNet through the SR3 filter (computed from the image sizes, or the release's index files) with one SR crop per
image; Places365 as random training crops and the seeded evaluation lists as centre crops; the dataset cards; and
what a user who lacks the data is told."""
from __future__ import annotations

import io
import os
import pickle
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

try:
    from data_fixtures import encode, random_image
except ImportError:
    from tests.data_fixtures import encode, random_image

from replication.data.config import validate_dataset_cfg
from replication.data.download import ManualDownloadRequired
from replication.data.imagenet import IndexFileError
from replication.data.places import evaluation_lists
from replication.data.prepare import config_hash, open_prepared, prepare_dataset
from replication.data.prepared import PreparedImages
from replication.data.preprocess import preprocess_imagenet_sr, preprocess_places, spec_for, spec_hash
from replication.data.sources import CorruptImageError
from replication.data.superres import SRSpec, sr_crop

RES = 16
WNIDS = ["n01440764", "n01443537"]
# (height, width) of each training image per synset: shorter sides on both sides of SR3's 256
TRAIN_SIZES = {"n01440764": [(256, 300), (200, 320), (300, 270)], "n01443537": [(255, 400), (280, 260)]}
VAL_SIZES = [(260, 300), (180, 400), (256, 256), (300, 250)]
VAL_WNIDS = ["n01443537", "n01440764", "n01440764", "n01443537"]


def _pil(path: Path) -> Image.Image:
    img = Image.open(io.BytesIO(path.read_bytes()))
    img.load()
    return img


def _imagenet(root: Path, flat_val: bool = False) -> tuple[dict[str, list[str]], dict[str, tuple[int, int]]]:
    """ILSVRC2012 as extracted: train/<wnid>/<wnid>_<j>.JPEG and val/ (synset folders, or flat with a labels file).
    Returns the relative paths '<wnid>/<file>' of each split in the release's sorted order, and each one's size."""
    rng = np.random.default_rng(0)
    rel: dict[str, list[str]] = {"train": [], "val": []}
    sizes: dict[str, tuple[int, int]] = {}
    for w, shapes in TRAIN_SIZES.items():
        (root / "train" / w).mkdir(parents=True)
        for j, (h, wd) in enumerate(shapes):
            (root / "train" / w / f"{w}_{j}.JPEG").write_bytes(encode(random_image(rng, h, wd), "JPEG", quality=90))
            rel["train"].append(f"{w}/{w}_{j}.JPEG")
            sizes[rel["train"][-1]] = (h, wd)
    labels = []
    for j, ((h, wd), w) in enumerate(zip(VAL_SIZES, VAL_WNIDS)):
        name = f"ILSVRC2012_val_{j + 1:08d}.JPEG"
        folder = root / "val" if flat_val else root / "val" / w
        folder.mkdir(parents=True, exist_ok=True)
        (folder / name).write_bytes(encode(random_image(rng, h, wd), "JPEG", quality=90))
        rel["val"].append(f"{w}/{name}")
        sizes[rel["val"][-1]] = (h, wd)
        labels.append(f"{name} {w}\n")
    if flat_val:
        (root / "val_labels.txt").write_text("".join(labels))
    return {k: sorted(v) for k, v in rel.items()}, sizes


def _sr_cfg(tmp_path: Path, **kw):
    base = dict(name="sr", family="imagenet_sr", root=str(tmp_path / "raw"), prepared_dir=str(tmp_path / "prep"),
                resolution=RES, interpolation="cv2_area", crop_seed=3, fid_reference="val", num_workers=0,
                source="test fixture")
    base.update(kw)
    return validate_dataset_cfg(base)


def _expected_sr(path: Path, seed: int, index: int) -> np.ndarray:
    """ImageNetSR's crop of one image, through data/superres.py itself, from the image's stream (seed, index)."""
    arr = np.asarray(_pil(path).convert("RGB"))
    return sr_crop(arr, SRSpec(size=RES, factor=1), np.random.default_rng([seed, index]))


def _kept(rel: list[str], sizes: dict[str, tuple[int, int]]) -> list[str]:
    """SR3's filter, by hand: the shorter side is at least 256."""
    return [r for r in rel if min(sizes[r]) >= 256]


def test_sr3_filter_computed_from_the_image_sizes(tmp_path):
    rel, sizes = _imagenet(tmp_path / "raw")
    cfg = _sr_cfg(tmp_path)
    summary = prepare_dataset(cfg, "train", progress=False)
    ds = PreparedImages(summary["dir"])
    kept = _kept(rel["train"], sizes)
    assert len(ds) == len(kept) == 3
    assert (ds.dir / "keys.txt").read_text().split() == [r.removesuffix(".JPEG") for r in kept]
    assert list(ds.labels) == [WNIDS.index(r.split("/")[0]) for r in kept]
    for i, r in enumerate(kept):  # one SR crop per image, drawn from (crop_seed, index in the kept list)
        np.testing.assert_array_equal(ds[i], _expected_sr(tmp_path / "raw" / "train" / r, 3, i))
    origin = ds.card["split_origin"]["sr3_filter"]
    assert origin["how"] == "computed from image sizes" and origin["kept"] == 3 and origin["min_side"] == 256
    assert ds.card["split_origin"]["all_images"] == 5 and ds.card["split_origin"]["listed"] == 3
    assert ds.card["preprocess_spec"]["crop_factor"] == [0.5, 1.0] and ds.card["preprocess_spec"]["crop_seed"] == 3
    # the same settings give the same bytes; another crop seed other crops and another preprocessing hash
    first = (ds.dir / "images.npy").read_bytes()
    again = prepare_dataset(cfg, "train", progress=False, overwrite=True)
    assert (Path(again["dir"]) / "images.npy").read_bytes() == first and again["spec_hash"] == summary["spec_hash"]
    other = _sr_cfg(tmp_path, crop_seed=4, prepared_dir=str(tmp_path / "prep4"))
    other_ds = PreparedImages(prepare_dataset(other, "train", progress=False)["dir"])
    assert other_ds.spec_hash != ds.spec_hash and not np.array_equal(other_ds[0], ds[0])


def test_reference_is_the_filtered_validation_set_with_the_same_crop(tmp_path):
    rel, sizes = _imagenet(tmp_path / "raw")
    cfg = _sr_cfg(tmp_path)
    ref = PreparedImages(prepare_dataset(cfg, "reference", progress=False)["dir"])
    kept = _kept(rel["val"], sizes)
    assert len(ref) == len(kept) == 2 and ref.card["fid_reference"] == "val"
    assert Path(ref.card["parts"][0]).name == "val" and ref.card["part_cards"][0]["mode"] == "eval"
    assert spec_for(cfg, True) == spec_for(cfg, False)  # the release's train and validation crops are the same
    np.testing.assert_array_equal(ref[0], _expected_sr(tmp_path / "raw" / "val" / kept[0], 3, 0))


def _index_file(path: Path, indices) -> None:
    path.write_bytes(pickle.dumps(indices))


@pytest.mark.parametrize("flat_val", [False, True])
def test_release_index_files_select_and_order_the_images(tmp_path, flat_val):
    rel, _ = _imagenet(tmp_path / "raw", flat_val=flat_val)
    (tmp_path / "raw" / "data").mkdir()
    _index_file(tmp_path / "raw" / "data" / "imagenet_train_hr_indices.p", [4, 0, 2])  # found below root
    _index_file(tmp_path / "raw" / "imagenet_val_hr_indices.p", np.array([3, 1], dtype=np.int64))
    cfg = _sr_cfg(tmp_path, val_labels="val_labels.txt" if flat_val else None)
    tr = PreparedImages(prepare_dataset(cfg, "train", progress=False)["dir"])
    assert (tr.dir / "keys.txt").read_text().split() == [rel["train"][i].removesuffix(".JPEG") for i in (4, 0, 2)]
    origin = tr.card["split_origin"]["sr3_filter"]
    assert origin["how"] == "release index file" and origin["kept"] == 3
    assert origin["file"] == "imagenet_train_hr_indices.p" and len(origin["file_sha256"]) == 64
    # the release indexes the sorted '<wnid>/<file>' list, whichever layout val has here
    va = PreparedImages(prepare_dataset(cfg, "val", progress=False)["dir"])
    names = [Path(k).name for k in (va.dir / "keys.txt").read_text().split()]
    assert names == [Path(rel["val"][i]).stem for i in (3, 1)]
    assert list(va.labels) == [WNIDS.index(rel["val"][i].split("/")[0]) for i in (3, 1)]
    folder = (tmp_path / "raw" / "val") if flat_val else (tmp_path / "raw" / "val" / rel["val"][3].split("/")[0])
    np.testing.assert_array_equal(va[0], _expected_sr(folder / Path(rel["val"][3]).name, 3, 0))


class _RunsCode:
    def __reduce__(self):
        return (os.getcwd, ())


@pytest.mark.parametrize("content,match", [(_RunsCode(), "getcwd"), ([0, 9], "outside"), ([1, 1], "twice"),
                                           (["a"], "integers"), ({"a": 1}, "integers")])
def test_an_index_file_that_is_not_a_list_of_indices_is_refused(tmp_path, content, match):
    _imagenet(tmp_path / "raw")
    _index_file(tmp_path / "raw" / "imagenet_train_hr_indices.p", content)
    with pytest.raises(IndexFileError, match=match):
        prepare_dataset(_sr_cfg(tmp_path), "train", progress=False)


def test_unreadable_image_stops_or_is_listed(tmp_path):
    _imagenet(tmp_path / "raw")
    bad = tmp_path / "raw" / "train" / WNIDS[0] / f"{WNIDS[0]}_9.JPEG"
    bad.write_bytes(b"not a jpeg")
    with pytest.raises(CorruptImageError, match=bad.name):
        prepare_dataset(_sr_cfg(tmp_path), "train", progress=False)
    ds = PreparedImages(prepare_dataset(_sr_cfg(tmp_path, on_corrupt="skip"), "train", progress=False)["dir"])
    origin = ds.card["split_origin"]["sr3_filter"]
    assert len(ds) == 3 and origin["num_unreadable"] == 1 and origin["unreadable"][0]["name"] == str(bad)


def test_superres_settings_count_only_for_their_family(tmp_path):
    base = _sr_cfg(tmp_path)
    assert config_hash(_sr_cfg(tmp_path, superres={"min_side": 128})) != config_hash(base)
    assert spec_hash(spec_for(_sr_cfg(tmp_path, superres={"min_crop_f": 0.6}), True)) != spec_hash(spec_for(base, True))
    imagenet = dict(family="imagenet", interpolation="cv2_bilinear")
    other_sections = {"superres": {"min_side": 128}, "places": {"eval_list": "ablation"}}
    assert config_hash(_sr_cfg(tmp_path, **imagenet)) == config_hash(_sr_cfg(tmp_path, **other_sections, **imagenet))
    assert spec_for(_sr_cfg(tmp_path, **imagenet), True).crop_factor is None


def test_missing_imagenet_names_the_tars_and_the_index_files(tmp_path):
    from omegaconf import OmegaConf

    from replication.stages.entry import CONFIG_DIR

    yaml = OmegaConf.load(CONFIG_DIR / "dataset" / "imagenet_sr.yaml")
    cfg = _sr_cfg(tmp_path, download=OmegaConf.to_container(yaml.download))
    with pytest.raises(ManualDownloadRequired) as err:
        prepare_dataset(cfg, "train", progress=False)
    text = str(err.value)
    assert "ILSVRC2012_img_train.tar" in text and f"{tmp_path / 'raw'}/imagenet_val_hr_indices.p" in text


def test_preprocess_imagenet_sr_is_the_release_crop():
    arr = random_image(np.random.default_rng(1), 40, 60)
    ours = preprocess_imagenet_sr(Image.fromarray(arr), np.random.default_rng(5), size=8, crop_factor=(0.5, 0.9))
    theirs = sr_crop(arr, SRSpec(size=8, factor=1, max_crop_f=0.9), np.random.default_rng(5))
    np.testing.assert_array_equal(ours, theirs)


# ---------------------------------------------------------------------------------------------------------
# Places
# ---------------------------------------------------------------------------------------------------------
PLACES_TRAIN = {"a/airfield/00000001.jpg": (40, 60), "a/airfield/00000002.jpg": (50, 40),
                "b/bakery/shop/00000001.jpg": (12, 30)}  # the last has a shorter side below the crop
EVAL = 20


def _places(root: Path, n_val: int = 12) -> list[str]:
    rng = np.random.default_rng(7)
    for rel, (h, w) in PLACES_TRAIN.items():
        (root / "data_large" / rel).parent.mkdir(parents=True, exist_ok=True)
        (root / "data_large" / rel).write_bytes(encode(random_image(rng, h, w), "JPEG", quality=90))
    (root / "val_large").mkdir(parents=True)
    names = []
    for i in range(1, n_val + 1):
        name = f"Places365_val_{i:08d}.jpg"
        h, w = (30 + i, 24) if i % 2 else (EVAL, 36 + i)
        (root / "val_large" / name).write_bytes(encode(random_image(rng, h, w), "JPEG", quality=90))
        names.append(name)
    return names


def _places_cfg(tmp_path: Path, **kw):
    base = dict(name="places", family="places", root=str(tmp_path / "raw"), prepared_dir=str(tmp_path / "prep"),
                resolution=RES, interpolation="pil_bicubic", crop_seed=2, fid_reference="val", num_workers=0,
                places={"list_seed": 5, "test_count": 6, "ablation_count": 3, "eval_resolution": EVAL},
                source="test fixture")
    base.update(kw)
    return validate_dataset_cfg(base)


def test_places_training_crops(tmp_path):
    _places(tmp_path / "raw")
    ds = PreparedImages(prepare_dataset(_places_cfg(tmp_path), "train", progress=False)["dir"])
    keys = sorted(PLACES_TRAIN)
    assert (ds.dir / "keys.txt").read_text().split() == [k.removesuffix(".jpg") for k in keys]
    assert ds.card["mode"] == "train" and ds.card["preprocess_spec"]["crop"] == "random"
    for i, k in enumerate(keys):
        arr = np.asarray(_pil(tmp_path / "raw" / "data_large" / k).convert("RGB"))
        h, w = arr.shape[:2]
        if min(h, w) >= RES:  # a window of the image at its stored scale
            rng = np.random.default_rng([2, i])
            top, left = int(rng.integers(0, h - RES + 1)), int(rng.integers(0, w - RES + 1))
            np.testing.assert_array_equal(ds[i], arr[top:top + RES, left:left + RES])
        else:  # scaled up to the crop size first
            up = np.asarray(Image.fromarray(arr).resize((round(w * RES / h), RES), Image.Resampling.BICUBIC))
            assert any(np.array_equal(ds[i], up[:, x:x + RES]) for x in range(up.shape[1] - RES + 1))


def test_places_evaluation_lists_as_centre_crops(tmp_path):
    names = _places(tmp_path / "raw")
    cfg = _places_cfg(tmp_path)
    lists = evaluation_lists(names, seed=5, test_count=6, ablation_count=3)
    prepare_dataset(cfg, "reference", progress=False)
    ref, val = open_prepared(cfg, "reference"), open_prepared(cfg, "val")
    assert val.dir.name == "val_test" and Path(ref.card["parts"][0]).name == "val_test" and len(ref) == 6
    assert (val.dir / "keys.txt").read_text().split() == [n.removesuffix(".jpg") for n in lists.test]
    origin = val.card["split_origin"]
    assert origin["evaluation_lists"] == lists.card() and origin["eval_list"] == "test" and origin["all_images"] == 12
    assert val.card["mode"] == "eval" and val.card["shape"] == [6, EVAL, EVAL, 3]
    for i, name in enumerate(lists.test):  # shorter side to EVAL with PIL bicubic, then the centre square
        img = _pil(tmp_path / "raw" / "val_large" / name).convert("RGB")
        w, h = img.size
        size = (EVAL, round(h * EVAL / w)) if w < h else (round(w * EVAL / h), EVAL)
        full = np.asarray(img.resize(size, Image.Resampling.BICUBIC) if size != (w, h) else img)
        top, left = (full.shape[0] - EVAL) // 2, (full.shape[1] - EVAL) // 2
        np.testing.assert_array_equal(val[i], full[top:top + EVAL, left:left + EVAL])
    # the ablation list: its own folder; the training split does not depend on the evaluation list
    ablation = _places_cfg(tmp_path, places={"eval_list": "ablation", "list_seed": 5, "test_count": 6,
                                             "ablation_count": 3, "eval_resolution": EVAL})
    abl = PreparedImages(prepare_dataset(ablation, "val", progress=False)["dir"])
    assert abl.dir.name == "val_ablation" and (abl.dir / "keys.txt").read_text().split() == [
        n.removesuffix(".jpg") for n in lists.ablation]
    assert (val.dir / "card.json").is_file()  # both lists stay prepared
    train = prepare_dataset(cfg, "train", progress=False)
    assert prepare_dataset(ablation, "train", progress=False) == {**train, "reused": True}
    assert config_hash(cfg, None) != config_hash(ablation, None)
    # the same settings give the same bytes
    before = (val.dir / "images.npy").read_bytes()
    again = prepare_dataset(cfg, "val", progress=False, overwrite=True)
    assert (Path(again["dir"]) / "images.npy").read_bytes() == before


def test_preprocess_places_keeps_an_image_already_at_the_evaluation_size():
    arr = random_image(np.random.default_rng(2), EVAL, 31)
    np.testing.assert_array_equal(preprocess_places(Image.fromarray(arr), False, None, EVAL), arr[:, 5:25])


def test_missing_places_names_the_tar_and_where_to_extract_it(tmp_path):
    from omegaconf import OmegaConf

    from replication.stages.entry import CONFIG_DIR

    download = OmegaConf.to_container(OmegaConf.load(CONFIG_DIR / "dataset" / "places.yaml").download)
    root = tmp_path / "raw"
    cfg = _places_cfg(tmp_path, download=download)
    with pytest.raises(ManualDownloadRequired) as err:  # nothing there yet
        prepare_dataset(cfg, "val", progress=False)
    text = str(err.value)
    assert f"{root} does not exist" in text and f"{root}/val_large/Places365_val_00000001.jpg" in text
    (root / "data_large" / "a").mkdir(parents=True)  # the training folder alone
    with pytest.raises(ManualDownloadRequired) as err:
        prepare_dataset(cfg, "reference", progress=False)
    text = str(err.value)
    assert text.startswith(f"no Places folder at {root / 'val_large'}: extract val_large.tar")
    assert f"tar -xf val_large.tar -C {root}" in text
