"""python -m replication.superres IN_DIR OUT_DIR --checkpoint CKPT: x4 super-resolution of every image in IN_DIR with a
concat-conditioned LDM (the released sr_bsr model by default: experiment sr_bsr_release).

Each low-resolution image (in [-1, 1]) is the condition at the latent's size; the sample is decoded by the first
stage (f = 4), so an H x W input gives a 4H x 4W output, written as OUT_DIR/<name>.png. The command resumes: rerun it
to finish an interrupted folder (see replication/apply.py)."""
from __future__ import annotations

from pathlib import Path
from typing import Any, Optional

import numpy as np
import torch

from replication.apply import (SUPERRES, ApplyError, center_crop, check_multiple, list_images, parse_arguments,
                               load_task_model, main_guard, prepare_output, read_rgb, run_folder, sample_with_condition,
                               sampler_overrides, settings_record, to_uint8_image, unet_multiple, image_seed)


def upscale(model: Any, lr: np.ndarray, seed: int) -> np.ndarray:
    """One uint8 HxWx3 low-resolution image -> uint8 (fH)x(fW)x3, f the first stage's downsampling factor."""
    cond = torch.from_numpy(lr.astype(np.float32) / 127.5 - 1.0).permute(2, 0, 1)[None]
    return to_uint8_image(sample_with_condition(model, cond, lr.shape[:2], seed))


def main(argv: Optional[list[str]] = None) -> int:
    args = parse_arguments(SUPERRES, __doc__, [("in_dir", "folder of low-resolution images"),
                                              ("out_dir", "folder for the results (<name>.png), created if needed")], argv)

    def run() -> int:
        files = list_images(args.in_dir, "input")
        model = load_task_model(SUPERRES, args.checkpoint, args.experiment, args.device, sampler_overrides(args),
                                ema=not args.raw_weights)
        factor = model.autoencoder.downsampling_factor

        def inputs(src: Path) -> np.ndarray:
            lr = center_crop(read_rgb(src), args.size, src)
            check_multiple(lr, unet_multiple(model), src, "the low-resolution image")
            return lr

        for src in files:  # every input checked before anything is written
            inputs(src)
        prepare_output(args.out_dir, {**settings_record(SUPERRES, args, model), "factor": factor})

        def make(src: Path) -> np.ndarray:
            return upscale(model, inputs(src), image_seed(args.seed, src.name))

        jobs = [(src, args.out_dir / f"{src.stem}.png") for src in files]
        if len({dst for _, dst in jobs}) != len(jobs):
            raise ApplyError(f"{args.in_dir} holds files whose names differ only in their suffix: outputs would collide")
        counts = run_folder(jobs, make, f"super-resolution x{factor}", progress=not args.no_progress)
        print(f"{counts['made']} image(s) made, {counts['kept']} kept from an earlier run, in {args.out_dir}")
        return 0

    return main_guard(run)


if __name__ == "__main__":
    raise SystemExit(main())
