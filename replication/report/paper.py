"""The paper's published numbers (reports/paper/*.csv) as lookups; an unknown key fails listing close matches.

The CSVs are the project's reference data (transcribed from paper v2, see reports/paper/PROTOCOL.md); no
number from the paper is typed into code.
"""
from __future__ import annotations

import difflib
import math
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Iterable

import pandas as pd

from . import schema as S

RESULTS_CSV = "results.csv"
AUTOENCODERS_CSV = "autoencoders.csv"
COMPUTE_CSV = "compute.csv"
HYPERPARAMETERS_CSV = "hyperparameters.csv"

RESULTS_COLUMNS = (
    "table", "task", "dataset", "resolution", "method", "is_ours", "f", "sampler_steps", "guidance_scale",
    "metric", "value", "plus_minus", "notes",
)
AUTOENCODER_COLUMNS = ("kind", "name", "f", "z_shape", "reg", "codebook_size", "model_desc", "rFID", "PSNR", "PSNR_pm", "PSIM", "PSIM_pm")
AUTOENCODER_KIND_FIRST_STAGE = "first_stage"
TABLE_AUTOENCODERS = "8"  # Tab.8: first-stage reconstruction quality on ImageNet-val

# Our metric key -> the paper's metric name in results.csv for LDM runs.
LDM_PAPER_METRIC = {S.FID: "FID", S.PRECISION: "precision", S.RECALL: "recall", S.IS: "IS"}
# The same for the tables of the image-conditioned tasks, which name their metrics differently. Super-resolution
# (Tab. 5, 11) reports FID against the validation and against the training split, IS, PSNR and SSIM; its "FID" column
# belongs to the baselines, whose reference split is not stated, so our FID is not put there. Inpainting (Tab. 7):
# FID and LPIPS over all images and over the 40-50 % masked ones. Tab. 6 gives one quality number, the FID of 2k
# validation images after 6 epochs, which is what our FID_all measures on the run's evaluation images.
SUPERRES_PAPER_METRIC = {S.FID_VALSPLIT: "FID_valsplit_ref", S.FID_TRAINSPLIT: "FID_trainsplit_ref", S.IS: "IS",
                         S.PSNR: "PSNR", S.SSIM: "SSIM"}
INPAINTING_PAPER_METRIC = {S.FID_ALL: "FID_all", S.LPIPS_ALL: "LPIPS_all", S.FID_HARD: "FID_40-50pct_masked",
                           S.LPIPS_HARD: "LPIPS_40-50pct_masked"}
TASK_PAPER_METRIC = {"5": SUPERRES_PAPER_METRIC, "11": SUPERRES_PAPER_METRIC, "6": {S.FID_ALL: "FID_2k_val_after_epoch6"},
                     "7": INPAINTING_PAPER_METRIC}


def paper_metric_map(table: Any | None) -> dict[str, str]:
    """Our metric key -> the paper's metric name, for an LDM run compared with `table` (None: a run without a paper
    key, named as the generation tables name it)."""
    return TASK_PAPER_METRIC.get(str(table), LDM_PAPER_METRIC)


def headline_metric(table: Any | None) -> str:
    """The metric that stands for an LDM run of `table` where one number must (the summary's overview, the
    ours-vs-paper figure): FID, or the task table's first FID."""
    return next(iter(paper_metric_map(table)))


def context_metrics(table: Any) -> list[str] | None:
    """The paper's metrics shown when placing a run among the rows of `table`: the four of the generation tables, or
    every metric of a task table (its baselines' FID and the throughputs included); None means all."""
    return None if str(table) in TASK_PAPER_METRIC else list(LDM_PAPER_METRIC.values())
# Our reconstruction metric key -> (source, column or metric name). LPIPS has no paper counterpart: the
# paper's PSIM is not a plain mean LPIPS (values > 1; PROTOCOL.md section 1).
RECON_PAPER_METRIC = {
    S.RFID: ("autoencoders", "rFID"),
    S.PSNR: ("autoencoders", "PSNR"),
    S.SSIM: ("table8", "SSIM"),
    S.RIS: ("table8", "R-IS"),
}


class PaperKeyError(KeyError):
    """A key into the paper's tables that does not exist or is ambiguous."""

    def __str__(self) -> str:  # KeyError would print the message quoted
        return str(self.args[0]) if self.args else ""


@dataclass(frozen=True)
class PaperRow:
    table: str
    dataset: str
    method: str
    metric: str
    value: float
    plus_minus: float | None
    resolution: int | None
    is_ours: bool
    f: int | None
    sampler_steps: int | None
    guidance_scale: float | None
    notes: str


def _opt(x: Any) -> Any:
    """NaN/None -> None; numpy scalars -> plain Python numbers."""
    if hasattr(x, "item"):
        x = x.item()
    if x is None or (isinstance(x, float) and math.isnan(x)):
        return None
    return x


def _opt_int(x: Any) -> int | None:
    x = _opt(x)
    return None if x is None else int(x)


def _close(word: str, choices: Iterable[str]) -> list[str]:
    choices = sorted(set(choices))
    lower = {c.lower(): c for c in choices}
    hits = [lower[c] for c in difflib.get_close_matches(word.lower(), list(lower), n=5, cutoff=0.5)]
    hits += [c for c in choices if word.lower() in c.lower() and c not in hits]
    return hits[:6]


def _unknown(what: str, word: Any, choices: Iterable[str], where: str) -> PaperKeyError:
    choices = sorted(set(choices))
    close = _close(str(word), choices)
    hint = f"; close matches: {close}" if close else ""
    shown = choices if len(choices) <= 25 else choices[:25] + ["..."]
    return PaperKeyError(f"unknown {what} {word!r} in {where}{hint}; known: {shown}")


def _require_columns(df: pd.DataFrame, columns: Iterable[str], path: Path) -> None:
    missing = [c for c in columns if c not in df.columns]
    if missing:
        raise ValueError(f"{path}: column(s) {missing} missing; columns present: {list(df.columns)}")


class PaperResults:
    """Lookups into results.csv (all tables) and autoencoders.csv (released first stages)."""

    def __init__(self, results: pd.DataFrame, autoencoders: pd.DataFrame, paper_dir: Path):
        self.results = results
        self.autoencoders = autoencoders
        self.paper_dir = paper_dir

    # ---- results.csv -------------------------------------------------------------------------------------
    def tables(self) -> list[str]:
        return list(dict.fromkeys(self.results["table"]))

    def rows(self, table: Any, dataset: str | None = None, resolution: int | None = None) -> pd.DataFrame:
        """All rows of one table (and dataset); unknown keys fail with close matches."""
        table = str(table)
        df = self.results[self.results["table"] == table]
        if df.empty:
            raise _unknown("table", table, self.tables(), self._where())
        if dataset is not None:
            sub = df[df["dataset"] == dataset]
            if sub.empty:
                raise _unknown("dataset", dataset, df["dataset"], f"table {table} of {self._where()}")
            df = sub
        if resolution is not None:
            sub = df[df["resolution"] == float(resolution)]
            if sub.empty:
                raise _unknown("resolution", resolution, [str(int(r)) for r in df["resolution"].dropna()], f"table {table}")
            df = sub
        return df

    def row(self, table: Any, dataset: str, method: str, metric: str, resolution: int | None = None) -> PaperRow:
        """The one row for (table, dataset, method, metric[, resolution])."""
        df = self.rows(table, dataset, resolution)
        by_method = df[df["method"] == method]
        if by_method.empty:
            raise _unknown("method", method, df["method"], f"table {table}, dataset {dataset!r}")
        hit = by_method[by_method["metric"] == metric]
        if hit.empty:
            raise _unknown("metric", metric, by_method["metric"], f"table {table}, {dataset!r}, {method!r}")
        if len(hit) > 1:
            options = [f"resolution {_opt_int(r.resolution)}: {r.value}" for r in hit.itertuples()]
            raise PaperKeyError(
                f"table {table}, {dataset!r}, {method!r}, {metric!r} is ambiguous ({len(hit)} rows: {options}); "
                "give the resolution in the run's paper key"
            )
        r = hit.iloc[0]
        return PaperRow(
            table=str(r["table"]), dataset=r["dataset"], method=r["method"], metric=r["metric"], value=float(r["value"]),
            plus_minus=_opt(r["plus_minus"]), resolution=_opt_int(r["resolution"]), is_ours=bool(r["is_ours"]),
            f=_opt_int(r["f"]), sampler_steps=_opt_int(r["sampler_steps"]), guidance_scale=_opt(r["guidance_scale"]),
            notes=_opt(r["notes"]) or "",
        )

    def value(self, table: Any, dataset: str, method: str, metric: str, resolution: int | None = None) -> float:
        return self.row(table, dataset, method, metric, resolution).value

    def metrics_of(self, table: Any, dataset: str, method: str, resolution: int | None = None) -> list[str]:
        df = self.rows(table, dataset, resolution)
        by_method = df[df["method"] == method]
        if by_method.empty:
            raise _unknown("method", method, df["method"], f"table {table}, dataset {dataset!r}")
        return list(dict.fromkeys(by_method["metric"]))

    def context_table(self, table: Any, dataset: str, metrics: Iterable[str] | None = None, resolution: int | None = None) -> pd.DataFrame:
        """One row per method (paper order) and one column per metric, for placing a run among its table. A metric
        that one method reports at several resolutions (Tab. 6's sampling throughput) gets a column per resolution,
        named "<metric> @ <resolution> px"."""
        df = self.rows(table, dataset, resolution)
        if metrics is not None:
            df = df[df["metric"].isin(list(metrics))]
        split = {m for (_, m), n in df.groupby(["method", "metric"]).size().items() if n > 1}
        if split:
            df = df.assign(metric=[f"{m} @ {int(r)} px" if m in split and pd.notna(r) else m
                                   for m, r in zip(df["metric"], df["resolution"])])
        order = list(dict.fromkeys(df["method"]))
        wide = df.pivot_table(index="method", columns="metric", values="value", aggfunc="first")
        cols = [m for m in dict.fromkeys(df["metric"]) if m in wide.columns]
        wide = wide.reindex(order)[cols]
        wide.insert(0, "is_ours", [bool(df[df["method"] == m]["is_ours"].iloc[0]) for m in order])
        return wide

    # ---- autoencoders.csv --------------------------------------------------------------------------------
    def autoencoder_names(self) -> list[str]:
        df = self.autoencoders
        return list(df[df["kind"] == AUTOENCODER_KIND_FIRST_STAGE]["name"])

    def autoencoder(self, name: str) -> dict[str, Any]:
        df = self.autoencoders
        hit = df[(df["kind"] == AUTOENCODER_KIND_FIRST_STAGE) & (df["name"] == name)]
        if hit.empty:
            raise _unknown("autoencoder", name, self.autoencoder_names(), str(self.paper_dir / AUTOENCODERS_CSV))
        return {k: _opt(v) for k, v in hit.iloc[0].to_dict().items()}

    def table8_method(self, name: str) -> str | None:
        """Tab.8's row label for a released autoencoder (built from its f, channels, |Z|), if that row exists."""
        ae = self.autoencoder(name)
        channels = int(str(ae["z_shape"]).split()[0].split("x")[-1])
        f = int(ae["f"])
        if ae["reg"] == "KL":
            label = f"KL f={f} c={channels}"
        else:
            prefix = "VQ (attention-free)" if "no attention" in str(ae.get("model_desc") or "") else "VQ"
            label = f"{prefix} f={f} |Z|={int(ae['codebook_size'])} c={channels}"
        known = self.results[self.results["table"] == TABLE_AUTOENCODERS]["method"]
        return label if (known == label).any() else None

    def recon_value(self, name: str, metric: str) -> tuple[float, float | None, str] | None:
        """(value, plus_minus, source) of one of our reconstruction metrics for autoencoder `name`, or None."""
        if metric not in RECON_PAPER_METRIC:
            return None
        source, column = RECON_PAPER_METRIC[metric]
        if source == "autoencoders":
            ae = self.autoencoder(name)
            value = ae.get(column)
            if value is None:
                return None
            return float(value), ae.get(f"{column}_pm"), f"{AUTOENCODERS_CSV} {name}.{column}"
        label = self.table8_method(name)
        if label is None:
            return None
        df = self.results
        hit = df[(df["table"] == TABLE_AUTOENCODERS) & (df["method"] == label) & (df["metric"] == column)]
        if hit.empty:
            return None
        r = hit.iloc[0]
        return float(r["value"]), _opt(r["plus_minus"]), f"Tab.8 '{label}' {column}"

    def _where(self) -> str:
        return str(self.paper_dir / RESULTS_CSV)


def load_paper_results(paper_dir: str | Path) -> PaperResults:
    """Read results.csv and autoencoders.csv from `paper_dir`, checking their columns."""
    paper_dir = Path(paper_dir)
    paths = {name: paper_dir / name for name in (RESULTS_CSV, AUTOENCODERS_CSV)}
    for p in paths.values():
        if not p.is_file():
            raise FileNotFoundError(f"paper reference file {p} does not exist (expected the paper's CSVs in {paper_dir})")
    results = pd.read_csv(paths[RESULTS_CSV], dtype={"table": str, "dataset": str, "method": str, "metric": str})
    _require_columns(results, RESULTS_COLUMNS, paths[RESULTS_CSV])
    autoencoders = pd.read_csv(paths[AUTOENCODERS_CSV], dtype={"name": str, "kind": str})
    _require_columns(autoencoders, AUTOENCODER_COLUMNS, paths[AUTOENCODERS_CSV])
    return PaperResults(results, autoencoders, paper_dir)


def paper_row(paper: PaperResults, table: Any, dataset: str, method: str, metric: str, resolution: int | None = None) -> PaperRow:
    return paper.row(table, dataset, method, metric, resolution)


def paper_value(paper: PaperResults, table: Any, dataset: str, method: str, metric: str, resolution: int | None = None) -> float:
    return paper.value(table, dataset, method, metric, resolution)


def autoencoder_row(paper: PaperResults, name: str) -> dict[str, Any]:
    return paper.autoencoder(name)
