"""Running one stage. A stage is `run(cfg) -> dict` (cfg: the composed Hydra config) that hands its body to
`execute`: the config is validated, the stage is skipped when up to date (fingerprint.py), and otherwise its body
runs with a `StageContext`, its log goes to the stage folder's log.txt, and it ends with the manifest
(provenance.py) and done.json written next to its outputs. Under torchrun or srun the ranks agree through
ranks.py."""
from __future__ import annotations

import contextlib
import logging
import sys
import time
from pathlib import Path
from typing import Any, Callable

import torch
from omegaconf import DictConfig, OmegaConf

from replication.config import TypedConfig, validate_config
from replication.stages.context import StageContext, resolve_device, run_dir_for, seed_everything
from replication.stages.fingerprint import decide_up_to_date, done_result, write_done
from replication.stages.provenance import write_manifest
from replication.stages.ranks import (DISTRIBUTED_STAGES, decided_by_main, hold_run_folder, run_on_every_rank,
                                      run_on_rank0)
from replication.training.distributed import DistInfo, init_distributed
from replication.utils.io import atomic_write_text
from replication.utils.verify import content_records

Body = Callable[[StageContext], dict[str, Any]]
log = logging.getLogger("replication")


def execute(stage: str, cfg: DictConfig, body: Body) -> dict[str, Any]:
    """Run `body` for `stage` unless it is up to date; return its result dict (with `skipped`).

    Under torchrun or an srun step with several tasks, rank 0 decides whether the stage is up to date (every
    rank follows it), single-process stages run on rank 0 only while the others wait (an error there ends every
    rank with its message), and only rank 0 writes the manifest and done.json."""
    typed = validate_config(cfg)
    root = typed.root
    run_dir = run_dir_for(cfg)
    stage_dir = run_dir / stage
    forced = "all" in root.force or stage in root.force
    device = resolve_device(root.device)
    dist = init_distributed(device)
    with contextlib.ExitStack() as lock:
        hold_run_folder(lock, run_dir, stage, dist)
        up_to_date = decided_by_main(lambda: decide_up_to_date(stage, cfg, root, forced), dist)
        if up_to_date:
            result = done_result(stage_dir)
            result["skipped"] = True
            if dist.is_main:
                log.info("stage %s of %s is up to date; skipped (force=[%s] reruns it)", stage, root.name, stage)
            return result

        def run() -> dict[str, Any]:
            return _run_stage(stage, cfg, body, typed, run_dir, device, dist)

        if not dist.enabled:
            return run()
        if stage not in DISTRIBUTED_STAGES:
            return run_on_rank0(stage, dist, stage_dir, run)
        return run_on_every_rank(stage, dist, run)


def setup_logging(stage_dir: Path, rank: int = 0) -> logging.Handler:
    """The stage folder's log.txt (log.rank<r>.txt for other ranks) receives the `replication` logger; a console
    handler is added where nobody prints the log yet (Hydra's job logging does)."""
    stage_dir.mkdir(parents=True, exist_ok=True)
    handler = logging.FileHandler(stage_dir / ("log.txt" if rank == 0 else f"log.rank{rank}.txt"))
    handler.setFormatter(logging.Formatter("%(asctime)s %(levelname)s %(name)s: %(message)s"))
    root = logging.getLogger("replication")
    root.setLevel(logging.INFO)
    root.addHandler(handler)
    console_elsewhere = logging.getLogger().handlers  # Hydra's job logging already prints to the console
    if not console_elsewhere and not any(isinstance(h, logging.StreamHandler) and not isinstance(h, logging.FileHandler)
                                         for h in root.handlers):
        console = logging.StreamHandler(sys.stderr)
        console.setFormatter(logging.Formatter("[%(name)s] %(message)s"))
        root.addHandler(console)
    return handler


def _run_stage(stage: str, cfg: DictConfig, body: Body, typed: TypedConfig, run_dir: Path, device: torch.device,
               dist: DistInfo) -> dict[str, Any]:
    root = typed.root
    stage_dir = run_dir / stage
    handler = setup_logging(stage_dir, dist.rank)
    if root.cpu_threads:
        torch.set_num_threads(root.cpu_threads)
    seed_everything(root.seed)  # weight initialisation and any library randomness repeat run to run
    ctx = StageContext(name=stage, cfg=cfg, typed=typed, run_dir=run_dir, stage_dir=stage_dir, device=device,
                       progress=root.progress and dist.is_main, is_main=dist.is_main)
    if dist.is_main:
        run_dir.mkdir(parents=True, exist_ok=True)
        atomic_write_text(run_dir / "config.yaml", OmegaConf.to_yaml(cfg, resolve=True))
    started = time.time()
    log.info("stage %s of %s: start (device %s%s)", stage, root.name, device,
             f", process {dist.rank} of {dist.world_size}" if dist.enabled else "")
    try:
        result = body(ctx)
    finally:
        logging.getLogger("replication").removeHandler(handler)
        handler.close()
    elapsed = time.time() - started
    outputs = [str(p) for p in result.pop("outputs", [])]
    if dist.is_main:
        files = content_records(outputs, root=root.runs_root)
        write_manifest(ctx, elapsed, dist.world_size, outputs, files)
        write_done(stage, cfg, stage_dir, outputs, files, result)  # last: the stage is finished once it exists
        ctx.stats(event="stage_done", seconds=elapsed)
        log.info("stage %s of %s: done in %.1f s", stage, root.name, elapsed)
    result["skipped"] = False
    result["seconds"] = elapsed
    return result
