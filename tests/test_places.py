"""Places365 folders in the publisher's layout and the seeded evaluation lists."""
from __future__ import annotations

import numpy as np
import pytest
from PIL import Image

from replication.data.places import PlacesLayoutError, evaluation_lists, train_files, val_files


def _jpeg(path, seed):
    path.parent.mkdir(parents=True, exist_ok=True)
    Image.fromarray(np.random.default_rng(seed).integers(0, 256, (16, 24, 3), dtype=np.uint8)).save(path, quality=90)


def test_reads_the_publisher_layout(tmp_path):
    for i in range(1, 13):
        _jpeg(tmp_path / "val_large" / f"Places365_val_{i:08d}.jpg", i)
    _jpeg(tmp_path / "data_large" / "a" / "airfield" / "00000001.jpg", 0)
    _jpeg(tmp_path / "data_large" / "b" / "bakery" / "shop" / "00000002.jpg", 1)
    (tmp_path / "val_large" / "notes.txt").write_text("not an image")
    assert val_files(tmp_path)[:2] == ["Places365_val_00000001.jpg", "Places365_val_00000002.jpg"]
    assert len(val_files(tmp_path)) == 12
    assert train_files(tmp_path) == ["a/airfield/00000001.jpg", "b/bakery/shop/00000002.jpg"]


def test_missing_folders_say_what_to_extract(tmp_path):
    with pytest.raises(PlacesLayoutError, match="val_large.tar"):
        val_files(tmp_path)
    with pytest.raises(PlacesLayoutError, match="train_large_places365standard.tar"):
        train_files(tmp_path)


def test_evaluation_lists_are_seeded_disjoint_and_order_free():
    names = [f"Places365_val_{i:08d}.jpg" for i in range(1, 501)]
    a = evaluation_lists(names, seed=0, test_count=300, ablation_count=100)
    b = evaluation_lists(list(reversed(names)), seed=0, test_count=300, ablation_count=100)
    c = evaluation_lists(names, seed=1, test_count=300, ablation_count=100)
    assert a == b and a.list_sha256 == b.list_sha256
    assert a.test != c.test and a.list_sha256 != c.list_sha256
    assert len(a.test) == 300 and len(a.ablation) == 100 and not set(a.test) & set(a.ablation)
    assert list(a.test) == sorted(a.test) and set(a.test) | set(a.ablation) <= set(names)
    assert a.card()["lists_sha256"] == a.list_sha256
    with pytest.raises(PlacesLayoutError, match="fewer than"):
        evaluation_lists(names, seed=0, test_count=450, ablation_count=100)
