"""Compare the protocol a run used with the paper's protocol for the same result, key by key."""
from __future__ import annotations

import enum
import math
from dataclasses import dataclass
from typing import Any, Mapping

# Display order of the protocol keys the evaluate stage writes; other keys follow alphabetically.
PROTOCOL_ORDER = (
    "num_samples", "sampler", "steps", "steps_run", "eta", "ddim_spacing", "guidance_scale", "classifier_scale", "ema",
    "evaluator", "feature_extractor", "pr_protocol", "pr_reference_images", "reference_set", "reference_images",
    "preprocessing_hash", "train_steps", "train_global_batch", "train_lr", "train_precision", "autoencoder",
)
# Our key -> the paper key it is checked against when the paper has no entry of its own name.
ALIASES = {"steps_run": "steps"}


class ProtocolStatus(str, enum.Enum):
    MATCHES = "matches"
    DEVIATES = "deviates"
    NOT_STATED = "not stated by paper"
    NOT_RECORDED = "not recorded by run"

    def __str__(self) -> str:
        return self.value


@dataclass(frozen=True)
class ProtocolEntry:
    key: str
    paper: Any
    ours: Any
    status: ProtocolStatus

    @property
    def is_deviation(self) -> bool:
        return self.status in (ProtocolStatus.DEVIATES, ProtocolStatus.NOT_RECORDED)


def same_setting(a: Any, b: Any, rel_tol: float = 1e-9) -> bool:
    """Equality for settings: numbers up to rounding, booleans only equal booleans, lists element-wise."""
    if isinstance(a, bool) or isinstance(b, bool):
        return isinstance(a, bool) and isinstance(b, bool) and a == b
    if isinstance(a, (int, float)) and isinstance(b, (int, float)):
        return math.isclose(float(a), float(b), rel_tol=rel_tol, abs_tol=0.0) or float(a) == float(b)
    if isinstance(a, (list, tuple)) and isinstance(b, (list, tuple)):
        return len(a) == len(b) and all(same_setting(x, y, rel_tol) for x, y in zip(a, b))
    return a == b


def _ordered(keys: set[str]) -> list[str]:
    first = [k for k in PROTOCOL_ORDER if k in keys]
    return first + sorted(keys - set(first))


def compare_protocol(protocol: Mapping[str, Any], paper_protocol: Mapping[str, Any]) -> list[ProtocolEntry]:
    """Every key of either side, with its status; paper keys absent from the run count as deviations."""
    entries = []
    for key in _ordered(set(protocol) | set(paper_protocol)):
        paper_key = key if key in paper_protocol else ALIASES.get(key, key)
        has_paper = paper_key in paper_protocol
        paper = paper_protocol.get(paper_key)
        if key not in protocol:
            entries.append(ProtocolEntry(key, paper, None, ProtocolStatus.NOT_RECORDED))
        elif not has_paper:
            entries.append(ProtocolEntry(key, None, protocol[key], ProtocolStatus.NOT_STATED))
        else:
            ok = same_setting(protocol[key], paper)
            entries.append(ProtocolEntry(key, paper, protocol[key], ProtocolStatus.MATCHES if ok else ProtocolStatus.DEVIATES))
    return entries


def deviations(protocol: Mapping[str, Any], paper_protocol: Mapping[str, Any]) -> list[ProtocolEntry]:
    """Only the entries where the run differs from, or does not record, a setting the paper fixes."""
    return [e for e in compare_protocol(protocol, paper_protocol) if e.is_deviation]
