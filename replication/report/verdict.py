"""Verdict rule comparing one of our metric values with the paper's value.

The rule (this project's choice, stated in every report; the paper defines no tolerance):

* tolerance band = paper value +- max(relative * |paper value|, absolute floor), per metric;
  defaults: FID / rFID / IS / rIS 10 % relative (FID floor 0.5, rFID floor 0.1); precision, recall, SSIM
  0.03 / 0.03 / 0.02 absolute; PSNR 0.5 dB absolute; the task tables' FIDs (against the train or val split, over all
  or the 40-50 % masked inpainted images) as FID; their LPIPS 10 % relative with a 0.01 floor. Every tolerance is a
  parameter.
* our interval = the run's 95 % confidence interval when it has one (widened to include the value itself,
  since a bootstrap interval of a biased statistic such as FID can miss it), else the single value;
* REPRODUCED when the whole interval lies inside the band; NOT_REPRODUCED when the whole interval lies
  outside it (on either side: a much better value is a failure to reproduce too); INCONCLUSIVE when the
  interval straddles an edge of the band;
* NOT_COMPARABLE whenever the run is marked not comparable (smoke data, stand-in feature extractor, ...),
  whatever the numbers: such a run is never called reproduced;
* NO_PAPER_VALUE when the paper gives no number for the metric; MISSING when the run has none.
"""
from __future__ import annotations

import enum
from dataclasses import dataclass
from typing import Mapping

from . import schema as S


class Verdict(str, enum.Enum):
    REPRODUCED = "reproduced"
    NOT_REPRODUCED = "not reproduced"
    INCONCLUSIVE = "inconclusive"
    NOT_COMPARABLE = "not comparable"
    NO_PAPER_VALUE = "no paper value"
    MISSING = "missing"

    def __str__(self) -> str:
        return self.value


@dataclass(frozen=True)
class Tolerance:
    """Half-width of the band around the paper value: max(relative * |paper|, absolute)."""

    relative: float = 0.0
    absolute: float = 0.0

    def __post_init__(self) -> None:
        if self.relative < 0 or self.absolute < 0:
            raise ValueError(f"tolerances must be >= 0, got relative={self.relative}, absolute={self.absolute}")
        if self.relative == 0 and self.absolute == 0:
            raise ValueError("a tolerance needs a relative or an absolute part above 0")

    def half_width(self, paper_value: float) -> float:
        return max(self.relative * abs(paper_value), self.absolute)

    def describe(self) -> str:
        parts = []
        if self.relative:
            parts.append(f"{self.relative:.0%} relative")
        if self.absolute:
            parts.append(f"{self.absolute:g} absolute")
        return "max(" + ", ".join(parts) + ")" if len(parts) > 1 else parts[0]


# Project choices (see module docstring); they are defaults, not facts from the paper.
FID_TOLERANCE = Tolerance(relative=0.10, absolute=0.5)
LPIPS_TOLERANCE = Tolerance(relative=0.10, absolute=0.01)
DEFAULT_TOLERANCES: Mapping[str, Tolerance] = {
    S.FID: FID_TOLERANCE,
    S.PRECISION: Tolerance(absolute=0.03),
    S.RECALL: Tolerance(absolute=0.03),
    S.IS: Tolerance(relative=0.10),
    S.RFID: Tolerance(relative=0.10, absolute=0.1),
    S.RIS: Tolerance(relative=0.10),
    S.PSNR: Tolerance(absolute=0.5),
    S.SSIM: Tolerance(absolute=0.02),
    S.FID_VALSPLIT: FID_TOLERANCE,
    S.FID_TRAINSPLIT: FID_TOLERANCE,
    S.FID_ALL: FID_TOLERANCE,
    S.FID_HARD: FID_TOLERANCE,
    S.LPIPS_ALL: LPIPS_TOLERANCE,
    S.LPIPS_HARD: LPIPS_TOLERANCE,
}


@dataclass(frozen=True)
class Comparison:
    metric: str
    paper: float | None
    ours: float | None
    interval: tuple[float, float] | None  # our 95 % CI, None when the run gives none
    band: tuple[float, float] | None  # paper +- tolerance
    verdict: Verdict
    reason: str

    @property
    def diff(self) -> float | None:
        return None if self.paper is None or self.ours is None else self.ours - self.paper

    @property
    def rel_diff(self) -> float | None:
        if self.diff is None or not self.paper:
            return None
        return self.diff / abs(self.paper)


def tolerance_for(metric: str, tolerances: Mapping[str, Tolerance] | None = None) -> Tolerance:
    table = DEFAULT_TOLERANCES if tolerances is None else {**DEFAULT_TOLERANCES, **tolerances}
    if metric not in table:
        raise KeyError(f"no tolerance stated for metric {metric!r}; known: {sorted(table)}. Pass one in `tolerances`.")
    return table[metric]


def judge(
    metric: str,
    ours: float | None,
    paper: float | None,
    interval: tuple[float, float] | None = None,
    comparable: bool = True,
    tolerance: Tolerance | None = None,
    tolerances: Mapping[str, Tolerance] | None = None,
) -> Comparison:
    """Apply the module's rule to one metric. `tolerance` overrides the per-metric default."""
    if interval is not None:
        lo, hi = float(interval[0]), float(interval[1])
        if lo > hi:
            raise ValueError(f"{metric}: interval low {lo} is above high {hi}")
        interval = (lo, hi)
    band = None
    if paper is not None:
        tol = tolerance if tolerance is not None else tolerance_for(metric, tolerances)
        w = tol.half_width(paper)
        band = (paper - w, paper + w)

    def result(verdict: Verdict, reason: str) -> Comparison:
        return Comparison(metric, paper, ours, interval, band, verdict, reason)

    if not comparable:
        return result(Verdict.NOT_COMPARABLE, "run is marked not comparable with the paper's protocol")
    if ours is None:
        return result(Verdict.MISSING, "the run reports no value")
    if paper is None or band is None:
        return result(Verdict.NO_PAPER_VALUE, "the paper reports no value for this metric")
    # A bootstrap CI of a biased statistic (FID) may miss the point estimate; judge their hull.
    lo, hi = (min(interval[0], ours), max(interval[1], ours)) if interval is not None else (ours, ours)
    what = "95% CI" if interval is not None else "value"
    if band[0] <= lo and hi <= band[1]:
        return result(Verdict.REPRODUCED, f"{what} inside paper +- tolerance [{band[0]:.4g}, {band[1]:.4g}]")
    if hi < band[0] or lo > band[1]:
        side = "below" if hi < band[0] else "above"
        return result(Verdict.NOT_REPRODUCED, f"{what} entirely {side} [{band[0]:.4g}, {band[1]:.4g}]")
    return result(Verdict.INCONCLUSIVE, f"{what} straddles an edge of [{band[0]:.4g}, {band[1]:.4g}]")


def overall(verdicts: list[Verdict]) -> Verdict:
    """One verdict for an experiment: not comparable dominates; then any failure; then any doubt, where a
    metric the paper reports but the run lacks (MISSING) counts as doubt."""
    judged = [v for v in verdicts if v not in (Verdict.NO_PAPER_VALUE, Verdict.MISSING)]
    if Verdict.NOT_COMPARABLE in verdicts:
        return Verdict.NOT_COMPARABLE
    if not judged:
        return Verdict.NO_PAPER_VALUE
    if Verdict.NOT_REPRODUCED in judged:
        return Verdict.NOT_REPRODUCED
    if Verdict.INCONCLUSIVE in judged or Verdict.MISSING in verdicts:
        return Verdict.INCONCLUSIVE
    return Verdict.REPRODUCED


def rule_text(tolerances: Mapping[str, Tolerance] | None = None) -> str:
    """The rule in words, with the tolerances in force, for the report."""
    table = DEFAULT_TOLERANCES if tolerances is None else {**DEFAULT_TOLERANCES, **tolerances}
    by_tolerance: dict[Tolerance, list[str]] = {}
    for m, t in table.items():  # metrics that share a tolerance are named together
        by_tolerance.setdefault(t, []).append(m)
    tol = "; ".join(f"{', '.join(ms)}: {t.describe()}" for t, ms in by_tolerance.items())
    return (
        "Verdict rule (this project's choice; the paper states no tolerance). Band = paper value +- "
        f"tolerance, with tolerance per metric = {tol}. Our interval is the run's 95% CI, or its single value "
        "when it has no CI. **reproduced**: the whole interval lies inside the band; **not reproduced**: the "
        "whole interval lies outside it (either side); **inconclusive**: it straddles an edge. A run marked "
        "not comparable (smoke data, stand-in feature extractor, ...) is always **not comparable**, never "
        "reproduced. The experiment's overall verdict is the worst of its metrics' verdicts; a metric the paper "
        "reports but the run lacks makes an otherwise reproduced experiment inconclusive."
    )
