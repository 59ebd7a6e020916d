"""Two kinds of checkpoint (edm habit): inference weights (EMA, safetensors) and the full training state
(model, EMA, optimiser, LR schedule, step, RNG states, data order) for exact resume. Full states are
written with torch.save of tensors and plain containers, and read back with weights_only=True."""
from __future__ import annotations

import logging
import os
import random
import re
import shutil
from pathlib import Path
from typing import Any

import numpy as np
import torch

from replication.utils.io import ArtifactError, check_free_space, torch_load_safe, torch_save_atomic
from replication.utils.verify import file_sha256, hash_beside, recorded_hash, write_hash_beside
from replication.utils.state import check_fits

STATE_PATTERN = re.compile(r"state_(\d{9})\.pt$")
log = logging.getLogger("replication")


def rng_state(generator: torch.Generator) -> dict[str, Any]:
    py_state = random.getstate()
    np_state = np.random.get_state()
    state = {
        "torch": torch.get_rng_state(),
        "generator": generator.get_state(),
        "python": [py_state[0], list(py_state[1]), py_state[2]],
        "numpy": {"keys": torch.from_numpy(np_state[1].astype(np.int64)), "pos": int(np_state[2]),
                  "has_gauss": int(np_state[3]), "cached_gaussian": float(np_state[4])},
    }
    if torch.cuda.is_available():
        state["cuda"] = torch.cuda.get_rng_state_all()
    return state


def set_rng_state(state: dict[str, Any], generator: torch.Generator) -> None:
    torch.set_rng_state(state["torch"])
    generator.set_state(state["generator"])
    version, internal, gauss = state["python"]
    random.setstate((version, tuple(internal), gauss))
    n = state["numpy"]
    np.random.set_state(("MT19937", n["keys"].numpy().astype(np.uint32), n["pos"], n["has_gauss"], n["cached_gaussian"]))
    if "cuda" in state and torch.cuda.is_available():
        torch.cuda.set_rng_state_all(state["cuda"])


def state_path(directory: Path, step: int) -> Path:
    return directory / f"state_{step:09d}.pt"


def list_states(directory: Path) -> list[tuple[int, Path]]:
    if not directory.exists():
        return []
    found = [(int(m.group(1)), p) for p in directory.iterdir() if (m := STATE_PATTERN.search(p.name))]
    return sorted(found)


def _nbytes(obj: Any) -> int:
    if isinstance(obj, torch.Tensor):
        return obj.numel() * obj.element_size()
    if isinstance(obj, dict):
        return sum(_nbytes(v) for v in obj.values())
    if isinstance(obj, (list, tuple)):
        return sum(_nbytes(v) for v in obj)
    return 0


def save_state(directory: Path, step: int, state: dict[str, Any], keep_last: int = 2) -> Path:
    """Write the full state of `step` and, beside it, its SHA-256 (`state_XXX.pt.sha256`, written after the state
    itself): a loader trusts a state only when the two agree. Older states beyond `keep_last` are removed."""
    path = state_path(directory, step)
    # fail before writing rather than leave a truncated file (the previous checkpoints stay untouched)
    check_free_space(directory, int(_nbytes(state) * 1.1) + (1 << 20), what=f"full-state checkpoint of step {step}")
    torch_save_atomic(path, state)
    write_hash_beside(path)
    for _, old in list_states(directory)[:-max(1, keep_last)]:
        old.unlink(missing_ok=True)
        hash_beside(old).unlink(missing_ok=True)
    return path


def _checked_load(path: Path) -> dict[str, Any]:
    """A full state whose bytes equal the hash written beside it (a flipped byte in an optimiser moment loads
    fine and trains on silently, so the hash, not the unpickler, decides)."""
    expected = recorded_hash(path)
    if expected is None:
        raise ArtifactError(f"{path} has no recorded hash ({hash_beside(path).name}): it was not finished by this harness")
    actual = file_sha256(path)
    if actual != expected:
        raise ArtifactError(f"{path} does not match its recorded hash (sha256 {actual[:12]}..., recorded "
                            f"{expected[:12]}...): damaged on disk")
    return torch_load_safe(path)


def load_latest_state(directory: Path) -> dict[str, Any] | None:
    """Newest intact full state; a damaged or unreadable newest file falls back to the one before, loudly."""
    states = list_states(directory)
    for step, path in reversed(states):
        try:
            return _checked_load(path)
        except ArtifactError as exc:
            log.warning("full-state checkpoint %s is not usable (%s); trying an older one", path, exc)
    return None


RESUME_KEY = "resume_key"
STALE_SUFFIX = ".stale"


def stale_dir(directory: Path, key: str | None) -> Path:
    """Where the checkpoints of another training configuration (resume key `key`) are kept."""
    return directory.with_name(directory.name + STALE_SUFFIX) / (str(key)[:16] if key else "unkeyed")


def load_resumable_state(directory: Path, resume_key: str | None) -> dict[str, Any] | None:
    """The newest full state to resume from, if it was written for this training configuration.

    `resume_key` hashes what decides the training trajectory (model, schedule, optimiser settings, seed, global
    batch, the content ids of the inputs). A checkpoint with another key belongs to another configuration:
    resuming it would silently hand back the old model (a changed learning rate would change nothing). It is
    never deleted: it moves to `<directory>.stale/<its key>/`, and a later run with that configuration moves it
    back and resumes from it. None: no check (tests of the loop itself)."""
    state = load_latest_state(directory)
    if resume_key is None or (state is not None and state.get(RESUME_KEY) == resume_key):
        return state
    if state is not None:
        keep = stale_dir(directory, state.get(RESUME_KEY))
        if keep.exists():  # an older set of the same configuration: the newer one replaces it
            shutil.rmtree(keep)
        keep.parent.mkdir(parents=True, exist_ok=True)
        os.replace(directory, keep)
        log.warning("the checkpoints in %s (step %s) were written for another configuration (resume key %s, now "
                    "%s): kept in %s, where a run with that configuration resumes from them", directory,
                    state.get("step"), str(state.get(RESUME_KEY))[:12], resume_key[:12], keep)
    mine = stale_dir(directory, resume_key)
    if mine.exists():
        if directory.exists():  # only unusable files are left in it: kept for inspection, out of the way
            os.replace(directory, stale_dir(directory, f"unusable-{os.getpid()}"))
        os.replace(mine, directory)
        state = load_latest_state(directory)
        if state is not None and state.get(RESUME_KEY) == resume_key:
            log.warning("resuming the checkpoints of this configuration kept in %s (step %s)", mine, state.get("step"))
            return state
    log.info("no checkpoint of this training configuration in %s: training starts from step 0", directory)
    return None


def describe_kept(directory: Path) -> str:
    """What full states exist for a message after a failed training: this configuration's (in `directory`) and
    those of other configurations kept aside, each with its steps."""
    mine = [step for step, _ in list_states(directory)]
    parts = [f"this configuration's checkpoints in {directory}: steps {mine}" if mine else
             f"no checkpoint of this configuration yet in {directory}"]
    stale_root = directory.with_name(directory.name + STALE_SUFFIX)
    for kept in sorted(stale_root.iterdir()) if stale_root.is_dir() else []:
        steps = [step for step, _ in list_states(kept)]
        if steps:
            parts.append(f"another configuration's checkpoints (resumed by a run with that configuration) in {kept}: "
                         f"steps {steps}")
    return "kept: " + "; ".join(parts)


def check_state_dict_fits(module: torch.nn.Module, state: dict[str, torch.Tensor], what: str) -> None:
    """One error naming every missing, unexpected or mismatched tensor."""
    check_fits(module.state_dict(), state, f"{what} does not fit the configured model")
