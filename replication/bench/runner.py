"""One benchmark run: every requested row of one experiment, its results rewritten after each row so that a run
cut short (a time limit, a failure) keeps what it measured."""
from __future__ import annotations

import datetime as _dt
from pathlib import Path
from typing import Any, Optional, Sequence

import torch

from replication.bench.environment import device_slug, environment, git_commit, slug
from replication.bench.measurement import matmul_peak_tflops, nonzero_init_
from replication.bench.networks import build_first_stage, build_unet, compose_typed, unet_flops
from replication.bench.rendering import render_markdown, row_line
from replication.bench.rows import ROW_MEASURES, BenchRun
from replication.bench.settings import ROWS, SCHEMA_VERSION, BenchError, BenchSettings, settings_dict
from replication.bench.targets import gflop_checks
from replication.perf import FastPath, cuda_flags
from replication.utils.io import atomic_write_json, atomic_write_text


def run_bench(overrides: Sequence[str], s: BenchSettings, out_dir: Optional[Path] = None,
              tag: Optional[str] = None, progress: bool = True) -> dict[str, Any]:
    """Measure every row of `s.rows`; write <out_dir>/<tag>.json/.md after each row (when out_dir is given)."""
    unknown = [r for r in s.rows if r not in ROWS]
    if unknown:
        raise BenchError(f"unknown row(s) {unknown}; allowed: {', '.join(ROWS)}")
    typed = compose_typed(overrides)
    experiment, device = typed.root.name, s.device
    say = print if progress else (lambda *a, **k: None)
    tag = tag or f"{device_slug(device)}-{slug(experiment)}"
    report: dict[str, Any] = {
        "schema": SCHEMA_VERSION, "experiment": experiment, "overrides": list(overrides),
        "created": _dt.datetime.now(_dt.timezone.utc).isoformat(timespec="seconds"), "git_commit": git_commit(),
        "device": environment(device), "settings": settings_dict(s), "baseline": FastPath().describe(),
        "fast_path": s.fast.describe(), "rows": [], "numerics": {}, "gflop_check": {}, "counted_gflop": {},
        "complete": False}

    def save() -> None:
        if out_dir is not None:
            atomic_write_json(Path(out_dir) / f"{tag}.json", report)
            atomic_write_text(Path(out_dir) / f"{tag}.md", render_markdown([report]))

    with cuda_flags(benchmark=True) as flags:
        report["device"]["flags"] = flags if device.type == "cuda" else {}
        say(f"[bench] {experiment} on {report['device']['name']}: measuring the bf16 matmul peak")
        report["peak_bf16_tflops"] = peak = matmul_peak_tflops(device, torch.bfloat16)
        report["peak_fp32_tflops"] = matmul_peak_tflops(device, torch.float32)
        save()  # a run cut short still leaves its header and every finished row
        needs_unet = any(r in s.rows for r in ("train", "sample"))
        torch.manual_seed(s.seed)

        def on_baseline(name: str, what: str, batch: int, gflop: float, base: dict[str, Any]) -> None:
            report["pending"] = {"row": name, "what": what, "batch": batch, "gflop_per_img": gflop, "baseline": base}
            save()

        run = BenchRun(typed, s, report["device"], peak,
                       unet=nonzero_init_(build_unet(typed), s.seed) if needs_unet else None,
                       first_stage=build_first_stage(typed) if any(r in s.rows for r in ("encode", "decode")) else None,
                       counted=report["counted_gflop"], on_baseline=on_baseline)
        if needs_unet:
            run.counted["unet_forward"] = unet_flops(typed, train=False) / 1e9
        for name in s.rows:
            say(f"[bench] row {name}: eager fp32 baseline, then {s.fast.describe()}")
            row = ROW_MEASURES[name](run)
            if row is None:
                say(f"[bench]   {name}: skipped (the experiment has no first stage with weights)")
                continue
            report.pop("pending", None)
            report["rows"].append(row)
            report["numerics"][name] = row["fast_vs_baseline_rel_err"]
            report["gflop_check"] = gflop_checks(experiment, run.counted)
            save()
            say(row_line(row))
    report["complete"] = True
    save()
    return report
