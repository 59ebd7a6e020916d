"""How the processes of a torchrun or srun job agree on a stage. Rank 0 holds the run folder's lock and decides
whether the stage runs (every rank follows it); a single-process stage runs on rank 0 while the others wait; a
stage of `DISTRIBUTED_STAGES` runs on every rank, and the ranks compare notes after it, so that one failed
process ends all of them. A process that vanishes (killed, out of memory) breaks the collective the others wait
in; they then end with a message that says so, not a gloo traceback."""
from __future__ import annotations

import contextlib
import logging
from pathlib import Path
from typing import Any, Callable, TypeVar

from replication.stages.context import StageError
from replication.stages.fingerprint import done_result
from replication.stages.lock import FolderBusy, folder_lock
from replication.training.distributed import DistInfo, broadcast_from_main, gather_objects
from replication.utils.errors import first_line

# Stage bodies that use every process of a torchrun/srun job (DDP training; sampling shards split by rank). The
# others run on rank 0 while the other ranks wait for its result.
DISTRIBUTED_STAGES = frozenset({"train_ldm", "sample"})

T = TypeVar("T")
log = logging.getLogger("replication")


def hold_run_folder(stack: contextlib.ExitStack, run_dir: Path, stage: str, dist: DistInfo) -> None:
    """Rank 0 takes the run folder's lock until `stack` closes (from the skip decision to done.json: one writer
    per run folder). Every process learns whether it got it, so that a refused job ends on all its processes at
    once with `FolderBusy`."""
    busy = None
    if dist.is_main:
        try:
            stack.enter_context(folder_lock(run_dir, stage))
        except FolderBusy as exc:
            busy = str(exc)
    busy = broadcast_from_main(busy, dist)
    if busy is not None:
        raise FolderBusy(busy)


def decided_by_main(decide: Callable[[], T], dist: DistInfo) -> T:
    """`decide()` on rank 0, its answer on every rank; a StageError there is raised on every rank."""
    decision: Any = None
    if dist.is_main:
        try:
            decision = decide()
        except StageError as exc:
            if not dist.enabled:
                raise
            decision = exc
    decision = broadcast_from_main(decision, dist)
    if isinstance(decision, StageError):
        raise decision
    return decision


def process_gone(what: str, then: str, exc: BaseException) -> StageError:
    """The error of a process whose collective broke because a peer's process vanished (SIGKILL, out of memory)."""
    return StageError(f"{what} (killed, or out of memory?); {then} Finished stages are kept, and a rerun goes on "
                      f"from them. The collective said: {first_line(exc)}")


def run_on_rank0(stage: str, dist: DistInfo, stage_dir: Path, run: Callable[[], dict[str, Any]]) -> dict[str, Any]:
    """Rank 0 runs the stage alone, then tells the others how it went; they return the result it recorded."""
    if dist.is_main:
        error = None
        try:
            return run()
        except BaseException as exc:
            error = f"{type(exc).__name__}: {exc}"
            raise
        finally:
            try:
                broadcast_from_main(error, dist)
            except RuntimeError as exc:  # gloo: "Connection closed by peer" when a waiting process is gone
                raise process_gone(f"stage {stage} {'finished' if error is None else 'failed'} on rank 0, but "
                                   f"another process of this {dist.world_size}-process job is gone",
                                   "the job ends here.", exc) from exc
    log.info("stage %s: process %d waits for rank 0, which runs it alone", stage, dist.rank)
    try:
        error = broadcast_from_main(None, dist)
    except RuntimeError as exc:  # the same when rank 0's process is gone
        raise process_gone(f"stage {stage}: rank 0 ended without a word while process {dist.rank} waited for it",
                           f"its log is {stage_dir / 'log.txt'}.", exc) from exc
    if error is not None:
        raise StageError(f"stage {stage} failed on rank 0 (see {stage_dir / 'log.txt'}): {error}")
    result = done_result(stage_dir)
    result.update(skipped=False, ran_on="rank 0")
    return result


def run_on_every_rank(stage: str, dist: DistInfo, run: Callable[[], dict[str, Any]]) -> dict[str, Any]:
    """Every rank runs the stage; then they compare notes, so that one failed rank ends all of them (rather than
    leaving the others waiting) and nobody moves on before rank 0 has written done.json."""
    error, result = None, {}
    try:
        result = run()
    except BaseException as exc:
        error = exc
    try:
        errors = gather_objects(None if error is None else f"{type(error).__name__}: {error}", dist)
    except RuntimeError as exc:  # gloo: "Connection closed by peer"; the body's own collectives broke the same way
        own = "" if error is None else f" This process's own error: {type(error).__name__}: {first_line(error)}."
        raise process_gone(f"stage {stage}: another process of this {dist.world_size}-process job is gone",
                           f"process {dist.rank} ends here.{own}", exc) from exc
    if error is not None:
        raise error
    failed = [(rank, msg) for rank, msg in enumerate(errors) if msg is not None]
    if failed:
        rank, msg = failed[0]
        raise StageError(f"stage {stage} failed on process {rank} of {dist.world_size}: {msg}")
    return result
