"""Apply a concat-conditioned LDM (super-resolution, inpainting) to a user's own images, one image at a time.

The two commands (`python -m replication.superres`, `python -m replication.inpaint`) share what is here: loading
the model and refusing one of the other task, reading and checking the inputs (each problem names its file), a
seed per image from the run's seed and the file name (the same result whatever the order or a rerun), and an
output folder that resumes: results are written atomically beside a record of the settings that made them, a rerun
with the same settings makes only what is missing, and a folder made with other settings is refused.
"""
from __future__ import annotations

import argparse
import hashlib
import json
import os
import sys
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Callable, Optional

import numpy as np
import torch
from PIL import Image

from replication.config import ConditioningKind

IMAGE_SUFFIXES = (".png", ".jpg", ".jpeg", ".webp", ".bmp")
RECORD_FILE = "apply.json"


class ApplyError(ValueError):
    """An input, output folder or checkpoint the command cannot use; the message names the file and the problem."""


@dataclass(frozen=True)
class Task:
    name: str  # "superres", "inpainting"
    kind: ConditioningKind
    experiment: str  # the experiment that builds the released model of this task
    command: str


SUPERRES = Task("superres", ConditioningKind.lowres, "sr_bsr_release", "python -m replication.superres")
INPAINTING = Task("inpainting", ConditioningKind.masked_image, "inpainting_big_release", "python -m replication.inpaint")
TASKS = {t.kind: t for t in (SUPERRES, INPAINTING)}


# ------------------------------------------------------------------------------------------------ model
def load_task_model(task: Task, checkpoint: str, experiment: Optional[str], device: str, overrides: list[str],
                    ema: bool = True) -> Any:
    """`replication.load_pretrained` for `task`; a checkpoint or zoo model of another task is refused by name."""
    from replication.api import load_pretrained
    from replication.pretrained import read_zoo
    from replication.utils.state import CheckpointMismatchError

    zoo = read_zoo() if not Path(checkpoint).exists() else {}
    if checkpoint in zoo and experiment is None and zoo[checkpoint].experiment not in ("", task.experiment):
        other = zoo[checkpoint].experiment
        raise ApplyError(f"zoo model {checkpoint!r} is built by experiment {other!r}, not a {task.name} model; "
                         f"{_command_for(other)}")
    try:
        model = load_pretrained(checkpoint, experiment=experiment or (None if checkpoint in zoo else task.experiment),
                                ema=ema, device=device, overrides=overrides)
    except CheckpointMismatchError as exc:
        hint = _other_task_hint(checkpoint, experiment or task.experiment, overrides)
        raise ApplyError(f"{checkpoint}: does not fit a {task.name} model ({exc}){hint}") from None
    kind = model.config.root.conditioning.kind
    if kind is not task.kind:
        raise ApplyError(f"{checkpoint}: experiment {model.experiment!r} builds a model with conditioning "
                         f"{kind.value!r}, not a {task.name} model ({task.kind.value!r}); {_command_for(model.experiment)}")
    return model


def _command_for(experiment: str) -> str:
    from replication.config import validate_config
    from replication.stages.entry import compose

    try:
        kind = validate_config(compose([f"experiment={experiment}"])).root.conditioning.kind
    except Exception:  # an unknown experiment: nothing more to say than its name
        return "use the command of that task"
    task = TASKS.get(kind)
    return f"use {task.command}" if task else "it does not take images as its condition"


def _other_task_hint(checkpoint: str, experiment: str, overrides: list[str]) -> str:
    """Name the task a released checkpoint's U-Net input belongs to (its first conv's input channels, read against
    the experiment's latent channels: super-resolution joins 3 image channels, inpainting a code and a mask)."""
    from replication.config import validate_config
    from replication.models.compvis import UNET_PREFIX, load_compvis_checkpoint
    from replication.models.concat_conditioning import concat_in_channels
    from replication.stages.entry import compose

    path = Path(checkpoint)
    if not path.is_file():
        return ""
    try:
        weight = load_compvis_checkpoint(path).get(f"{UNET_PREFIX}input_blocks.0.0.weight")
        latent = validate_config(compose([f"experiment={experiment}", *overrides])).autoencoder.embed_dim
    except Exception:  # not readable as a checkpoint, or no config to read it against: the first error says enough
        return ""
    if weight is None:
        return ""
    channels = int(weight.shape[1])
    known = {concat_in_channels("superres", latent): f"a super-resolution model ({SUPERRES.command})",
             concat_in_channels("inpainting", latent): f"an inpainting model ({INPAINTING.command})",
             latent: "an unconditional or class-conditional model"}
    return (f"; its U-Net reads {channels} input channels with a {latent}-channel latent: "
            + known.get(channels, "not a model of this harness's tasks"))


# ------------------------------------------------------------------------------------------------ inputs
def list_images(folder: Path, what: str) -> list[Path]:
    if not folder.is_dir():
        raise ApplyError(f"{what} folder {folder} does not exist")
    files = sorted(p for p in folder.iterdir() if p.is_file() and p.suffix.lower() in IMAGE_SUFFIXES)
    if not files:
        raise ApplyError(f"{what} folder {folder} holds no images ({', '.join(IMAGE_SUFFIXES)})")
    return files


def read_rgb(path: Path) -> np.ndarray:
    try:
        with Image.open(path) as img:
            img.load()
            return np.asarray(img.convert("RGB"), dtype=np.uint8)
    except (OSError, ValueError) as exc:
        raise ApplyError(f"{path}: not a readable image ({exc})") from None


def read_mask(path: Path, image_shape: tuple[int, int]) -> np.ndarray:
    """uint8 {0, 1} (1 = hole). The mask must have the image's size and only two values: 0 and 1, or 0 and 255."""
    try:
        with Image.open(path) as img:
            img.load()
            mask = np.asarray(img.convert("L"), dtype=np.uint8)
    except (OSError, ValueError) as exc:
        raise ApplyError(f"{path}: not a readable mask image ({exc})") from None
    if mask.shape != image_shape:
        raise ApplyError(f"{path}: mask is {mask.shape[1]}x{mask.shape[0]} but its image is "
                         f"{image_shape[1]}x{image_shape[0]}")
    values = set(np.unique(mask).tolist())
    if not (values <= {0, 255} or values <= {0, 1}):
        shown = sorted(values)[:6]
        raise ApplyError(f"{path}: mask is not binary (values {shown}{'...' if len(values) > 6 else ''}); save it with "
                         "0 for pixels to keep and 255 for the hole")
    return (mask > 0).astype(np.uint8)


def center_crop(arr: np.ndarray, size: Optional[int], path: Path) -> np.ndarray:
    if size is None:
        return arr
    h, w = arr.shape[:2]
    if h < size or w < size:
        raise ApplyError(f"{path}: image is {w}x{h}, smaller than the {size}x{size} crop (--size)")
    top, left = (h - size) // 2, (w - size) // 2
    return np.ascontiguousarray(arr[top:top + size, left:left + size])


def check_multiple(arr: np.ndarray, multiple: int, path: Path, what: str) -> None:
    h, w = arr.shape[:2]
    if h % multiple or w % multiple:
        raise ApplyError(f"{path}: {what} is {w}x{h}; the model needs sides that are multiples of {multiple} "
                         "(crop it, or use --size)")


def image_seed(seed: int, name: str) -> int:
    """The seed of one image: from the run's seed and the file name, so order and reruns do not matter."""
    return int.from_bytes(hashlib.sha256(f"{seed}:{name}".encode()).digest()[:8], "little") >> 1


def unet_multiple(model: Any) -> int:
    """Latent sides must halve cleanly at every U-Net level."""
    return 2 ** (len(model.config.unet.channel_mult) - 1)


# ------------------------------------------------------------------------------------------------ sampling
@torch.no_grad()
def sample_with_condition(model: Any, cond: torch.Tensor, latent_hw: tuple[int, int], seed: int) -> torch.Tensor:
    """Decoded sample in [-1, 1] (1, 3, H, W) from one concatenated condition (1, C, h, w) at the latent's size."""
    from replication.diffusion.config import run_sampler
    from replication.diffusion.denoiser import sampling_denoiser
    from replication.utils.rng import StackedRandomGenerator

    sampler = model.sampler
    rng = StackedRandomGenerator([seed], device=model.device)
    x_T = rng.randn((1, model.config.unet.out_channels, *latent_hw))
    denoiser = sampling_denoiser(model.denoiser, None, None, 1.0, concat=cond.to(model.device))
    z = run_sampler(sampler, denoiser, x_T, model.schedule, rng=rng).x
    return model.autoencoder.decode(z / model.scale_factor)


def to_uint8_image(x: torch.Tensor) -> np.ndarray:
    """(1, 3, H, W) in [-1, 1] -> uint8 HxWx3, rounding as the sample stage ((x + 1) * 127.5)."""
    return ((x[0].float().clamp(-1, 1) + 1) * 127.5).round().to(torch.uint8).permute(1, 2, 0).cpu().numpy()


# ------------------------------------------------------------------------------------------------ outputs
def prepare_output(out_dir: Path, settings: dict[str, Any]) -> None:
    """Create `out_dir` with its settings record, or check that an existing one was made with the same settings."""
    out_dir.mkdir(parents=True, exist_ok=True)
    record = out_dir / RECORD_FILE
    if record.is_file():
        before = json.loads(record.read_text())
        if before != settings:
            changed = sorted(k for k in set(before) | set(settings) if before.get(k) != settings.get(k))
            raise ApplyError(f"{out_dir} holds results made with other settings ({', '.join(changed)} differ; see "
                             f"{record}): choose another output folder, or delete that one to remake it")
        return
    tmp = record.with_name(f".{record.name}.tmp")
    tmp.write_text(json.dumps(settings, indent=2, sort_keys=True) + "\n")
    os.replace(tmp, record)


def write_png(arr: np.ndarray, path: Path) -> None:
    tmp = path.with_name(f".{path.name}.tmp")
    Image.fromarray(arr).save(tmp, format="PNG")
    os.replace(tmp, path)


def run_folder(jobs: list[tuple[Path, Path]], make: Callable[[Path], np.ndarray], what: str, progress: bool) -> dict:
    """Make each (input, output) pair whose output is missing; {"made", "kept"} counts."""
    from replication.utils.progress import ProgressLog

    todo = [(src, dst) for src, dst in jobs if not dst.is_file()]
    with ProgressLog(what, total=len(jobs), initial=len(jobs) - len(todo), unit="img", bar=progress) as bar:
        for src, dst in todo:
            write_png(make(src), dst)
            bar.update(1)
    return {"made": len(todo), "kept": len(jobs) - len(todo)}


def parse_arguments(task: Task, doc: str, folders: list[tuple[str, str]], argv: Optional[list[str]]) -> argparse.Namespace:
    """The command line of a task: its folders (name, help) in order, then the options every task shares."""
    parser = argparse.ArgumentParser(prog=task.command, description=doc, formatter_class=argparse.RawDescriptionHelpFormatter)
    for name, help_text in folders:
        parser.add_argument(name, type=Path, help=help_text)
    common_arguments(parser, task)
    return parser.parse_args(argv)


def common_arguments(parser: argparse.ArgumentParser, task: Task) -> None:
    parser.add_argument("--checkpoint", required=True,
                        help=f"a released .ckpt, a run folder, or a zoo model name (experiments/zoo.csv), e.g. the "
                             f"model of experiment {task.experiment}")
    parser.add_argument("--experiment", default=None,
                        help=f"the experiment that builds the model (default: the zoo row's, else {task.experiment})")
    parser.add_argument("--steps", type=int, default=None, help="sampler steps (default: the experiment's)")
    parser.add_argument("--eta", type=float, default=None, help="DDIM eta (default: the experiment's)")
    parser.add_argument("--seed", type=int, default=0, help="each image's noise comes from this seed and its file name")
    parser.add_argument("--size", type=int, default=None, help="centre-crop every input to SIZE x SIZE first")
    model_arguments(parser)


def model_arguments(parser: argparse.ArgumentParser) -> None:
    """The options of every command that loads a model and samples: device, weights, overrides, progress."""
    parser.add_argument("--device", default="auto", help="cpu, cuda, cuda:1 or auto")
    parser.add_argument("--raw-weights", action="store_true", help="the raw U-Net weights instead of the EMA ones")
    parser.add_argument("--override", action="append", default=[], metavar="KEY=VALUE",
                        help="a Hydra override of the experiment (repeatable)")
    parser.add_argument("--no-progress", action="store_true", help="no progress bar (progress lines still go to the log)")


def sampler_overrides(args: argparse.Namespace) -> list[str]:
    over = list(args.override)
    if args.steps is not None:
        over.append(f"sampler.steps={args.steps}")
    if args.eta is not None:
        over.append(f"sampler.eta={args.eta}")
    return over


def settings_record(task: Task, args: argparse.Namespace, model: Any) -> dict[str, Any]:
    return {"task": task.name, "checkpoint": str(args.checkpoint), "model_source": model.source,
            "experiment": model.experiment, "ema": model.ema, "sampler": model.sampler.kind.value
            if hasattr(model.sampler.kind, "value") else str(model.sampler.kind), "steps": model.sampler.steps,
            "eta": model.sampler.eta, "seed": args.seed, "size": args.size, "overrides": list(args.override)}


def main_guard(run: Callable[[], int]) -> int:
    """Run a command; an input the user must fix is one line on stderr and exit code 2, not a traceback."""
    from replication.pretrained import PretrainedError
    from replication.stages.entry import user_errors

    try:
        return run()
    except (ApplyError, PretrainedError, *user_errors()) as exc:
        print(f"error: {exc}", file=sys.stderr)
        return 2
