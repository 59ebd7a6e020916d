"""Bounding-box layout tokens (replication/data/layout.py): taming's bbox builder layout, round trips, padding,
errors, and the fit to the released layout encoder (vocabulary 8192, 92 tokens)."""
from __future__ import annotations

import numpy as np
import pytest
import torch

from replication.data.layout import (
    FULL_CROP,
    LAYOUT_SPEC,
    LayoutError,
    LayoutTokenSpec,
    boxes_to_tokens,
    class_token,
    coordinate_token,
    token_coordinates,
    tokens_to_boxes,
    tokens_to_crop,
)
from replication.models.text_encoder import RELEASED_TEXT_ENCODERS

G = 90  # int(sqrt(8192))
NONE = 8191


def test_spec_fits_the_released_layout_encoder():
    enc = RELEASED_TEXT_ENCODERS["layout2img-openimages256"]
    assert (LAYOUT_SPEC.grid, LAYOUT_SPEC.none, LAYOUT_SPEC.length) == (G, NONE, 92)
    assert LAYOUT_SPEC.length == enc.max_seq_len and LAYOUT_SPEC.no_tokens == enc.vocab_size


def test_coordinate_tokens_follow_taming():
    # taming's docstring example: 16 tokens, 4x4 grid, the cell (x=2, y=1) is token 6, (3, 3) is token 15
    small = LayoutTokenSpec(no_tokens=16, max_objects=1)
    assert coordinate_token(2 / 3, 1 / 3, small) == 6 and coordinate_token(1.0, 1.0, small) == 15
    assert coordinate_token(0.0, 0.0) == 0
    assert coordinate_token(1.0, 0.0) == G - 1
    assert coordinate_token(0.0, 1.0) == (G - 1) * G
    assert coordinate_token(1.0, 1.0) == G * G - 1 == 8099
    # round half to even, as Python's round in taming's tokenize_coordinates
    assert coordinate_token(0.5 / (G - 1), 0.0) == 0 and coordinate_token(1.5 / (G - 1), 0.0) == 2
    assert token_coordinates(G * 5 + 7) == (7 / (G - 1), 5 / (G - 1))
    with pytest.raises(LayoutError, match="grid"):
        token_coordinates(G * G)


def test_layout_of_two_objects():
    boxes = [[0.0, 0.0, 1.0, 1.0], [10 / 89, 20 / 89, 30 / 89, 40 / 89]]
    tokens = boxes_to_tokens(boxes, [5, 600])
    assert tokens.dtype == torch.int64 and tokens.shape == (92,)
    assert tokens[:6].tolist() == [5, 0, 8099, 600, 20 * G + 10, 40 * G + 30]
    assert tokens[6:90].eq(NONE).all()
    assert tokens[90:].tolist() == [0, 8099]  # the full image as the crop
    assert int(tokens.max()) < 8192


def test_round_trip_on_grid_is_exact():
    rng = np.random.default_rng(0)
    for n in (0, 1, 7, 30):
        corners = np.sort(rng.integers(0, G, size=(n, 2, 2)), axis=1)  # x0 <= x1, y0 <= y1
        boxes = np.stack([corners[:, 0, 0], corners[:, 0, 1], corners[:, 1, 0], corners[:, 1, 1]], 1) / (G - 1)
        classes = rng.integers(0, 601, size=n)
        crop = (3 / 89, 0.0, 80 / 89, 1.0)
        tokens = boxes_to_tokens(boxes, classes, crop=crop)
        back, back_classes = tokens_to_boxes(tokens)
        assert torch.equal(back, torch.from_numpy(boxes).reshape(-1, 4))
        assert back_classes.tolist() == classes.tolist()
        assert tokens_to_crop(tokens) == crop
        assert tokens[3 * n:90].eq(NONE).all()


def test_round_trip_off_grid_within_half_a_cell():
    rng = np.random.default_rng(1)
    a, b = rng.uniform(0, 1, size=(2, 25, 2))
    boxes = np.concatenate([np.minimum(a, b), np.maximum(a, b)], 1)
    back, _ = tokens_to_boxes(boxes_to_tokens(boxes, np.arange(25)))
    err = np.abs(back.numpy() - boxes)
    assert err.max() <= 0.5 / (G - 1) + 1e-12
    assert err.max() > 0  # off-grid boxes do move


def test_tensor_inputs_and_torch_class_ids():
    boxes = torch.tensor([[0.1, 0.2, 0.3, 0.4]])
    assert torch.equal(boxes_to_tokens(boxes, torch.tensor([3])), boxes_to_tokens([[0.1, 0.2, 0.3, 0.4]], [3]))


def test_class_token_with_group_of():
    assert class_token(7, num_classes=601) == 7
    assert class_token(7, num_classes=601, is_group_of=True) == 608
    with pytest.raises(LayoutError, match="outside"):
        class_token(601, num_classes=601)
    with pytest.raises(LayoutError, match="padding id 8191"):
        class_token(4095, num_classes=4096, is_group_of=True)


def test_errors():
    box = [[0.1, 0.1, 0.2, 0.2]]
    with pytest.raises(LayoutError, match="31 objects exceed the layout's 30"):
        boxes_to_tokens(box * 31, [1] * 31)
    with pytest.raises(LayoutError, match=r"boxes\[1\].*inside \[0, 1\]"):
        boxes_to_tokens(box + [[0.5, 0.5, 1.2, 0.9]], [1, 2])
    with pytest.raises(LayoutError, match="inside"):
        boxes_to_tokens([[-0.1, 0.0, 0.5, 0.5]], [1])
    with pytest.raises(LayoutError, match="x0 <= x1"):
        boxes_to_tokens([[0.6, 0.1, 0.5, 0.5]], [1])
    with pytest.raises(LayoutError, match="inside"):
        boxes_to_tokens([[float("nan"), 0.1, 0.5, 0.5]], [1])
    with pytest.raises(LayoutError, match="2 boxes but 1 class ids"):
        boxes_to_tokens(box * 2, [1])
    with pytest.raises(LayoutError, match=r"\[0, 8191\)"):
        boxes_to_tokens(box, [NONE])
    with pytest.raises(LayoutError, match="integers"):
        boxes_to_tokens(box, [1.5])
    with pytest.raises(LayoutError, match="crop"):
        boxes_to_tokens(box, [1], crop=(0.0, 0.0, 1.5, 1.0))
    with pytest.raises(LayoutError, match="92 tokens"):
        tokens_to_boxes(torch.zeros(91, dtype=torch.long))
    with pytest.raises(LayoutError, match=r"\[0, 8192\)"):
        tokens_to_boxes(torch.full((92,), 8192))
    with pytest.raises(LayoutError, match="no crop"):
        tokens_to_crop(torch.full((90,), NONE), LayoutTokenSpec(encode_crop=False))


def test_without_crop_tokens():
    spec = LayoutTokenSpec(encode_crop=False, max_objects=2)
    tokens = boxes_to_tokens([[0.0, 0.0, 0.5, 0.5]], [4], spec=spec)
    assert tokens.tolist() == [4, 0, coordinate_token(0.5, 0.5), NONE, NONE, NONE]
    boxes, classes = tokens_to_boxes(tokens, spec)
    assert classes.tolist() == [4] and boxes.shape == (1, 4)


def test_full_crop_constant():
    assert boxes_to_tokens([], [])[-2:].tolist() == [coordinate_token(*FULL_CROP[:2]), coordinate_token(*FULL_CROP[2:])]
