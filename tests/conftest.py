"""Test-wide settings: every library offline, no analytics, headless plotting."""
from __future__ import annotations

import os
import sys
from pathlib import Path

import pytest

for key, value in {"DVC_NO_ANALYTICS": "1", "HF_HUB_OFFLINE": "1", "TRANSFORMERS_OFFLINE": "1",
                   "HF_DATASETS_OFFLINE": "1", "MPLBACKEND": "Agg", "TORCH_HOME": str(Path(__file__).parent / ".torch_home_unused")}.items():
    os.environ.setdefault(key, value)

REPO = Path(__file__).resolve().parents[1]
if str(REPO) not in sys.path:
    sys.path.insert(0, str(REPO))


@pytest.fixture(scope="session")
def repo_root() -> Path:
    return REPO
