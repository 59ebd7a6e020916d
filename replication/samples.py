"""A finished sample folder, as the sample stage writes it and evaluation, the report and tests read it: uint8
NHWC shards named `SHARD_PATTERN`, and `index.json`, which lists exactly the shards of the configured sample set
with their hashes. Readers take the index's shards and nothing else."""
from __future__ import annotations

from pathlib import Path

import numpy as np

from replication.utils.io import ArtifactError, read_json
from replication.utils.verify import verify_records

SHARD_PATTERN = "shard_{:06d}.npy"


def verified_shards(out_dir: Path) -> list[Path]:
    """The shard files of a finished sample folder that make up its sample set (the index's list, in order), each
    checked against the hash the index records. A missing, extra-to-the-set or damaged shard never enters a
    metric: a damaged one stops with its name."""
    index = read_json(out_dir / "index.json")
    if "shards" not in index:
        raise ArtifactError(f"{out_dir}/index.json lists no shard hashes: sample again (force=[sample])")
    paths = [out_dir / r["file"] for r in index["shards"]]
    records = {str(p): {"size": p.stat().st_size if p.exists() else -1, "sha256": r["sha256"]}
               for p, r in zip(paths, index["shards"])}
    problems = verify_records(records, full=True)
    if problems:
        raise ArtifactError(f"{out_dir}: samples do not match their index ({'; '.join(problems[:3])}); they are not "
                            "evaluated. Rerun the sample stage (python -m replication.run ...), which makes them again")
    return paths


def load_samples(out_dir: Path) -> np.ndarray:
    """All shards of a finished sample folder, in sample order."""
    index = read_json(out_dir / "index.json")
    arrays = [np.load(p) for p in verified_shards(out_dir)]
    return np.concatenate(arrays)[: index["num_samples"]]


def load_sample_subset(out_dir: Path, indices) -> np.ndarray:
    """Samples `indices` (in that order) of a finished sample folder, reading only the shards that hold them
    (memory-mapped), so a figure of 64 samples out of 50k does not load 10 GB."""
    index = read_json(out_dir / "index.json")
    idx = np.asarray(indices, dtype=np.int64).reshape(-1)
    if idx.size and (idx.min() < 0 or idx.max() >= index["num_samples"]):
        raise ValueError(f"{out_dir}: sample indices must lie in [0, {index['num_samples'] - 1}], got "
                         f"[{idx.min()}, {idx.max()}]")
    shards: dict[int, np.ndarray] = {}
    rows = []
    for i in idx.tolist():
        s = i // index["shard_size"]
        if s not in shards:
            shards[s] = np.load(out_dir / SHARD_PATTERN.format(s), mmap_mode="r")
        rows.append(np.asarray(shards[s][i - s * index["shard_size"]]))
    return np.stack(rows) if rows else np.empty((0,), dtype=np.uint8)


def grid_indices(num_samples: int, num_classes: int | None, per_row: int = 8, max_rows: int = 8) -> tuple[list[int], str]:
    """Which samples a figure shows, and how to read it. Sample i of a class-conditional run has label
    i % num_classes (balanced): then each row shows one class (the first `max_rows` classes)."""
    if not num_classes:
        n = min(num_samples, per_row * max_rows)
        return list(range(n)), ""
    rows = []
    for c in range(min(num_classes, max_rows)):
        row = [c + k * num_classes for k in range(per_row) if c + k * num_classes < num_samples]
        if len(row) == per_row:
            rows.append(row)
    if not rows:  # too few samples for a full row per class: fall back to sample order
        return list(range(min(num_samples, per_row * max_rows))), ""
    return [i for row in rows for i in row], f"rows = classes 0..{len(rows) - 1}"
