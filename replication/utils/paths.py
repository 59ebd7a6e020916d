"""Names that become folder names, and paths that must stay inside a root folder.

Experiment and run names (`name`, `reuse_from`) are joined onto `runs_root` and `reports_dir`; a name such as
`../x`, `/abs` or `` would put a run (or a report figure) outside those roots, so names are plain identifiers and
every folder built from one can be checked with `contained`.
"""
from __future__ import annotations

import os
import re
from pathlib import Path

from replication.utils.schema import ConfigError

# letters, digits, '_', '-', '.'; not starting with '.' (so never '.', '..' or a hidden folder)
PLAIN_NAME = re.compile(r"[A-Za-z0-9_-][A-Za-z0-9_.-]*")
PLAIN_NAME_RULE = "a plain identifier: letters, digits, '_', '-', '.', not starting with '.'"


class PathEscapeError(ConfigError):
    """A path built from configured parts (a run name, a root) would lie outside the root folder it belongs under.
    A ConfigError, so the command line reports it in one line like any other bad setting."""


def is_plain_name(value: object) -> bool:
    """True for a non-empty string of letters, digits, '_', '-', '.' that does not start with '.'."""
    return isinstance(value, str) and PLAIN_NAME.fullmatch(value) is not None


def contained(root: str | os.PathLike, *parts: str | os.PathLike, what: str = "path") -> Path:
    """`root / parts...`, resolved (symlinks followed, `..` collapsed), if it lies inside resolved `root`;
    PathEscapeError naming `what` otherwise. The root itself counts as outside when `parts` are given, so an
    empty name cannot make a run folder of the root. Neither path needs to exist."""
    root_resolved = Path(root).resolve()
    candidate = Path(root, *parts).resolve()
    inside = candidate == root_resolved if not parts else root_resolved in candidate.parents
    if not inside:
        joined = Path(root, *parts)
        raise PathEscapeError(f"{what} {str(joined)!r} resolves to {str(candidate)!r}, which is not inside "
                              f"{str(root_resolved)!r}")
    return candidate
