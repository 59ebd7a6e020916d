"""python -m replication.inpaint IMAGES_DIR MASKS_DIR OUT_DIR --checkpoint CKPT: fill the hole of every image with a
concat-conditioned LDM (the released inpainting_big model by default: experiment inpainting_big_release).

MASKS_DIR holds one mask per image, named like the image (<name>.png) or as LaMa and the release name them
(<name>_mask.png); white (255) marks the hole, black (0) the pixels to keep, at the image's size. As the release's
scripts/inpaint.py: the first stage encodes the masked image, the mask is resized to the latent, and the result keeps
every input pixel outside the hole. Written as OUT_DIR/<name>.png; the command resumes (see replication/apply.py)."""
from __future__ import annotations

from pathlib import Path
from typing import Any, Optional

import numpy as np
import torch

from replication.apply import (INPAINTING, ApplyError, center_crop, check_multiple, image_seed, parse_arguments,
                               list_images, load_task_model, main_guard, prepare_output, read_mask, read_rgb,
                               run_folder, sample_with_condition, sampler_overrides, settings_record, unet_multiple)
from replication.models.concat_conditioning import composite, inpainting_condition, inpainting_inputs


def inpaint_image(model: Any, image: np.ndarray, mask: np.ndarray, seed: int) -> np.ndarray:
    """uint8 HxWx3 image and uint8 {0, 1} HxW mask (1 = hole) -> the inpainted uint8 HxWx3 image."""
    batch = {k: v.to(model.device) for k, v in inpainting_inputs(image, mask).items()}
    with torch.no_grad():
        cond = inpainting_condition(model.autoencoder.encode, batch["masked_image"], batch["mask"])
    f = model.autoencoder.downsampling_factor
    predicted = sample_with_condition(model, cond, (image.shape[0] // f, image.shape[1] // f), seed)
    out = composite(batch["image"], batch["mask"], predicted)
    return (out[0] * 255).round().clamp(0, 255).to(torch.uint8).permute(1, 2, 0).cpu().numpy()


def find_mask(masks_dir: Path, image: Path) -> Path:
    for name in (f"{image.stem}.png", f"{image.stem}_mask.png", image.name):
        if (masks_dir / name).is_file():
            return masks_dir / name
    raise ApplyError(f"{image}: no mask in {masks_dir} (looked for {image.stem}.png and {image.stem}_mask.png)")


def main(argv: Optional[list[str]] = None) -> int:
    args = parse_arguments(INPAINTING, __doc__, [("images_dir", "folder of images"),
                                                ("masks_dir", "folder of masks (255 = hole), one per image"),
                                                ("out_dir", "folder for the results (<name>.png), created if needed")],
                           argv)

    def run() -> int:
        files = list_images(args.images_dir, "image")
        if not args.masks_dir.is_dir():
            raise ApplyError(f"mask folder {args.masks_dir} does not exist")
        masks = {src: find_mask(args.masks_dir, src) for src in files}  # every mask found before any work
        model = load_task_model(INPAINTING, args.checkpoint, args.experiment, args.device, sampler_overrides(args),
                                ema=not args.raw_weights)
        multiple = model.autoencoder.downsampling_factor * unet_multiple(model)

        def inputs(src: Path) -> tuple[np.ndarray, np.ndarray]:
            image = read_rgb(src)
            mask = read_mask(masks[src], image.shape[:2])
            image, mask = center_crop(image, args.size, src), center_crop(mask, args.size, masks[src])
            check_multiple(image, multiple, src, "the image")
            return image, mask

        for src in files:  # every input checked before anything is written
            inputs(src)
        prepare_output(args.out_dir, settings_record(INPAINTING, args, model))

        def make(src: Path) -> np.ndarray:
            return inpaint_image(model, *inputs(src), image_seed(args.seed, src.name))

        jobs = [(src, args.out_dir / f"{src.stem}.png") for src in files]
        if len({dst for _, dst in jobs}) != len(jobs):
            raise ApplyError(f"{args.images_dir} holds files whose names differ only in their suffix: outputs would collide")
        counts = run_folder(jobs, make, "inpaint", progress=not args.no_progress)
        print(f"{counts['made']} image(s) made, {counts['kept']} kept from an earlier run, in {args.out_dir}")
        return 0

    return main_guard(run)


if __name__ == "__main__":
    raise SystemExit(main())
