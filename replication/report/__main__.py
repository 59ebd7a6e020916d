"""`python -m replication.report --runs runs --out reports [--paper reports/paper] [--experiments a b]`."""
from __future__ import annotations

import argparse
import json
import logging
import sys

from .build import build_report


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m replication.report", description="Compare runs with the paper's numbers.")
    parser.add_argument("--runs", default="runs", help="folder holding <experiment>/metrics.json (default: runs)")
    parser.add_argument("--out", default="reports", help="folder the report is written to (default: reports)")
    parser.add_argument("--paper", default="reports/paper", help="folder with the paper's CSVs (default: reports/paper)")
    parser.add_argument("--experiments", nargs="*", default=None, help="only these experiments (default: every run folder)")
    parser.add_argument("--grid-images", type=int, default=64, help="images in each sample grid, 0 for none")
    args = parser.parse_args(argv)
    logging.basicConfig(level=logging.INFO, format="%(message)s")
    result = build_report(args.runs, args.out, args.paper, args.experiments, grid_images=args.grid_images)
    json.dump({"summary": result["summary"], "verdicts": result["verdicts"], "files_written": len(result["written"])}, sys.stdout, indent=2)
    sys.stdout.write("\n")
    return 0


if __name__ == "__main__":
    sys.exit(main())
