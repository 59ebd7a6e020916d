"""Keys and validation of the metrics files the evaluate stage writes (`metrics.json`, `recon_metrics.json`).

The schema itself is fixed by the evaluate stage; this module only names its keys and refuses files that do
not follow it, with an error naming the file and the key.
"""
from __future__ import annotations

import json
import math
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Mapping

SCHEMA_VERSION = 1
SUPPORTED_SCHEMA_VERSIONS = (SCHEMA_VERSION,)

METRICS_FILE = "metrics.json"
RECON_METRICS_FILE = "recon_metrics.json"

# Metric names (keys of "metrics").
FID = "FID"
PRECISION = "precision"
RECALL = "recall"
IS = "IS"
KID = "KID"
RFID = "rFID"
RIS = "rIS"
PSNR = "PSNR"
SSIM = "SSIM"
LPIPS = "LPIPS"
FID_INF = "FID_inf"  # reported from the top-level key below; Chong & Forsyth 2020
# Super-resolution (Tab. 5, 11): FID against the validation and the training split's features.
FID_VALSPLIT = "FID_valsplit_ref"
FID_TRAINSPLIT = "FID_trainsplit_ref"
# Inpainting (Tab. 6, 7): FID and LPIPS of every inpainted image against its original, and of the 40-50 % masked ones.
FID_ALL = "FID_all"
LPIPS_ALL = "LPIPS_all"
FID_HARD = "FID_40-50pct_masked"
LPIPS_HARD = "LPIPS_40-50pct_masked"

# Keys of one metric entry.
VALUE = "value"
CI95 = "ci95"
STD = "std"
N_SAMPLES = "n_samples"
METRIC_PROTOCOL = "protocol"
METRIC_REFERENCE = "reference"  # what an FID compares against, where a run has several (train split, val split, ...)
METRIC_NOTE = "note"  # why a metric has no value (`"value": null`)

# Top-level keys.
K_SCHEMA_VERSION = "schema_version"
K_EXPERIMENT = "experiment"
K_CREATED = "created"
K_COMPARABLE = "comparable"
K_NOT_COMPARABLE_REASONS = "not_comparable_reasons"
K_PAPER = "paper"
K_METRICS = "metrics"
K_FID_INF = "fid_extrapolated_infinity"
K_PROTOCOL = "protocol"
K_PAPER_PROTOCOL = "paper_protocol"
K_CURVES = "curves"
K_THROUGHPUT = "throughput"
K_TASK = "task"  # concat tasks (super-resolution, inpainting): the condition settings and, for inpainting, the bins
K_FIRST_STAGE = "first_stage"  # the run's autoencoder: reconstruction PSNR (value, std, images, split)
K_AUTOENCODER = "autoencoder"
K_F = "f"
K_N_IMAGES = "n_images"

# Keys of "task" (concat tasks) and of its masked-area bins.
TASK_KIND = "task"
TASK_SUPERRES = "superres"
TASK_INPAINTING = "inpainting"
TASK_BINS = "bins"
TASK_EXAMPLES = "examples"  # path of the examples file, relative to the run folder
B_COUNT = "count"
B_FID = "FID"
B_FID_NOTE = "FID_note"
B_LPIPS = "LPIPS"
# Arrays of the examples file (uint8; images NHWC, the inpainting mask NHW with 255 = hole).
EX_LOWRES = "lowres"  # nearest-upsampled to the output size
EX_INPUT = "input"  # the image with its hole grey
EX_MASK = "mask"
EX_OUTPUT = "output"
EX_TARGET = "target"

# Keys of "paper".
P_TABLE = "table"
P_DATASET = "dataset"
P_METHOD = "method"
P_NAME = "name"
P_RESOLUTION = "resolution"  # optional: needed where a table lists one method at two resolutions (Tab.6, Tab.9)

# Curves and their point keys.
CURVE_FID_VS_DDIM_STEPS = "fid_vs_ddim_steps"
CURVE_FID_VS_TRAIN_STEPS = "fid_vs_train_steps"
CURVE_TRAIN_LOSS = "train_loss"
C_STEPS = "steps"
C_SAMPLES_PER_S = "samples_per_s"
C_TRAIN_STEP = "train_step"
C_STEP = "step"
C_LOSS = "loss"
CURVE_REQUIRED_KEYS = {
    CURVE_FID_VS_DDIM_STEPS: (C_STEPS, FID),
    CURVE_FID_VS_TRAIN_STEPS: (C_TRAIN_STEP, FID),
    CURVE_TRAIN_LOSS: (C_STEP, C_LOSS),
}

# Keys of "throughput".
T_SAMPLING_IMG_PER_S = "sampling_img_per_s"
T_DEVICE = "device"

LDM_REQUIRED = (K_SCHEMA_VERSION, K_EXPERIMENT, K_COMPARABLE, K_METRICS, K_PROTOCOL)
LDM_OPTIONAL = (K_CREATED, K_NOT_COMPARABLE_REASONS, K_PAPER, K_FID_INF, K_PAPER_PROTOCOL, K_CURVES, K_THROUGHPUT,
                K_FIRST_STAGE, K_TASK)
RECON_REQUIRED = (K_SCHEMA_VERSION, K_EXPERIMENT, K_AUTOENCODER, K_F, K_COMPARABLE, K_METRICS)
RECON_OPTIONAL = (K_CREATED, K_NOT_COMPARABLE_REASONS, K_N_IMAGES, K_PAPER, K_PROTOCOL)


class SchemaError(ValueError):
    """A metrics file does not follow the schema; the message names the file and the key."""


@dataclass(frozen=True)
class MetricValue:
    value: float
    ci95: tuple[float, float] | None = None
    std: float | None = None
    n_samples: int | None = None
    protocol: str | None = None
    reference: str | None = None

    @property
    def interval(self) -> tuple[float, float] | None:
        return self.ci95


@dataclass(frozen=True)
class LdmRun:
    """Validated content of one `metrics.json`."""

    path: Path
    experiment: str
    comparable: bool
    not_comparable_reasons: tuple[str, ...]
    paper: dict[str, Any] | None
    metrics: dict[str, MetricValue]
    protocol: dict[str, Any]
    paper_protocol: dict[str, Any]
    curves: dict[str, list[dict[str, Any]]] = field(default_factory=dict)
    throughput: dict[str, Any] = field(default_factory=dict)
    first_stage: dict[str, Any] = field(default_factory=dict)
    fid_inf: float | None = None
    created: str | None = None
    task: dict[str, Any] = field(default_factory=dict)  # the concat task's record, validated by `_task`
    unmeasured: dict[str, str] = field(default_factory=dict)  # metric -> why it has no value


@dataclass(frozen=True)
class ReconRun:
    """Validated content of one `recon_metrics.json`."""

    path: Path
    experiment: str
    autoencoder: str
    f: int
    comparable: bool
    not_comparable_reasons: tuple[str, ...]
    paper: dict[str, Any] | None
    metrics: dict[str, MetricValue]
    n_images: int | None = None
    protocol: dict[str, Any] = field(default_factory=dict)
    created: str | None = None


def _is_number(x: Any) -> bool:
    return isinstance(x, (int, float)) and not isinstance(x, bool) and math.isfinite(float(x))


def _fail(path: Path, key: str, msg: str) -> SchemaError:
    return SchemaError(f"{path}: key '{key}': {msg}")


def _read(path: str | Path) -> tuple[Path, dict[str, Any]]:
    path = Path(path)
    if not path.is_file():
        raise SchemaError(f"{path}: metrics file does not exist")
    try:
        data = json.loads(path.read_text(encoding="utf-8"))
    except json.JSONDecodeError as exc:
        raise SchemaError(f"{path}: not valid JSON ({exc})") from exc
    if not isinstance(data, dict):
        raise SchemaError(f"{path}: top level must be a JSON object, got {type(data).__name__}")
    return path, data


def _check_keys(path: Path, data: Mapping[str, Any], required: tuple[str, ...], optional: tuple[str, ...], strict: bool) -> None:
    missing = [k for k in required if k not in data]
    if missing:
        raise _fail(path, missing[0], f"required key missing (all missing: {missing})")
    version = data[K_SCHEMA_VERSION]
    if version not in SUPPORTED_SCHEMA_VERSIONS:
        raise _fail(path, K_SCHEMA_VERSION, f"unsupported schema version {version!r}; this report reads {SUPPORTED_SCHEMA_VERSIONS}")
    if strict:
        unknown = sorted(set(data) - set(required) - set(optional))
        if unknown:
            raise _fail(path, unknown[0], f"unknown top-level key(s) {unknown}; known: {sorted(required + optional)}")


def _metric(path: Path, name: str, entry: Any) -> MetricValue:
    key = f"{K_METRICS}.{name}"
    if not isinstance(entry, dict):
        raise _fail(path, key, f"must be an object with a '{VALUE}', got {entry!r}")
    if VALUE not in entry:
        raise _fail(path, f"{key}.{VALUE}", "required key missing")
    if not _is_number(entry[VALUE]):
        raise _fail(path, f"{key}.{VALUE}", f"must be a finite number, got {entry[VALUE]!r}")
    ci = entry.get(CI95)
    if ci is not None:
        if not (isinstance(ci, (list, tuple)) and len(ci) == 2 and all(_is_number(c) for c in ci)):
            raise _fail(path, f"{key}.{CI95}", f"must be null or [low, high] numbers, got {ci!r}")
        if ci[0] > ci[1]:
            raise _fail(path, f"{key}.{CI95}", f"low {ci[0]} is above high {ci[1]}")
        ci = (float(ci[0]), float(ci[1]))
    std = entry.get(STD)
    if std is not None and not _is_number(std):
        raise _fail(path, f"{key}.{STD}", f"must be null or a number, got {std!r}")
    n = entry.get(N_SAMPLES)
    if n is not None and not (isinstance(n, int) and not isinstance(n, bool) and n >= 0):
        raise _fail(path, f"{key}.{N_SAMPLES}", f"must be null or a non-negative integer, got {n!r}")
    proto = entry.get(METRIC_PROTOCOL)
    ref = entry.get(METRIC_REFERENCE)
    return MetricValue(float(entry[VALUE]), ci, None if std is None else float(std), n, proto,
                       ref if isinstance(ref, str) else None)


def _metrics(path: Path, data: Mapping[str, Any], skip: Mapping[str, str] | None = None) -> dict[str, MetricValue]:
    raw = data[K_METRICS]
    if not isinstance(raw, dict):
        raise _fail(path, K_METRICS, f"must be an object, got {type(raw).__name__}")
    return {name: _metric(path, name, entry) for name, entry in raw.items() if name not in (skip or {})}


def _unmeasured(path: Path, data: Mapping[str, Any]) -> dict[str, str]:
    """Metrics the evaluation names without a value (`"value": null`) and says why in a `"note"` (an FID over fewer
    than two images of a masked-area bin): the report lists them as missing with that note. A null value without a
    note stays an error."""
    raw = data.get(K_METRICS)
    if not isinstance(raw, dict):
        return {}
    return {name: entry[METRIC_NOTE] for name, entry in raw.items()
            if isinstance(entry, dict) and VALUE in entry and entry[VALUE] is None and isinstance(entry.get(METRIC_NOTE), str)}


def _task(path: Path, data: Mapping[str, Any]) -> dict[str, Any]:
    """The concat task's record: its kind, the examples file and, for inpainting, the masked-area bins (each a count,
    an FID or null with a note, and an LPIPS mean and std where the bin has images)."""
    task = _object(path, data, K_TASK)
    if not task:
        return {}
    if not isinstance(task.get(TASK_KIND), str) or not task[TASK_KIND]:
        raise _fail(path, f"{K_TASK}.{TASK_KIND}", f"must be a non-empty string, got {task.get(TASK_KIND)!r}")
    examples = task.get(TASK_EXAMPLES)
    if examples is not None and not (isinstance(examples, str) and examples):
        raise _fail(path, f"{K_TASK}.{TASK_EXAMPLES}", f"must be a path relative to the run folder, got {examples!r}")
    bins = task.get(TASK_BINS)
    if bins is None:
        return task
    if not isinstance(bins, dict):
        raise _fail(path, f"{K_TASK}.{TASK_BINS}", f"must be an object of masked-area bins, got {type(bins).__name__}")
    for label, entry in bins.items():
        key = f"{K_TASK}.{TASK_BINS}.{label}"
        if not isinstance(entry, dict):
            raise _fail(path, key, f"must be an object, got {entry!r}")
        count = entry.get(B_COUNT)
        if not (isinstance(count, int) and not isinstance(count, bool) and count >= 0):
            raise _fail(path, f"{key}.{B_COUNT}", f"must be a non-negative integer, got {count!r}")
        if entry.get(B_FID) is not None and not _is_number(entry[B_FID]):
            raise _fail(path, f"{key}.{B_FID}", f"must be null or a finite number, got {entry[B_FID]!r}")
        lpips = entry.get(B_LPIPS)
        if lpips is not None:
            if not (isinstance(lpips, dict) and _is_number(lpips.get(VALUE))):
                raise _fail(path, f"{key}.{B_LPIPS}", f"must be an object with a numeric '{VALUE}', got {lpips!r}")
            if lpips.get(STD) is not None and not _is_number(lpips[STD]):
                raise _fail(path, f"{key}.{B_LPIPS}.{STD}", f"must be null or a number, got {lpips[STD]!r}")
    return task


def _comparable(path: Path, data: Mapping[str, Any]) -> tuple[bool, tuple[str, ...]]:
    comparable = data[K_COMPARABLE]
    if not isinstance(comparable, bool):
        raise _fail(path, K_COMPARABLE, f"must be true or false, got {comparable!r}")
    reasons = data.get(K_NOT_COMPARABLE_REASONS) or []
    if not isinstance(reasons, list) or not all(isinstance(r, str) for r in reasons):
        raise _fail(path, K_NOT_COMPARABLE_REASONS, f"must be a list of strings, got {reasons!r}")
    return comparable, tuple(reasons)


def _paper_key(path: Path, data: Mapping[str, Any], keys: tuple[str, ...], optional: tuple[str, ...] = ()) -> dict[str, Any] | None:
    paper = data.get(K_PAPER)
    if paper is None:
        return None
    if not isinstance(paper, dict):
        raise _fail(path, K_PAPER, f"must be null or an object with keys {list(keys)}, got {paper!r}")
    for k in keys:
        if k not in paper or not isinstance(paper[k], (str, int)) or isinstance(paper[k], bool):
            raise _fail(path, f"{K_PAPER}.{k}", f"required string missing (got {paper.get(k)!r})")
    unknown = sorted(set(paper) - set(keys) - set(optional))
    if unknown:
        raise _fail(path, f"{K_PAPER}.{unknown[0]}", f"unknown key(s) {unknown}; known: {list(keys + optional)}")
    out: dict[str, Any] = {k: str(paper[k]) for k in keys}
    for k in optional:
        if paper.get(k) is not None:
            if not _is_number(paper[k]):
                raise _fail(path, f"{K_PAPER}.{k}", f"must be a number, got {paper[k]!r}")
            out[k] = int(paper[k])
    return out


def _object(path: Path, data: Mapping[str, Any], key: str) -> dict[str, Any]:
    value = data.get(key)
    if value is None:
        return {}
    if not isinstance(value, dict):
        raise _fail(path, key, f"must be an object, got {type(value).__name__}")
    return dict(value)


def _curves(path: Path, data: Mapping[str, Any]) -> dict[str, list[dict[str, Any]]]:
    curves = _object(path, data, K_CURVES)
    out: dict[str, list[dict[str, Any]]] = {}
    for name, points in curves.items():
        if points is None:
            continue
        if not isinstance(points, list):
            raise _fail(path, f"{K_CURVES}.{name}", f"must be a list of points, got {type(points).__name__}")
        required = CURVE_REQUIRED_KEYS.get(name, ())
        for i, point in enumerate(points):
            if not isinstance(point, dict):
                raise _fail(path, f"{K_CURVES}.{name}[{i}]", f"must be an object, got {point!r}")
            for k in required:
                if k not in point:
                    raise _fail(path, f"{K_CURVES}.{name}[{i}].{k}", "required key missing")
                if not _is_number(point[k]):
                    raise _fail(path, f"{K_CURVES}.{name}[{i}].{k}", f"must be a finite number, got {point[k]!r}")
        out[name] = [dict(p) for p in points]
    return out


def load_metrics(path: str | Path, strict: bool = True) -> LdmRun:
    """Read and validate one LDM `metrics.json`; `strict` also refuses unknown top-level keys."""
    path, data = _read(path)
    _check_keys(path, data, LDM_REQUIRED, LDM_OPTIONAL, strict)
    if not isinstance(data[K_EXPERIMENT], str) or not data[K_EXPERIMENT]:
        raise _fail(path, K_EXPERIMENT, f"must be a non-empty string, got {data[K_EXPERIMENT]!r}")
    comparable, reasons = _comparable(path, data)
    fid_inf = data.get(K_FID_INF)
    if fid_inf is not None and not _is_number(fid_inf):
        raise _fail(path, K_FID_INF, f"must be null or a number, got {fid_inf!r}")
    unmeasured = _unmeasured(path, data)
    return LdmRun(
        path=path,
        experiment=data[K_EXPERIMENT],
        comparable=comparable,
        not_comparable_reasons=reasons,
        paper=_paper_key(path, data, (P_TABLE, P_DATASET, P_METHOD), (P_RESOLUTION,)),
        metrics=_metrics(path, data, skip=unmeasured),
        protocol=_object(path, data, K_PROTOCOL),
        paper_protocol=_object(path, data, K_PAPER_PROTOCOL),
        curves=_curves(path, data),
        throughput=_object(path, data, K_THROUGHPUT),
        first_stage=_object(path, data, K_FIRST_STAGE),
        fid_inf=None if fid_inf is None else float(fid_inf),
        created=data.get(K_CREATED),
        task=_task(path, data),
        unmeasured=unmeasured,
    )


def load_recon_metrics(path: str | Path, strict: bool = True) -> ReconRun:
    """Read and validate one autoencoder `recon_metrics.json`."""
    path, data = _read(path)
    _check_keys(path, data, RECON_REQUIRED, RECON_OPTIONAL, strict)
    for key in (K_EXPERIMENT, K_AUTOENCODER):
        if not isinstance(data[key], str) or not data[key]:
            raise _fail(path, key, f"must be a non-empty string, got {data[key]!r}")
    f = data[K_F]
    if not (isinstance(f, int) and not isinstance(f, bool) and f >= 1):
        raise _fail(path, K_F, f"must be a positive integer downsampling factor, got {f!r}")
    comparable, reasons = _comparable(path, data)
    n_images = data.get(K_N_IMAGES)
    if n_images is not None and not (isinstance(n_images, int) and n_images >= 0):
        raise _fail(path, K_N_IMAGES, f"must be null or a non-negative integer, got {n_images!r}")
    return ReconRun(
        path=path,
        experiment=data[K_EXPERIMENT],
        autoencoder=data[K_AUTOENCODER],
        f=f,
        comparable=comparable,
        not_comparable_reasons=reasons,
        paper=_paper_key(path, data, (P_NAME,)),
        metrics=_metrics(path, data),
        n_images=n_images,
        protocol=_object(path, data, K_PROTOCOL),
        created=data.get(K_CREATED),
    )
