"""`dvc metrics show` on a fresh clone (no runs/): every declared metrics file exists and loads, no warning."""
from __future__ import annotations

import json
import shutil
import subprocess
from pathlib import Path

import pytest

from pipeline_helpers import REPO, env

FLAT = "reports/metrics_flat.json"


@pytest.fixture(scope="module")
def clone(tmp_path_factory) -> Path:
    """The tracked (and not ignored) files of the working tree, without runs/ or tests/, committed to a new git repo."""
    repo = tmp_path_factory.mktemp("clone") / "repo"
    repo.mkdir()
    files = subprocess.run(["git", "ls-files", "-co", "--exclude-standard"], cwd=REPO, capture_output=True, text=True,
                           check=True).stdout.split()
    for rel in files:
        src = REPO / rel
        if src.is_file() and not rel.startswith(("runs/", "tests/", "data/")):
            (repo / rel).parent.mkdir(parents=True, exist_ok=True)
            shutil.copy2(src, repo / rel)
    e = env()
    subprocess.run(["git", "init", "-q"], cwd=repo, check=True, env=e)
    subprocess.run(["git", "add", "-A"], cwd=repo, check=True, env=e)
    subprocess.run(["git", "-c", "user.name=t", "-c", "user.email=t@t", "commit", "-qm", "clone"], cwd=repo, check=True, env=e)
    return repo


def test_dvc_metrics_show_is_clean_on_a_fresh_clone(clone):
    e = env()
    shown = subprocess.run(["dvc", "metrics", "show", "--json"], cwd=clone, env=e, capture_output=True, text=True, timeout=300)
    assert shown.returncode == 0, shown.stderr[-2000:]
    assert "failed to load" not in (shown.stdout + shown.stderr).lower(), shown.stderr[-2000:]
    files = json.loads(shown.stdout)[""]["data"]
    assert set(files) == {FLAT}, f"declared metrics files: {sorted(files)}"
    entry = files[FLAT]
    assert "error" not in entry, entry
    assert entry["data"] == json.loads((clone / FLAT).read_text())
    assert entry["data"], "the published metrics hold at least one experiment"
    for experiment, metrics in entry["data"].items():
        assert metrics and all(isinstance(v, (int, float)) for v in metrics.values()), experiment

    table = subprocess.run(["dvc", "metrics", "show"], cwd=clone, env=e, capture_output=True, text=True, timeout=300)
    assert table.returncode == 0 and "failed to load" not in (table.stdout + table.stderr).lower(), table.stderr[-2000:]
    rows = [line for line in table.stdout.splitlines() if line.strip()]
    assert rows[0].split()[0] == "Path" and len(rows) == 2, table.stdout  # a header and the one file's row
    assert rows[1].split()[0] == FLAT and len(rows[1].split()) == len(rows[0].split()), table.stdout
