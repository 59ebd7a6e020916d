"""Small helpers for error messages."""
from __future__ import annotations


def first_line(exc: BaseException) -> str:
    """The first line of an exception's message (multi-line ones, e.g. gloo's or OmegaConf's, repeat context
    below it), or its type's name when the message is blank."""
    text = str(exc)
    return text.splitlines()[0] if text.strip() else type(exc).__name__
