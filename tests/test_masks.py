"""Inpainting masks after LaMa's evaluation configurations: seeded, the configurations' geometry, area bins."""
from __future__ import annotations

import numpy as np
import pytest
from PIL import Image
from scipy import ndimage

from replication.data.masks import (LAMA_CONFIGS, Boxes, MaskError, area_bin, bin_label, box_mask, image_seed,
                                    make_masked_image, mask_config, square_crop_around, stroke_mask)


def _image(w=800, h=600, seed=0):
    return Image.fromarray(np.random.default_rng(seed).integers(0, 256, (h, w, 3), dtype=np.uint8))


def test_same_seed_and_key_give_the_same_pair_on_any_order():
    img = _image()
    cfg = mask_config("medium")
    a = make_masked_image(img, cfg, image_seed(0, "places/a.jpg"))
    _ = make_masked_image(img, cfg, image_seed(0, "places/b.jpg"))  # another image drawn in between
    b = make_masked_image(img, cfg, image_seed(0, "places/a.jpg"))
    other = make_masked_image(img, cfg, image_seed(0, "places/c.jpg"))
    np.testing.assert_array_equal(a.mask, b.mask)
    np.testing.assert_array_equal(a.image, b.image)
    assert not np.array_equal(a.mask, other.mask)
    assert not np.array_equal(a.mask, make_masked_image(img, cfg, image_seed(1, "places/a.jpg")).mask)


def test_pair_is_a_512_square_crop_of_the_resized_image():
    img = _image(800, 600)
    pair = make_masked_image(img, mask_config("thick"), image_seed(3, "x"))
    assert pair.image.shape == (512, 512, 3) and pair.mask.shape == (512, 512)
    assert pair.mask.dtype == np.uint8 and set(np.unique(pair.mask)) <= {0, 1}
    # shorter side 600 -> 512: 683 x 512 with PIL bicubic, then the crop box
    resized = np.asarray(img.resize((683, 512), Image.Resampling.BICUBIC))
    left, top, right, bottom = pair.crop_box
    np.testing.assert_array_equal(pair.image, resized[top:bottom, left:right])


def _masks(name, n=24, size=512):
    cfg = mask_config(name)
    img = Image.new("RGB", (size, size))
    return [make_masked_image(img, cfg, image_seed(0, f"k{i}")).mask for i in range(n)]


def test_area_and_width_statistics_of_each_configuration():
    widths = {}
    for name in ("thin", "medium", "thick"):
        masks = _masks(name)
        areas = np.array([m.mean() for m in masks])
        assert (areas > 0).all() and (areas <= 0.5).all()  # max_tamper_area
        # the radius of the widest disc inside the hole: half the brush (or box) width
        widths[name] = np.array([ndimage.distance_transform_edt(m).max() for m in masks])
    # brushes of at most 24, 104 and 254 px (5 + max_width - 1), crossings and joints aside: thin < medium < thick
    assert 2 * widths["thin"].mean() < widths["medium"].mean() and 1.3 * widths["medium"].mean() < widths["thick"].mean()
    # the hard "40-50%" subset of the thick configuration is not empty
    assert any(area_bin(m.mean()) == 4 for m in _masks("thick"))


def test_strokes_are_drawn_lines_of_the_configured_brush():
    rng = np.random.default_rng(0)
    cfg = LAMA_CONFIGS["thin"].strokes
    mask = stroke_mask(512, 512, cfg, rng)
    assert mask.dtype == np.float32 and set(np.unique(mask)) == {0.0, 1.0}
    # every piece of a stroke mask is at least the narrowest brush (5 px) wide: eroding by 1 px keeps each piece
    labels, count = ndimage.label(mask)
    eroded = ndimage.binary_erosion(mask, iterations=1)
    assert count >= 1 and set(np.unique(labels[eroded])) - {0} == set(range(1, count + 1))


def test_boxes_respect_margin_and_sizes():
    b = Boxes(margin=10, bbox_min_size=30, bbox_max_size=60, min_times=1, max_times=1)
    mask = box_mask(200, 300, b, np.random.default_rng(5))
    ys, xs = np.nonzero(mask)
    assert ys.min() >= 10 and xs.min() >= 10 and ys.max() < 190 and xs.max() < 290
    assert 30 <= ys.max() - ys.min() + 1 < 60 and 30 <= xs.max() - xs.min() + 1 < 60
    with pytest.raises(MaskError, match="too small"):
        box_mask(40, 40, b, np.random.default_rng(0))


def test_square_crop_keeps_the_hole_inside():
    mask = np.zeros((512, 900), np.float32)
    mask[100:200, 700:760] = 1
    for seed in range(20):
        left, top, right, bottom = square_crop_around(mask, 1.0, np.random.default_rng(seed))
        assert (right - left, bottom - top) == (512, 512)
        assert mask[top:bottom, left:right].sum() == mask.sum()


def test_area_bins():
    assert area_bin(0.0) == 0 and area_bin(0.45) == 4 and bin_label(4) == "40-50%"
    assert area_bin(0.4) == 4 and area_bin(0.5) == 5 and area_bin(1.0) == 9
    with pytest.raises(MaskError):
        area_bin(1.2)
    with pytest.raises(MaskError, match="not one of"):
        mask_config("huge")
