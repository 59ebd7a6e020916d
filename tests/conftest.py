"""Test-wide settings: every library offline, no analytics, headless plotting."""
from __future__ import annotations

import os
import socket
import sys
from pathlib import Path

import pytest

for key, value in {"DVC_NO_ANALYTICS": "1", "HF_HUB_OFFLINE": "1", "TRANSFORMERS_OFFLINE": "1",
                   "HF_DATASETS_OFFLINE": "1", "MPLBACKEND": "Agg", "TORCH_HOME": str(Path(__file__).parent / ".torch_home_unused")}.items():
    os.environ.setdefault(key, value)

# Under pytest-xdist (the README's `-n 2`) each worker and every pipeline it starts computes on one thread: two
# workers with two threads each would spin against each other on a 2-core machine.
if os.environ.get("PYTEST_XDIST_WORKER"):
    for key in ("OMP_NUM_THREADS", "MKL_NUM_THREADS"):
        os.environ.setdefault(key, "1")

REPO = Path(__file__).resolve().parents[1]
if str(REPO) not in sys.path:
    sys.path.insert(0, str(REPO))


# A CPU without native bf16 (no AVX512-BF16 or AMX, e.g. an AVX2-only EPYC) emulates every bf16 kernel at about
# 1 GFLOP/s: tests that run the bf16 fast path for real (the 200-step bf16 training curve, the benchmark runs and the
# GPU-check rehearsal) then take minutes each instead of seconds, so on such a CPU they run with `-m slow`.
def _native_bf16() -> bool:
    import torch

    return bool(torch.cpu._is_avx512_bf16_supported() or torch.cpu._is_amx_tile_supported())


NATIVE_BF16 = _native_bf16()
slow_without_native_bf16 = pytest.mark.slow if not NATIVE_BF16 else pytest.mark.usefixtures()


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


@pytest.fixture
def no_network(monkeypatch, tmp_path):
    """Any connection attempt (a weight download, say) fails the test; torch hub's cache points at an empty folder
    that must stay empty. Modules that must stay offline use it with pytest.mark.usefixtures("no_network")."""
    import torch

    def refuse(*args, **kwargs):
        raise AssertionError(f"network access attempted: {args!r}")

    monkeypatch.setattr(socket.socket, "connect", refuse)
    monkeypatch.setattr(socket, "create_connection", refuse)
    monkeypatch.setattr(torch.hub, "download_url_to_file", refuse)
    monkeypatch.setattr(torch.hub, "load_state_dict_from_url", refuse)
    hub = tmp_path / "torch_home"
    monkeypatch.setenv("TORCH_HOME", str(hub))
    yield
    assert not hub.exists() or not any(hub.rglob("*")), "something was written to the torch hub cache"


@pytest.fixture(scope="session")
def finished_smoke(tmp_path_factory) -> Path:
    """One finished `python -m replication.run experiment=smoke` for the whole session, kept pristine: a test that
    changes it works on `copy_smoke(finished_smoke, dest)` (done.json records paths relative to the runs root, so a
    copied tree verifies against its own files). Under pytest-xdist the workers share one run: the first to ask makes
    it while the others wait on the lock."""
    import fcntl

    from pipeline_helpers import paths_overrides, run_module

    base = tmp_path_factory.getbasetemp()
    shared = base.parent if os.environ.get("PYTEST_XDIST_WORKER") else base
    tmp, done = shared / "finished_smoke", shared / "finished_smoke.done"
    with open(shared / "finished_smoke.lock", "w") as lock:
        fcntl.flock(lock, fcntl.LOCK_EX)
        if not done.exists():
            import shutil

            shutil.rmtree(tmp, ignore_errors=True)
            tmp.mkdir()
            run_module("replication.run", ["experiment=smoke", *paths_overrides(tmp)])
            done.write_text("finished\n")
    return tmp


def copy_smoke(finished: Path, dest: Path) -> Path:
    import shutil

    shutil.copytree(finished, dest, symlinks=True)
    return dest
