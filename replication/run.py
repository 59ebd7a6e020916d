"""`python -m replication.run experiment=NAME [overrides]`: the stages of one experiment, in order.

Each stage is also runnable alone: `python -m replication.stages.<stage> experiment=NAME`. Before the first stage,
the whole config is validated, the output folders are checked to be writable and the disk estimate of the run is
printed and checked against the free space (replication/preflight.py).
"""
from __future__ import annotations

import importlib
import logging
from typing import Any

from omegaconf import DictConfig

from replication.config import AUTOENCODER_STAGES, STAGES, ExperimentKind, TypedConfig, validate_config
from replication.preflight import preflight
from replication.stages.entry import hydra_entry

log = logging.getLogger("replication")


def stages_for(cfg: DictConfig, typed: TypedConfig | None = None) -> list[str]:
    typed = typed or validate_config(cfg)
    allowed = AUTOENCODER_STAGES if typed.root.kind == ExperimentKind.autoencoder else STAGES
    chosen = [s for s in STAGES if s in typed.root.stages and s in allowed]
    return chosen


def run(cfg: DictConfig) -> dict[str, Any]:
    typed = validate_config(cfg)
    stages = stages_for(cfg, typed)
    preflight(typed)
    results: dict[str, Any] = {}
    for stage in stages:
        module = importlib.import_module(f"replication.stages.{stage}")
        results[stage] = module.run(cfg)
    return results


main = hydra_entry(run)

if __name__ == "__main__":
    main()
