"""Which samples the report's figure shows, read without loading every shard, and the labelled built-in data
behind the class-conditional smoke run."""
from __future__ import annotations

import json

import numpy as np
import pytest

from replication.data.builtin import NUM_BUILTIN_CLASSES, make_builtin_images, make_builtin_labelled
from replication.samples import SHARD_PATTERN, grid_indices, load_sample_subset, load_samples
from replication.utils.io import sha256_file


def _write_shards(folder, num_samples: int, shard_size: int) -> np.ndarray:
    folder.mkdir(parents=True, exist_ok=True)
    data = np.random.default_rng(0).integers(0, 256, size=(num_samples, 4, 4, 3), dtype=np.uint8)
    num_shards = -(-num_samples // shard_size)
    shards = []
    for s in range(num_shards):
        np.save(folder / SHARD_PATTERN.format(s), data[s * shard_size:(s + 1) * shard_size])
        shards.append({"file": SHARD_PATTERN.format(s), "count": len(data[s * shard_size:(s + 1) * shard_size]),
                       "sha256": sha256_file(folder / SHARD_PATTERN.format(s))})
    (folder / "index.json").write_text(json.dumps({"num_samples": num_samples, "shard_size": shard_size,
                                                   "num_shards": num_shards, "shards": shards}))
    return data


def test_load_samples_refuses_a_shard_that_does_not_match_the_index(tmp_path):
    from replication.utils.io import ArtifactError

    data = _write_shards(tmp_path / "s", num_samples=10, shard_size=5)
    np.save(tmp_path / "s" / SHARD_PATTERN.format(1), data[5:][::-1])  # same shape, other order
    with pytest.raises(ArtifactError, match="shard_000001.npy: content differs"):
        load_samples(tmp_path / "s")


def test_subset_reads_the_right_samples_in_the_asked_order(tmp_path):
    data = _write_shards(tmp_path / "s", num_samples=23, shard_size=5)
    idx = [22, 0, 7, 5, 7]
    np.testing.assert_array_equal(load_sample_subset(tmp_path / "s", idx), data[idx])
    np.testing.assert_array_equal(load_samples(tmp_path / "s"), data)
    with pytest.raises(ValueError, match=r"\[0, 22\]"):
        load_sample_subset(tmp_path / "s", [23])


def test_subset_opens_only_the_shards_it_needs(tmp_path):
    data = _write_shards(tmp_path / "s", num_samples=30, shard_size=10)
    (tmp_path / "s" / SHARD_PATTERN.format(2)).unlink()  # a shard it must not touch
    np.testing.assert_array_equal(load_sample_subset(tmp_path / "s", [1, 12]), data[[1, 12]])


def test_grid_shows_one_class_per_row_when_labels_are_balanced():
    idx, how = grid_indices(num_samples=128, num_classes=3)
    assert how == "rows = classes 0..2" and len(idx) == 24
    rows = np.asarray(idx).reshape(3, 8)
    assert all((rows[c] % 3 == c).all() for c in range(3))  # sample i has label i % num_classes
    idx, how = grid_indices(num_samples=50000, num_classes=1000)
    assert how == "rows = classes 0..7" and np.asarray(idx).reshape(8, 8)[5].tolist() == [5 + 1000 * k for k in range(8)]
    assert grid_indices(64, None) == (list(range(64)), "")
    assert grid_indices(10, None) == (list(range(10)), "")
    # too few samples for a full row of any class: plain sample order
    assert grid_indices(20, 1000) == (list(range(20)), "")


def test_builtin_labels_are_the_first_shape_and_leave_the_pixels_alone():
    images, labels = make_builtin_labelled(40, 16, seed=1)
    np.testing.assert_array_equal(images, make_builtin_images(40, 16, seed=1))
    assert labels.dtype == np.int64 and set(np.unique(labels)) <= set(range(NUM_BUILTIN_CLASSES))
    assert len(np.unique(labels)) == NUM_BUILTIN_CLASSES  # 40 draws cover all three kinds
    _, tail = make_builtin_labelled(10, 16, seed=1, start=30)
    np.testing.assert_array_equal(tail, labels[30:])


def test_generator_swaps_snapshot_weights_in_place_and_samples_as_a_fresh_one(tmp_path):
    """Fig. 6 snapshots reuse one generator (on CUDA, one compilation): loading a snapshot into it gives the same
    images as a generator built with those weights, and a snapshot of another model is refused by name."""
    import torch

    from replication.bench.measurement import nonzero_init_
    from replication.bench.networks import compose_typed
    from replication.stages.artifacts import build_first_stage, build_unet
    from replication.stages.sample import Generator
    from replication.utils.io import save_tensors
    from replication.utils.state import CheckpointMismatchError

    torch.set_num_threads(1)
    typed = compose_typed(["experiment=smoke", "sampler.steps=4"])
    first_stage = build_first_stage(typed).eval()
    torch.manual_seed(0)
    unet_a = nonzero_init_(build_unet(typed), seed=0).eval()
    unet_b = nonzero_init_(build_unet(typed), seed=1).eval()
    snap = tmp_path / "step_000000100.safetensors"
    save_tensors(snap, unet_b.state_dict())
    device = torch.device("cpu")
    gen = Generator(unet_a, first_stage, 0.5, typed, device)
    params_before = [id(p) for p in gen.unet.parameters()]
    before = gen(np.arange(4), steps=4)
    gen.load_weights(snap)
    assert [id(p) for p in gen.unet.parameters()] == params_before  # same tensors, new values
    swapped = gen(np.arange(4), steps=4)
    fresh = Generator(copy_of(unet_b), first_stage, 0.5, typed, device)(np.arange(4), steps=4)
    np.testing.assert_array_equal(swapped, fresh)
    assert not np.array_equal(swapped, before)
    bad = tmp_path / "other.safetensors"
    save_tensors(bad, {"not_a_unet.weight": torch.zeros(2)})
    with pytest.raises((CheckpointMismatchError, ValueError), match="not_a_unet"):
        gen.load_weights(bad)


def copy_of(module):
    import copy

    return copy.deepcopy(module)
