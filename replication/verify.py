"""`python -m replication.verify RUN_DIR [RUN_DIR ...]`: check every file of finished runs against its record.

For each stage folder with a done.json, every file the stage recorded (prepared images, autoencoder and LDM
weights, latent caches, sample shards, metrics) is hashed and compared with the size and SHA-256 written when the
stage finished; full-state checkpoints are compared with the hash written beside each. Prints one row per stage
(files, bytes, seconds, problems) and exits 1 when anything does not match, naming each file. Nothing is changed:
the next `python -m replication.run` of the experiment re-makes what failed.
"""
from __future__ import annotations

import argparse
import sys
import time
from pathlib import Path
from typing import Any

from replication.utils.io import ArtifactError, read_json
from replication.utils.verify import recorded_hash, verify_records

DONE_FILE = "done.json"


def _checkpoints(stage_dir: Path) -> dict[str, dict[str, Any]]:
    """Full-state checkpoints and their recorded hashes (state_XXX.pt.sha256 beside each)."""
    records = {}
    for path in sorted((stage_dir / "state").glob("state_*.pt")) if (stage_dir / "state").is_dir() else []:
        records[str(path)] = {"size": path.stat().st_size, "sha256": recorded_hash(path) or "(no recorded hash)"}
    return records


def verify_run(run_dir: Path) -> list[dict[str, Any]]:
    """One row per finished stage of `run_dir`: {stage, files, bytes, seconds, problems}."""
    if not run_dir.is_dir():
        raise ArtifactError(f"{run_dir} is not a run folder")
    rows = []
    for done in sorted(run_dir.glob(f"*/{DONE_FILE}")):
        stage_dir = done.parent
        record = read_json(done)
        files = dict(record.get("files", {}))
        files.update(_checkpoints(stage_dir))
        start = time.perf_counter()
        problems = verify_records(files, full=True, root=run_dir.parent) if "files" in record else [
            f"{done}: records no file hashes (written by an older version); rerun the stage to record them"]
        rows.append({"stage": stage_dir.name, "files": len(files),
                     "bytes": sum(r["size"] for r in files.values()), "seconds": time.perf_counter() - start,
                     "problems": problems})
    return rows


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m replication.verify", description=__doc__.split("\n\n")[0])
    parser.add_argument("runs", nargs="+", type=Path, help="run folders (runs/<experiment>)")
    args = parser.parse_args(argv)
    bad = 0
    for run_dir in args.runs:
        try:
            rows = verify_run(run_dir)
        except ArtifactError as exc:
            print(f"error: {exc}", file=sys.stderr)
            return 2
        print(f"{run_dir}:")
        if not rows:
            print("  no finished stage")
        for row in rows:
            status = "ok" if not row["problems"] else f"{len(row['problems'])} problem(s)"
            print(f"  {row['stage']:<18} {row['files']:>6} files {row['bytes'] / 2**20:>10.1f} MiB "
                  f"{row['seconds']:>7.2f} s  {status}")
            for problem in row["problems"]:
                print(f"      {problem}")
            bad += len(row["problems"])
    return 1 if bad else 0


if __name__ == "__main__":
    sys.exit(main())
