"""One check, one message, for every place that loads a state dict into a module (released checkpoints,
our own weights, full-state checkpoints): all missing, unexpected and shape-mismatched keys at once."""
from __future__ import annotations

from typing import Mapping

import torch

from replication.utils.io import ArtifactError

SHOWN = 50


class CheckpointMismatchError(ArtifactError, ValueError):
    """A state dict does not fit a module: missing, unexpected or shape-mismatched keys."""


def state_mismatch(expected: Mapping[str, torch.Tensor], given: Mapping[str, torch.Tensor]) -> dict[str, list[str]]:
    """{"missing", "unexpected", "shape mismatch"} key lists (empty lists when the state fits)."""
    missing = sorted(set(expected) - set(given))
    unexpected = sorted(set(given) - set(expected))
    mismatched = sorted(f"{k}: checkpoint {tuple(given[k].shape)} vs model {tuple(expected[k].shape)}"
                        for k in set(expected) & set(given) if tuple(given[k].shape) != tuple(expected[k].shape))
    return {"missing": missing, "unexpected": unexpected, "shape mismatch": mismatched}


def check_fits(expected: Mapping[str, torch.Tensor], given: Mapping[str, torch.Tensor], subject: str) -> None:
    """Raise one CheckpointMismatchError listing every problem, headed by `subject` (e.g. "X does not fit Y")."""
    problems = state_mismatch(expected, given)
    if not any(problems.values()):
        return

    def listing(title: str, items: list[str]) -> str:
        if not items:
            return f"  {title}: none"
        more = f"\n    ... and {len(items) - SHOWN} more" if len(items) > SHOWN else ""
        return f"  {title} ({len(items)}):\n    " + "\n    ".join(items[:SHOWN]) + more

    raise CheckpointMismatchError(f"{subject}:\n" + "\n".join(listing(t, i) for t, i in problems.items()))
