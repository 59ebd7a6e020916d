"""replication/ARCHITECTURE.md names only what exists: every file it lists is in its folder, and every code object it
names is importable with the arguments it shows.

What counts as a reference (the convention the doc states in its header):
- anywhere outside fenced blocks, a backticked dotted path starting with `replication.` (a module, or a module's
  attribute, optionally with an argument list);
- in a bullet of a section headed "... (`replication/<folder>/`)", a backticked `name.py` / `name.sh` names a file
  of that folder, and the backticked code after it (until the next file) belongs to that module: `name(args)`,
  `Class.method(args)`, `CamelCase` class names, `UPPER_CASE` constants and `Class.attribute`. The names in an
  argument list must be parameters of the object, in the signature's order.
Plain lower-case words in backticks (config keys, dict keys, folder names) are prose and are not checked.
"""
from __future__ import annotations

import importlib
import inspect
import re
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Optional

ROOT = Path(__file__).resolve().parents[1]
DOC = ROOT / "replication" / "ARCHITECTURE.md"

SECTION = re.compile(r"^##\s.*\(`(replication/(?:[\w]+/)*)`\)\s*$")
SPAN = re.compile(r"`([^`]+)`")
FILE = re.compile(r"^[\w]+\.(py|sh)$")
CODE = re.compile(r"^([A-Za-z_]\w*(?:\.[A-Za-z_]\w*)*)(?:\((.*)\))?$")
CAMEL = re.compile(r"^[A-Z][A-Za-z0-9]*[a-z][A-Za-z0-9]*$")
UPPER = re.compile(r"^[A-Z][A-Z0-9_]*$")


@dataclass
class Report:
    problems: list[str] = field(default_factory=list)
    checked: list[str] = field(default_factory=list)


def _blocks(text: str) -> list[tuple[Optional[str], str, bool]]:
    """(section folder, text, is_bullet) for each bullet and each other line, outside ``` fences; a bullet's
    indented continuation lines are joined to it."""
    out: list[tuple[Optional[str], str, bool]] = []
    folder: Optional[str] = None
    fenced = False
    for line in text.splitlines():
        if line.startswith("```"):
            fenced = not fenced
            continue
        if fenced:
            continue
        if line.startswith("#"):
            m = SECTION.match(line)
            folder = m.group(1) if m else None
            out.append((folder, line, False))
        elif line.startswith("- "):
            out.append((folder, line[2:], True))
        elif line.startswith("  ") and out and out[-1][2]:
            f, prev, _ = out[-1]
            out[-1] = (f, prev + " " + line.strip(), True)
        else:
            out.append((folder, line, False))
    return out


def _resolve_dotted(path: str) -> Any:
    """Import the longest importable module prefix of `path`, then read the rest as attributes."""
    parts = path.split(".")
    for i in range(len(parts), 0, -1):
        try:
            obj = importlib.import_module(".".join(parts[:i]))
        except ModuleNotFoundError:
            continue
        for name in parts[i:]:
            obj = getattr(obj, name)
        return obj
    raise ModuleNotFoundError(path)


def _check_args(obj: Any, args: str) -> Optional[str]:
    """None if every name of `args` is a parameter of `obj`, in the signature's order; else what is wrong."""
    names = [a.strip() for a in args.split(",") if a.strip()]
    names = [a for a in names if not a.startswith("*") and a != "..."]
    try:
        params = list(inspect.signature(obj).parameters)
    except (TypeError, ValueError):
        return "has no readable signature" if names else None
    unknown = [a for a in names if a not in params]
    if unknown:
        return f"has no parameter(s) {unknown} (signature: {params})"
    positions = [params.index(a) for a in names]
    if positions != sorted(positions):
        return f"takes {names} in another order (signature: {params})"
    return None


def check(text: str, root: Path = ROOT) -> Report:
    rep = Report()
    for folder, block, is_bullet in _blocks(text):
        module: Optional[str] = None
        for span in SPAN.findall(block):
            span = span.strip()
            m = CODE.match(span)
            if m and m.group(1).startswith("replication."):
                rep.checked.append(m.group(1))
                try:
                    obj = _resolve_dotted(m.group(1))
                except (ImportError, AttributeError) as e:
                    rep.problems.append(f"`{span}`: {type(e).__name__}: {e}")
                    continue
                wrong = _check_args(obj, m.group(2)) if m.group(2) is not None else None
                if wrong:
                    rep.problems.append(f"`{span}`: {wrong}")
                continue
            if not is_bullet or folder is None:
                continue
            if FILE.match(span):
                rep.checked.append(folder + span)
                if not (root / folder / span).is_file():
                    rep.problems.append(f"`{span}`: no file {folder}{span}")
                    module = None
                else:
                    module = (folder + span[:-3]).replace("/", ".") if span.endswith(".py") else None
                continue
            m = CODE.match(span)
            if not m:
                continue
            dotted, args = m.group(1), m.group(2)
            head = dotted.split(".")[0]
            if args is None and not (CAMEL.match(head) or UPPER.match(head)):
                continue  # a plain word: a key or a name in prose
            if module is None:
                rep.problems.append(f"`{span}` in section {folder} follows no Python file")
                continue
            rep.checked.append(f"{module}.{dotted}")
            try:
                obj = _resolve_dotted(f"{module}.{dotted}")
            except (ImportError, AttributeError) as e:
                rep.problems.append(f"`{span}` ({module}): {type(e).__name__}: {e}")
                continue
            if args is not None:
                wrong = _check_args(obj, args)
                if wrong:
                    rep.problems.append(f"`{span}` ({module}): {wrong}")
    return rep


def test_every_name_in_architecture_md_exists():
    rep = check(DOC.read_text())
    assert not rep.problems, "ARCHITECTURE.md names what does not exist:\n" + "\n".join(rep.problems)
    # the parser really read the doc: files and objects of every package folder
    assert len(rep.checked) > 150, len(rep.checked)
    for folder in ("data", "models", "diffusion", "training", "stages", "metrics", "report", "utils"):
        assert any(c.startswith(f"replication.{folder}.") or c.startswith(f"replication/{folder}/")
                   for c in rep.checked), folder


def test_architecture_md_tells_no_history():
    text = DOC.read_text()
    assert not re.search(r"\bissues?\s*#?\d", text, re.IGNORECASE), "name the design, not the issue it came from"


def test_the_checker_catches_renamed_and_missing_names():
    doc = """## Diffusion (`replication/diffusion/`)
- `ddim.py`: `ddim_loop(denoiser, x_T, schedule)`, `ddim_sampel(denoiser)`, `ddim_loop(schedule, denoiser)`,
  `ddim_parameters(schedule, steps)`, `DDIMParameterz`, `TablePrecision.FLOAT32`, `TablePrecision.FLOAT16`,
  a key `spacing` in prose; `gone.py`: `whatever(x)`.
- `plms.py`: `plms_loop(denoiser, x_T)`.
Elsewhere: `replication.diffusion.schedule.Schedule.make`, `replication.diffusion.nothing`.
"""
    rep = check(doc)
    found = "\n".join(rep.problems)
    for expected in ("ddim_sampel", "`ddim_loop(schedule, denoiser)`", "['steps']", "DDIMParameterz",
                     "FLOAT16", "gone.py", "`whatever(x)` in section", "replication.diffusion.nothing"):
        assert expected in found, (expected, found)
    assert len(rep.problems) == 8, found
    assert "replication.diffusion.ddim.ddim_loop" in rep.checked
    assert "replication.diffusion.plms.plms_loop" in rep.checked
    assert not any("spacing" in c for c in rep.checked)
