"""Figure helpers: point labels stay on their own points (read back from the matplotlib artists), and log axes keep
readable tick labels. The same check on every figure build_report writes is in test_report.py."""
from __future__ import annotations

import numpy as np
import pytest

from replication.report.figures import Series, curves_figure, figure_annotations


def test_labels_follow_their_points_when_the_line_is_sorted():
    """Points given in falling x order: the line is drawn in rising x, each label stays with its own point."""
    s = Series("run", [200.0, 90.0, 40.0, 5.0], [80.0, 82.0, 85.0, 95.0], annotations=["5 st", "10 st", "20 st", "200 st"])
    fig, _ = curves_figure([s], "t", "samples / s", "FID")
    (ax,) = fig.axes
    line = ax.lines[0].get_xydata()
    assert line[:, 0].tolist() == [5.0, 40.0, 90.0, 200.0]
    placed = {t.get_text(): tuple(t.xy) for t in ax.texts}
    assert placed == {"5 st": (200.0, 80.0), "10 st": (90.0, 82.0), "20 st": (40.0, 85.0), "200 st": (5.0, 95.0)}
    assert all(any(np.allclose(xy, p) for p in line) for xy in placed.values())
    assert {a["text"]: tuple(a["xy"]) for a in figure_annotations(fig)} == placed


def _visible_tick_labels(fig, ax):
    fig.canvas.draw()
    lo, hi = sorted(ax.get_xlim())
    major = [(t, lab) for t, lab in zip(ax.get_xticks(), ax.get_xticklabels()) if lo <= t <= hi and lab.get_text()]
    minor = [lab.get_text() for t, lab in zip(ax.get_xticks(minor=True), ax.get_xticklabels(minor=True)) if lo <= t <= hi]
    return major, minor


@pytest.mark.parametrize("xs", [[3.2, 7.5, 20.0, 61.0], [5.0, 10.0, 20.0, 50.0, 100.0, 200.0], [0.8, 150.0, 1200.0]])
def test_log_axis_ticks_are_plain_numbers_that_do_not_overlap(xs):
    fig, _ = curves_figure([Series("run", xs, [float(i) for i in range(len(xs))])], "t", "samples / s", "FID")
    (ax,) = fig.axes
    assert ax.get_xscale() == "log"
    major, minor = _visible_tick_labels(fig, ax)
    assert 2 <= len(major) <= 10, [lab.get_text() for _, lab in major]
    assert not any(minor), f"minor ticks are labelled: {minor}"
    for t, lab in major:
        text = lab.get_text().replace(",", "")
        assert "$" not in text and "^" not in text, text
        assert float(text) == pytest.approx(t), (text, t)
    boxes = sorted((lab.get_window_extent() for _, lab in major), key=lambda b: b.x0)
    for left, right in zip(boxes, boxes[1:]):
        assert left.x1 <= right.x0, "tick labels overlap"
