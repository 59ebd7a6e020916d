"""Markdown tables of the comparison: one page per experiment and a summary placing runs among the paper's rows."""
from __future__ import annotations

import math
from typing import Any, Iterable, Mapping, Sequence

import pandas as pd

from . import schema as S
from .compare import ExperimentComparison, MetricRow, RunKind
from .paper import LDM_PAPER_METRIC, PaperResults, context_metrics, paper_metric_map
from .protocol import ProtocolStatus
from .verdict import Verdict

DEVIATION_FLAG = "⚠ deviates"
NOT_RECORDED_FLAG = "⚠ not recorded"
MISSING = "—"
STATUS_TEXT = {
    ProtocolStatus.MATCHES: "✓ matches",
    ProtocolStatus.DEVIATES: DEVIATION_FLAG,
    ProtocolStatus.NOT_STATED: "not stated by paper",
    ProtocolStatus.NOT_RECORDED: NOT_RECORDED_FLAG,
}
VERDICT_TEXT = {
    Verdict.REPRODUCED: "✅ reproduced",
    Verdict.NOT_REPRODUCED: "❌ not reproduced",
    Verdict.INCONCLUSIVE: "❔ inconclusive",
    Verdict.NOT_COMPARABLE: "🚫 not comparable",
    Verdict.NO_PAPER_VALUE: "no paper value",
    Verdict.MISSING: "missing in run",
}


def fmt(x: Any) -> str:
    """Numbers compactly (up to 4 decimals, no trailing zeros); None/NaN as a dash; others as text."""
    if x is None or (isinstance(x, float) and math.isnan(x)):
        return MISSING
    if isinstance(x, bool):
        return "true" if x else "false"
    if isinstance(x, int):
        return str(x)
    if isinstance(x, float):
        if x != 0 and abs(x) < 1e-3:
            return f"{x:.3g}"
        if x.is_integer() and abs(x) >= 100:
            return str(int(x))  # counts (samples, steps) stored as floats
        if abs(x) >= 1e5:
            return f"{x:.6g}"
        text = f"{x:.4f}".rstrip("0")
        decimals = len(text.split(".")[1])
        return text + "0" * max(0, 2 - decimals)  # at least two decimals, as the paper prints
    return str(x)


def fmt_signed(x: float | None) -> str:
    if x is None:
        return MISSING
    return ("+" if x >= 0 else "") + fmt(float(x))


def escape(text: Any) -> str:
    """Make a cell safe inside a markdown table row."""
    return str(text).replace("|", "\\|").replace("\n", " ")


def md_table(header: Sequence[str], rows: Iterable[Sequence[Any]]) -> str:
    lines = ["| " + " | ".join(escape(h) for h in header) + " |", "|" + "---|" * len(header)]
    lines += ["| " + " | ".join(escape(c) for c in row) + " |" for row in rows]
    return "\n".join(lines) + "\n"


def banner(ec: ExperimentComparison) -> str:
    if ec.comparable:
        return ""
    reasons = "; ".join(ec.not_comparable_reasons) or "no reason recorded"
    return (
        f"> **NOT COMPARABLE WITH THE PAPER: {reasons}. These numbers check that the pipeline runs; they say "
        "nothing about whether the paper's result is reproduced.**\n"
    )


def _ours_cell(r: MetricRow) -> str:
    c = r.comparison
    text = fmt(c.ours)
    if c.ours is not None and r.std is not None:
        text += f" ± {fmt(r.std)} (std)"
    return text


def _paper_cell(r: MetricRow) -> str:
    text = fmt(r.comparison.paper)
    if r.comparison.paper is not None and r.paper_plus_minus is not None:
        text += f" ± {fmt(r.paper_plus_minus)}"
    return text


def _diff_cell(r: MetricRow) -> str:
    c = r.comparison
    if c.diff is None:
        return MISSING
    rel = f" ({c.rel_diff:+.1%})" if c.rel_diff is not None else ""
    return fmt_signed(c.diff) + rel


def _ci_cell(r: MetricRow) -> str:
    ci = r.comparison.interval
    return MISSING if ci is None else f"[{fmt(ci[0])}, {fmt(ci[1])}]"


def _metric_cell(r: MetricRow) -> str:
    """Our metric's name, and the paper's where it names the same quantity differently (Tab. 6)."""
    if r.paper_metric is None or r.paper_metric == r.metric:
        return r.metric
    return f"{r.metric} (paper: {r.paper_metric})"


def metric_table(ec: ExperimentComparison) -> str:
    rows = []
    for r in ec.rows:
        band = r.comparison.band
        rows.append([
            _metric_cell(r), _paper_cell(r), _ours_cell(r), _diff_cell(r), _ci_cell(r),
            MISSING if band is None else f"[{fmt(band[0])}, {fmt(band[1])}]",
            fmt(r.n_samples), VERDICT_TEXT[r.verdict],
        ])
    table = md_table(["metric", "paper", "ours", "diff (ours − paper)", "95% CI", "tolerance band", "n", "verdict"], rows)
    notes = [f"- {r.metric}: {r.note}" for r in ec.rows if r.note]
    notes += [f"- {r.metric}: paper value from {r.paper_source}" for r in ec.rows if r.paper_source]
    if any(r.paper_plus_minus is not None for r in ec.rows):
        notes.append("- The paper's ± is not defined in the paper (most likely a standard deviation, PROTOCOL.md section 1); it is not used by the verdict.")
    return table + ("\n" + "\n".join(notes) + "\n" if notes else "")


def protocol_table(ec: ExperimentComparison) -> str:
    if not ec.protocol:
        return "The run records no protocol settings.\n"
    rows = [[e.key, fmt(e.paper), fmt(e.ours), STATUS_TEXT[e.status]] for e in ec.protocol]
    table = md_table(["setting", "paper", "ours", "status"], rows)
    devs = ec.deviations
    if devs:
        listed = ", ".join(f"{e.key} (paper {fmt(e.paper)}, ours {fmt(e.ours)})" for e in devs)
        table += f"\n**{len(devs)} deviation(s) from the paper's protocol:** {listed}.\n"
    else:
        table += "\nNo deviation from the settings the paper fixes.\n"
    return table


def _figure_links(figures: Mapping[str, str]) -> str:
    if not figures:
        return "No figures for this run.\n"
    return "\n".join(f"![{name}]({rel})" for name, rel in figures.items()) + "\n"


def _curve_ends(points: Sequence[Mapping[str, Any]], x: str, y: str) -> tuple[Mapping[str, Any], Mapping[str, Any]] | None:
    pts = sorted((p for p in points if p.get(x) is not None and p.get(y) is not None), key=lambda p: p[x])
    return (pts[0], pts[-1]) if pts else None


def run_statement(comparisons: Sequence[ExperimentComparison]) -> str:
    """One line saying what a not-comparable run shows: the autoencoder's reconstruction PSNR on the run's
    validation images, FID at the first and last training snapshot (the FID-vs-training-steps curve), and that
    this is not the paper's protocol. Empty for comparable runs."""
    if not comparisons or all(ec.comparable for ec in comparisons):
        return ""
    psnr = next((ec.row(S.PSNR) for ec in comparisons if ec.kind is RunKind.RECONSTRUCTION and ec.row(S.PSNR)), None)
    psnr_text = ("on the validation images n/a (not recorded by this run)" if psnr is None or psnr.comparison.ours is None
                 else f"on the validation images {fmt(psnr.comparison.ours)} dB")
    gen = next((ec for ec in comparisons if ec.kind is RunKind.GENERATION and ec.run is not None), None)
    recorded = None if gen is None else gen.run.first_stage.get("psnr")
    if isinstance(recorded, dict) and recorded.get("value") is not None:  # measured by the LDM run's evaluation
        psnr_text = (f"{fmt(float(recorded['value']))} dB (mean over {recorded.get('images')} images of the "
                     f"{recorded.get('split')})")
    ends = None if gen is None else _curve_ends(gen.run.curves.get(S.CURVE_FID_VS_TRAIN_STEPS, []), S.C_TRAIN_STEP, S.FID)
    if ends is None:
        fid_text = "FID at the training snapshots n/a (no FID-vs-training-steps curve)"
    else:
        first, last = ends
        fid_text = (f"FID {fmt(float(first[S.FID]))} at the first training snapshot (step {first[S.C_TRAIN_STEP]}) and "
                    f"{fmt(float(last[S.FID]))} at the last (step {last[S.C_TRAIN_STEP]})")
    return (f"**What this run shows:** autoencoder reconstruction PSNR {psnr_text}; "
            f"{fid_text}; a pipeline check, not the paper's protocol.\n")


def _source(ec: ExperimentComparison) -> str:
    """The metrics file by its run, not by a machine's folder: `metrics.json` of run `smoke` (created ...)."""
    if ec.run is None:
        return ""
    created = f", created {ec.run.created}" if ec.run.created else ""
    return f" Source: `{ec.run.path.name}` of run `{ec.experiment}`{created}."


TASK_TITLES = {S.TASK_SUPERRES: "Super-resolution", S.TASK_INPAINTING: "Inpainting"}
TASK_RECORD_SKIP = (S.TASK_KIND, S.TASK_BINS, S.TASK_EXAMPLES)  # shown elsewhere on the page (title, bins, figure)
HARD_BIN = "40-50%"  # the masked-area bin Tab. 7 quotes beside all images
BIN_COLUMNS = ("masked area", "images", "FID", "LPIPS", "LPIPS std", "note")


def task_settings_table(task: Mapping[str, Any]) -> str:
    """The task record's settings (degradation and factor, or mask settings; seed, images, split), one row each."""
    rows = [[k, fmt(v)] for k, v in task.items() if k not in TASK_RECORD_SKIP]
    return md_table(["setting", "value"], rows)


def bins_table(task: Mapping[str, Any]) -> str:
    """Inpainting's scores per masked-area bin (`task.bins`): images, FID of the bin's inpainted images against the
    same images' originals, LPIPS mean and std, and why a bin has no FID."""
    rows = []
    for label, b in task.get(S.TASK_BINS, {}).items():
        lpips = b.get(S.B_LPIPS) or {}
        note = b.get(S.B_FID_NOTE, "")
        if label == HARD_BIN:
            note = "; ".join(n for n in (note, f"Tab. 7's 40-50% column ({S.FID_HARD}, {S.LPIPS_HARD})") if n)
        rows.append([label, fmt(b[S.B_COUNT]), fmt(b.get(S.B_FID)), fmt(lpips.get(S.VALUE)), fmt(lpips.get(S.STD)), note])
    return md_table(BIN_COLUMNS, rows)


def task_markdown(ec: ExperimentComparison, paper: PaperResults | None) -> str:
    """A concat task's part of its page: the task's settings, the per-bin scores of inpainting, and the run among
    the rows of its paper table (baselines included)."""
    task = ec.run.task
    kind = task[S.TASK_KIND]
    parts = [f"### Task: {TASK_TITLES.get(kind, kind)}\n\n" + task_settings_table(task)]
    if S.TASK_BINS in task:
        parts.append("### Scores per masked-area bin\n\nEach bin's inpainted images against the same images' "
                     "originals (FID needs at least 2 images).\n\n" + bins_table(task))
    key = ec.paper_key
    if paper is not None and key:
        head = f"Table {key[S.P_TABLE]}" if str(key[S.P_TABLE]).isdigit() else str(key[S.P_TABLE])
        parts.append(f"### The paper's {head}: {key[S.P_DATASET]}\n\nThe paper's rows (baselines included) and this "
                     "run, in bold, under the row it reproduces.\n\n" + generation_context(paper, key, [ec]))
    return "\n".join(parts)


def experiment_markdown(experiment: str, comparisons: Sequence[ExperimentComparison], figures: Mapping[str, str], rule: str,
                        paper: PaperResults | None = None) -> str:
    """`<experiment>.md`: banner, what a not-comparable run shows, comparison, protocol, a concat task's settings,
    bins and paper table (`paper` given), figures, rule."""
    parts = [f"# {experiment}: comparison with the paper\n"]
    for ec in comparisons:
        if not ec.comparable:
            parts.append(banner(ec))
            break
    statement = run_statement(comparisons)
    if statement:
        parts.append(statement)
    for ec in comparisons:
        head = "Generation (LDM samples)" if ec.kind is RunKind.GENERATION else "Reconstruction (autoencoder)"
        src = _source(ec)
        parts.append(f"## {head}\n\nPaper reference: **{ec.paper_label}**.{src}\n\nOverall verdict: **{VERDICT_TEXT[ec.verdict]}**\n")
        if not ec.comparable:
            parts.append(banner(ec))
        parts.append(metric_table(ec))
        parts.append(f"### Protocol ({head.split()[0].lower()})\n\n" + protocol_table(ec))
        if ec.kind is RunKind.GENERATION and ec.run is not None and ec.run.throughput:
            tp = ec.run.throughput
            parts.append(
                f"Sampling throughput: {fmt(tp.get(S.T_SAMPLING_IMG_PER_S))} images/s on {fmt(tp.get(S.T_DEVICE))} "
                "(the paper's throughput figures are for one A100 and are not compared).\n"
            )
        if ec.kind is RunKind.GENERATION and ec.run is not None and ec.run.task:
            parts.append(task_markdown(ec, paper))
    parts.append("## Figures\n\n" + _figure_links(figures))
    parts.append("## How the verdict is reached\n\n" + rule + "\n")
    return "\n".join(parts)


def _our_cells(ec: ExperimentComparison, paper_metrics: Sequence[str]) -> list[str]:
    """Our values under the paper's columns: only a metric that measures the column's quantity (the table's map of
    our keys to the paper's names); the others are a dash."""
    reverse = {v: k for k, v in paper_metric_map(ec.table).items()}
    cells = []
    for pm in paper_metrics:
        row = ec.row(reverse[pm]) if pm in reverse else None
        cells.append(MISSING if row is None or row.comparison.ours is None else f"**{fmt(row.comparison.ours)}**")
    return cells


def _ours_label(ec: ExperimentComparison) -> str:
    tag = " (NOT COMPARABLE)" if not ec.comparable else ""
    return f"**→ ours: {ec.experiment}**{tag} — {VERDICT_TEXT[ec.verdict]}"


def generation_context(paper: PaperResults, key: Mapping[str, Any], ours: Sequence[ExperimentComparison]) -> str:
    """The paper's rows for the run's table and dataset (baselines included) with our runs placed under their row."""
    metrics = context_metrics(key[S.P_TABLE])
    ctx = paper.context_table(key[S.P_TABLE], key[S.P_DATASET], metrics, key.get(S.P_RESOLUTION))
    cols = [c for c in ctx.columns if c != "is_ours"]
    rows = []
    for method, rec in ctx.iterrows():
        label = f"{method} (paper)" if rec["is_ours"] else method
        rows.append([label] + [fmt(rec[c]) for c in cols])
        for ec in ours:
            if ec.paper_key and ec.paper_key[S.P_METHOD] == method:
                rows.append([_ours_label(ec)] + _our_cells(ec, cols))
    return md_table(["method"] + cols, rows)


AE_CONTEXT_COLUMNS = ("name", "reg", "f", "z_shape", "rFID", "PSNR", "PSIM")


def autoencoder_context(paper: PaperResults, ours: Sequence[ExperimentComparison]) -> str:
    df = paper.autoencoders
    df = df[df["kind"] == "first_stage"]
    rows = []
    placed = set()
    metrics = (S.RFID, S.PSNR, S.SSIM, S.LPIPS)

    def our_row(ec: ExperimentComparison) -> list[str]:
        run = ec.run
        cells = [_ours_label(ec), MISSING, fmt(run.f), MISSING]
        for m in metrics:
            r = ec.row(m)
            cells.append(MISSING if r is None else f"**{fmt(r.comparison.ours)}**")
        return cells

    header = ["autoencoder", "reg", "f", "z_shape", "rFID", "PSNR", "SSIM (Tab.8)", "PSIM (paper) / LPIPS (ours)"]
    for rec in df.itertuples():
        label8 = paper.table8_method(rec.name)
        ssim = paper.recon_value(rec.name, S.SSIM) if label8 else None
        rows.append([rec.name, rec.reg, fmt(int(rec.f)), rec.z_shape.split()[0], fmt(rec.rFID), fmt(rec.PSNR),
                     fmt(None if ssim is None else ssim[0]), fmt(rec.PSIM)])
        for ec in ours:
            if ec.paper_key and ec.paper_key.get(S.P_NAME) == rec.name:
                rows.append(our_row(ec))
                placed.add(id(ec))
    rows += [our_row(ec) for ec in ours if id(ec) not in placed]
    return md_table(header, rows)


def overview_table(comparisons: Sequence[ExperimentComparison]) -> str:
    rows = []
    for ec in comparisons:
        key_metric = ec.headline
        r = ec.row(key_metric)
        rows.append([
            f"[{ec.experiment}]({ec.experiment}.md)", str(ec.kind), ec.paper_label, "yes" if ec.comparable else "**NO**",
            key_metric, fmt(None if r is None else r.comparison.paper), fmt(None if r is None else r.comparison.ours),
            MISSING if r is None else _ci_cell(r), VERDICT_TEXT[ec.verdict], str(len(ec.deviations)),
        ])
    return md_table(["experiment", "kind", "paper reference", "comparable", "metric", "paper", "ours", "95% CI", "verdict", "protocol deviations"], rows)


def paper_only_tables(paper: PaperResults, table: str = "1") -> str:
    parts = []
    for dataset in dict.fromkeys(paper.rows(table)["dataset"]):
        ctx = paper.context_table(table, dataset, list(LDM_PAPER_METRIC.values()))
        cols = [c for c in ctx.columns if c != "is_ours"]
        rows = [[f"{m} (paper)" if rec["is_ours"] else m] + [fmt(rec[c]) for c in cols] for m, rec in ctx.iterrows()]
        parts.append(f"### Table {table}: {dataset}\n\n" + md_table(["method"] + cols, rows))
    return "\n".join(parts)


def summary_markdown(comparisons: Sequence[ExperimentComparison], paper: PaperResults, figures: Mapping[str, str], rule: str, runs_dir: str) -> str:
    parts = ["# Replication summary: LDM (Rombach et al., CVPR 2022)\n",
             "Generated by `python -m replication.report` from the metrics files of every run reported into this "
             f"folder (copies under `metrics/`) and the paper's numbers in `{paper.paper_dir}`. Do not edit by hand.\n"]
    if not comparisons:
        parts.append(f"**No runs found in `{runs_dir}`: this report shows the paper's numbers only.**\n")
        parts.append("## The paper's Table 1 (unconditional generation)\n\n" + paper_only_tables(paper))
        parts.append("## The paper's autoencoders (Tab. 8 / model zoo)\n\n" + autoencoder_context(paper, []))
        parts.append("## How the verdict is reached\n\n" + rule + "\n")
        return "\n".join(parts)
    if any(not ec.comparable for ec in comparisons):
        names = ", ".join(sorted({ec.experiment for ec in comparisons if not ec.comparable}))
        parts.append(f"> **NOT COMPARABLE runs present ({names}): their numbers say nothing about reproduction.**\n")
    parts.append("## Overview\n\n" + overview_table(comparisons))
    gen = [ec for ec in comparisons if ec.kind is RunKind.GENERATION and ec.paper_key]
    groups: dict[tuple, list[ExperimentComparison]] = {}
    for ec in gen:
        k = (ec.paper_key[S.P_TABLE], ec.paper_key[S.P_DATASET], ec.paper_key.get(S.P_RESOLUTION))
        groups.setdefault(k, []).append(ec)
    for (table, dataset, res), ecs in groups.items():
        head = f"Table {table}" if str(table).isdigit() else str(table)
        key = {S.P_TABLE: table, S.P_DATASET: dataset, S.P_RESOLUTION: res}
        parts.append(f"## {head}: {dataset}{'' if res is None else f' ({res} px)'}\n\n"
                     "The paper's rows (baselines included, as printed in the paper) and our runs, in bold, under "
                     "the row they reproduce.\n\n" + generation_context(paper, key, ecs))
    recon = [ec for ec in comparisons if ec.kind is RunKind.RECONSTRUCTION]
    if recon:
        parts.append("## Autoencoders (Tab. 8 / model zoo)\n\n"
                     "The paper's PSIM is not a plain mean LPIPS (PROTOCOL.md section 1); our LPIPS sits in that "
                     "column for orientation only.\n\n" + autoencoder_context(paper, recon))
    if figures:
        parts.append("## Figures\n\n" + _figure_links(figures))
    parts.append("## How the verdict is reached\n\n" + rule + "\n")
    return "\n".join(parts)


SUMMARY_COLUMNS = (
    "experiment", "kind", "metric", "paper_metric", "paper", "paper_plus_minus", "ours", "ours_std", "diff", "rel_diff",
    "ci_low", "ci_high", "band_low", "band_high", "verdict", "comparable", "overall_verdict", "n_protocol_deviations",
    "paper_reference", "paper_source", "n_samples",
)


def summary_frame(comparisons: Sequence[ExperimentComparison]) -> pd.DataFrame:
    """Flat table, one row per (experiment, kind, metric)."""
    records = []
    for ec in comparisons:
        for r in ec.rows:
            c = r.comparison
            records.append({
                "experiment": ec.experiment, "kind": str(ec.kind), "metric": r.metric, "paper_metric": r.paper_metric,
                "paper": c.paper, "paper_plus_minus": r.paper_plus_minus, "ours": c.ours, "ours_std": r.std,
                "diff": c.diff, "rel_diff": c.rel_diff,
                "ci_low": None if c.interval is None else c.interval[0], "ci_high": None if c.interval is None else c.interval[1],
                "band_low": None if c.band is None else c.band[0], "band_high": None if c.band is None else c.band[1],
                "verdict": str(c.verdict), "comparable": ec.comparable, "overall_verdict": str(ec.verdict),
                "n_protocol_deviations": len(ec.deviations), "paper_reference": ec.paper_label,
                "paper_source": r.paper_source, "n_samples": r.n_samples,
            })
    return pd.DataFrame.from_records(records, columns=list(SUMMARY_COLUMNS))


def metrics_flat(comparisons: Sequence[ExperimentComparison]) -> dict[str, dict[str, float]]:
    """{experiment: {metric: our value}} (numbers only), for `dvc metrics show`. Generation and reconstruction
    metrics have distinct names; a name both kinds of one experiment carry is prefixed with its kind."""
    out: dict[str, dict[str, float]] = {}
    for ec in comparisons:
        entry = out.setdefault(ec.experiment, {})
        for r in ec.rows:
            if r.comparison.ours is None:
                continue
            key = r.metric if r.metric not in entry else f"{ec.kind}.{r.metric}"
            entry[key] = float(r.comparison.ours)
    return out


def metrics_summary(comparisons: Sequence[ExperimentComparison], rule: str) -> dict:
    """Nested dict for `dvc metrics show` and the notebook: experiments -> kind -> metrics."""
    out: dict[str, Any] = {"schema_version": S.SCHEMA_VERSION, "verdict_rule": rule, "experiments": {}}
    for ec in comparisons:
        entry = {
            "comparable": ec.comparable,
            "not_comparable_reasons": list(ec.not_comparable_reasons),
            "paper_reference": ec.paper_label,
            "overall_verdict": str(ec.verdict),
            "n_protocol_deviations": len(ec.deviations),
            "protocol_deviations": {e.key: {"paper": e.paper, "ours": e.ours, "status": str(e.status)} for e in ec.deviations},
            "metrics": {
                r.metric: {
                    "paper": r.comparison.paper, "ours": r.comparison.ours, "diff": r.comparison.diff,
                    "ci95": None if r.comparison.interval is None else list(r.comparison.interval),
                    "verdict": str(r.verdict), "paper_metric": r.paper_metric, "paper_plus_minus": r.paper_plus_minus,
                    "std": r.std,
                }
                for r in ec.rows
            },
        }
        if ec.kind is RunKind.GENERATION and ec.run is not None and ec.run.task:
            entry["task"] = ec.run.task  # the concat task's settings and, for inpainting, its per-bin scores
        out["experiments"].setdefault(ec.experiment, {})[str(ec.kind)] = entry
    return out
