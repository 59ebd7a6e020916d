"""Captions through the data layer: built-in captions and their vocabulary, captions beside prepared images and in
the latent cache (checked against their recorded hash), and the three image-caption layouts (folder, WebDataset
shards, MS-COCO) through the prepare stage's reader."""
from __future__ import annotations

import io
import json
import tarfile
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image

from replication.data.builtin import (COLOUR_NAMES, builtin_vocabulary, colour_rgb, make_builtin_captioned,
                                      make_builtin_images, parse_builtin_caption)
from replication.data.captioned import CaptionDataError, coco_caption_choice
from replication.data.config import CaptionChoice, validate_dataset_cfg
from replication.data.latents import LatentDataset, encode_to_cache
from replication.data.prepare import open_prepared, prepare_dataset
from replication.data.prepared import CAPTIONS, PreparedImages, write_prepared
from replication.data.tokenizer import CaptionTokenizer
from replication.utils.io import ArtifactError


@pytest.mark.parametrize("style", ["full", "simple"])
def test_builtin_captions_name_what_was_drawn_and_leave_the_pixels_alone(style):
    images, labels, captions = make_builtin_captioned(40, 16, seed=3, style=style)
    np.testing.assert_array_equal(images, make_builtin_images(40, 16, seed=3, style=style))
    for image, label, caption in zip(images, labels, captions):
        parsed = parse_builtin_caption(caption)
        assert parsed["shapes"][0][1] == ("disc", "square", "ring")[label]
        if style == "simple":  # palette colours: the shape's exactly, every other pixel between the two ends
            pixels = image.reshape(-1, 3).astype(np.float32)
            shape = (pixels == colour_rgb(parsed["shapes"][0][0])).all(1)
            assert shape.any(), caption
            c0, c1 = (colour_rgb(c) for c in parsed["gradient"])
            t = np.clip((pixels[~shape] - c0) @ (c1 - c0) / ((c1 - c0) @ (c1 - c0)), 0, 1)
            assert np.abs(pixels[~shape] - (c0 + t[:, None] * (c1 - c0))).max() < 2, caption


def test_builtin_vocabulary_tokenizes_every_caption_without_unknown_words(tmp_path):
    vocab = tmp_path / "vocab.txt"
    vocab.write_text("".join(t + "\n" for t in builtin_vocabulary()))
    tok = CaptionTokenizer(vocab)
    _, _, captions = make_builtin_captioned(30, 8, seed=0)
    ids = tok(captions)
    assert ids.shape == (30, 77) and ids.dtype == torch.int64
    assert not (ids == tok.vocab["[UNK]"]).any()
    assert tok.decode(ids) == captions


def test_parse_builtin_caption_refuses_other_text():
    assert parse_builtin_caption("a red disc on a blue and green gradient") == {
        "shapes": [("red", "disc")], "gradient": ("blue", "green")}
    for bad in ("a cat on a mat", "a purple disc on a blue and green gradient", "a red disc on a blue gradient"):
        with pytest.raises(ValueError):
            parse_builtin_caption(bad)
    assert set(COLOUR_NAMES) <= set(builtin_vocabulary())


def _smoke_txt(tmp_path, **builtin):
    return validate_dataset_cfg({
        "name": "t", "family": "builtin", "root": str(tmp_path / "raw"), "prepared_dir": str(tmp_path / "prep"),
        "resolution": 16, "interpolation": "none", "fid_reference": "val", "num_workers": 0, "source": "test",
        "builtin": {"num_train": 12, "num_val": 5, "style": "simple", "captions": True, **builtin}})


def test_prepared_captions_and_vocabulary_are_recorded_and_verified(tmp_path):
    cfg = _smoke_txt(tmp_path)
    prepare_dataset(cfg, "train", progress=False)
    prepare_dataset(cfg, "reference", progress=False)
    train = open_prepared(cfg, "train")
    assert train.captions == make_builtin_captioned(12, 16, seed=0, style="simple")[2]
    assert open_prepared(cfg, "reference").captions == make_builtin_captioned(5, 16, 0, start=12, style="simple")[2]
    assert train.card["has_captions"] and {CAPTIONS, "vocab.txt"} <= set(train.card["files"])
    assert (train.dir / "vocab.txt").read_text().split() == builtin_vocabulary()
    # a caption edited after preparation is refused by name, and the next prepare makes the split again
    (train.dir / CAPTIONS).write_text(json.dumps(["x"] * 12))
    with pytest.raises(ArtifactError, match="SHA-256"):
        _ = PreparedImages(train.dir).captions
    assert prepare_dataset(cfg, "train", progress=False)["reused"] is False
    assert open_prepared(cfg, "train").captions[0] != "x"


def test_captions_go_into_the_latent_cache(tmp_path):
    cfg = _smoke_txt(tmp_path)
    prepare_dataset(cfg, "train", progress=False)
    images = open_prepared(cfg, "train")
    encode_to_cache(lambda x: x[:, :, ::4, ::4].repeat(1, 2, 1, 1)[:, :8], images, tmp_path / "c.latents",
                    batch_size=5, progress=False)
    cache = LatentDataset(tmp_path / "c.latents")
    assert cache.captions == images.captions and cache.card["has_captions"]
    (tmp_path / "c.latents" / CAPTIONS).write_text(json.dumps(list(reversed(images.captions))))
    with pytest.raises(ArtifactError, match="SHA-256"):
        LatentDataset(tmp_path / "c.latents")


def test_images_with_and_without_captions_are_refused(tmp_path):
    img = np.zeros((4, 4, 3), np.uint8)
    with pytest.raises(ValueError, match="some images have captions"):
        write_prepared([("a", img, None, "a cap"), ("b", img, None, None)], tmp_path / "p", {"spec_hash": "x"},
                       progress=False)


def _png(rgb, size=20) -> bytes:
    buf = io.BytesIO()
    Image.fromarray(np.full((size, size, 3), rgb, np.uint8)).save(buf, format="PNG")
    return buf.getvalue()


def _captioned_cfg(tmp_path, fmt, **captions):
    return validate_dataset_cfg({
        "name": "cap", "family": "captioned", "root": str(tmp_path / "raw"), "prepared_dir": str(tmp_path / "prep"),
        "resolution": 16, "interpolation": "pil_bicubic", "fid_reference": "val", "num_workers": 0, "source": "test",
        "captions": {"format": fmt, **captions}})


def test_caption_folder_is_read_in_sorted_order_with_each_caption(tmp_path):
    val = tmp_path / "raw" / "val"
    (val / "sub").mkdir(parents=True)
    for name, rgb, text in (("b", 10, "second  image\n"), ("a", 200, "first image"), ("sub/c", 90, "third")):
        (val / f"{name}.png").write_bytes(_png(rgb))
        (val / f"{name}.txt").write_text(text)
    cfg = _captioned_cfg(tmp_path, "folder")
    prepare_dataset(cfg, "val", progress=False)
    prepared = open_prepared(cfg, "val")
    assert prepared.captions == ["first image", "second image", "third"]
    assert prepared.get_batch(np.arange(3))[:, 0, 0, 0].tolist() == [200, 10, 90]
    (val / "a.txt").unlink()
    with pytest.raises(CaptionDataError, match="no caption file"):
        prepare_dataset(cfg, "val", progress=False, overwrite=True)


def _shard(path: Path, samples):
    with tarfile.open(path, "w") as tar:
        for key, members in samples:
            for ext, data in members.items():
                info = tarfile.TarInfo(f"{key}.{ext}")
                info.size = len(data)
                tar.addfile(info, io.BytesIO(data))


def test_webdataset_shards_are_read_with_their_captions(tmp_path):
    train = tmp_path / "raw" / "train"
    train.mkdir(parents=True)
    _shard(train / "00001.tar", [("000010", {"png": _png(30), "txt": b"a dark square"}),
                                 ("000011", {"png": _png(120), "txt": "caf\u00e9 table".encode()})])
    _shard(train / "00000.tar", [("000000", {"png": _png(250), "txt": b"a bright square", "json": b"{}"})])
    cfg = _captioned_cfg(tmp_path, "webdataset")
    prepare_dataset(cfg, "train", progress=False)
    prepared = open_prepared(cfg, "train")
    assert prepared.captions == ["a bright square", "a dark square", "caf\u00e9 table"]
    assert prepared.get_batch(np.arange(3))[:, 5, 5, 1].tolist() == [250, 30, 120]
    assert prepared.card["split_origin"]["shards"] == ["00000.tar", "00001.tar"]
    _shard(train / "00002.tar", [("000020", {"png": _png(1)})])
    with pytest.raises(CaptionDataError, match="no caption"):
        prepare_dataset(cfg, "train", progress=False, overwrite=True)


def _coco(tmp_path, n=6):
    root = tmp_path / "raw"
    (root / "annotations").mkdir(parents=True)
    (root / "val2014").mkdir()
    images, annotations = [], []
    for i in range(n):
        image_id = 100 + i
        images.append({"id": image_id, "file_name": f"COCO_val2014_{image_id:012d}.jpg"})
        Image.fromarray(np.full((24, 32, 3), 10 * i, np.uint8)).save(root / "val2014" / images[-1]["file_name"])
        for k in range(3):  # annotation ids out of order: "first" means the lowest id
            annotations.append({"id": 1000 * (3 - k) + i, "image_id": image_id, "caption": f"image {i} caption {3 - k}"})
    (root / "annotations" / "captions_val2014.json").write_text(json.dumps({"images": images,
                                                                            "annotations": annotations}))


def test_coco_captions_follow_the_configured_choice_subset_and_seed(tmp_path):
    _coco(tmp_path)
    cfg = _captioned_cfg(tmp_path, "coco", caption_choice="first", subset=4, caption_seed=7)
    prepare_dataset(cfg, "val", progress=False)
    prepared = open_prepared(cfg, "val")
    keep = sorted(np.random.default_rng(7).choice(6, size=4, replace=False))
    assert prepared.captions == [f"image {i} caption 1" for i in keep]
    origin = prepared.card["split_origin"]
    assert origin["year"] == "2014" and origin["caption_choice"] == "first" and len(origin["annotations_sha256"]) == 64
    pairs = [(5, "x"), (2, "y"), (9, "z")]
    drawn = {coco_caption_choice(pairs, CaptionChoice.random, seed, 1) for seed in range(30)}
    assert drawn == {"x", "y", "z"}
    assert coco_caption_choice(pairs, CaptionChoice.random, 3, 1) == coco_caption_choice(pairs, CaptionChoice.random, 3, 1)
