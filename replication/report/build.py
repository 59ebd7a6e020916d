"""The report: read the runs' metrics files, write markdown, CSV, JSON and figures into a reports folder; publish
chosen finished reports from one reports folder (the pipeline's, under runs/) into another (the tracked reports/).

Files of a reports folder:
- per experiment: `<exp>.md`, `figures/<exp>_<figure>.png` (curves, sample grids and a super-resolution or
  inpainting run's examples), `plots/<exp>_<curve>.csv` (names in `experiment_files`), and `metrics/<exp>/{metrics,recon_metrics}.json`, a copy of the metrics file it was made from;
- the summary (`summary.md`, `summary.csv`, `metrics_summary.json`, `metrics_flat.json`, the figures and plots in
  `SUMMARY_FIGURES` / `SUMMARY_PLOTS`), rebuilt from every metrics copy under `metrics/`: reporting or publishing
  one experiment never drops the rows of another.
Rebuilding an experiment's report first removes the files it owns, so no figure of an earlier build stays behind.
"""
from __future__ import annotations

import json
import logging
import shutil
from pathlib import Path
from typing import Any, Mapping, Sequence

import numpy as np
import pandas as pd

from . import figures as F
from . import schema as S
from . import tables as T
from .compare import ExperimentComparison, RunKind, compare_ldm, compare_recon
from .files import write_bytes, write_json, write_text
from .paper import AUTOENCODER_KIND_FIRST_STAGE, LDM_PAPER_METRIC, PaperKeyError, PaperResults, load_paper_results
from .verdict import Tolerance, rule_text

log = logging.getLogger(__name__)

FIGURES_DIR = "figures"
PLOTS_DIR = "plots"
METRICS_COPIES_DIR = "metrics"  # metrics/<experiment>/<metrics file>: what the summary is built from
SUMMARY_MD = "summary.md"
SUMMARY_CSV = "summary.csv"
METRICS_SUMMARY_JSON = "metrics_summary.json"
METRICS_FLAT_JSON = "metrics_flat.json"  # {experiment: {metric: value}}, the file `dvc metrics show` reads
RECON_FIGURE = "recon_vs_f.png"
DEFAULT_GRID_IMAGES = 64
DEFAULT_GRID_NROW = 8

# Per-experiment file names: figures/<experiment>_<name>.png and plots/<experiment>_<name>.csv.
FIG_FID_VS_DDIM_STEPS = "fid_vs_ddim_steps"
FIG_FID_VS_THROUGHPUT = "fid_vs_throughput"
FIG_FID_VS_TRAIN_STEPS = "fid_vs_train_steps"
FIG_TRAIN_LOSS = "train_loss"
FIG_SAMPLES = "samples"
FIG_TRAIN_IMAGES = "train_images"  # training images beside the samples, drawn by the report stage too
FIG_TASK_EXAMPLES = "examples"  # a concat task's inputs, results and originals, from the evaluate stage's examples file
EXPERIMENT_FIGURES = (FIG_FID_VS_DDIM_STEPS, FIG_FID_VS_THROUGHPUT, FIG_FID_VS_TRAIN_STEPS, FIG_TRAIN_LOSS, FIG_SAMPLES,
                      FIG_TRAIN_IMAGES, FIG_TASK_EXAMPLES)
PLOT_FID_VS_STEPS = "fid_vs_steps"
PLOT_FID_VS_TRAIN_STEPS = "fid_vs_train_steps"
PLOT_TRAIN_LOSS = "train_loss"
EXPERIMENT_PLOTS = (PLOT_FID_VS_STEPS, PLOT_FID_VS_TRAIN_STEPS, PLOT_TRAIN_LOSS)
SUMMARY_FIGURES = ("fid_vs_ddim_steps.png", "fid_vs_throughput.png", "fid_vs_train_steps.png", RECON_FIGURE,
                   "fid_ours_vs_paper.png")
SUMMARY_PLOTS = ("recon_vs_f.csv", "fid_ours_vs_paper.csv")
SUMMARY_FILES = (SUMMARY_MD, SUMMARY_CSV, METRICS_SUMMARY_JSON, METRICS_FLAT_JSON)
# Columns of a task's example figure: (column title, array of the examples file), left to right.
TASK_EXAMPLE_COLUMNS = {
    S.TASK_SUPERRES: (("LR (input)", S.EX_LOWRES), ("SR (ours)", S.EX_OUTPUT), ("HR (original)", S.EX_TARGET)),
    S.TASK_INPAINTING: (("input", S.EX_INPUT), ("mask", S.EX_MASK), ("result (ours)", S.EX_OUTPUT),
                        ("original", S.EX_TARGET)),
}


def figure_name(experiment: str, figure: str) -> str:
    return f"{experiment}_{figure}.png"


def plot_name(experiment: str, plot: str) -> str:
    return f"{experiment}_{plot}.csv"


def experiment_files(experiment: str, with_grid: bool = True) -> list[str]:
    """Paths (relative to a reports folder) of every file the report of `experiment` owns; `with_grid=False`
    leaves out the sample grid (drawn by the report stage itself)."""
    figs = [f for f in EXPERIMENT_FIGURES if with_grid or f not in (FIG_SAMPLES, FIG_TRAIN_IMAGES)]
    return ([f"{experiment}.md"] + [f"{FIGURES_DIR}/{figure_name(experiment, f)}" for f in figs]
            + [f"{PLOTS_DIR}/{plot_name(experiment, p)}" for p in EXPERIMENT_PLOTS]
            + [f"{METRICS_COPIES_DIR}/{experiment}/{m}" for m in (S.METRICS_FILE, S.RECON_METRICS_FILE)])


def _remove(reports_dir: Path, rels: Sequence[str]) -> None:
    for rel in rels:
        (reports_dir / rel).unlink(missing_ok=True)


def discover_runs(runs_dir: str | Path, experiments: Sequence[str] | None = None) -> dict[str, dict[RunKind, Path]]:
    """`<runs_dir>/<experiment>/{metrics.json, recon_metrics.json}`; a named experiment without either fails."""
    runs_dir = Path(runs_dir)
    found: dict[str, dict[RunKind, Path]] = {}
    names = experiments if experiments is not None else (
        sorted(p.name for p in runs_dir.iterdir() if p.is_dir()) if runs_dir.is_dir() else []
    )
    for name in names:
        kinds = {}
        for kind, fname in ((RunKind.GENERATION, S.METRICS_FILE), (RunKind.RECONSTRUCTION, S.RECON_METRICS_FILE)):
            p = runs_dir / name / fname
            if p.is_file():
                kinds[kind] = p
        if kinds:
            found[name] = kinds
        elif experiments is not None:
            raise FileNotFoundError(
                f"experiment {name!r}: neither {runs_dir / name / S.METRICS_FILE} nor {runs_dir / name / S.RECON_METRICS_FILE} exists"
            )
    return found


def _curve_frame(points: list[dict], columns: Sequence[str]) -> pd.DataFrame:
    frame = pd.DataFrame.from_records(points)
    keep = [c for c in dict.fromkeys(columns) if c in frame.columns]
    return frame[keep].sort_values(keep[0]).reset_index(drop=True)


def _curve_series(w: "_Writer", ec: ExperimentComparison, points: list[dict], columns: Sequence[str], plot: str,
                  what: str) -> tuple[pd.DataFrame, "F.Series"]:
    """One curve of a run: its table written as the plot's CSV (x = columns[0], y = columns[1]) and the series the
    figure draws from that same table."""
    frame = _curve_frame(points, columns)
    x, y = columns[0], columns[1]
    w.csv(frame, plot_name(ec.experiment, plot), x, y, f"{ec.experiment}: {what}")
    return frame, F.Series(ec.experiment, frame[x].tolist(), frame[y].tolist(), ec.comparable)


def dvc_path(path: Path) -> str:
    """Path as dvc.yaml wants it: relative to the working directory (the repository root) when possible."""
    try:
        return Path(path).resolve().relative_to(Path.cwd().resolve()).as_posix()
    except ValueError:
        return Path(path).as_posix()


class _Writer:
    """Collects the paths written and the DVC plot definitions."""

    def __init__(self, reports_dir: Path):
        self.reports_dir = reports_dir
        self.written: list[Path] = []
        self.plots: list[dict[str, dict[str, Any]]] = []

    def fig(self, name: str) -> Path:
        return self.reports_dir / FIGURES_DIR / name

    def csv(self, frame: pd.DataFrame, name: str, x: str, y: str | list[str], title: str) -> Path:
        path = F.write_csv(frame, self.reports_dir / PLOTS_DIR / name)
        self.written.append(path)
        self.plots.append({dvc_path(path): {"x": x, "y": y, "title": title}})
        return path

    def add(self, path: Path) -> str:
        self.written.append(path)
        return f"{FIGURES_DIR}/{path.name}"


def _paper_reference_point(ec: ExperimentComparison, paper: PaperResults) -> list[tuple[str, float, float]]:
    key = ec.paper_key
    if not key or S.P_TABLE not in key:
        return []
    try:
        row = paper.row(key[S.P_TABLE], key[S.P_DATASET], key[S.P_METHOD], LDM_PAPER_METRIC[S.FID], key.get(S.P_RESOLUTION))
    except PaperKeyError:
        return []
    if row.sampler_steps is None:
        return []
    return [(f"paper {paper_label_short(key)} ({row.sampler_steps} steps, 50k samples)", float(row.sampler_steps), row.value)]


def paper_label_short(key: Mapping[str, Any]) -> str:
    return f"Tab.{key[S.P_TABLE]} {key[S.P_METHOD]}"


def _sample_grid_images(run_dir: Path, grid_images: int) -> tuple[np.ndarray, Path] | None:
    """The first `grid_images` samples of a finished sample folder (the sample stage's layout), or None."""
    from replication.samples import load_sample_subset
    from replication.stages.artifacts import SAMPLES_DIR

    samples_dir = run_dir / SAMPLES_DIR
    if not (samples_dir / "index.json").is_file():
        return None
    total = int(json.loads((samples_dir / "index.json").read_text())["num_samples"])
    return load_sample_subset(samples_dir, range(min(total, grid_images))), samples_dir


def task_example_columns(run_dir: Path, task: Mapping[str, Any]) -> list[tuple[str, np.ndarray]] | None:
    """The columns of a concat task's example figure (`TASK_EXAMPLE_COLUMNS`), read from the examples file the task
    record names (relative to `run_dir`, which it must not leave); None when the record names none, the file is not
    there (a metrics file copied without it), or the task has no figure."""
    from replication.utils.paths import contained

    columns = TASK_EXAMPLE_COLUMNS.get(task.get(S.TASK_KIND))
    rel = task.get(S.TASK_EXAMPLES)
    if columns is None or rel is None:
        return None
    path = contained(run_dir, rel, what=f"{S.K_TASK}.{S.TASK_EXAMPLES}")
    if not path.is_file():
        log.info("report: %s names no existing examples file (%s); no example figure", run_dir.name, path)
        return None
    with np.load(path, allow_pickle=False) as examples:
        missing = [key for _, key in columns if key not in examples.files]
        if missing:
            raise ValueError(f"{path}: array(s) {missing} missing; a {task[S.TASK_KIND]} examples file holds "
                             f"{[key for _, key in columns]} (found {examples.files})")
        return [(label, examples[key]) for label, key in columns]


def _task_figure(ec: ExperimentComparison, w: _Writer, runs_dir: Path) -> dict[str, str]:
    task = ec.run.task
    columns = task_example_columns(runs_dir / ec.experiment, task)
    if columns is None:
        return {}
    what = "LR | SR | HR" if task[S.TASK_KIND] == S.TASK_SUPERRES else "input | mask | result | original"
    title = f"{ec.experiment}: {T.TASK_TITLES[task[S.TASK_KIND]].lower()} examples ({what})"
    path = w.fig(figure_name(ec.experiment, FIG_TASK_EXAMPLES))
    try:
        return {"task examples": w.add(F.plot_task_examples(columns, path, title, ec.comparable))}
    except ValueError as exc:
        raise ValueError(f"{runs_dir / ec.experiment / task[S.TASK_EXAMPLES]}: {exc}") from exc


def _experiment_figures(ec: ExperimentComparison, paper: PaperResults, w: _Writer, runs_dir: Path, grid_images: int, grid_nrow: int) -> dict[str, str]:
    figs: dict[str, str] = {}
    run = ec.run
    exp = ec.experiment
    if ec.kind is RunKind.GENERATION:
        steps = run.curves.get(S.CURVE_FID_VS_DDIM_STEPS)
        if steps:
            frame, s = _curve_series(w, ec, steps, (S.C_STEPS, S.FID, S.C_SAMPLES_PER_S), PLOT_FID_VS_STEPS, "FID vs DDIM steps")
            figs["FID vs DDIM steps"] = w.add(F.plot_fid_vs_ddim_steps([s], w.fig(figure_name(exp, FIG_FID_VS_DDIM_STEPS)), _paper_reference_point(ec, paper), title=f"{exp}: FID vs DDIM steps (cf. paper Fig. 7)"))
            if S.C_SAMPLES_PER_S in frame and frame[S.C_SAMPLES_PER_S].notna().all():
                t = F.Series(exp, frame[S.C_SAMPLES_PER_S].tolist(), frame[S.FID].tolist(), ec.comparable, [f"{int(v)} st" for v in frame[S.C_STEPS]])
                figs["FID vs throughput"] = w.add(F.plot_fid_vs_throughput([t], w.fig(figure_name(exp, FIG_FID_VS_THROUGHPUT)), title=f"{exp}: FID vs sampling throughput (cf. paper Fig. 7)"))
        train = run.curves.get(S.CURVE_FID_VS_TRAIN_STEPS)
        if train:
            _, s = _curve_series(w, ec, train, (S.C_TRAIN_STEP, S.FID), PLOT_FID_VS_TRAIN_STEPS, "FID vs training steps")
            figs["FID vs training steps"] = w.add(F.plot_fid_vs_train_steps([s], w.fig(figure_name(exp, FIG_FID_VS_TRAIN_STEPS)), title=f"{exp}: FID vs training steps (cf. paper Fig. 6)"))
        loss = run.curves.get(S.CURVE_TRAIN_LOSS)
        if loss:
            _, s = _curve_series(w, ec, loss, (S.C_STEP, S.C_LOSS), PLOT_TRAIN_LOSS, "training loss")
            figs["training loss"] = w.add(F.plot_train_loss([s], w.fig(figure_name(exp, FIG_TRAIN_LOSS)), title=f"{exp}: training loss"))
        grid = w.fig(figure_name(exp, FIG_SAMPLES))
        found = _sample_grid_images(runs_dir / exp, grid_images) if grid_images > 0 else None
        if found is not None:
            images, samples_dir = found
            title = None if ec.comparable else F.NOT_COMPARABLE_TAG
            try:
                figs["samples"] = w.add(F.sample_grid(np.ascontiguousarray(images), grid, grid_nrow, title))
            except ValueError as exc:
                raise ValueError(f"{samples_dir}: {exc}") from exc
        elif grid_images == 0 and grid.is_file():  # the report stage draws the grid itself
            figs["samples"] = f"{FIGURES_DIR}/{grid.name}"
        train_grid = w.fig(figure_name(exp, FIG_TRAIN_IMAGES))
        if grid_images == 0 and train_grid.is_file():  # ... and the training images to compare them with
            figs["training images"] = f"{FIGURES_DIR}/{train_grid.name}"
        if run.task:
            figs.update(_task_figure(ec, w, runs_dir))
    return figs


def _combined_curve(comps: Sequence[ExperimentComparison], curve: str, x: str) -> list[F.Series]:
    out = []
    for ec in comps:
        pts = ec.run.curves.get(curve) if ec.kind is RunKind.GENERATION else None
        if pts and all(p.get(x) is not None for p in pts):
            frame = _curve_frame(pts, (x, S.FID, S.C_STEPS))
            out.append(F.Series(ec.experiment, frame[x].tolist(), frame[S.FID].tolist(), ec.comparable))
    return out


def _recon_frames(comps: Sequence[ExperimentComparison], paper: PaperResults) -> tuple[pd.DataFrame, pd.DataFrame]:
    ae = paper.autoencoders
    ae = ae[ae["kind"] == AUTOENCODER_KIND_FIRST_STAGE]
    paper_pts = pd.DataFrame({"name": ae["name"], "reg": ae["reg"], "f": ae["f"].astype(int), "rFID": ae["rFID"], "PSNR": ae["PSNR"]})
    ours = []
    for ec in comps:
        if ec.kind is not RunKind.RECONSTRUCTION:
            continue
        run = ec.run
        reg = paper.autoencoder(run.paper[S.P_NAME])["reg"] if run.paper else run.autoencoder.split("-")[0].upper()
        get = lambda m: run.metrics[m].value if m in run.metrics else None  # noqa: E731
        ours.append({"name": ec.experiment, "reg": reg, "f": run.f, "rFID": get(S.RFID), "PSNR": get(S.PSNR), "comparable": ec.comparable})
    return paper_pts, pd.DataFrame(ours, columns=["name", "reg", "f", "rFID", "PSNR", "comparable"])


def _summary_figures(comps: Sequence[ExperimentComparison], paper: PaperResults, w: _Writer) -> dict[str, str]:
    figs: dict[str, str] = {}
    series = _combined_curve(comps, S.CURVE_FID_VS_DDIM_STEPS, S.C_STEPS)
    if series:
        figs["FID vs DDIM steps, all runs"] = w.add(F.plot_fid_vs_ddim_steps(series, w.fig("fid_vs_ddim_steps.png")))
    series = _combined_curve(comps, S.CURVE_FID_VS_DDIM_STEPS, S.C_SAMPLES_PER_S)
    if series:
        figs["FID vs throughput, all runs"] = w.add(F.plot_fid_vs_throughput(series, w.fig("fid_vs_throughput.png")))
    series = _combined_curve(comps, S.CURVE_FID_VS_TRAIN_STEPS, S.C_TRAIN_STEP)
    if series:
        figs["FID vs training steps, all runs"] = w.add(F.plot_fid_vs_train_steps(series, w.fig("fid_vs_train_steps.png")))
    paper_pts, ours = _recon_frames(comps, paper)
    both = pd.concat([paper_pts.assign(source="paper", comparable=True), ours.assign(source="ours")], ignore_index=True)
    w.csv(both[["source", "name", "reg", "f", "rFID", "PSNR", "comparable"]], "recon_vs_f.csv", "f", ["rFID", "PSNR"], "reconstruction vs f")
    figs["reconstruction vs f"] = w.add(F.plot_recon_vs_f(paper_pts, ours, w.fig(RECON_FIGURE)))
    items = []
    for ec in comps:
        r = ec.row(ec.headline) if ec.kind is RunKind.GENERATION else None
        if r is not None and r.comparison.paper is not None and r.comparison.ours is not None:
            ci = r.comparison.interval
            items.append({"label": ec.experiment, "paper": r.comparison.paper, "ours": r.comparison.ours,
                          "ci_low": None if ci is None else ci[0], "ci_high": None if ci is None else ci[1], "comparable": ec.comparable})
    if items:
        frame = pd.DataFrame(items, columns=["label", "paper", "ours", "ci_low", "ci_high", "comparable"])
        w.csv(frame, "fid_ours_vs_paper.csv", "label", ["paper", "ours"], "FID: ours vs paper")
        figs["FID: ours vs paper"] = w.add(F.plot_ours_vs_paper(frame, w.fig("fid_ours_vs_paper.png")))
    return figs


def _check_folder(run, folder: str):
    if run.experiment != folder:
        raise S.SchemaError(f"{run.path}: key '{S.K_EXPERIMENT}' is {run.experiment!r} but the run folder is {folder!r}")
    return run


def _compare(runs: Mapping[str, Mapping[RunKind, Path]], paper: PaperResults, tolerances, strict: bool) -> list[ExperimentComparison]:
    comps: list[ExperimentComparison] = []
    for name, kinds in runs.items():
        if RunKind.GENERATION in kinds:
            run = _check_folder(S.load_metrics(kinds[RunKind.GENERATION], strict=strict), name)
            comps.append(compare_ldm(run, paper, tolerances))
        if RunKind.RECONSTRUCTION in kinds:
            recon = _check_folder(S.load_recon_metrics(kinds[RunKind.RECONSTRUCTION], strict=strict), name)
            comps.append(compare_recon(recon, paper, tolerances))
    return comps


def _keep_metrics_copy(reports_dir: Path, name: str, kinds: Mapping[RunKind, Path]) -> list[Path]:
    """metrics/<name>/<file>: the metrics the experiment's report was made from, for later summaries."""
    out = []
    for path in kinds.values():
        out.append(write_bytes(reports_dir / METRICS_COPIES_DIR / name / path.name, path.read_bytes()))
    return out


def build_summary(
    reports_dir: str | Path,
    paper_dir: str | Path,
    tolerances: Mapping[str, Tolerance] | None = None,
    strict: bool = True,
) -> dict[str, Any]:
    """Rebuild the summary of `reports_dir` (summary.md/.csv, metrics_summary.json, metrics_flat.json, the
    all-runs figures) from every metrics copy under `reports_dir/metrics/`. Summary files this build does not
    write (a figure with no data left) are removed. Returns {"written", "plots", "summary"}."""
    reports_dir = Path(reports_dir)
    paper = load_paper_results(paper_dir)
    rule = rule_text(tolerances)
    comps = _compare(discover_runs(reports_dir / METRICS_COPIES_DIR), paper, tolerances, strict)
    _remove(reports_dir, list(SUMMARY_FILES) + [f"{FIGURES_DIR}/{f}" for f in SUMMARY_FIGURES]
            + [f"{PLOTS_DIR}/{p}" for p in SUMMARY_PLOTS])
    w = _Writer(reports_dir)
    figs = _summary_figures(comps, paper, w)
    summary = write_text(reports_dir / SUMMARY_MD, T.summary_markdown(comps, paper, figs, rule, str(reports_dir / METRICS_COPIES_DIR)))
    w.written.append(summary)
    w.written.append(write_text(reports_dir / SUMMARY_CSV, T.summary_frame(comps).to_csv(index=False)))
    w.written.append(write_json(reports_dir / METRICS_SUMMARY_JSON, T.metrics_summary(comps, rule)))
    w.written.append(write_json(reports_dir / METRICS_FLAT_JSON, T.metrics_flat(comps)))
    w.plots.append({dvc_path(reports_dir / FIGURES_DIR): {}})
    return {"written": w.written, "plots": w.plots, "summary": summary}


def build_report(
    runs_dir: str | Path,
    reports_dir: str | Path,
    paper_dir: str | Path,
    experiments: Sequence[str] | None = None,
    tolerances: Mapping[str, Tolerance] | None = None,
    grid_images: int = DEFAULT_GRID_IMAGES,
    grid_nrow: int = DEFAULT_GRID_NROW,
    strict: bool = True,
) -> dict[str, Any]:
    """Report `experiments` (default: every run folder of `runs_dir` with a metrics file) into `reports_dir`:
    <experiment>.md, figures/*.png, plots/*.csv and the metrics copy, after removing that experiment's files of
    an earlier build; then rebuild the summary from every experiment reported into `reports_dir` so far.
    With `grid_images=0` the sample grid is not drawn here but an existing one (drawn by the report stage) is linked.

    Returns {"written": [paths], "verdicts": {experiment: {kind: verdict}}, "plots": [DVC plot definitions],
    "summary": path of summary.md}. With no runs at all, the summary shows the paper's tables only.
    """
    runs_dir, reports_dir = Path(runs_dir), Path(reports_dir)
    paper = load_paper_results(paper_dir)
    rule = rule_text(tolerances)
    runs = discover_runs(runs_dir, experiments)
    comps = _compare(runs, paper, tolerances, strict)
    w = _Writer(reports_dir)
    verdicts: dict[str, dict[str, str]] = {}
    for name, kinds in runs.items():
        _remove(reports_dir, experiment_files(name, with_grid=grid_images > 0))
        ecs = [ec for ec in comps if ec.experiment == name]
        figs: dict[str, str] = {}
        for ec in ecs:
            figs.update(_experiment_figures(ec, paper, w, runs_dir, grid_images, grid_nrow))
            if ec.kind is RunKind.RECONSTRUCTION:
                figs["reconstruction vs f (all autoencoders)"] = f"{FIGURES_DIR}/{RECON_FIGURE}"
            verdicts.setdefault(name, {})[str(ec.kind)] = str(ec.verdict)
        w.written.append(write_text(reports_dir / f"{name}.md", T.experiment_markdown(name, ecs, figs, rule, paper)))
        w.written.extend(_keep_metrics_copy(reports_dir, name, kinds))
    summary = build_summary(reports_dir, paper_dir, tolerances, strict)
    w.written.extend(summary["written"])
    w.plots.extend(summary["plots"])
    log.info("report: %d experiment(s), %d file(s) written to %s", len(runs), len(w.written), reports_dir)
    return {"written": [str(p) for p in w.written], "verdicts": verdicts, "plots": w.plots, "summary": str(summary["summary"])}


def reported_experiments(reports_dir: str | Path) -> list[str]:
    """Experiments with a finished report in `reports_dir` (a page and a metrics copy)."""
    reports_dir = Path(reports_dir)
    copies = reports_dir / METRICS_COPIES_DIR
    names = sorted(p.name for p in copies.iterdir() if p.is_dir()) if copies.is_dir() else []
    return [n for n in names if (reports_dir / f"{n}.md").is_file() and any((copies / n).glob("*.json"))]


def publish(
    source_dir: str | Path,
    target_dir: str | Path,
    paper_dir: str | Path,
    experiments: Sequence[str] | None = None,
    tolerances: Mapping[str, Tolerance] | None = None,
) -> dict[str, Any]:
    """Copy the finished reports of `experiments` (default: all of `source_dir`) into `target_dir`, replacing
    each one's earlier files there (a figure the new report lacks is removed), then rebuild the target's summary
    from all its metrics copies, so experiments published earlier keep their rows.
    Returns {"published": [experiments], "written": [paths], "summary": path}."""
    source_dir, target_dir = Path(source_dir), Path(target_dir)
    available = reported_experiments(source_dir)
    names = list(experiments) if experiments else available
    if not names:
        raise FileNotFoundError(f"no finished report in {source_dir} (expected <experiment>.md and "
                                f"{METRICS_COPIES_DIR}/<experiment>/*.json): run the report stage first")
    missing = [n for n in names if n not in available]
    if missing:
        raise FileNotFoundError(f"no finished report of {', '.join(repr(n) for n in missing)} in {source_dir} "
                                f"(reported there: {', '.join(available) or 'none'})")
    written: list[Path] = []
    for name in names:
        rels = experiment_files(name)
        _remove(target_dir, rels)
        for rel in rels:
            if (source_dir / rel).is_file():
                (target_dir / rel).parent.mkdir(parents=True, exist_ok=True)
                shutil.copyfile(source_dir / rel, target_dir / rel)
                written.append(target_dir / rel)
    summary = build_summary(target_dir, paper_dir, tolerances)
    written.extend(summary["written"])
    log.info("publish: %s from %s to %s", ", ".join(names), source_dir, target_dir)
    return {"published": names, "written": [str(p) for p in written], "summary": str(summary["summary"])}
