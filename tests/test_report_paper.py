"""The project's copy of the paper's numbers (reports/paper/) equals the shared reference data (../shared/paper/)
wherever that folder exists."""
from __future__ import annotations

from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[1]
PROJECT = REPO / "reports" / "paper"
SHARED = REPO.parent / "shared" / "paper"
FILES = ("results.csv", "autoencoders.csv", "compute.csv", "hyperparameters.csv", "PROTOCOL.md")


@pytest.mark.skipif(not SHARED.is_dir(), reason=f"no shared paper data here: {SHARED} does not exist")
@pytest.mark.parametrize("name", FILES)
def test_project_copy_equals_shared_paper_data(name):
    assert (SHARED / name).is_file(), f"{SHARED / name} is missing"
    assert (PROJECT / name).read_bytes() == (SHARED / name).read_bytes(), (
        f"{PROJECT / name} differs from {SHARED / name}: copy the shared file over the project's")


@pytest.mark.skipif(not SHARED.is_dir(), reason=f"no shared paper data here: {SHARED} does not exist")
def test_shared_paper_folder_holds_no_file_the_project_lacks():
    assert sorted(p.name for p in SHARED.iterdir() if p.is_file()) == sorted(FILES)


def test_table10_rows_are_class_conditional_imagenet():
    import pandas as pd

    rows = pd.read_csv(PROJECT / "results.csv", dtype={"table": str})
    t10 = rows[rows["table"] == "10"]
    assert len(t10) == 53 and set(t10["task"]) == {"class-conditional"}, sorted(set(t10["task"]))


SHARED_MODULES = REPO.parent / "shared" / "reference" / "compvis_modules"
PROJECT_MODULES = REPO / "tests" / "reference" / "compvis_modules"


@pytest.mark.skipif(not SHARED_MODULES.is_dir(), reason=f"no shared reference dumps here: {SHARED_MODULES} does not exist")
def test_project_copy_of_the_release_module_dumps_equals_shared():
    shared = sorted(p.name for p in SHARED_MODULES.glob("*.json"))
    assert sorted(p.name for p in PROJECT_MODULES.glob("*.json")) == shared
    differ = [n for n in shared if (SHARED_MODULES / n).read_bytes() != (PROJECT_MODULES / n).read_bytes()]
    assert not differ, f"copy these shared files over the project's: {differ}"
