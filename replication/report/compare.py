"""Put one run next to the paper: per-metric verdicts and the protocol check, ready for tables and figures."""
from __future__ import annotations

import enum
from dataclasses import dataclass, field
from typing import Mapping

from . import schema as S
from .paper import PaperResults, headline_metric, paper_metric_map
from .protocol import ProtocolEntry, compare_protocol
from .verdict import Comparison, Tolerance, Verdict, judge, overall

# Display order of metrics; others follow in the run's order.
METRIC_ORDER = (S.FID, S.PRECISION, S.RECALL, S.IS, S.KID, S.FID_INF, S.RFID, S.RIS, S.PSNR, S.SSIM, S.LPIPS)


class RunKind(str, enum.Enum):
    GENERATION = "generation"  # an LDM run, metrics.json
    RECONSTRUCTION = "reconstruction"  # an autoencoder run, recon_metrics.json

    def __str__(self) -> str:
        return self.value


@dataclass(frozen=True)
class MetricRow:
    comparison: Comparison
    paper_metric: str | None  # the paper's name for the metric, None without a counterpart
    paper_plus_minus: float | None = None
    paper_source: str | None = None
    std: float | None = None
    n_samples: int | None = None
    note: str = ""

    @property
    def metric(self) -> str:
        return self.comparison.metric

    @property
    def verdict(self) -> Verdict:
        return self.comparison.verdict


@dataclass(frozen=True)
class ExperimentComparison:
    experiment: str
    kind: RunKind
    comparable: bool
    not_comparable_reasons: tuple[str, ...]
    paper_key: dict | None
    paper_label: str  # human-readable pointer into the paper
    rows: list[MetricRow]
    protocol: list[ProtocolEntry] = field(default_factory=list)
    run: S.LdmRun | S.ReconRun | None = None

    @property
    def verdict(self) -> Verdict:
        if not self.comparable:
            return Verdict.NOT_COMPARABLE
        return overall([r.verdict for r in self.rows])

    @property
    def deviations(self) -> list[ProtocolEntry]:
        return [e for e in self.protocol if e.is_deviation]

    def row(self, metric: str) -> MetricRow | None:
        return next((r for r in self.rows if r.metric == metric), None)

    @property
    def table(self) -> str | None:
        """The paper table an LDM run is compared with, None for an autoencoder or a run without a paper key."""
        return None if self.kind is not RunKind.GENERATION or not self.paper_key else self.paper_key[S.P_TABLE]

    @property
    def headline(self) -> str:
        """The metric that stands for the run where one number must: rFID for an autoencoder, else its table's."""
        return S.RFID if self.kind is RunKind.RECONSTRUCTION else headline_metric(self.table)


def _ordered(names: list[str], first: tuple[str, ...] = ()) -> list[str]:
    """`first` (the paper's metrics of the run's table, in the table's order), then METRIC_ORDER, then the rest."""
    head = [m for m in dict.fromkeys(first + METRIC_ORDER) if m in names]
    return head + [m for m in names if m not in head]


def _ldm_note(name: str, mv: S.MetricValue | None, run: S.LdmRun) -> str:
    """What a row of an LDM run needs said beside its numbers: the metric's protocol, what its FID is measured
    against, or why the run has no value."""
    parts = []
    if mv is not None and mv.protocol:
        parts.append(f"protocol {mv.protocol}")
    if mv is not None and mv.reference:
        parts.append(f"against {mv.reference}")
    if name in run.unmeasured:
        parts.append(f"no value: {run.unmeasured[name]}")
    return "; ".join(parts)


def paper_label(key: Mapping | None) -> str:
    if not key:
        return "no paper counterpart"
    if S.P_NAME in key:
        return f"autoencoder '{key[S.P_NAME]}' (autoencoders.csv; Tab.8)"
    table = key[S.P_TABLE]
    prefix = f"Table {table}" if str(table).isdigit() else str(table)
    res = f", {key[S.P_RESOLUTION]} px" if key.get(S.P_RESOLUTION) else ""
    return f"{prefix}, {key[S.P_DATASET]}{res}, {key[S.P_METHOD]}"


def compare_ldm(run: S.LdmRun, paper: PaperResults, tolerances: Mapping[str, Tolerance] | None = None) -> ExperimentComparison:
    """Verdict per metric of one LDM run; an unknown paper key raises PaperKeyError."""
    key = run.paper
    paper_metrics: list[str] = []
    mapping = paper_metric_map(None if key is None else key[S.P_TABLE])
    if key is not None:
        paper_metrics = paper.metrics_of(key[S.P_TABLE], key[S.P_DATASET], key[S.P_METHOD], key.get(S.P_RESOLUTION))
    reverse = {v: k for k, v in mapping.items()}
    names = list(run.metrics) + [reverse[m] for m in paper_metrics if m in reverse and reverse[m] not in run.metrics]
    names += [m for m in run.unmeasured if m not in names]
    rows = []
    for name in _ordered(names, tuple(mapping)):
        mv = run.metrics.get(name)
        pm = mapping.get(name)
        prow = None
        if key is not None and pm in paper_metrics:
            prow = paper.row(key[S.P_TABLE], key[S.P_DATASET], key[S.P_METHOD], pm, key.get(S.P_RESOLUTION))
        comp = judge(
            name, None if mv is None else mv.value, None if prow is None else prow.value,
            None if mv is None else mv.ci95, run.comparable, tolerances=tolerances,
        )
        note = _ldm_note(name, mv, run)
        rows.append(MetricRow(
            comp, pm if prow is not None else None,
            None if prow is None else prow.plus_minus,
            None if prow is None else f"results.csv: {paper_label(key)}, {pm}",
            None if mv is None else mv.std, None if mv is None else mv.n_samples, note,
        ))
    if run.fid_inf is not None:
        comp = judge(S.FID_INF, run.fid_inf, None, None, run.comparable)
        rows.append(MetricRow(comp, None, note="FID extrapolated to infinitely many samples (Chong & Forsyth 2020); the paper reports none"))
    return ExperimentComparison(
        run.experiment, RunKind.GENERATION, run.comparable, run.not_comparable_reasons, key, paper_label(key), rows,
        compare_protocol(run.protocol, run.paper_protocol), run,
    )


def compare_recon(run: S.ReconRun, paper: PaperResults, tolerances: Mapping[str, Tolerance] | None = None) -> ExperimentComparison:
    """Verdict per reconstruction metric of one autoencoder run against Tab.8 / autoencoders.csv."""
    name = None if run.paper is None else run.paper[S.P_NAME]
    if name is not None:
        paper.autoencoder(name)  # fail early, with close matches, on an unknown name
    rows = []
    for metric in _ordered(list(run.metrics)):
        mv = run.metrics[metric]
        found = None if name is None else paper.recon_value(name, metric)
        comp = judge(metric, mv.value, None if found is None else found[0], mv.ci95, run.comparable, tolerances=tolerances)
        note = ""
        if metric == S.LPIPS:
            note = "the paper's PSIM is not a plain mean LPIPS (values > 1; PROTOCOL.md section 1), so no comparison"
        rows.append(MetricRow(
            comp, None if found is None else metric, None if found is None else found[1],
            None if found is None else found[2], mv.std, mv.n_samples or run.n_images, note,
        ))
    protocol = compare_protocol(run.protocol, {}) if run.protocol else []
    return ExperimentComparison(
        run.experiment, RunKind.RECONSTRUCTION, run.comparable, run.not_comparable_reasons, run.paper,
        paper_label(run.paper), rows, protocol, run,
    )
