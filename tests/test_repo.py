"""The repository's promises to a new user: the README's two commands, CI running the README's test command,
the top-level layout, and reference data copied from the paper."""
from __future__ import annotations

import re

from pipeline_helpers import REPO

TOP_LEVEL = {"replication", "experiments", "data.dvc", "reports", "notebooks", "tests", "dvc.yaml", "pyproject.toml",
             "README.md", ".ci"}


def _quick_start_commands() -> list[str]:
    text = (REPO / "README.md").read_text()
    quick = text.split("## Quick start", 1)[1].split("\n## ", 1)[0]
    return re.findall(r"```bash\n(.+?)\n```", quick)


def test_readme_quick_start_is_exactly_two_commands():
    commands = _quick_start_commands()
    assert len(commands) == 2 and all("\n" not in c for c in commands)
    assert "replication.run experiment=smoke" in commands[0] and "pip install" in commands[0]
    assert "pytest" in commands[1] and "pip install" in commands[1]


def test_ci_runs_the_readme_test_command():
    ci = (REPO / ".ci" / "run").read_text()
    assert _quick_start_commands()[1] in ci.splitlines()


def test_top_level_layout():
    assert TOP_LEVEL <= {p.name for p in REPO.iterdir()}


def test_paper_numbers_are_the_shared_files():
    for name in ("results.csv", "hyperparameters.csv", "compute.csv", "autoencoders.csv", "PROTOCOL.md"):
        text = (REPO / "reports" / "paper" / name).read_text()
        assert len(text) > 1000, name
    assert "LSUN-Churches,256,LDM-8 (KL),1,8,200,,FID,4.02" in (REPO / "reports" / "paper" / "results.csv").read_text()
