"""Clear messages where a run stops: every dataset offline names the exact files and folders to place, a bad
checkpoint gives one line that never suggests unpickling code, and Ctrl-C during training says where the state
was saved and that rerunning resumes (a real subprocess, a real SIGINT)."""
from __future__ import annotations

import json
import os
import pickle
import signal
import socket
import subprocess
import sys
import textwrap
import time
from pathlib import Path

import pytest
import torch

from replication.config import validate_config
from replication.data import download as download_module
from replication.data.download import DownloadError, ManualDownloadRequired
from replication.data.prepare import prepare_dataset
from replication.stages.entry import compose
from replication.utils.io import ArtifactError, torch_load_safe

REPO = Path(__file__).resolve().parents[1]


# ------------------------------------------------------------------------------------------- datasets, offline

@pytest.fixture
def closed_port() -> int:
    """A local port nobody listens on: connecting is refused at once, as on a machine without network."""
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _dataset(name: str, tmp: Path, port: int):
    cfg = validate_config(compose([f"dataset={name}", f"data_root={tmp / 'data'}",
                                   f"runs_root={tmp / 'runs'}"])).dataset
    for f in cfg.download.files:
        if f.url:
            f.url = f"http://127.0.0.1:{port}/{f.name}"
    return cfg


def _failure(cfg) -> str:
    with pytest.raises((DownloadError, ManualDownloadRequired, FileNotFoundError)) as err:
        prepare_dataset(cfg, "train", progress=False)
    text = str(err.value)
    assert "\n" not in text.splitlines()[0]
    return text


@pytest.fixture
def no_retry_wait(monkeypatch):
    monkeypatch.setattr(download_module, "DEFAULT_RETRY_WAIT_S", 0.0)  # the retries still run, without the pause


@pytest.mark.parametrize("name,archive,lmdb", [("lsun_churches", "church_outdoor_train_lmdb.zip", "church_outdoor_train_lmdb"),
                                               ("lsun_bedrooms", "bedroom_train_lmdb.zip", "bedroom_train_lmdb")])
def test_lsun_offline_names_the_archive_to_place_and_where_it_is_extracted(name, archive, lmdb, tmp_path, closed_port,
                                                                           no_retry_wait):
    cfg = _dataset(name, tmp_path, closed_port)
    root = Path(cfg.root)
    text = _failure(cfg)
    assert text.startswith(f"could not reach http://127.0.0.1:{closed_port}/{archive} after 5 retries (")
    assert f"place it as {root / archive} (that exact name)" in text
    assert f"extracted into {root})" in text
    # the archive placed (and extracted, here: an empty LMDB folder) but no LMDB inside: the exact LMDB file
    for f in cfg.download.files:
        (root / f.name).write_bytes(b"placed by hand")
        (root / (f.name + ".extracted")).write_text("done\n")
    text = _failure(cfg)
    assert f"place the LSUN LMDB there as {root / lmdb / 'data.mdb'}" in text
    assert f"{root / 'lsun.zip'} (from http://127.0.0.1:{closed_port}/lsun.zip): extracted into {root}" in text


@pytest.mark.parametrize("name,first_list", [("celebahq", "celebahqtrain.txt"), ("ffhq", "ffhqtrain.txt")])
def test_face_datasets_name_their_folder_once_and_the_files_to_place(name, first_list, tmp_path, closed_port,
                                                                     no_retry_wait):
    cfg = _dataset(name, tmp_path, closed_port)
    root = Path(cfg.root)
    text = _failure(cfg)  # no dataset folder yet: the manual instructions, with the real folder in them
    assert f"The dataset folder {root} does not exist." in text
    assert f"{root}{os.sep}{root}" not in text and f"{root}/data/raw" not in text
    assert "<root>" not in text and "(the folder named above)" not in text
    if name == "celebahq":
        assert f"directly in the dataset folder {root}," in text.replace("\n", " ")
        assert f"placed as {root / 'CelebA-HQ-img'}/" in text
    else:
        assert f"{root / 'ffhq-dataset-v2.json'}\n" in text
        assert f"{root / 'images1024x1024' / '00000' / '00000.png'} ..." in text
    root.mkdir(parents=True)  # the folder, but offline: the split list to place by hand
    text = _failure(cfg)
    assert f"place it as {root / first_list} (that exact name)" in text
    for f in cfg.download.files:
        (root / f.name).write_text("00001.png\n")
    text = _failure(cfg)  # the lists, but no images: the exact image files
    if name == "celebahq":
        assert f"place the PGGAN arrays as {root / 'imgHQ00000.npy'} ... {root / 'imgHQ29999.npy'}" in text
        assert f"{root / 'CelebA-HQ-img' / '0.jpg'}" in text
    else:
        assert f"place {root / 'ffhq-dataset-v2.json'} (the images of a split are then fetched" in text
        assert f"{root / 'images1024x1024' / '69000' / '69999.png'}" in text


def test_imagenet_names_the_folders_to_extract_into(tmp_path, closed_port):
    cfg = _dataset("imagenet", tmp_path, closed_port)
    root = Path(cfg.root)
    text = _failure(cfg)
    assert f"Missing under {root}:\n  - {root / 'train'}\n  - {root / 'val'}\n" in text
    assert f"{root / 'train' / 'n01440764' / 'n01440764_10026.JPEG'} ..." in text and "<root>" not in text
    (root / "train").mkdir(parents=True)
    (root / "val").mkdir()
    text = _failure(cfg)  # folders without synset folders
    assert text.startswith(f"dataset 'imagenet': no ImageNet train synset folders in {root / 'train'}: extract "
                           f"ILSVRC2012_img_train.tar there")


# ------------------------------------------------------------------------------------------- checkpoints

class _RunsCode:
    def __init__(self, marker: Path):
        self.marker = marker

    def __reduce__(self):
        return (os.system, (f"touch {self.marker}",))


@pytest.mark.parametrize("kind", ["garbage", "pickle", "zip_pickle"])
def test_a_bad_checkpoint_gives_one_line_that_never_suggests_unpickling(kind, tmp_path):
    from replication.models.compvis import load_compvis_checkpoint

    path, marker = tmp_path / "state.pt", tmp_path / "code_ran"
    if kind == "garbage":
        path.write_bytes(b"\x00not a checkpoint at all" * 10)
    elif kind == "pickle":
        path.write_bytes(pickle.dumps({"model": _RunsCode(marker)}, protocol=2))
    else:
        torch.save({"model": _RunsCode(marker)}, path)
    for load in (torch_load_safe, load_compvis_checkpoint):
        with pytest.raises(ArtifactError) as err:
            load(path)
        text = str(err.value)
        assert "\n" not in text, text
        assert "weights_only=False" not in text and "weights_only" not in text, text
        assert str(path) in text
        if kind == "zip_pickle" and load is torch_load_safe:
            assert "os.system" in text or "posix.system" in text, text  # the refused global is named
    assert not marker.exists()


# ------------------------------------------------------------------------------------------- Ctrl-C

TRAIN_SCRIPT = textwrap.dedent("""
    import logging, sys
    from pathlib import Path
    import torch
    from torch import nn
    from replication.diffusion.schedule import Schedule
    from replication.stages.execute import setup_logging
    from replication.training.ldm_trainer import LoopSettings, train_loop
    from replication.utils.io import append_jsonl

    torch.set_num_threads(1)
    stage = Path(sys.argv[1])
    # as under Hydra: the console handler is the root logger's, on stdout; the stage adds its log.txt handler
    logging.getLogger().addHandler(logging.StreamHandler(sys.stdout))
    setup_logging(stage)

    class Tiny(nn.Module):
        def __init__(self):
            super().__init__()
            self.conv = nn.Conv2d(2, 2, 3, padding=1)
        def forward(self, x, t):
            return self.conv(x)

    torch.manual_seed(0)
    data = torch.randn(8, 2, 4, 4)
    settings = LoopSettings(steps=10 ** 7, batch_size=2, lr=1e-3, lr_lambda=lambda s: 1.0, weight_decay=0.0,
                            adam_betas=(0.9, 0.999), loss_type="l2", grad_clip=None, log_every=1, ckpt_every=10 ** 6,
                            keep_last=1, seed=0, progress=False)
    train_loop(Tiny(), None, Schedule.make("linear", 1000, 0.0015, 0.0195), lambda idx, g: (data[idx], None), 8,
               settings, stage / "state", lambda **r: append_jsonl(stage / "stats.jsonl", r), torch.device("cpu"))
""")


def test_ctrl_c_says_where_the_state_is_and_that_rerunning_resumes(tmp_path):
    script, stage = tmp_path / "train.py", tmp_path / "train_ldm"
    script.write_text(TRAIN_SCRIPT)
    env = {**os.environ, "PYTHONPATH": str(REPO), "REPLICATION_PROGRESS_INTERVAL_S": "0.2"}
    proc = subprocess.Popen([sys.executable, str(script), str(stage)], env=env, cwd=REPO, stdout=subprocess.PIPE,
                            stderr=subprocess.PIPE, text=True)
    stats = stage / "stats.jsonl"
    deadline = time.time() + 240
    try:
        while time.time() < deadline and proc.poll() is None:
            steps = [json.loads(ln).get("step", 0) for ln in stats.read_text().splitlines()] if stats.exists() else []
            if steps and max(steps) >= 3:
                break
            time.sleep(0.05)
        assert proc.poll() is None, proc.communicate()
        proc.send_signal(signal.SIGINT)
        out, err = proc.communicate(timeout=120)
    finally:
        if proc.poll() is None:
            proc.kill()
            proc.wait()
    assert proc.returncode == 128 + signal.SIGINT, err[-3000:]
    saved = sorted((stage / "state").glob("state_*.pt"))
    assert len(saved) == 1
    step = int(saved[0].stem.split("_")[1])
    expected = (f"LDM training stopped by SIGINT at step {step}: the full training state is saved in {saved[0]}; "
                "rerun the same command to resume from that step")
    assert expected in err  # stderr, even where the log's console handler writes to stdout (Hydra)
    assert expected in out and expected in (stage / "log.txt").read_text()
    assert "Traceback" not in err
    preempted = [json.loads(ln) for ln in stats.read_text().splitlines() if '"preempted"' in ln]
    assert preempted and preempted[-1]["checkpoint"] == str(saved[0]) and preempted[-1]["signal"] == signal.SIGINT
