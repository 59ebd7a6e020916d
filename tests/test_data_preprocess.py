"""Preprocessing against hand-computed crops and resizes (independent PIL / numpy / torch calls)."""
from __future__ import annotations

import dataclasses

import numpy as np
import pytest
import torch
import torch.nn.functional as F
from PIL import Image

from replication.data.builtin import make_builtin_images
from replication.data.config import validate_dataset_cfg
from replication.data.preprocess import (
    PreprocessSpec,
    preprocess_faces,
    preprocess_for,
    preprocess_imagenet,
    preprocess_lsun,
    resize_cv2,
    smallest_side_size,
    spec_dict,
    spec_for,
    spec_hash,
)


def _img(h, w, seed=0):
    return np.random.default_rng(seed).integers(0, 256, size=(h, w, 3), dtype=np.uint8)


def _torch_bilinear(arr, out_h, out_w):
    """Float bilinear with half-pixel centres and border clamping (same sampling grid as cv2 INTER_LINEAR)."""
    x = torch.from_numpy(arr.astype(np.float64)).permute(2, 0, 1)[None]
    y = F.interpolate(x, size=(out_h, out_w), mode="bilinear", align_corners=False, antialias=False)
    return y[0].permute(1, 2, 0).numpy()


@pytest.mark.parametrize("h,w", [(30, 40), (31, 40), (40, 29), (24, 24)])
def test_lsun_center_crop_then_pil_bicubic(h, w):
    arr = _img(h, w)
    crop = min(h, w)
    # ldm/data/lsun.py slices [(h-crop)//2:(h+crop)//2]; written out here as a PIL box
    top, left = (h - crop) // 2, (w - crop) // 2
    expected = Image.fromarray(arr).crop((left, top, left + crop, top + crop)).resize((16, 16), Image.BICUBIC)
    out = preprocess_lsun(Image.fromarray(arr), size=16)
    assert out.dtype == np.uint8 and out.shape == (16, 16, 3)
    np.testing.assert_array_equal(out, np.asarray(expected))


def test_lsun_converts_non_rgb():
    gray = Image.fromarray(_img(20, 20)[..., 0], mode="L")
    out = preprocess_lsun(gray, size=8)
    assert out.shape == (8, 8, 3)
    np.testing.assert_array_equal(out[..., 0], out[..., 1])


def test_cv2_bilinear_exact_4x_downsample_by_hand():
    # cv2 INTER_LINEAR at scale 4: source x = 4d + 1.5, i.e. the mean of pixels 4d+1 and 4d+2 per axis;
    # fixed-point rounding equals floor(mean + 1/2).
    arr = _img(32, 32, seed=1)
    a = arr.astype(np.int64)
    s = a[1::4, 1::4] + a[1::4, 2::4] + a[2::4, 1::4] + a[2::4, 2::4]
    expected = (s + 2) // 4
    np.testing.assert_array_equal(resize_cv2(arr, 8, 8), expected)


def test_cv2_bilinear_2x_upsample_by_hand():
    # rows constant: only the horizontal taps matter. fx = d/2 - 1/4; border pixels clamp.
    row = np.array([0, 40, 100, 255, 7], dtype=np.int64)
    arr = np.repeat(np.repeat(row[None, :, None], 3, axis=2), 4, axis=0).astype(np.uint8)
    out = resize_cv2(arr, 4, 10)[0, :, 0].astype(np.int64)
    exp = [row[0]]
    for d in range(1, 9):
        fx = d / 2 - 0.25
        i = int(np.floor(fx))
        f = fx - i
        exp.append(int(np.floor((1 - f) * row[i] + f * row[i + 1] + 0.5)))
    exp.append(row[-1])
    np.testing.assert_array_equal(out, exp)


@pytest.mark.parametrize("shape,out", [((37, 53), (256, 366)), ((300, 200), (96, 64)), ((17, 17), (40, 40))])
def test_cv2_bilinear_matches_float_bilinear_within_one_level(shape, out):
    arr = _img(*shape, seed=2)
    ours = resize_cv2(arr, *out).astype(np.float64)
    ref = _torch_bilinear(arr, *out)
    # fixed-point weights (11 bits) vs exact float: at most one grey level apart
    assert np.max(np.abs(ours - ref)) <= 1.0


def test_smallest_side_size_like_albumentations():
    assert smallest_side_size(300, 450, 256) == (256, 384)
    assert smallest_side_size(1024, 1024, 256) == (256, 256)
    assert smallest_side_size(256, 300, 256) == (256, 300)  # scale 1: untouched
    assert smallest_side_size(4, 6, 3) == (3, 4)  # 4.5 rounds half to even, as Python's round


def test_faces_square_1024_like_pipeline():
    arr = _img(64, 64, seed=3)
    out = preprocess_faces(Image.fromarray(arr), size=16)  # exact 4x
    a = arr.astype(np.int64)
    s = a[1::4, 1::4] + a[1::4, 2::4] + a[2::4, 1::4] + a[2::4, 2::4]
    np.testing.assert_array_equal(out, (s + 2) // 4)


def test_faces_non_square_center_crop():
    arr = _img(30, 45, seed=4)  # shorter side 30 -> 20: resized 20 x 30, center crop columns 5..24
    out = preprocess_faces(Image.fromarray(arr), size=20).astype(np.float64)
    ref = _torch_bilinear(arr, 20, 30)[:, 5:25]
    assert out.shape == (20, 20, 3)
    assert np.max(np.abs(out - ref)) <= 1.0


def test_imagenet_eval_center_and_train_random_crop():
    arr = _img(20, 30, seed=5)
    size = 10  # resized to 10 x 15
    full = resize_cv2(arr, 10, 15)
    ev = preprocess_imagenet(Image.fromarray(arr), train=False, rng=None, size=size)
    np.testing.assert_array_equal(ev, full[:, 2:12])  # (15 - 10) // 2 = 2
    rng = np.random.default_rng(0)
    seen = set()
    for _ in range(200):
        tr = preprocess_imagenet(Image.fromarray(arr), train=True, rng=rng, size=size)
        offs = [x for x in range(6) if np.array_equal(tr, full[:, x : x + 10])]
        assert offs, "training crop is not a window of the resized image"
        seen.add(offs[0])
    assert seen == set(range(6))  # every valid offset occurs
    a = preprocess_imagenet(Image.fromarray(arr), True, np.random.default_rng(7), size)
    b = preprocess_imagenet(Image.fromarray(arr), True, np.random.default_rng(7), size)
    np.testing.assert_array_equal(a, b)
    with pytest.raises(ValueError, match="rng"):
        preprocess_imagenet(Image.fromarray(arr), train=True, rng=None, size=size)


def test_spec_hash_changes_with_every_field():
    base = PreprocessSpec(family="lsun", resolution=256, interpolation="pil_bicubic", crop="center", crop_seed=None)
    h0 = spec_hash(base)
    assert h0 == spec_hash(PreprocessSpec(**dataclasses.asdict(base)))
    changes = {"family": "ffhq", "resolution": 128, "interpolation": "cv2_bilinear", "crop": "random",
               "crop_seed": 3, "version": base.version + 1, "crop_factor": (0.5, 1.0)}
    assert set(changes) == {f.name for f in dataclasses.fields(PreprocessSpec)}
    hashes = {spec_hash(dataclasses.replace(base, **{k: v})) for k, v in changes.items()}
    assert h0 not in hashes and len(hashes) == len(changes)
    # a field only some families set is left out where unset: the other families' hashes are as without it
    assert "crop_factor" not in spec_dict(base) and spec_dict(dataclasses.replace(base, crop_factor=(0.5, 1.0)))[
        "crop_factor"] == [0.5, 1.0]


def _cfg(**kw):
    base = dict(name="t", family="imagenet", root="r", prepared_dir="p", resolution=8, interpolation="cv2_bilinear",
                source="test")
    base.update(kw)
    return validate_dataset_cfg(base)


def test_spec_for_train_vs_eval_and_interpolation_check():
    cfg = _cfg()
    assert spec_for(cfg, True).crop == "random" and spec_for(cfg, False).crop == "center"
    assert spec_hash(spec_for(cfg, True)) != spec_hash(spec_for(cfg, False))
    lsun = _cfg(family="lsun", interpolation="pil_bicubic")
    assert spec_for(lsun, True) == spec_for(lsun, False)
    with pytest.raises(ValueError, match="pil_bicubic"):
        spec_for(_cfg(family="lsun", interpolation="cv2_bilinear"), True)
    fn = preprocess_for(_cfg(family="ffhq"), train=True)
    arr = _img(16, 16)
    np.testing.assert_array_equal(fn(Image.fromarray(arr), None), preprocess_faces(Image.fromarray(arr), size=8))


def test_builtin_images_deterministic_and_nontrivial():
    a = make_builtin_images(6, 16, seed=3)
    b = make_builtin_images(3, 16, seed=3)
    np.testing.assert_array_equal(a[:3], b)  # image i does not depend on how many are made
    np.testing.assert_array_equal(a[4:], make_builtin_images(2, 16, seed=3, start=4))
    assert a.dtype == np.uint8 and a.shape == (6, 16, 16, 3)
    assert not np.array_equal(a, make_builtin_images(6, 16, seed=4))
    assert all(a[i].std() > 5 for i in range(6))  # not flat
    assert len({a[i].tobytes() for i in range(6)}) == 6
