"""Figures of the comparison (PNG, matplotlib's Agg canvas, no pyplot global state) and their CSV data.

Fig.7-style: FID against DDIM steps and against sampling throughput; Fig.6-style: FID against training
steps; reconstruction quality against the downsampling factor f (Tab.8 points and ours); ours vs paper
per experiment; sample grids; a super-resolution or inpainting run's examples beside their inputs and originals. A
figure that shows a not-comparable run says so in its title.
"""
from __future__ import annotations

import io
import json
import textwrap
from dataclasses import dataclass, field
from pathlib import Path
from typing import Iterable, Sequence

import numpy as np
import pandas as pd
from matplotlib.backends.backend_agg import FigureCanvasAgg
from matplotlib.figure import Figure
from matplotlib.ticker import FuncFormatter, LogLocator, NullFormatter

from .files import write_bytes, write_text

NOT_COMPARABLE_TAG = "NOT COMPARABLE (smoke / stand-in run)"
DPI = 100
GRID_PADDING = 2
GRID_BANNER_HEIGHT = 14  # px strip above a sample grid holding its title


@dataclass(frozen=True)
class Series:
    """One line of a plot: x/y points of one experiment."""

    label: str
    x: Sequence[float]
    y: Sequence[float]
    comparable: bool = True
    annotations: Sequence[str] = field(default_factory=tuple)  # text at each point (e.g. DDIM steps)

    def __post_init__(self) -> None:
        if len(self.x) != len(self.y):
            raise ValueError(f"series {self.label!r}: {len(self.x)} x values but {len(self.y)} y values")
        if self.annotations and len(self.annotations) != len(self.x):
            raise ValueError(f"series {self.label!r}: {len(self.annotations)} annotations for {len(self.x)} points")


MIXED_TAG = "includes NOT COMPARABLE (smoke / stand-in) runs"


def title_for(base: str, comparable: bool | Sequence[bool]) -> str:
    """Title that says when a figure shows not-comparable runs (all of them, or some)."""
    flags = [comparable] if isinstance(comparable, bool) else [bool(c) for c in comparable]
    if all(flags):
        return base
    if not any(flags):
        return f"{NOT_COMPARABLE_TAG}\n{base}"
    return f"{base}\n({MIXED_TAG})"


def _label(s: Series) -> str:
    return s.label if s.comparable else f"{s.label} (NOT COMPARABLE)"


def _new(ncols: int = 1, width: float = 5.5, height: float = 4.0) -> tuple[Figure, list]:
    fig = Figure(figsize=(width * ncols, height), dpi=DPI)
    FigureCanvasAgg(fig)
    axes = [fig.add_subplot(1, ncols, i + 1) for i in range(ncols)]
    return fig, axes


ANNOTATIONS_KEY = "Annotations"  # PNG text chunk: JSON list of the figure's point labels (see figure_annotations)


def figure_annotations(fig: Figure) -> list[dict]:
    """Every point label of `fig`, read from its matplotlib artists: {"axes": i, "text", "xy": [x, y], "points":
    the data points [[x, y], ...] drawn in the same axes (lines and scatter markers)}."""
    out = []
    for i, ax in enumerate(fig.axes):
        texts = [t for t in ax.texts if hasattr(t, "xy")]
        if not texts:
            continue
        points = [[float(x), float(y)] for line in ax.lines for x, y in line.get_xydata()]
        points += [[float(x), float(y)] for coll in ax.collections for x, y in np.asarray(coll.get_offsets()).reshape(-1, 2)]
        for t in texts:
            out.append({"axes": i, "text": t.get_text(), "xy": [float(t.xy[0]), float(t.xy[1])], "points": points})
    return out


def _save(fig: Figure, path: str | Path, title: str) -> Path:
    """PNG with the title stored as PNG text metadata ("Title"), and the point labels as JSON ("Annotations",
    from `figure_annotations`), so tools and tests can check what the figure shows."""
    fig.tight_layout()
    metadata = {"Title": title.replace("\n", " ")}
    labels = figure_annotations(fig)
    if labels:
        metadata[ANNOTATIONS_KEY] = json.dumps(labels)
    buf = io.BytesIO()
    fig.savefig(buf, format="png", dpi=DPI, metadata=metadata)
    return write_bytes(path, buf.getvalue())


def _plain_number(value: float, _pos=None) -> str:
    """Tick text without powers of ten: 0.5, 2, 20, 1,500."""
    if value >= 1000:
        return f"{value:,.0f}"
    return f"{value:g}"


def _log_if_wide(ax, values: Iterable[float], axis: str = "x") -> None:
    """Log scale when the values span a factor of 10 or more, ticked at 1, 2, 5 x 10^k with plain-number labels
    (matplotlib's default labels every minor tick of a short log axis with overlapping powers of ten)."""
    v = [x for x in values if x and x > 0]
    if not v or max(v) / min(v) < 10:
        return
    (ax.set_xscale if axis == "x" else ax.set_yscale)("log")
    target = ax.xaxis if axis == "x" else ax.yaxis
    target.set_major_locator(LogLocator(base=10, subs=(1.0, 2.0, 5.0), numticks=12))
    target.set_major_formatter(FuncFormatter(_plain_number))
    target.set_minor_locator(LogLocator(base=10, subs=tuple(range(1, 10)), numticks=12))
    target.set_minor_formatter(NullFormatter())


def _lines(ax, series: Sequence[Series]) -> None:
    """One line per series through its points in x order; each point keeps its own annotation."""
    for s in series:
        order = np.argsort(np.asarray(s.x, dtype=float), kind="stable")
        x = np.asarray(s.x, dtype=float)[order]
        y = np.asarray(s.y, dtype=float)[order]
        ax.plot(x, y, marker="o", linestyle="-" if s.comparable else "--", label=_label(s))
        if s.annotations:
            for i in order:
                ax.annotate(str(s.annotations[i]), (float(s.x[i]), float(s.y[i])), textcoords="offset points",
                            xytext=(4, 4), fontsize=7)
    if any(s.annotations for s in series):
        ax.margins(x=0.1)  # room for the label of the rightmost point
    if series:
        ax.legend(fontsize=7)
    ax.grid(True, alpha=0.3)


def curves_figure(
    series: Sequence[Series], title: str, xlabel: str, ylabel: str, reference: Sequence[tuple[str, float, float]] = (),
) -> tuple[Figure, str]:
    """The figure of `plot_curves` and its full title, unsaved."""
    fig, (ax,) = _new()
    _lines(ax, series)
    for label, x, y in reference:
        ax.scatter([x], [y], marker="*", s=120, color="black", zorder=5, label=label)
    if reference:
        ax.legend(fontsize=7)
    _log_if_wide(ax, [x for s in series for x in s.x] + [r[1] for r in reference])
    ax.set_xlabel(xlabel)
    ax.set_ylabel(ylabel)
    full = title_for(title, [s.comparable for s in series])
    ax.set_title(full, fontsize=9)
    return fig, full


def plot_curves(
    series: Sequence[Series], path: str | Path, title: str, xlabel: str, ylabel: str,
    reference: Sequence[tuple[str, float, float]] = (),
) -> Path:
    """A line per series; `reference` adds single starred points (label, x, y), e.g. the paper's table value."""
    fig, full = curves_figure(series, title, xlabel, ylabel, reference)
    return _save(fig, path, full)


def plot_fid_vs_ddim_steps(series: Sequence[Series], path: str | Path, reference: Sequence[tuple[str, float, float]] = (), title: str = "FID vs DDIM steps (cf. paper Fig. 7)") -> Path:
    return plot_curves(series, path, title, "DDIM steps", "FID", reference)


def plot_fid_vs_throughput(series: Sequence[Series], path: str | Path, title: str = "FID vs sampling throughput (cf. paper Fig. 7)") -> Path:
    return plot_curves(series, path, title, "samples / s", "FID")


def plot_fid_vs_train_steps(series: Sequence[Series], path: str | Path, title: str = "FID vs training steps (cf. paper Fig. 6)") -> Path:
    return plot_curves(series, path, title, "training steps", "FID")


def plot_train_loss(series: Sequence[Series], path: str | Path, title: str = "training loss") -> Path:
    return plot_curves(series, path, title, "step", "loss")


RECON_PANELS = (("rFID", "rFID (lower is better)"), ("PSNR", "PSNR dB (higher is better)"))
REG_MARKERS = {"KL": "o", "VQ": "s"}


def plot_recon_vs_f(paper_points: pd.DataFrame, ours: pd.DataFrame, path: str | Path, title: str = "Reconstruction quality vs downsampling factor f (cf. paper Tab. 8)") -> Path:
    """Two panels (rFID, PSNR vs f). Both frames have columns name, reg (KL/VQ), f, rFID, PSNR; `ours` also
    has `comparable`. Paper points are hollow, ours filled stars."""
    fig, axes = _new(ncols=2, width=5.0)
    fs = sorted({int(v) for v in list(paper_points["f"]) + list(ours["f"])})
    for ax, (col, ylabel) in zip(axes, RECON_PANELS):
        for reg, marker in REG_MARKERS.items():
            pts = paper_points[(paper_points["reg"] == reg) & paper_points[col].notna()]
            if len(pts):
                ax.scatter(pts["f"], pts[col], marker=marker, facecolors="none", edgecolors="black" if reg == "KL" else "tab:gray", label=f"paper {reg}")
                for r in pts.itertuples():
                    ax.annotate(r.name, (r.f, getattr(r, col)), textcoords="offset points", xytext=(4, 2), fontsize=6, color="dimgray")
        for r in ours.itertuples():
            value = getattr(r, col)
            if value is None or pd.isna(value):
                continue
            tag = "" if r.comparable else " (NOT COMPARABLE)"
            ax.scatter([r.f], [value], marker="*", s=140, zorder=5, color="tab:red" if r.comparable else "tab:orange", label=f"ours {r.name}{tag}")
        ax.set_xscale("log", base=2)
        ax.set_xticks(fs, [str(f) for f in fs])
        ax.set_xlabel("f")
        ax.set_ylabel(ylabel)
        ax.grid(True, alpha=0.3)
        ax.legend(fontsize=7)
    full = title_for(title, [bool(c) for c in ours["comparable"]])
    fig.suptitle(full, fontsize=9)
    return _save(fig, path, full)


def plot_ours_vs_paper(items: pd.DataFrame, path: str | Path, metric: str = "FID") -> Path:
    """Dot chart, one row per experiment: paper value, ours, our 95% CI. Columns: label, paper, ours,
    ci_low, ci_high, comparable."""
    fig, (ax,) = _new(height=max(2.5, 0.6 * len(items) + 1.5))
    y = np.arange(len(items))
    seen: set[str] = set()
    ax.scatter(items["paper"], y, marker="|", s=300, color="black", label="paper", zorder=4)
    for i, r in enumerate(items.itertuples()):
        color = "tab:blue" if r.comparable else "tab:red"
        if pd.notna(r.ci_low) and pd.notna(r.ci_high):
            ax.plot([r.ci_low, r.ci_high], [i, i], color=color, linewidth=3, alpha=0.5)
        label = "ours" if r.comparable else "ours (NOT COMPARABLE)"
        ax.scatter([r.ours], [i], color=color, zorder=5, label=None if label in seen else label)
        seen.add(label)
    ax.set_yticks(y)
    ax.set_yticklabels([r.label if r.comparable else f"{r.label}\n(NOT COMPARABLE)" for r in items.itertuples()], fontsize=7)
    ax.set_xlabel(metric)
    ax.grid(True, axis="x", alpha=0.3)
    ax.legend(fontsize=7)
    full = title_for(f"{metric}: ours vs paper", [bool(c) for c in items["comparable"]])
    ax.set_title(full, fontsize=9)
    return _save(fig, path, full)


EXAMPLE_CELL_INCHES = 1.6  # side of one image in a task's example figure


def task_examples_figure(columns: Sequence[tuple[str, np.ndarray]], title: str, comparable: bool = True) -> tuple[Figure, str]:
    """The figure of `plot_task_examples`, unsaved: one row per example, one column per (label, uint8 array) pair,
    each image drawn as stored (no resampling); a 2-D array (NHW, a mask) in grey from 0 to 255."""
    if not columns:
        raise ValueError("a task's example figure needs at least one column")
    arrays = [np.asarray(a) for _, a in columns]
    n = len(arrays[0])
    for (label, _), a in zip(columns, arrays):
        if a.dtype != np.uint8 or a.ndim not in (3, 4) or (a.ndim == 4 and a.shape[-1] not in (1, 3)):
            raise ValueError(f"column {label!r}: want uint8 NHWC (1 or 3 channels) or NHW, got dtype {a.dtype}, shape {a.shape}")
        if len(a) != n or len(a) == 0:
            raise ValueError(f"column {label!r}: {len(a)} images, the first column has {n}; every column needs the same, above 0")
    fig = Figure(figsize=(EXAMPLE_CELL_INCHES * len(columns), EXAMPLE_CELL_INCHES * n + 0.6), dpi=DPI)
    FigureCanvasAgg(fig)
    for r in range(n):
        for c, ((label, _), a) in enumerate(zip(columns, arrays)):
            ax = fig.add_subplot(n, len(columns), r * len(columns) + c + 1)
            image = a[r, ..., 0] if a.ndim == 4 and a.shape[-1] == 1 else a[r]
            if image.ndim == 2:
                ax.imshow(image, cmap="gray", vmin=0, vmax=255, interpolation="nearest")
            else:
                ax.imshow(image, interpolation="nearest")
            ax.set_xticks([])
            ax.set_yticks([])
            if r == 0:
                ax.set_title(label, fontsize=9)
    full = title_for(title, comparable)
    fig.suptitle(full, fontsize=9)
    return fig, full


def plot_task_examples(columns: Sequence[tuple[str, np.ndarray]], path: str | Path, title: str, comparable: bool = True) -> Path:
    """A super-resolution or inpainting run's examples side by side (LR | SR | HR; input | mask | result | original),
    one evaluation image per row."""
    fig, full = task_examples_figure(columns, title, comparable)
    return _save(fig, path, full)


def sample_grid(images: np.ndarray, path: str | Path, nrow: int = 8, title: str | None = None, padding: int = GRID_PADDING) -> Path:
    """Tile uint8 NHWC images (H, W equal across images; C 1 or 3) into one PNG, `nrow` images per row."""
    from PIL import Image, ImageDraw
    from PIL.PngImagePlugin import PngInfo

    images = np.asarray(images)
    if images.dtype != np.uint8 or images.ndim != 4 or images.shape[-1] not in (1, 3):
        raise ValueError(f"sample_grid wants uint8 NHWC images with 1 or 3 channels, got dtype {images.dtype}, shape {images.shape}")
    if len(images) == 0:
        raise ValueError("sample_grid got no images")
    if nrow < 1:
        raise ValueError(f"nrow must be >= 1, got {nrow}")
    if images.shape[-1] == 1:
        images = np.repeat(images, 3, axis=-1)
    n, h, w, _ = images.shape
    cols = min(nrow, n)
    rows = -(-n // cols)
    width = cols * (w + padding) + padding
    # PIL's default bitmap font is about 6 px per character: wrap the title instead of cutting it off
    lines = textwrap.wrap(title, max(8, width // 6)) if title else []
    top = GRID_BANNER_HEIGHT * len(lines)
    canvas = np.full((top + rows * (h + padding) + padding, width, 3), 255, dtype=np.uint8)
    for i in range(n):
        r, c = divmod(i, cols)
        y0 = top + padding + r * (h + padding)
        x0 = padding + c * (w + padding)
        canvas[y0:y0 + h, x0:x0 + w] = images[i]
    img = Image.fromarray(canvas)
    for k, line in enumerate(lines):
        ImageDraw.Draw(img).text((2, 1 + k * GRID_BANNER_HEIGHT), line, fill=(200, 0, 0))
    info = PngInfo()
    if title:
        info.add_text("Title", title)
    buf = io.BytesIO()
    img.save(buf, format="PNG", pnginfo=info)
    return write_bytes(path, buf.getvalue())


def write_csv(frame: pd.DataFrame, path: str | Path) -> Path:
    """CSV data behind a figure, for `dvc plots`."""
    return write_text(path, frame.to_csv(index=False))
