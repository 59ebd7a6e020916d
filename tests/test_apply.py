"""python -m replication.superres / replication.inpaint on folders of real image files, with tiny concat-conditioned
models saved in the release's checkpoint layout: outputs, resuming, the kept pixels, and each input problem."""
from __future__ import annotations

import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image

from replication.config import validate_config
from replication.models.ema import shadow_name
from replication.stages.artifacts import build_first_stage, build_unet
from replication.stages.entry import compose

ROOT = Path(__file__).resolve().parents[1]
# the smoke experiment (KL f=4, 4-channel latent, 8x8 U-Net) turned into each task's concat model
SR = ["--experiment", "smoke", "--override", "conditioning.kind=lowres", "--override", "unet.in_channels=7",
      "--steps", "4"]
INPAINT = ["--experiment", "smoke", "--override", "conditioning.kind=masked_image", "--override", "unet.in_channels=9",
           "--steps", "4"]


def _release_ckpt(path: Path, overrides: list[str], seed: int) -> Path:
    typed = validate_config(compose(["experiment=smoke", *overrides]))
    g = torch.Generator().manual_seed(seed)

    def jitter(state):
        return {k: v + 0.2 * torch.randn(v.shape, generator=g) if v.is_floating_point() else v for k, v in state.items()}

    unet = build_unet(typed).diffusion_model
    raw = jitter(unet.state_dict())
    sd = {f"model.diffusion_model.{k}": v for k, v in raw.items()}
    sd.update({f"model_ema.{shadow_name('diffusion_model.' + k)}": v for k, v in jitter(raw).items()})
    sd.update({f"first_stage_model.{k}": v for k, v in jitter(build_first_stage(typed).state_dict()).items()})
    sd["betas"] = typed.diffusion.make_schedule().betas.float()
    torch.save({"state_dict": sd, "global_step": 1}, path)
    return path


def _overrides(args: list[str]) -> list[str]:
    return [args[i + 1] for i, a in enumerate(args) if a == "--override"]


@pytest.fixture(scope="module")
def ckpts(tmp_path_factory):
    root = tmp_path_factory.mktemp("apply_ckpts")
    return {"sr": _release_ckpt(root / "sr.ckpt", _overrides(SR), 0),
            "inpaint": _release_ckpt(root / "inpaint.ckpt", _overrides(INPAINT), 1)}


def _png(path: Path, arr: np.ndarray) -> Path:
    path.parent.mkdir(parents=True, exist_ok=True)
    Image.fromarray(arr).save(path)
    return path


def _images(folder: Path, n: int, size: int, seed: int = 0) -> list[Path]:
    rng = np.random.default_rng(seed)
    return [_png(folder / f"img{i}.png", rng.integers(0, 256, (size, size, 3), dtype=np.uint8)) for i in range(n)]


def _superres(*argv: str) -> int:
    from replication.superres import main
    return main([*argv, "--device", "cpu", "--no-progress"])


def _inpaint(*argv: str) -> int:
    from replication.inpaint import main
    return main([*argv, "--device", "cpu", "--no-progress"])


def test_superres_makes_x4_images_and_resumes(tmp_path, ckpts, capsys):
    _images(tmp_path / "in", 3, 8)
    out = tmp_path / "out"
    assert _superres(str(tmp_path / "in"), str(out), "--checkpoint", str(ckpts["sr"]), *SR) == 0
    made = sorted(out.glob("*.png"))
    assert [p.name for p in made] == ["img0.png", "img1.png", "img2.png"]
    assert all(np.asarray(Image.open(p)).shape == (32, 32, 3) for p in made)
    first = {p.name: p.read_bytes() for p in made}
    assert "3 image(s) made" in capsys.readouterr().out
    # a rerun makes nothing; a lost result is made again, identical (its seed comes from the run seed and its name)
    (out / "img1.png").unlink()
    assert _superres(str(tmp_path / "in"), str(out), "--checkpoint", str(ckpts["sr"]), *SR) == 0
    assert "1 image(s) made, 2 kept" in capsys.readouterr().out
    assert {p.name: p.read_bytes() for p in sorted(out.glob("*.png"))} == first
    # other settings into the same folder are refused, naming what differs
    assert _superres(str(tmp_path / "in"), str(out), "--checkpoint", str(ckpts["sr"]), *SR, "--seed", "5") == 2
    err = capsys.readouterr().err
    assert "other settings (seed differ" in err and "apply.json" in err


def test_inpaint_keeps_every_pixel_outside_the_hole(tmp_path, ckpts, capsys):
    images = _images(tmp_path / "img", 2, 32, seed=3)
    mask = np.zeros((32, 32), np.uint8)
    mask[8:20, 4:24] = 255
    _png(tmp_path / "masks" / "img0.png", mask)
    _png(tmp_path / "masks" / "img1_mask.png", mask)  # LaMa's / the release's naming
    out = tmp_path / "out"
    assert _inpaint(str(tmp_path / "img"), str(tmp_path / "masks"), str(out), "--checkpoint",
                    str(ckpts["inpaint"]), *INPAINT) == 0
    for src in images:
        result, original = np.asarray(Image.open(out / src.name)), np.asarray(Image.open(src))
        keep = mask == 0
        np.testing.assert_array_equal(result[keep], original[keep])
        assert not np.array_equal(result[~keep], original[~keep])  # the hole was filled by the model


def test_each_input_problem_stops_naming_the_file(tmp_path, ckpts, capsys):
    _images(tmp_path / "img", 1, 32, seed=4)
    masks = tmp_path / "masks"
    run = [str(tmp_path / "img"), str(masks), str(tmp_path / "out"), "--checkpoint", str(ckpts["inpaint"]), *INPAINT]

    _png(masks / "img0.png", np.zeros((16, 32), np.uint8))
    assert _inpaint(*run) == 2
    assert f"{masks / 'img0.png'}: mask is 32x16 but its image is 32x32" in capsys.readouterr().err

    soft = np.zeros((32, 32), np.uint8)
    soft[4:8, 4:8] = 128
    soft[10:12, 10:12] = 255
    _png(masks / "img0.png", soft)
    assert _inpaint(*run) == 2
    assert "mask is not binary (values [0, 128, 255])" in capsys.readouterr().err

    soft[soft > 0] = 255
    _png(masks / "img0.png", soft)
    assert _inpaint(*run, "--size", "64") == 2
    assert f"{tmp_path / 'img' / 'img0.png'}: image is 32x32, smaller than the 64x64 crop" in capsys.readouterr().err

    (masks / "img0.png").unlink()
    assert _inpaint(*run) == 2
    assert "no mask in" in capsys.readouterr().err
    assert not (tmp_path / "out").exists()  # every input is checked before anything is written


def test_a_checkpoint_of_the_other_task_is_refused(tmp_path, ckpts, capsys):
    _images(tmp_path / "img", 1, 32, seed=5)
    _png(tmp_path / "masks" / "img0.png", np.zeros((32, 32), np.uint8))
    assert _inpaint(str(tmp_path / "img"), str(tmp_path / "masks"), str(tmp_path / "out"), "--checkpoint",
                    str(ckpts["sr"]), *INPAINT) == 2
    err = capsys.readouterr().err
    assert f"{ckpts['sr']}: does not fit a inpainting model" in err
    assert "reads 7 input channels with a 4-channel latent: a super-resolution model" in err
    assert not (tmp_path / "out").exists()  # nothing written before the model loaded


def test_superres_command_line_runs_as_a_module(tmp_path, ckpts):
    _images(tmp_path / "in", 1, 8, seed=6)
    proc = subprocess.run([sys.executable, "-m", "replication.superres", str(tmp_path / "in"), str(tmp_path / "out"),
                           "--checkpoint", str(ckpts["sr"]), *SR, "--device", "cpu", "--no-progress"],
                          capture_output=True, text=True, cwd=ROOT, timeout=600)
    assert proc.returncode == 0, proc.stderr
    assert np.asarray(Image.open(tmp_path / "out" / "img0.png")).shape == (32, 32, 3)
    bad = subprocess.run([sys.executable, "-m", "replication.superres", str(tmp_path / "nowhere"), str(tmp_path / "o2"),
                          "--checkpoint", str(ckpts["sr"]), *SR], capture_output=True, text=True, cwd=ROOT, timeout=600)
    assert bad.returncode == 2 and "input folder" in bad.stderr and "Traceback" not in bad.stderr
