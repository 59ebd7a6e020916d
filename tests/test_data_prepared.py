"""Prepared format, batched reader, the smoke dataset, the latent cache against direct encoding, configs."""
from __future__ import annotations

import glob
import hashlib
import json
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import torch
import torch.nn.functional as F
from omegaconf import OmegaConf

from replication.data.builtin import make_builtin_images
from replication.data.config import Family, validate_dataset_cfg
from replication.data.latents import LatentDataset, card_path, encode_to_cache
from replication.data.prepare import prepare_dataset
from replication.data.prepared import (
    PreparedImages,
    SkippedImage,
    hflip_nhwc,
    to_model_input,
    write_prepared,
)
from replication.utils.io import ArtifactError
from replication.utils.schema import ConfigError

ROOT = Path(__file__).resolve().parents[1]


def _images(n=11, r=8, seed=0):
    return np.random.default_rng(seed).integers(0, 256, size=(n, r, r, 3), dtype=np.uint8)


def _write(tmp_path, imgs, labels=None, name="p"):
    items = ((f"k{i}", imgs[i], None if labels is None else int(labels[i])) for i in range(len(imgs)))
    return write_prepared(items, tmp_path / name, {"spec_hash": "abc", "flip_train": True}, progress=False)


def test_write_and_read_prepared(tmp_path):
    imgs, labels = _images(), np.arange(11) % 3
    card = _write(tmp_path, imgs, labels)
    out = tmp_path / "p"
    np.testing.assert_array_equal(np.load(out / "images.npy"), imgs)  # a plain, valid .npy file
    assert card["count"] == 11 and card["shape"] == [11, 8, 8, 3] and card["spec_hash"] == "abc"
    for name, digest in card["files"].items():
        assert hashlib.sha256((out / name).read_bytes()).hexdigest() == digest
    ds = PreparedImages(out)
    assert len(ds) == 11 and ds.spec_hash == "abc" and ds.resolution == 8
    np.testing.assert_array_equal(ds[4], imgs[4])
    np.testing.assert_array_equal(ds.labels, labels)
    np.testing.assert_array_equal(ds.get_batch(np.array([7, 2, 7])), imgs[[7, 2, 7]])
    with pytest.raises(IndexError):
        ds.get_batch(np.array([11]))
    assert not [p.name for p in out.iterdir() if p.name.startswith(".")]  # no temporary files left


def test_skipped_items_are_counted(tmp_path):
    imgs = _images(3)
    items = [("a", imgs[0], None), SkippedImage("bad.png", "truncated"), ("b", imgs[1], None)]
    card = write_prepared(iter(items), tmp_path / "p", {"spec_hash": "x"}, progress=False)
    assert card["count"] == 2 and card["num_skipped"] == 1 and card["skipped"] == [{"name": "bad.png", "reason": "truncated"}]


@pytest.mark.reliability  # bad input gives a clear error and damages nothing
def test_interrupted_write_leaves_no_artifact(tmp_path):
    imgs = _images(4)

    def items():
        yield "a", imgs[0], None
        raise RuntimeError("killed")

    with pytest.raises(RuntimeError):
        write_prepared(items(), tmp_path / "p", {"spec_hash": "x"}, progress=False)
    assert list(tmp_path.iterdir()) == []  # neither the folder nor its half-built temporary twin
    with pytest.raises(ArtifactError, match="did not finish"):
        PreparedImages(tmp_path / "p")
    with pytest.raises(ValueError, match="spec_hash"):
        write_prepared(iter([]), tmp_path / "q", {}, progress=False)
    with pytest.raises(ValueError, match="'b'"):
        write_prepared(iter([("a", imgs[0], None), ("b", imgs[1][:4], None)]), tmp_path / "r", {"spec_hash": "x"}, progress=False)


def test_iter_batches_flips_order_and_batch_size_independence(tmp_path):
    imgs = _images(11)
    _write(tmp_path, imgs)
    ds = PreparedImages(tmp_path / "p")

    def run(bs, epoch):
        out = list(ds.iter_batches(bs, flip=True, shuffle=True, seed=3, epoch=epoch))
        return (np.concatenate([b["images"] for b in out]), np.concatenate([b["indices"] for b in out]),
                np.concatenate([b["flipped"] for b in out]))

    a_img, a_idx, a_flip = run(3, 0)
    b_img, b_idx, b_flip = run(5, 0)
    np.testing.assert_array_equal(a_img, b_img)
    np.testing.assert_array_equal(a_idx, b_idx)
    assert sorted(a_idx) == list(range(11)) and 0 < a_flip.sum() < 11
    for img, i, f in zip(a_img, a_idx, a_flip):
        np.testing.assert_array_equal(img, imgs[i][:, ::-1] if f else imgs[i])
    c_img, c_idx, _ = run(3, 1)
    assert not np.array_equal(a_idx, c_idx)  # a new epoch reshuffles
    plain = np.concatenate([b["images"] for b in ds.iter_batches(4)])
    np.testing.assert_array_equal(plain, imgs)
    assert sum(len(b["indices"]) for b in ds.iter_batches(4, drop_last=True)) == 8


def test_hflip_and_model_input_against_direct_formulas():
    x = _images(5, 6)
    np.testing.assert_array_equal(hflip_nhwc(x), x[:, :, ::-1])
    ref = torch.from_numpy(x.astype(np.float64) / 127.5 - 1.0).permute(0, 3, 1, 2)
    for got in (to_model_input(x), to_model_input(torch.from_numpy(x))):
        assert got.dtype == torch.float32 and got.shape == (5, 3, 6, 6)
        torch.testing.assert_close(got.double(), ref, atol=1e-6, rtol=0)
    assert to_model_input(np.zeros((1, 2, 2, 3), np.uint8)).min() == -1.0
    assert to_model_input(np.full((1, 2, 2, 3), 255, np.uint8)).max() == 1.0
    with pytest.raises(ValueError, match="uint8"):
        to_model_input(x.astype(np.float32))


def _smoke_cfg(tmp_path, **kw):
    node = OmegaConf.create({"data_root": str(tmp_path / "data"), "runs_root": str(tmp_path / "runs"), "dataset": OmegaConf.load(ROOT / "experiments/dataset/smoke.yaml")})
    cfg = validate_dataset_cfg(node.dataset)
    cfg.builtin.num_train, cfg.builtin.num_val, cfg.resolution = 10, 4, 8
    for k, v in kw.items():
        setattr(cfg, k, v)
    return cfg


def test_smoke_dataset_and_reference_alias(tmp_path):
    from replication.data.config import FidReference

    cfg = _smoke_cfg(tmp_path, fid_reference=FidReference.all)
    tr = prepare_dataset(cfg, "train", progress=False)
    va = prepare_dataset(cfg, "val", progress=False)
    assert tr["count"] == 10 and va["count"] == 4 and tr["path"] == tr["dir"]
    assert PreparedImages(tr["path"]).card_path.is_file()
    np.testing.assert_array_equal(PreparedImages(tr["dir"]).get_batch(np.arange(10)), make_builtin_images(10, 8, 0))
    np.testing.assert_array_equal(PreparedImages(va["dir"]).get_batch(np.arange(4)), make_builtin_images(4, 8, 0, start=10))
    ref = prepare_dataset(cfg, "reference", progress=False)
    ds = PreparedImages(ref["dir"])
    assert len(ds) == 14 and ref["reused"] and ds.spec_hash == tr["spec_hash"]
    np.testing.assert_array_equal(ds.get_batch(np.array([12, 0, 9])), make_builtin_images(14, 8, 0)[[12, 0, 9]])
    assert not (Path(ref["dir"]) / "images.npy").exists()  # points at train + val, no copy
    assert prepare_dataset(cfg, "train", progress=False)["reused"]
    cfg.builtin.seed = 1  # any config change that alters the pixels forces a new preparation
    again = prepare_dataset(cfg, "train", progress=False)
    assert not again["reused"]
    np.testing.assert_array_equal(PreparedImages(again["dir"]).get_batch(np.arange(10)), make_builtin_images(10, 8, 1))


def _encode_fn():
    g = torch.Generator().manual_seed(0)
    w = torch.randn(4, 3, 3, 3, generator=g)
    b = torch.randn(4, generator=g)
    return lambda x: F.conv2d(x, w, b, stride=2, padding=1)  # 'moments': 4 channels at half resolution


def test_latent_cache_equals_direct_encoding(tmp_path):
    imgs, labels = _images(7, 8), np.arange(7) % 2
    _write(tmp_path, imgs, labels)
    ds = PreparedImages(tmp_path / "p")
    enc = _encode_fn()
    out = tmp_path / "lat" / "train.latents"
    card = encode_to_cache(enc, ds, out, batch_size=3, flips=True, progress=False, autoencoder_hash="ae1",
                           extra_card={"autoencoder": "fixed-conv"})
    assert card["autoencoder"] == "fixed-conv" and card["flips"]
    x = torch.from_numpy(imgs.astype(np.float32) / 127.5 - 1.0).permute(0, 3, 1, 2)
    direct, direct_flip = enc(x), enc(torch.from_numpy(np.ascontiguousarray(imgs[:, :, ::-1]).astype(np.float32) / 127.5 - 1.0).permute(0, 3, 1, 2))
    lat = LatentDataset(out, expect_spec_hash="abc", expect_autoencoder_hash="ae1")
    assert len(lat) == 7 and lat.has_flips and card["moments_shape"] == [7, 4, 4, 4] and card["spec_hash"] == "abc"
    torch.testing.assert_close(lat.get(np.arange(7)), direct, atol=1e-5, rtol=1e-5)
    torch.testing.assert_close(lat.get(np.arange(7), flip=np.ones(7, bool)), direct_flip, atol=1e-5, rtol=1e-5)
    mask = np.array([True, False, False, True, False, True, False])
    mixed = lat.get(np.arange(7), flip=mask)
    torch.testing.assert_close(mixed, torch.where(torch.from_numpy(mask)[:, None, None, None], direct_flip, direct), atol=1e-5, rtol=1e-5)
    assert lat[3]["label"] == labels[3]
    assert json.loads(card_path(out).read_text())["autoencoder_hash"] == "ae1"
    batches = list(lat.iter_batches(3, seed=1))
    idx = np.concatenate([b["indices"] for b in batches])
    assert sorted(idx) == list(range(7))
    for b in batches:
        want = torch.where(torch.from_numpy(b["flipped"])[:, None, None, None], direct_flip[b["indices"]], direct[b["indices"]])
        torch.testing.assert_close(b["moments"], want, atol=1e-5, rtol=1e-5)
        np.testing.assert_array_equal(b["labels"], labels[b["indices"]])
    with pytest.raises(ArtifactError, match="spec_hash"):
        LatentDataset(out, expect_spec_hash="other")
    # same cache whatever the batch size
    encode_to_cache(enc, ds, tmp_path / "lat2.latents", batch_size=7, flips=False, progress=False)
    no_flip = LatentDataset(tmp_path / "lat2.latents")
    torch.testing.assert_close(no_flip.get(np.arange(7)), direct, atol=1e-5, rtol=1e-5)
    with pytest.raises(ValueError, match="without flips"):
        no_flip.get(np.arange(2), flip=np.ones(2, bool))


@pytest.mark.parametrize("path", sorted(glob.glob(str(ROOT / "experiments/dataset/*.yaml"))))
def test_every_dataset_yaml_validates(path):
    node = OmegaConf.create({"data_root": "/d", "runs_root": "/r", "dataset": OmegaConf.load(path)})
    cfg = validate_dataset_cfg(node.dataset)
    # raw files under data/ (tracked by data.dvc), prepared sets under runs/ (pipeline outputs)
    assert cfg.root.startswith("/d/") and cfg.prepared_dir.startswith("/r/prepared/") and cfg.source
    if cfg.family is not Family.builtin:
        assert cfg.resolution == 256


def test_config_errors_name_the_key():
    base = dict(name="t", family="lsun", root="r", prepared_dir="p", interpolation="pil_bicubic", source="s")
    with pytest.raises(ConfigError, match="flip_trian"):
        validate_dataset_cfg({**base, "flip_trian": True})
    with pytest.raises(ConfigError, match="family"):
        validate_dataset_cfg({**base, "family": "cifar"})
    with pytest.raises(ConfigError, match="source"):
        validate_dataset_cfg({k: v for k, v in base.items() if k != "source"})
    with pytest.raises(ConfigError, match="sha256"):
        validate_dataset_cfg({**base, "download": {"files": [{"name": "a.zip", "url": "http://x", "sha256": "abc"}]}})
    with pytest.raises(ConfigError, match="urll.*DownloadFile"):
        validate_dataset_cfg({**base, "download": {"files": [{"name": "a.zip", "urll": "http://x"}]}})
    with pytest.raises(ConfigError, match="interpolation"):
        validate_dataset_cfg({**base, "family": "builtin"})


def test_bench_runs_and_writes_json(tmp_path):
    out = tmp_path / "bench.json"
    subprocess.run([sys.executable, "-m", "replication.data.bench", "--seconds", "0.2", "--num-images", "64",
                    "--latent-shape", "4", "8", "8", "--out", str(out)], check=True, cwd=ROOT, capture_output=True, timeout=120)
    res = json.loads(out.read_text())
    assert res["uint8_flip"]["images_per_s"] > 0 and res["latents"]["latents_per_s"] > 0
    assert res["prepared"]["resolution"] == 256
