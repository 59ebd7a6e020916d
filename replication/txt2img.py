"""python -m replication.txt2img "a prompt" --checkpoint CKPT --vocab vocab.txt --out DIR: images from a text prompt with a
text-conditional LDM (the released 1.45B txt2img model by default: experiment txt2img_kl8), as the release's
scripts/txt2img.py: classifier-free guidance with scale --scale against the empty prompt "", DDIM.

Sample i starts from seed --seed + i (the sample stage's per-sample seeds), so an image does not depend on the batch
it was made in; each is written as DIR/NNNN.png and all of them as DIR/grid.png. The command resumes: rerun it to
finish an interrupted folder; a folder made with other settings is refused (see replication/apply.py)."""
from __future__ import annotations

import argparse
import dataclasses
import math
from pathlib import Path
from typing import Any, Optional

import numpy as np

from replication.apply import (ApplyError, Task, load_task_model, main_guard, model_arguments, prepare_output,
                               sampler_overrides, write_png)
from replication.config import ConditioningKind

TXT2IMG = Task("txt2img", ConditioningKind.text, "txt2img_kl8", "python -m replication.txt2img")
GRID_FILE = "grid.png"


def parse_arguments(argv: Optional[list[str]]) -> argparse.Namespace:
    parser = argparse.ArgumentParser(prog=TXT2IMG.command, description=__doc__,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("prompt", help="the caption to draw (\"\" gives the unconditional model's images)")
    parser.add_argument("--checkpoint", required=True,
                        help="a released .ckpt (txt2img-f8-large: zoo model text2img-large), a run folder of a text "
                             "experiment, or a zoo model name")
    parser.add_argument("--vocab", required=True, type=Path,
                        help="the WordPiece vocabulary the model was trained with (bert-base-uncased's vocab.txt for "
                             "the released model; a smoke run's prepared vocab.txt)")
    parser.add_argument("--out", required=True, type=Path, help="output folder (NNNN.png and grid.png), created if needed")
    parser.add_argument("--experiment", default=None,
                        help=f"the experiment that builds the model (default: a run folder's own, else {TXT2IMG.experiment})")
    parser.add_argument("--scale", type=float, default=None,
                        help="classifier-free guidance scale s: eps(\"\") + s (eps(prompt) - eps(\"\")); 1 = no "
                             "guidance (default: the experiment's)")
    parser.add_argument("--steps", type=int, default=None, help="DDIM steps (default: the experiment's)")
    parser.add_argument("--eta", type=float, default=None, help="DDIM eta (default: the experiment's)")
    parser.add_argument("--seed", type=int, default=0, help="sample i starts from seed SEED + i")
    parser.add_argument("--n-samples", type=int, default=4, help="how many images")
    parser.add_argument("--batch", type=int, default=None, help="images per sampler call (memory only)")
    model_arguments(parser)
    return parser.parse_args(argv)


def _overrides(args: argparse.Namespace) -> list[str]:
    over = sampler_overrides(args) + [f"conditioning.vocab_path={args.vocab}", f"sampler.seed={args.seed}"]
    if args.scale is not None:
        over.append(f"sampler.guidance_scale={args.scale}")
    if args.batch is not None:
        over.append(f"sampler.batch_size={args.batch}")
    return over


def load_text_model(args: argparse.Namespace) -> Any:
    """The model as `replication.load_pretrained` gives it; a run folder without --experiment is built from its own
    config. A model that is not text-conditional is refused by name."""
    from replication.api import load_pretrained

    path = Path(args.checkpoint)
    if args.experiment is None and path.is_dir() and (path / "config.yaml").is_file():
        model = load_pretrained(path, ema=not args.raw_weights, device=args.device, overrides=_overrides(args),
                                progress=not args.no_progress)
        if model.config.root.conditioning.kind is not ConditioningKind.text:
            raise ApplyError(f"{path}: a run of experiment {model.experiment!r} with conditioning "
                             f"{model.config.root.conditioning.kind.value!r}, not a text-to-image model")
        return model
    return load_task_model(TXT2IMG, args.checkpoint, args.experiment, args.device, _overrides(args),
                           ema=not args.raw_weights)


def generate(model: Any, prompt: str, indices: np.ndarray, progress: bool = False) -> np.ndarray:
    """uint8 (len(indices), H, W, 3): sample i of `prompt` from seed sampler.seed + i, in batches of
    sampler.batch_size, through the sample stage's generator (the same denoiser, guidance and decoding)."""
    from replication.stages.sample import Generator
    from replication.utils.progress import ProgressLog

    if model._generator is None:
        model._generator = Generator(model.denoiser, model.autoencoder, model.scale_factor, model.config, model.device)
    gen = model._generator
    batch = model.sampler.batch_size
    parts = []
    with ProgressLog("txt2img", total=len(indices), unit="img", bar=progress) as bar:
        for start in range(0, len(indices), batch):
            idx = indices[start:start + batch]
            parts.append(gen(idx, model.sampler.steps, captions=[prompt] * len(idx)))
            bar.update(len(idx))
    return np.concatenate(parts) if parts else np.zeros((0, 0, 0, 3), np.uint8)


def image_grid(images: np.ndarray) -> np.ndarray:
    """The images on a near-square grid (rows of ceil(sqrt(n))), black where the last row is short."""
    n, h, w, c = images.shape
    cols = math.ceil(math.sqrt(n))
    rows = math.ceil(n / cols)
    grid = np.zeros((rows * h, cols * w, c), np.uint8)
    for i, image in enumerate(images):
        r, k = divmod(i, cols)
        grid[r * h:(r + 1) * h, k * w:(k + 1) * w] = image
    return grid


def settings_record(args: argparse.Namespace, model: Any) -> dict[str, Any]:
    from replication.utils.verify import file_sha256

    sampler = model.sampler
    return {"task": TXT2IMG.name, "prompt": args.prompt, "checkpoint": str(args.checkpoint), "model_source": model.source,
            "experiment": model.experiment, "ema": model.ema, "vocab_sha256": file_sha256(args.vocab),
            "sampler": str(getattr(sampler.kind, "value", sampler.kind)), "steps": sampler.steps, "eta": sampler.eta,
            "guidance_scale": sampler.guidance_scale, "seed": args.seed, "overrides": list(args.override)}


def main(argv: Optional[list[str]] = None) -> int:
    args = parse_arguments(argv)

    def run() -> int:
        if args.n_samples < 1:
            raise ApplyError(f"--n-samples must be >= 1, got {args.n_samples}")
        from replication.data.tokenizer import CaptionTokenizer

        CaptionTokenizer(args.vocab)  # a missing or malformed vocabulary is named before the model loads
        model = load_text_model(args)
        model.sampler = dataclasses.replace(model.config.sampler)
        prepare_output(args.out, settings_record(args, model))
        files = [args.out / f"{i:04d}.png" for i in range(args.n_samples)]
        todo = np.array([i for i, f in enumerate(files) if not f.is_file()], dtype=np.int64)
        images = generate(model, args.prompt, todo, progress=not args.no_progress)
        for i, image in zip(todo, images):
            write_png(image, files[int(i)])
        from PIL import Image

        write_png(image_grid(np.stack([np.asarray(Image.open(f).convert("RGB")) for f in files])), args.out / GRID_FILE)
        print(f"{len(todo)} image(s) made, {args.n_samples - len(todo)} kept from an earlier run, grid in "
              f"{args.out / GRID_FILE}")
        return 0

    return main_guard(run)


if __name__ == "__main__":
    raise SystemExit(main())
