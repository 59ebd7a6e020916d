"""Build a report from runs, or publish finished reports into the tracked folder.

    python -m replication.report [--runs runs] [--out runs/reports] [--paper reports/paper] [--experiments a b]
    python -m replication.report publish [--from runs/reports] [--to reports] [--experiments smoke smoke_cin]

The first writes the report of every run (or of the named ones) into the run-output folder, as the report stage
does; `publish` copies chosen finished reports from there into the tracked `reports/` and rebuilds its summary
from every experiment published so far.
"""
from __future__ import annotations

import argparse
import json
import logging
import sys

from .build import build_report, publish

DEFAULT_RUNS = "runs"
DEFAULT_OUTPUT = "runs/reports"  # the report stage's default (reports_dir = <runs_root>/reports), not tracked
DEFAULT_PUBLISHED = "reports"  # tracked
DEFAULT_PAPER = "reports/paper"


def _build(argv: list[str]) -> int:
    parser = argparse.ArgumentParser(prog="python -m replication.report", description="Compare runs with the paper's numbers.")
    parser.add_argument("--runs", default=DEFAULT_RUNS, help=f"folder holding <experiment>/metrics.json (default: {DEFAULT_RUNS})")
    parser.add_argument("--out", default=DEFAULT_OUTPUT, help=f"folder the report is written to (default: {DEFAULT_OUTPUT}; "
                        "publish copies from there into the tracked reports/)")
    parser.add_argument("--paper", default=DEFAULT_PAPER, help=f"folder with the paper's CSVs (default: {DEFAULT_PAPER})")
    parser.add_argument("--experiments", nargs="*", default=None, help="only these experiments (default: every run folder)")
    parser.add_argument("--grid-images", type=int, default=64, help="images in each sample grid, 0 for none")
    args = parser.parse_args(argv)
    result = build_report(args.runs, args.out, args.paper, args.experiments, grid_images=args.grid_images)
    json.dump({"summary": result["summary"], "verdicts": result["verdicts"], "files_written": len(result["written"])}, sys.stdout, indent=2)
    sys.stdout.write("\n")
    return 0


def _publish(argv: list[str]) -> int:
    parser = argparse.ArgumentParser(
        prog="python -m replication.report publish",
        description="Copy finished reports into the tracked reports folder and rebuild its summary, keeping the rows "
                    "of experiments published earlier.")
    parser.add_argument("--from", dest="source", default=DEFAULT_OUTPUT, help=f"reports folder the report stage wrote (default: {DEFAULT_OUTPUT})")
    parser.add_argument("--to", dest="target", default=DEFAULT_PUBLISHED, help=f"tracked reports folder (default: {DEFAULT_PUBLISHED})")
    parser.add_argument("--paper", default=DEFAULT_PAPER, help=f"folder with the paper's CSVs (default: {DEFAULT_PAPER})")
    parser.add_argument("--experiments", nargs="*", default=None, help="experiments to publish (default: every finished report in --from)")
    args = parser.parse_args(argv)
    result = publish(args.source, args.target, args.paper, args.experiments)
    json.dump({"published": result["published"], "summary": result["summary"], "files_written": len(result["written"])}, sys.stdout, indent=2)
    sys.stdout.write("\n")
    return 0


def main(argv: list[str] | None = None) -> int:
    argv = list(sys.argv[1:] if argv is None else argv)
    logging.basicConfig(level=logging.INFO, format="%(message)s")
    try:
        if argv[:1] == ["publish"]:
            return _publish(argv[1:])
        return _build(argv)
    except (FileNotFoundError, ValueError) as exc:  # bad folders or names, schema errors: one line, no traceback
        sys.stderr.write(f"error: {exc}\n")
        return 2


if __name__ == "__main__":
    sys.exit(main())
