"""Single entry point of the report stage: read every run's metrics files, write markdown, CSV, JSON and figures."""
from __future__ import annotations

import logging
from pathlib import Path
from typing import Any, Mapping, Sequence

import numpy as np
import pandas as pd

from . import figures as F
from . import schema as S
from . import tables as T
from .compare import ExperimentComparison, RunKind, compare_ldm, compare_recon
from .files import write_json, write_text
from .paper import AUTOENCODER_KIND_FIRST_STAGE, LDM_PAPER_METRIC, PaperKeyError, PaperResults, load_paper_results
from .verdict import Tolerance, rule_text

log = logging.getLogger(__name__)

FIGURES_DIR = "figures"
PLOTS_DIR = "plots"
SUMMARY_MD = "summary.md"
SUMMARY_CSV = "summary.csv"
METRICS_SUMMARY_JSON = "metrics_summary.json"
SAMPLES_DIR = "samples"
FIRST_SHARD = "shard_00000.npy"
RECON_FIGURE = "recon_vs_f.png"
DEFAULT_GRID_IMAGES = 64
DEFAULT_GRID_NROW = 8


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


def _experiment_figures(ec: ExperimentComparison, paper: PaperResults, w: _Writer, runs_dir: Path, grid_images: int, grid_nrow: int) -> dict[str, str]:
    figs: dict[str, str] = {}
    run = ec.run
    exp = ec.experiment
    if ec.kind is RunKind.GENERATION:
        steps = run.curves.get(S.CURVE_FID_VS_DDIM_STEPS)
        if steps:
            frame = _curve_frame(steps, (S.C_STEPS, S.FID, S.C_SAMPLES_PER_S))
            w.csv(frame, f"{exp}_fid_vs_steps.csv", S.C_STEPS, S.FID, f"{exp}: FID vs DDIM steps")
            s = F.Series(exp, frame[S.C_STEPS].tolist(), frame[S.FID].tolist(), ec.comparable)
            figs["FID vs DDIM steps"] = w.add(F.plot_fid_vs_ddim_steps([s], w.fig(f"{exp}_fid_vs_ddim_steps.png"), _paper_reference_point(ec, paper), title=f"{exp}: FID vs DDIM steps (cf. paper Fig. 7)"))
            if S.C_SAMPLES_PER_S in frame and frame[S.C_SAMPLES_PER_S].notna().all():
                t = F.Series(exp, frame[S.C_SAMPLES_PER_S].tolist(), frame[S.FID].tolist(), ec.comparable, [f"{int(v)} st" for v in frame[S.C_STEPS]])
                figs["FID vs throughput"] = w.add(F.plot_fid_vs_throughput([t], w.fig(f"{exp}_fid_vs_throughput.png"), title=f"{exp}: FID vs sampling throughput (cf. paper Fig. 7)"))
        train = run.curves.get(S.CURVE_FID_VS_TRAIN_STEPS)
        if train:
            frame = _curve_frame(train, (S.C_TRAIN_STEP, S.FID))
            w.csv(frame, f"{exp}_fid_vs_train_steps.csv", S.C_TRAIN_STEP, S.FID, f"{exp}: FID vs training steps")
            s = F.Series(exp, frame[S.C_TRAIN_STEP].tolist(), frame[S.FID].tolist(), ec.comparable)
            figs["FID vs training steps"] = w.add(F.plot_fid_vs_train_steps([s], w.fig(f"{exp}_fid_vs_train_steps.png"), title=f"{exp}: FID vs training steps (cf. paper Fig. 6)"))
        loss = run.curves.get(S.CURVE_TRAIN_LOSS)
        if loss:
            frame = _curve_frame(loss, (S.C_STEP, S.C_LOSS))
            w.csv(frame, f"{exp}_train_loss.csv", S.C_STEP, S.C_LOSS, f"{exp}: training loss")
            s = F.Series(exp, frame[S.C_STEP].tolist(), frame[S.C_LOSS].tolist(), ec.comparable)
            figs["training loss"] = w.add(F.plot_train_loss([s], w.fig(f"{exp}_train_loss.png"), title=f"{exp}: training loss"))
        shard = runs_dir / exp / SAMPLES_DIR / FIRST_SHARD
        if grid_images > 0 and shard.is_file():
            images = np.load(shard, mmap_mode="r", allow_pickle=False)[:grid_images]
            title = None if ec.comparable else F.NOT_COMPARABLE_TAG
            try:
                figs["samples"] = w.add(F.sample_grid(np.ascontiguousarray(images), w.fig(f"{exp}_samples.png"), grid_nrow, title))
            except ValueError as exc:
                raise ValueError(f"{shard}: {exc}") from exc
        elif w.fig(f"{exp}_samples.png").is_file():  # the report stage draws the grid itself (grid_images=0)
            figs["samples"] = f"{FIGURES_DIR}/{exp}_samples.png"
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
        r = ec.row(S.FID) if ec.kind is RunKind.GENERATION else None
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
    """Write reports/<experiment>.md, summary.md/.csv, metrics_summary.json, figures/*.png, plots/*.csv.

    Returns {"written": [paths], "verdicts": {experiment: {kind: verdict}}, "plots": [DVC plot definitions],
    "summary": path of summary.md}. With no runs, the summary shows the paper's tables only.
    """
    runs_dir, reports_dir = Path(runs_dir), Path(reports_dir)
    paper = load_paper_results(paper_dir)
    rule = rule_text(tolerances)
    runs = discover_runs(runs_dir, experiments)
    comps: list[ExperimentComparison] = []
    for name, kinds in runs.items():
        if RunKind.GENERATION in kinds:
            run = _check_folder(S.load_metrics(kinds[RunKind.GENERATION], strict=strict), name)
            comps.append(compare_ldm(run, paper, tolerances))
        if RunKind.RECONSTRUCTION in kinds:
            recon = _check_folder(S.load_recon_metrics(kinds[RunKind.RECONSTRUCTION], strict=strict), name)
            comps.append(compare_recon(recon, paper, tolerances))
    w = _Writer(reports_dir)
    verdicts: dict[str, dict[str, str]] = {}
    for name in runs:
        ecs = [ec for ec in comps if ec.experiment == name]
        figs: dict[str, str] = {}
        for ec in ecs:
            figs.update(_experiment_figures(ec, paper, w, runs_dir, grid_images, grid_nrow))
            if ec.kind is RunKind.RECONSTRUCTION:
                figs["reconstruction vs f (all autoencoders)"] = f"{FIGURES_DIR}/{RECON_FIGURE}"
            verdicts.setdefault(name, {})[str(ec.kind)] = str(ec.verdict)
        w.written.append(write_text(reports_dir / f"{name}.md", T.experiment_markdown(name, ecs, figs, rule)))
    summary_figs = _summary_figures(comps, paper, w)
    summary = write_text(reports_dir / SUMMARY_MD, T.summary_markdown(comps, paper, summary_figs, rule, str(runs_dir)))
    w.written.append(summary)
    w.written.append(write_text(reports_dir / SUMMARY_CSV, T.summary_frame(comps).to_csv(index=False)))
    w.written.append(write_json(reports_dir / METRICS_SUMMARY_JSON, T.metrics_summary(comps, rule)))
    w.plots.append({dvc_path(reports_dir / FIGURES_DIR): {}})
    log.info("report: %d experiment(s), %d file(s) written to %s", len(runs), len(w.written), reports_dir)
    return {"written": [str(p) for p in w.written], "verdicts": verdicts, "plots": w.plots, "summary": str(summary)}
