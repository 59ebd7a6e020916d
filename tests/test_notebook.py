"""notebooks/comparison.ipynb executes headless on reports written by build_report, and without any run."""
from __future__ import annotations

import json
import re
import shutil
from pathlib import Path

import nbformat
from nbclient import NotebookClient

from replication.report.build import build_report

REPO = Path(__file__).resolve().parents[1]
NOTEBOOK = REPO / "notebooks" / "comparison.ipynb"
PAPER_DIR = REPO / "reports" / "paper"
CELL_TIMEOUT_S = 60


def _run(name: str, comparable: bool, fid: float) -> dict:
    protocol = {"num_samples": 64, "sampler": "ddim", "steps": 200, "eta": 0.0}
    return {
        "schema_version": 1, "experiment": name, "comparable": comparable,
        "not_comparable_reasons": [] if comparable else ["smoke experiment (tiny data, tiny model)"],
        "paper": {"table": "1", "dataset": "LSUN-Churches", "method": "LDM-8 (KL)"},
        "metrics": {"FID": {"value": fid, "ci95": [fid - 0.1, fid + 0.1], "n_samples": 64}},
        "protocol": protocol, "paper_protocol": dict(protocol, num_samples=50000),
        "curves": {"fid_vs_ddim_steps": [{"steps": 10, "FID": fid + 5, "samples_per_s": 10.0}, {"steps": 50, "FID": fid, "samples_per_s": 2.0}]},
    }


def _execute(reports_dir: Path, monkeypatch) -> nbformat.NotebookNode:
    monkeypatch.setenv("REPORTS_DIR", str(reports_dir))
    monkeypatch.setenv("PAPER_DIR", str(PAPER_DIR))
    nb = nbformat.read(NOTEBOOK, as_version=4)
    NotebookClient(nb, timeout=CELL_TIMEOUT_S, kernel_name="python3", resources={"metadata": {"path": str(NOTEBOOK.parent)}}).execute()
    return nb


def _text(nb: nbformat.NotebookNode) -> str:
    parts = []
    for cell in nb.cells:
        for out in cell.get("outputs", []):
            if out.get("output_type") == "error":
                raise AssertionError(f"cell raised {out['ename']}: {out['evalue']}")
            parts.append(out.get("text", ""))
            data = out.get("data", {})
            parts.append(data.get("text/plain", "") + data.get("text/markdown", "") + data.get("text/html", ""))
    return "\n".join(parts)


def test_notebook_renders_generated_reports(tmp_path, monkeypatch):
    runs, reports = tmp_path / "runs", tmp_path / "reports"
    for name, comparable, fid in (("smoke", False, 250.0), ("churches", True, 4.1)):
        (runs / name).mkdir(parents=True)
        (runs / name / "metrics.json").write_text(json.dumps(_run(name, comparable, fid)))
    build_report(runs, reports, PAPER_DIR)
    # a figure no page links (left by something else) is not shown
    shutil.copyfile(reports / "figures" / "smoke_fid_vs_ddim_steps.png", reports / "figures" / "ghost_fid_vs_ddim_steps.png")
    nb = _execute(reports, monkeypatch)
    text = _text(nb)
    assert "smoke" in text and "churches" in text
    assert "not comparable" in text and "num_samples" in text  # verdict and the flagged deviation
    pages = [reports / "summary.md", reports / "smoke.md", reports / "churches.md"]
    linked = {m for p in pages for m in re.findall(r"\]\((figures/[^)]+\.png)\)", p.read_text())}
    assert {"figures/smoke_fid_vs_throughput.png", "figures/churches_fid_vs_ddim_steps.png", "figures/fid_vs_ddim_steps.png"} <= linked
    shown = [out["data"]["text/markdown"].strip("*") for c in nb.cells for out in c.get("outputs", [])
             if out.get("data", {}).get("text/markdown", "").endswith(".png**")]
    assert sorted(shown) == sorted(Path(rel).name for rel in linked)
    assert f"{len(linked)} figure(s) shown" in text
    assert sum("image/png" in out.get("data", {}) for c in nb.cells for out in c.get("outputs", [])) == len(linked)
    assert "No runs yet" not in text


def test_notebook_without_runs_shows_paper_tables(tmp_path, monkeypatch):
    nb = _execute(tmp_path / "no_reports_here", monkeypatch)
    text = _text(nb)
    assert "No runs yet" in text
    assert "LDM-8 (KL)" in text and "kl-f8" in text  # the paper's Table 1 and autoencoders
