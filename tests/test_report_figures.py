"""The report's figures show what they say: every point label sits on the point whose data it names (read back
from the matplotlib artists and from the PNGs the report writes), and log axes keep readable tick labels."""
from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pandas as pd
import pytest
from PIL import Image

from replication.report import schema as S
from replication.report.build import build_report
from replication.report.figures import ANNOTATIONS_KEY, Series, curves_figure, figure_annotations
from test_report import PAPER_DIR, _write, comparable_run, recon_run, smoke_run


def _png_annotations(path: Path) -> list[dict]:
    with Image.open(path) as im:
        return json.loads(im.text.get(ANNOTATIONS_KEY, "[]"))


@pytest.fixture(scope="module")
def reports(tmp_path_factory):
    root = tmp_path_factory.mktemp("figs")
    runs, out = root / "runs", root / "reports"
    _write(runs, "churches_full", S.METRICS_FILE, comparable_run())
    _write(runs, "smoke", S.METRICS_FILE, smoke_run())  # throughput falls as steps rise: x order != step order
    _write(runs, "ae_kl_f8", S.RECON_METRICS_FILE, recon_run())
    build_report(runs, out, PAPER_DIR)
    return out


def _expected_labels(out: Path, figure: str, axes: int) -> list[tuple[float, float, str]]:
    """(x, y, label) of every point a figure of the report annotates, from the CSV the figure plots."""
    if figure.endswith("_fid_vs_throughput.png"):
        frame = pd.read_csv(out / "plots" / figure.replace("_fid_vs_throughput.png", "_fid_vs_steps.csv"))
        return [(r.samples_per_s, r.FID, f"{int(r.steps)} st") for r in frame.itertuples()]
    if figure == "recon_vs_f.png":
        frame = pd.read_csv(out / "plots" / "recon_vs_f.csv")
        col = ("rFID", "PSNR")[axes]
        frame = frame[(frame["source"] == "paper") & frame[col].notna()]
        return [(r.f, getattr(r, col), r.name) for r in frame.itertuples()]
    raise AssertionError(f"{figure} has point labels but no rule in this test for checking them: add one")


def test_every_annotated_figure_labels_the_points_its_csv_names(reports):
    annotated = {}
    for png in sorted((reports / "figures").glob("*.png")):
        labels = _png_annotations(png)
        if labels:
            annotated[png.name] = labels
    assert {"smoke_fid_vs_throughput.png", "churches_full_fid_vs_throughput.png", "recon_vs_f.png"} <= set(annotated)
    for name, labels in annotated.items():
        for axes in sorted({a["axes"] for a in labels}):
            expected = _expected_labels(reports, name, axes)
            mine = [a for a in labels if a["axes"] == axes]
            assert len(mine) == len(expected), f"{name}: {len(mine)} labels for {len(expected)} points"
            for a in mine:
                x, y = a["xy"]
                assert any(np.allclose([x, y], p) for p in a["points"]), f"{name}: label {a['text']!r} is off every drawn point"
                rows = [e for e in expected if np.allclose([x, y], e[:2])]
                assert rows, f"{name}: label {a['text']!r} at {(x, y)} matches no row of the plotted CSV"
                assert a["text"] in {r[2] for r in rows}, f"{name}: label {a['text']!r} sits on the point of {rows[0][2]!r}"


def test_smoke_throughput_labels_name_their_step_counts(reports):
    """The smoke curve of test_report: 2 steps at 50 samples/s, 5 steps at 20 samples/s."""
    by_text = {a["text"]: a["xy"] for a in _png_annotations(reports / "figures" / "smoke_fid_vs_throughput.png")}
    assert by_text == {"2 st": [50.0, 300.0], "5 st": [20.0, 250.0]}


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
