"""`python -m replication.bench`: the command line of the throughput benchmark (measure one experiment, or merge
result files into one table)."""
from __future__ import annotations

import argparse
from pathlib import Path
from typing import Optional, Sequence

import torch

import replication.bench
from replication.bench.environment import resolve_device
from replication.bench.merge import merge_reports
from replication.bench.networks import compose_typed
from replication.bench.rendering import render_markdown
from replication.bench.runner import run_bench
from replication.bench.settings import (DEFAULT_REPEATS, NOISE_THRESHOLD, ROWS, BenchError, BenchSettings,
                                        default_counts)
from replication.config import TypedConfig
from replication.perf import FastPath

DESCRIPTION = (replication.bench.__doc__ or "").split("\n\n")[0]


def parse_args(argv: Optional[Sequence[str]] = None) -> argparse.Namespace:
    p = argparse.ArgumentParser(prog="python -m replication.bench", description=DESCRIPTION,
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("overrides", nargs="*", help="Hydra overrides, e.g. experiment=lsun_churches_ldm8")
    p.add_argument("--device", default="auto", help="auto | cpu | cuda | cuda:N")
    p.add_argument("--batch", type=int, default=None, help="training batch (default: trainer.batch_size)")
    p.add_argument("--sample-batch", type=int, default=None, help="sampling batch (default: sampler.batch_size)")
    p.add_argument("--ae-batch", type=int, default=None, help="encoder/decoder batch")
    p.add_argument("--feature-batch", type=int, default=None, help="feature-extraction batch")
    p.add_argument("--steps", type=int, default=None, help="timed iterations per measurement")
    # argparse formats help texts with %: a literal percent sign is %%
    p.add_argument("--repeats", type=int, default=None,
                   help=f"measurements per path (default {DEFAULT_REPEATS}): median, range, and a NOISY flag when "
                        f"they span more than {NOISE_THRESHOLD * 100:.0f}%% of the median")
    p.add_argument("--warmup", type=int, default=None, help="untimed iterations before timing (compilation)")
    p.add_argument("--sample-steps", type=int, default=None, help="DDIM steps actually run for the sampling row")
    p.add_argument("--fast", default=None, help="levers of the fast path: bf16,channels_last,compile,fused_adam | "
                   "all | none (default: on where they help on this device)")
    p.add_argument("--rows", default=",".join(ROWS), help=f"comma-separated subset of {','.join(ROWS)}")
    p.add_argument("--compile-autoencoder", action="store_true", help="also torch.compile the encoder/decoder")
    p.add_argument("--profile", type=int, default=0, metavar="N",
                   help="after timing, N more calls of each path under torch.profiler: where the time goes "
                        "(GPU kernel time per category, and how busy the GPU is); the sampling row profiles one run")
    p.add_argument("--threads", type=int, default=None, help="torch CPU threads")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--out", default="reports/benchmarks", help="output folder")
    p.add_argument("--tag", default=None, help="output file stem (default: <device>-<experiment>)")
    p.add_argument("--merge", nargs="+", default=None, metavar="JSON", help="merge result files instead of measuring")
    p.add_argument("--quiet", action="store_true", help="no progress lines and no table")
    p.add_argument("--no-table", action="store_true", help="progress lines only; the table is in <out>/<tag>.md")
    return p.parse_args(argv)


def settings_from_args(args: argparse.Namespace, typed: TypedConfig) -> BenchSettings:
    device = resolve_device(args.device)
    d = default_counts(device)

    def pick(value: Optional[int], default: int, name: str) -> int:
        value = default if value is None else value
        if value < 1:
            raise BenchError(f"--{name} must be >= 1, got {value}")
        return value

    fast = FastPath.parse(args.fast) if args.fast is not None else FastPath.for_device(device)
    rows = tuple(r.strip() for r in args.rows.split(",") if r.strip())
    return BenchSettings(
        device=device, batch=pick(args.batch, typed.trainer.batch_size, "batch"),
        sample_batch=pick(args.sample_batch, typed.sampler.batch_size, "sample-batch"),
        ae_batch=pick(args.ae_batch, d["ae_batch"], "ae-batch"),
        feature_batch=pick(args.feature_batch, d["feature_batch"], "feature-batch"),
        iters=pick(args.steps, d["iters"], "steps"),
        warmup=d["warmup"] if args.warmup is None else max(0, args.warmup),
        sample_steps=pick(args.sample_steps, d["sample_steps"], "sample-steps"), fast=fast, rows=rows,
        compile_autoencoder=args.compile_autoencoder, seed=args.seed, profile=max(0, args.profile),
        repeats=pick(args.repeats, d["repeats"], "repeats"))


def main(argv: Optional[Sequence[str]] = None) -> int:
    args = parse_args(argv)
    if args.threads:
        torch.set_num_threads(args.threads)
    out = Path(args.out)
    if args.merge:
        merged = merge_reports([Path(p) for p in args.merge], out, args.tag)
        print(merged["markdown"])
        return 0
    overrides = list(args.overrides) or ["experiment=smoke"]
    bad = [o for o in overrides if "=" not in o]
    if bad:
        raise BenchError(f"overrides must look like key=value, got {bad}")
    typed = compose_typed(overrides)
    settings = settings_from_args(args, typed)
    report = run_bench(overrides, settings, out, args.tag, progress=not args.quiet)
    if not (args.quiet or args.no_table):
        print(render_markdown([report]))
    return 0
