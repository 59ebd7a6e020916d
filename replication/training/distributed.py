"""PyTorch distributed set-up: torchrun (one process per GPU), or SLURM tasks started by srun (Hydra's submitit
launcher with `tasks_per_node` > 1), whose variables are translated to torchrun's. A single process needs nothing.
"""
from __future__ import annotations

import datetime
import logging
import os
import re
from dataclasses import dataclass
from typing import Any, Mapping, Optional

import torch
import torch.distributed as dist

log = logging.getLogger("replication")

# waits of idle ranks while rank 0 runs a single-process stage (hours for an autoencoder): a gloo group whose
# timeout outlasts any stage, instead of the default group's (NCCL: 10 minutes)
_WAIT_TIMEOUT = datetime.timedelta(days=30)
_wait_group: Any = None
# set to 0 to ignore SLURM's variables (e.g. an srun step that starts independent jobs on purpose)
SLURM_SWITCH = "REPLICATION_SLURM_DIST"


def first_slurm_host(nodelist: str) -> str:
    """The first host of a SLURM node list: 'gpu[003-004,010],cpu1' -> 'gpu003', 'node7' -> 'node7'."""
    nodelist = nodelist.strip()
    m = re.match(r"([^,\[]+)(\[([^\]]+)\])?", nodelist)
    if not m or not m.group(1):
        raise ValueError(f"cannot read a host name from SLURM node list {nodelist!r}")
    prefix, ranges = m.group(1), m.group(3)
    if ranges is None:
        return prefix
    first = ranges.split(",")[0].split("-")[0]
    return prefix + first


def torch_env_from_slurm(env: Mapping[str, str]) -> Optional[dict[str, str]]:
    """torchrun's variables (RANK, WORLD_SIZE, LOCAL_RANK, LOCAL_WORLD_SIZE, MASTER_ADDR, MASTER_PORT) for a task of
    an srun step with more than one task, or None (already set by torchrun, not an srun step, one task, or
    switched off). A batch script itself has SLURM_PROCID 0 and SLURM_NTASKS N but no step variables, so a plain
    `python` there stays a single process instead of waiting for N - 1 peers that never come."""
    if "WORLD_SIZE" in env or env.get(SLURM_SWITCH, "1") == "0":
        return None
    ntasks = env.get("SLURM_STEP_NUM_TASKS")
    if "SLURM_STEP_ID" not in env or "SLURM_PROCID" not in env or not ntasks or int(ntasks) <= 1:
        return None
    nodelist = env.get("SLURM_STEP_NODELIST") or env.get("SLURM_JOB_NODELIST") or env.get("SLURM_NODELIST")
    if not nodelist:
        raise ValueError("srun step with several tasks but no SLURM_STEP_NODELIST/SLURM_JOB_NODELIST to find rank 0")
    job = int(env.get("SLURM_JOB_ID", "0") or 0)
    tasks_per_node = env.get("SLURM_STEP_TASKS_PER_NODE", "").split("(")[0].split(",")[0]
    return {
        "RANK": env["SLURM_PROCID"],
        "WORLD_SIZE": ntasks,
        "LOCAL_RANK": env.get("SLURM_LOCALID", "0"),
        "LOCAL_WORLD_SIZE": tasks_per_node or ntasks,
        "MASTER_ADDR": env.get("MASTER_ADDR") or first_slurm_host(nodelist),
        # one port per job (and step), so two jobs sharing a node do not meet each other
        "MASTER_PORT": env.get("MASTER_PORT") or str(20000 + (job * 7 + int(env["SLURM_STEP_ID"])) % 20000),
    }


@dataclass(frozen=True)
class DistInfo:
    rank: int = 0
    world_size: int = 1
    local_rank: int = 0

    @property
    def is_main(self) -> bool:
        return self.rank == 0

    @property
    def enabled(self) -> bool:
        return self.world_size > 1


def init_distributed(device: torch.device) -> DistInfo:
    """Join the process group torchrun describes in the environment (WORLD_SIZE, RANK, LOCAL_RANK), or the one
    an srun step describes (translated by torch_env_from_slurm)."""
    slurm = torch_env_from_slurm(os.environ)
    if slurm is not None:
        os.environ.update(slurm)
        log.info("SLURM step: process %s of %s (local %s), rank 0 at %s:%s", slurm["RANK"], slurm["WORLD_SIZE"],
                 slurm["LOCAL_RANK"], slurm["MASTER_ADDR"], slurm["MASTER_PORT"])
    world = int(os.environ.get("WORLD_SIZE", "1"))
    if world <= 1:
        return DistInfo()
    rank = int(os.environ["RANK"])
    local_rank = int(os.environ.get("LOCAL_RANK", "0"))
    if not dist.is_initialized():
        backend = "nccl" if device.type == "cuda" else "gloo"
        if device.type == "cuda":
            torch.cuda.set_device(local_rank)
        dist.init_process_group(backend=backend)
    return DistInfo(rank=rank, world_size=world, local_rank=local_rank)


def shutdown_distributed() -> None:
    """Destroy this process's groups once every rank is past its last collective (a stage's normal end, or an error
    every rank has agreed on). Without it, gloo's worker threads can outlive the interpreter and abort the process
    as it exits ("terminate called without an active exception", SIGABRT; pytorch/pytorch#190489): measured here,
    8 of 30 two-process torchrun exits of a gloo job without it, 0 of 30 with it. A Hydra multirun that runs its
    jobs in one process joins a fresh group in the next job."""
    global _wait_group
    if dist.is_available() and dist.is_initialized():
        dist.destroy_process_group()  # the default group and every group made from it (the waiting group too)
    _wait_group = None


def local_device(device: torch.device, info: DistInfo) -> torch.device:
    if device.type == "cuda" and info.enabled:
        return torch.device("cuda", info.local_rank)
    return device


def barrier(info: DistInfo) -> None:
    if info.enabled:
        dist.barrier()


def _waiting_group() -> Any:
    global _wait_group
    if _wait_group is None:  # collective: every rank reaches this at the same point (execute(), first stage)
        _wait_group = dist.new_group(backend="gloo", timeout=_WAIT_TIMEOUT)
    return _wait_group


def broadcast_from_main(value: Any, info: DistInfo) -> Any:
    """Rank 0's `value` on every rank (a picklable object; CPU gloo, with a timeout that outlasts any stage, so
    ranks may wait here while rank 0 works alone)."""
    if not info.enabled:
        return value
    box = [value if info.is_main else None]
    dist.broadcast_object_list(box, src=0, group=_waiting_group())
    return box[0]


def wait_for_all(info: DistInfo) -> None:
    """A barrier with the long timeout of broadcast_from_main."""
    if info.enabled:
        dist.barrier(group=_waiting_group())


def gather_objects(value: Any, info: DistInfo) -> list[Any]:
    """Every rank's `value`, in rank order, on every rank (the long-timeout gloo group)."""
    if not info.enabled:
        return [value]
    out: list[Any] = [None] * info.world_size
    dist.all_gather_object(out, value, group=_waiting_group())
    return out
