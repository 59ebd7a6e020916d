"""Comparison report against the paper: reads the runs' metrics files and reports/paper/*.csv, writes
markdown tables, CSV/JSON summaries and figures under reports/. Entry point: `build_report`."""
from .build import build_report
from .verdict import Tolerance, Verdict, judge

__all__ = ["build_report", "Tolerance", "Verdict", "judge"]
