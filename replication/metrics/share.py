"""Share FID reference statistics between groups: an exported .npz carries mu, sigma, the precision/recall
features and the keys it is valid for (dataset, split, preprocessing hash, extractor); importing files it
where the evaluate stage looks, so it is used only for evaluations with the same keys.

    python -m replication.metrics.share list   --cache runs/reference_stats
    python -m replication.metrics.share export --cache runs/reference_stats --dataset lsun_churches --to out/
    python -m replication.metrics.share import stats.npz --cache runs/reference_stats
"""
from __future__ import annotations

import argparse
import shutil
import sys
from pathlib import Path

from replication.metrics.reference import ReferenceStats, reference_cache_path


def list_cache(cache: Path) -> list[tuple[Path, ReferenceStats]]:
    return [(p, ReferenceStats.load(p)) for p in sorted(cache.rglob("*.npz"))]


def import_stats(path: Path, cache: Path) -> Path:
    """Validate the file (fields, shapes, format version) and copy it to its keyed place in the cache."""
    stats = ReferenceStats.load(path)
    target = reference_cache_path(cache, stats.dataset, stats.split, stats.preprocessing_hash, stats.extractor)
    if target.exists() and target.resolve() != path.resolve():
        raise FileExistsError(f"{target} already holds statistics for these keys; remove it first to replace it")
    stats.save(target)
    return target


def export_stats(cache: Path, dest: Path, dataset: str | None = None) -> list[Path]:
    dest.mkdir(parents=True, exist_ok=True)
    out = []
    for path, stats in list_cache(cache):
        if dataset is None or stats.dataset == dataset:
            name = f"{stats.dataset}-{stats.split}-{stats.extractor}-{stats.preprocessing_hash[:12]}.npz"
            shutil.copyfile(path, dest / name)
            out.append(dest / name)
    return out


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    sub = parser.add_subparsers(dest="command", required=True)
    for name in ("list", "export", "import"):
        p = sub.add_parser(name)
        p.add_argument("--cache", type=Path, default=Path("runs/reference_stats"))
        if name == "export":
            p.add_argument("--to", type=Path, required=True)
            p.add_argument("--dataset", default=None)
        if name == "import":
            p.add_argument("file", type=Path)
    args = parser.parse_args(argv)
    if args.command == "list":
        for path, s in list_cache(args.cache):
            print(f"{path}: dataset={s.dataset} split={s.split} extractor={s.extractor} "
                  f"preprocessing={s.preprocessing_hash[:12]} images={s.num_images} pr_features={len(s.pr_features)}")
    elif args.command == "export":
        for path in export_stats(args.cache, args.to, args.dataset):
            print(path)
    else:
        print(import_stats(args.file, args.cache))
    return 0


if __name__ == "__main__":
    sys.exit(main())
