"""Several benchmark runs (one per experiment, or per card) as one JSON and one table, with the summary against
the targets when GPU runs are among them."""
from __future__ import annotations

from pathlib import Path
from typing import Any, Optional, Sequence

from replication.bench.environment import slug
from replication.bench.rendering import render_markdown
from replication.bench.settings import SCHEMA_VERSION, BenchError
from replication.bench.targets import target_summary
from replication.utils.io import atomic_write_json, atomic_write_text, read_json


def merge_reports(paths: Sequence[Path], out_dir: Path, tag: Optional[str] = None) -> dict[str, Any]:
    """One JSON ({"reports": [...]}) and one markdown table for several single-experiment runs."""
    reports = []
    for path in paths:
        path = Path(path)
        if not path.exists():
            raise BenchError(f"benchmark result {path} does not exist (did that run fail or time out?)")
        data = read_json(path)
        # a merged file (of an earlier --merge) contributes its reports
        reports.extend(data["reports"] if "reports" in data else [data])
    if not reports:
        raise BenchError("--merge needs at least one result JSON")
    if tag is None:
        first = reports[0]["device"]
        tag = slug(first["name"]) if first["type"] == "cuda" else "cpu"
    merged = {"schema": SCHEMA_VERSION, "device": reports[0]["device"], "reports": reports}
    if any(rep["device"].get("type") == "cuda" for rep in reports):
        merged["targets"] = target_summary(reports)
    atomic_write_json(Path(out_dir) / f"{tag}.json", merged)
    text = render_markdown(reports)
    atomic_write_text(Path(out_dir) / f"{tag}.md", text)
    merged["markdown"] = text
    return merged
