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


@pytest.fixture
def one_thread():
    """One intra-op thread: on the shared 2-core CPU tiny kernels otherwise spin against each other."""
    import torch

    old = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(old)
