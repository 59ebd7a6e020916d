"""Each dataset's real on-disk format, built tiny by the test, read and prepared end to end; corrupt files;
manual datasets; the download stage against a local HTTP server."""
from __future__ import annotations

import hashlib
import io
import json
import shutil
import zipfile
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

try:
    from data_fixtures import encode, http_server, make_ffhq_tree, make_lsun_lmdb, random_image, truncate_file
except ImportError:
    from tests.data_fixtures import encode, http_server, make_ffhq_tree, make_lsun_lmdb, random_image, truncate_file

from replication.data.config import validate_dataset_cfg
from replication.data.download import ManualDownloadRequired
from replication.data.families import iter_images
from replication.data.prepare import prepare_dataset
from replication.data.prepared import PreparedImages
from replication.data.preprocess import preprocess_faces, preprocess_imagenet, preprocess_lsun
from replication.data.sources import CorruptImageError, SplitListError

RES = 8


def _cfg(tmp_path: Path, **kw):
    base = dict(name="t", root=str(tmp_path / "raw"), prepared_dir=str(tmp_path / "prep"), resolution=RES,
                num_workers=0, source="test fixture")
    base.update(kw)
    return validate_dataset_cfg(base)


def _pil(data: bytes) -> Image.Image:
    img = Image.open(io.BytesIO(data))
    img.load()
    return img


# ---------------------------------------------------------------------------------------------------------
# LSUN
# ---------------------------------------------------------------------------------------------------------
def _lsun_fixture(root: Path, n=7):
    rng = np.random.default_rng(0)
    keys = [hashlib.sha1(str(i).encode()).hexdigest() for i in range(n)]
    blobs = {}
    for i, k in enumerate(keys):
        arr = random_image(rng, 20 + i, 28)  # non-square, varying size
        blobs[k] = encode(arr, "WEBP", quality=90) if i % 2 == 0 else encode(arr, "JPEG", quality=90)
    make_lsun_lmdb(root / "church_outdoor_train_lmdb", blobs)
    (root / "lists").mkdir(parents=True)
    (root / "lists" / "church_outdoor_train.txt").write_text("".join(f"{k}.webp\n" for k in keys[:5]))
    (root / "lists" / "church_outdoor_val.txt").write_text("".join(f"{k}.webp\n" for k in keys[5:]))
    return keys, blobs


def _lsun_cfg(tmp_path, **kw):
    return _cfg(tmp_path, family="lsun", interpolation="pil_bicubic", flip_train=True, raw_subdir="church_outdoor_train_lmdb",
                splits={"train_list": "church_outdoor_train.txt", "val_list": "church_outdoor_val.txt"}, **kw)


def test_lsun_lmdb_prepared_end_to_end(tmp_path):
    keys, blobs = _lsun_fixture(tmp_path / "raw")
    cfg = _lsun_cfg(tmp_path, num_workers=2)
    summary = prepare_dataset(cfg, "train", progress=False)
    ds = PreparedImages(summary["dir"])
    assert len(ds) == 5 and ds.flip_train
    assert (Path(summary["dir"]) / "keys.txt").read_text().split() == keys[:5]
    for i, k in enumerate(keys[:5]):
        np.testing.assert_array_equal(ds[i], preprocess_lsun(_pil(blobs[k]), size=RES))
    assert ds.card["split_origin"]["kind"] == "list" and ds.card["split_origin"]["format"] == "lmdb"
    assert ds.card["spec_hash"] == summary["spec_hash"]
    val = prepare_dataset(cfg, "val", progress=False)
    assert val["count"] == 2 and not PreparedImages(val["dir"]).flip_train
    again = prepare_dataset(cfg, "train", progress=False)
    assert again["reused"]


def test_lsun_fallback_split_and_missing_list(tmp_path):
    keys, _ = _lsun_fixture(tmp_path / "raw")
    shutil.rmtree(tmp_path / "raw" / "lists")
    cfg = _lsun_cfg(tmp_path)
    with pytest.raises(SplitListError, match="church_outdoor_train.txt"):
        prepare_dataset(cfg, "train", progress=False)
    cfg = _lsun_cfg(tmp_path, **{})
    cfg.splits.allow_fallback, cfg.splits.fallback_val_count = True, 3
    tr = PreparedImages(prepare_dataset(cfg, "train", progress=False)["dir"])
    va = PreparedImages(prepare_dataset(cfg, "val", progress=False)["dir"])
    ordered = sorted(keys)
    assert (tr.dir / "keys.txt").read_text().split() == ordered[:4]
    assert (va.dir / "keys.txt").read_text().split() == ordered[4:]
    assert tr.card["split_origin"]["kind"] == "fallback"


@pytest.mark.reliability  # bad input gives a clear error and damages nothing
def test_lsun_corrupt_value_names_key_and_skip_counts(tmp_path):
    keys, blobs = _lsun_fixture(tmp_path / "raw")
    shutil.rmtree(tmp_path / "raw" / "church_outdoor_train_lmdb")
    blobs[keys[1]] = blobs[keys[1]][: len(blobs[keys[1]]) // 3]  # truncated JPEG
    make_lsun_lmdb(tmp_path / "raw" / "church_outdoor_train_lmdb", blobs)
    with pytest.raises(CorruptImageError, match=keys[1]):
        prepare_dataset(_lsun_cfg(tmp_path), "train", progress=False)
    summary = prepare_dataset(_lsun_cfg(tmp_path, on_corrupt="skip"), "train", progress=False)
    card = PreparedImages(summary["dir"]).card
    assert summary["count"] == 4 and card["num_skipped"] == 1 and keys[1] in card["skipped"][0]["name"]


def test_lsun_download_stage_over_http(tmp_path):
    """The configured archives are fetched from a server, checksummed (recorded in the card), extracted."""
    src = tmp_path / "src"
    keys, blobs = _lsun_fixture(src)
    srv = tmp_path / "srv"
    srv.mkdir()
    with zipfile.ZipFile(srv / "church_outdoor_train_lmdb.zip", "w") as zf:
        for f in (src / "church_outdoor_train_lmdb").iterdir():
            zf.write(f, f"church_outdoor_train_lmdb/{f.name}")
    with zipfile.ZipFile(srv / "lsun.zip", "w") as zf:
        for f in (src / "lists").iterdir():
            zf.write(f, f"lsun/{f.name}")
    with http_server(srv, drops=1, drop_after=500) as (url, _state):
        files = [
            {"name": "church_outdoor_train_lmdb.zip", "url": f"{url}/drop/church_outdoor_train_lmdb.zip", "extract": True,
             "done_marker": "church_outdoor_train_lmdb/data.mdb"},
            {"name": "lsun.zip", "url": f"{url}/lsun.zip", "extract": True},
        ]
        cfg = _lsun_cfg(tmp_path, download={"files": files})
        summary = prepare_dataset(cfg, "train", progress=False)
    card = PreparedImages(summary["dir"]).card
    assert summary["count"] == 5
    recorded = {d["name"]: d["sha256"] for d in card["downloads"]}
    assert recorded["lsun.zip"] == hashlib.sha256((srv / "lsun.zip").read_bytes()).hexdigest()
    assert recorded["church_outdoor_train_lmdb.zip"] == hashlib.sha256(
        (srv / "church_outdoor_train_lmdb.zip").read_bytes()).hexdigest()


# ---------------------------------------------------------------------------------------------------------
# FFHQ
# ---------------------------------------------------------------------------------------------------------
def _ffhq_images(n=5):
    rng = np.random.default_rng(1)
    return {i: random_image(rng, 16, 16) for i in range(n)}


def _ffhq_cfg(tmp_path, **kw):
    return _cfg(tmp_path, family="ffhq", interpolation="cv2_bilinear", raw_subdir="images1024x1024",
                splits={"train_list": "ffhqtrain.txt", "val_list": "ffhqvalidation.txt"}, **kw)


def _ffhq_lists(root: Path, train, val):
    (root / "ffhqtrain.txt").write_text("".join(f"{i:05d}.png\n" for i in train))
    (root / "ffhqvalidation.txt").write_text("".join(f"{i:05d}.png\n" for i in val))


def test_ffhq_png_tree_with_md5_metadata(tmp_path):
    imgs = _ffhq_images()
    root = tmp_path / "raw"
    make_ffhq_tree(root, imgs)
    _ffhq_lists(root, [3, 0, 1], [2, 4])
    summary = prepare_dataset(_ffhq_cfg(tmp_path), "train", progress=False)
    ds = PreparedImages(summary["dir"])
    for pos, n in enumerate([3, 0, 1]):
        np.testing.assert_array_equal(ds[pos], preprocess_faces(Image.fromarray(imgs[n]), size=RES))
    assert "verified" in ds.card["split_origin"]["per_file_md5"]
    # a file whose bytes differ from the published MD5 is named
    meta = json.loads((root / "ffhq-dataset-v2.json").read_text())
    meta["1"]["image"]["file_md5"] = "0" * 32
    (root / "ffhq-dataset-v2.json").write_text(json.dumps(meta))
    with pytest.raises(CorruptImageError, match=r"00001\.png.*md5 mismatch"):
        prepare_dataset(_ffhq_cfg(tmp_path), "train", progress=False, overwrite=True)


@pytest.mark.reliability  # bad input gives a clear error and damages nothing
def test_ffhq_truncated_png_error_and_skip(tmp_path):
    imgs = _ffhq_images()
    root = tmp_path / "raw"
    make_ffhq_tree(root, imgs)
    (root / "ffhq-dataset-v2.json").unlink()
    _ffhq_lists(root, [0, 1, 2], [3, 4])
    bad = root / "images1024x1024" / "00000" / "00002.png"
    truncate_file(bad, 0.6)
    with pytest.raises(CorruptImageError) as err:
        prepare_dataset(_ffhq_cfg(tmp_path), "train", progress=False)
    assert str(bad) in str(err.value)
    summary = prepare_dataset(_ffhq_cfg(tmp_path, on_corrupt="skip"), "train", progress=False)
    card = PreparedImages(summary["dir"]).card
    assert card["count"] == 2 and card["num_skipped"] == 1 and card["skipped"][0]["name"] == str(bad)
    assert "not verified" in card["split_origin"]["per_file_md5"]


def test_ffhq_images_fetched_from_published_metadata(tmp_path):
    imgs = _ffhq_images(4)
    srv = tmp_path / "srv"
    with http_server(srv) as (url, state):
        make_ffhq_tree(srv, imgs, url_base=url)  # the "published" tree + metadata with URLs and MD5s
        root = tmp_path / "raw"
        root.mkdir()
        shutil.copy(srv / "ffhq-dataset-v2.json", root / "ffhq-dataset-v2.json")
        _ffhq_lists(root, [0, 2], [1, 3])
        summary = prepare_dataset(_ffhq_cfg(tmp_path), "train", progress=False)
    ds = PreparedImages(summary["dir"])
    assert ds.card["split_origin"]["fetched_from_metadata"] == 2  # only the split's images
    assert sorted(p.name for p in (root / "images1024x1024").rglob("*.png")) == ["00000.png", "00002.png"]
    np.testing.assert_array_equal(ds[1], preprocess_faces(Image.fromarray(imgs[2]), size=RES))


# ---------------------------------------------------------------------------------------------------------
# CelebA-HQ
# ---------------------------------------------------------------------------------------------------------
def test_celebahq_pggan_npy_and_jpg_layouts(tmp_path):
    rng = np.random.default_rng(2)
    arrs = {i: random_image(rng, 16, 16) for i in range(4)}
    root = tmp_path / "raw"
    root.mkdir()
    for i, a in arrs.items():
        np.save(root / f"imgHQ{i:05d}.npy", a.transpose(2, 0, 1)[None])  # uint8 (1, 3, H, W)
    (root / "celebahqtrain.txt").write_text("imgHQ00002.npy\nimgHQ00000.npy\nimgHQ00003.npy\n")
    (root / "celebahqvalidation.txt").write_text("imgHQ00001.npy\n")
    cfg = _cfg(tmp_path, family="celebahq", interpolation="cv2_bilinear",
               splits={"train_list": "celebahqtrain.txt", "val_list": "celebahqvalidation.txt"})
    ds = PreparedImages(prepare_dataset(cfg, "train", progress=False)["dir"])
    assert ds.card["split_origin"]["format"] == "pggan_npy"
    for pos, n in enumerate([2, 0, 3]):
        np.testing.assert_array_equal(ds[pos], preprocess_faces(Image.fromarray(arrs[n]), size=RES))
    # the CelebAMask-HQ JPEG layout: N.jpg is image N
    jroot = tmp_path / "jraw"
    (jroot / "CelebA-HQ-img").mkdir(parents=True)
    for i, a in arrs.items():
        (jroot / "CelebA-HQ-img" / f"{i}.jpg").write_bytes(encode(a, "JPEG", quality=95))
    shutil.copy(root / "celebahqtrain.txt", jroot)
    shutil.copy(root / "celebahqvalidation.txt", jroot)
    cfg.root, cfg.prepared_dir = str(jroot), str(tmp_path / "jprep")
    keys = [k for k, _ in iter_images(cfg, "train")]
    assert keys == ["00002", "00000", "00003"]
    jds = PreparedImages(prepare_dataset(cfg, "train", progress=False)["dir"])
    assert jds.card["split_origin"]["format"] == "image_files"
    expected = preprocess_faces(_pil((jroot / "CelebA-HQ-img" / "2.jpg").read_bytes()), size=RES)
    np.testing.assert_array_equal(jds[0], expected)


@pytest.mark.reliability  # bad input gives a clear error and damages nothing
def test_celebahq_corrupt_npy_named(tmp_path):
    root = tmp_path / "raw"
    root.mkdir()
    np.save(root / "imgHQ00000.npy", np.zeros((1, 3, 8, 8), np.uint8))
    truncate_file(root / "imgHQ00000.npy", 0.5)
    (root / "t.txt").write_text("imgHQ00000.npy\n")
    cfg = _cfg(tmp_path, family="celebahq", interpolation="cv2_bilinear", splits={"train_list": "t.txt"})
    with pytest.raises(CorruptImageError, match="imgHQ00000.npy"):
        prepare_dataset(cfg, "train", progress=False)


def test_celebahq_missing_files_gives_instructions(tmp_path):
    (tmp_path / "raw").mkdir()
    cfg = _cfg(tmp_path, family="celebahq", interpolation="cv2_bilinear",
               download={"manual_instructions": "Put imgHQ00000.npy ... in the root"})
    with pytest.raises(ManualDownloadRequired, match="imgHQ00000.npy ... in the root"):
        prepare_dataset(cfg, "train", progress=False)


# ---------------------------------------------------------------------------------------------------------
# ImageNet
# ---------------------------------------------------------------------------------------------------------
def _imagenet_fixture(root: Path, flat_val: bool):
    rng = np.random.default_rng(3)
    wnids = ["n01440764", "n01443537", "n01484850"]
    train = {}
    for w in wnids:
        (root / "train" / w).mkdir(parents=True)
        for j in range(2):
            arr = random_image(rng, 12, 18)
            (root / "train" / w / f"{w}_{j}.JPEG").write_bytes(encode(arr, "JPEG", quality=95))
            train[f"{w}/{w}_{j}"] = wnids.index(w)
    val_labels = {}
    (root / "val").mkdir(parents=True)
    for j, w in enumerate(["n01484850", "n01440764", "n01443537", "n01440764"]):
        name = f"ILSVRC2012_val_{j + 1:08d}.JPEG"
        folder = root / "val" if flat_val else root / "val" / w
        folder.mkdir(exist_ok=True)
        (folder / name).write_bytes(encode(random_image(rng, 14, 10), "JPEG", quality=95))
        val_labels[name] = w
    if flat_val:
        (root / "val_labels.txt").write_text("".join(f"{n} {w}\n" for n, w in val_labels.items()))
    return wnids, train, val_labels


@pytest.mark.parametrize("flat_val", [False, True])
def test_imagenet_train_val_layouts(tmp_path, flat_val):
    root = tmp_path / "raw"
    wnids, train, val_labels = _imagenet_fixture(root, flat_val)
    cfg = _cfg(tmp_path, family="imagenet", interpolation="cv2_bilinear", crop_seed=5,
               val_labels="val_labels.txt" if flat_val else None)
    tr = PreparedImages(prepare_dataset(cfg, "train", progress=False)["dir"])
    keys = (tr.dir / "keys.txt").read_text().split()
    assert keys == sorted(train) and list(tr.labels) == [train[k] for k in keys]
    # training crop i is drawn from the stream (crop_seed, i)
    for i, k in enumerate(keys):
        img = _pil((root / "train" / f"{k}.JPEG").read_bytes())
        np.testing.assert_array_equal(tr[i], preprocess_imagenet(img, True, np.random.default_rng([5, i]), size=RES))
    va = PreparedImages(prepare_dataset(cfg, "val", progress=False)["dir"])
    vkeys = (va.dir / "keys.txt").read_text().split()
    names = [k.split("/")[-1] + ".JPEG" for k in vkeys]
    assert list(va.labels) == [wnids.index(val_labels[n]) for n in names]
    path = (root / "val" / names[0]) if flat_val else (root / "val" / val_labels[names[0]] / names[0])
    np.testing.assert_array_equal(va[0], preprocess_imagenet(_pil(path.read_bytes()), False, None, size=RES))
    assert va.card["mode"] == "eval" and tr.card["mode"] == "train" and tr.spec_hash != va.spec_hash


def test_imagenet_reference_uses_eval_preprocessing_of_train(tmp_path):
    root = tmp_path / "raw"
    _imagenet_fixture(root, flat_val=False)
    cfg = _cfg(tmp_path, family="imagenet", interpolation="cv2_bilinear")
    ref = prepare_dataset(cfg, "reference", progress=False)
    ds = PreparedImages(ref["dir"])
    assert len(ds) == 6 and ds.card["fid_reference"] == "train"
    assert ds.card["part_cards"][0]["mode"] == "eval" and Path(ds.card["parts"][0]).name == "train_eval"
    img = _pil((root / "train" / "n01440764" / "n01440764_0.JPEG").read_bytes())
    np.testing.assert_array_equal(ds[0], preprocess_imagenet(img, False, None, size=RES))


def test_imagenet_missing_gives_manual_instructions(tmp_path):
    cfg = _cfg(tmp_path, family="imagenet", interpolation="cv2_bilinear",
               download={"required": ["train", "val"], "manual_instructions": "Download ILSVRC2012_img_train.tar"})
    with pytest.raises(ManualDownloadRequired) as err:
        prepare_dataset(cfg, "train", progress=False)
    assert "ILSVRC2012_img_train.tar" in str(err.value) and str(tmp_path / "raw" / "val") in str(err.value)
