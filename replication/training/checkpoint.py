"""Two kinds of checkpoint (edm habit): inference weights (EMA, safetensors) and the full training state
(model, EMA, optimiser, LR schedule, step, RNG states, data order) for exact resume. Full states are
written with torch.save of tensors and plain containers, and read back with weights_only=True."""
from __future__ import annotations

import random
import re
from pathlib import Path
from typing import Any

import numpy as np
import torch

from replication.utils.io import ArtifactError, check_free_space, torch_load_safe, torch_save_atomic
from replication.utils.state import check_fits

STATE_PATTERN = re.compile(r"state_(\d{9})\.pt$")


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
    path = state_path(directory, step)
    # fail before writing rather than leave a truncated file (the previous checkpoints stay untouched)
    check_free_space(directory, int(_nbytes(state) * 1.1) + (1 << 20), what=f"full-state checkpoint of step {step}")
    torch_save_atomic(path, state)
    for _, old in list_states(directory)[:-max(1, keep_last)]:
        old.unlink(missing_ok=True)
    return path


def load_latest_state(directory: Path) -> dict[str, Any] | None:
    """Newest readable full state; a damaged newest file falls back to the one before, loudly."""
    states = list_states(directory)
    for step, path in reversed(states):
        try:
            return torch_load_safe(path)
        except ArtifactError as exc:
            import logging

            logging.getLogger("replication").warning("full-state checkpoint %s is unreadable (%s); trying an older one", path, exc)
    return None


RESUME_KEY = "resume_key"


def load_resumable_state(directory: Path, resume_key: str | None) -> dict[str, Any] | None:
    """The newest full state to resume from, if it was written for this training configuration.

    `resume_key` hashes what decides the training trajectory (model, schedule, optimiser settings, seed, global
    batch, the inputs' run ids). A checkpoint with another key (or none, from before keys existed) belongs to
    another configuration: resuming it would silently hand back the old model (a changed learning rate would
    change nothing). It is moved aside to `<directory>.stale` (replacing an older one) and training starts
    afresh. None: no check (tests of the loop itself)."""
    import logging
    import shutil

    state = load_latest_state(directory)
    if state is None or resume_key is None or state.get(RESUME_KEY) == resume_key:
        return state
    stale = directory.with_name(directory.name + ".stale")
    shutil.rmtree(stale, ignore_errors=True)
    directory.rename(stale)
    logging.getLogger("replication").warning(
        "the checkpoints in %s were written for another configuration (resume key %s, now %s): moved to %s; "
        "training starts from step 0", directory, str(state.get(RESUME_KEY))[:12], resume_key[:12], stale)
    return None


def check_state_dict_fits(module: torch.nn.Module, state: dict[str, torch.Tensor], what: str) -> None:
    """One error naming every missing, unexpected or mismatched tensor."""
    check_fits(module.state_dict(), state, f"{what} does not fit the configured model")
