"""The image conditions of the concat-conditioned tasks, made from prepared images (paper Sec. 4.4 and 4.5).

A super-resolution example is a prepared high-resolution image and its degraded low-resolution version; an
inpainting example is a prepared image, a mask and the masked image. Training makes a fresh condition at every
visit (a new BSR degradation, a new mask), drawn from the training loop's generator, so a resumed run draws the
same ones. Evaluation makes one fixed condition per image from its own generator, seeded by (evaluation seed,
split, image index): every model compared on a task sees the same low-resolution inputs and the same masks, on any
machine and in any order.

What the release does not give, and what is chosen here (each recorded in every result through the config):
- which degradation made Tab. 5 (`conditioning.degradation`, default `pil_bicubic`: "bicubic with anti-aliasing");
- the inpainting training masks (the release shipped no training input): LaMa's evaluation configuration named by
  `conditioning.mask_config`, its pixel sizes scaled from LaMa's 512 to the image size, drawn until one covers at
  most `max_tamper_area` of the image (as LaMa's generator keeps its crops).
"""
from __future__ import annotations

import dataclasses
from dataclasses import dataclass
from typing import Any, Callable, Optional

import numpy as np
import torch
import torch.nn.functional as F

from replication.data.masks import LAMA_CONFIGS, MAX_ATTEMPTS, MaskConfig, MaskError, candidate_mask, image_seed, mask_config
from replication.data.superres import DEGRADATIONS, DegradationError, degrade

class ConditionError(ValueError):
    """A condition that cannot be made for these images (wrong size, unknown option)."""


def _scaled(value: int, scale: float, minimum: int = 1) -> int:
    return max(minimum, int(round(value * scale)))


def scaled_mask_config(cfg: MaskConfig, size: int) -> MaskConfig:
    """LaMa's configuration for 512-pixel images with its pixel sizes (stroke width and length, box sizes and
    margin) scaled to `size`-pixel images; counts and probabilities unchanged. At 512 it is LaMa's own."""
    if size == cfg.out_min_size:
        return cfg
    s = size / cfg.out_min_size
    strokes = dataclasses.replace(cfg.strokes, max_width=_scaled(cfg.strokes.max_width, s),
                                  max_len=_scaled(cfg.strokes.max_len, s), min_width=_scaled(cfg.strokes.min_width, s),
                                  min_len=_scaled(cfg.strokes.min_len, s))
    boxes = None
    if cfg.boxes is not None:
        boxes = dataclasses.replace(cfg.boxes, margin=_scaled(cfg.boxes.margin, s, 0),
                                    bbox_min_size=_scaled(cfg.boxes.bbox_min_size, s, 2),
                                    bbox_max_size=_scaled(cfg.boxes.bbox_max_size, s, 3))
    return dataclasses.replace(cfg, strokes=strokes, boxes=boxes, out_min_size=size)


def square_mask(size: int, cfg: MaskConfig, rng: np.random.Generator) -> np.ndarray:
    """uint8 size x size, 1 = hole: candidates of `cfg` (already scaled to `size`) drawn until one covers at most
    cfg.max_tamper_area of the image (at most MAX_ATTEMPTS * variants_n draws)."""
    for _ in range(MAX_ATTEMPTS * cfg.variants_n):
        mask = candidate_mask(size, size, cfg, rng)
        if mask.mean() <= cfg.max_tamper_area:
            return (mask > 0.5).astype(np.uint8)
    raise MaskError(f"no mask of configuration {cfg.name!r} covered <= {cfg.max_tamper_area:.0%} of a "
                    f"{size}x{size} image in {MAX_ATTEMPTS * cfg.variants_n} draws")


def _unit_range(images: np.ndarray) -> torch.Tensor:
    """uint8 NHWC -> float NCHW in [-1, 1]."""
    return torch.from_numpy(np.ascontiguousarray(images)).permute(0, 3, 1, 2).float() / 127.5 - 1.0


@dataclass(frozen=True)
class SuperResolution:
    """The low-resolution input of each image: `degradation` to size / factor (the release's ImageNetSR options).
    The U-Net joins it to a latent `upsample` times larger (factor / first-stage f): 1 for LDM-SR on a latent of the
    input's size (bsr_sr: x4 on VQ-f4), 4 for the pixel-space DM of Tab. 11, which reads the input bicubically
    upsampled to the output size as SR3 does."""

    degradation: str
    factor: int
    upsample: int = 1

    def __post_init__(self) -> None:
        if self.degradation not in DEGRADATIONS:
            raise ConditionError(f"conditioning.degradation {self.degradation!r} is not one of {', '.join(DEGRADATIONS)}")
        if self.factor < 1:
            raise ConditionError(f"conditioning.sr_factor must be >= 1, got {self.factor}")

    def make(self, images: np.ndarray, rngs: list[np.random.Generator]) -> dict[str, Any]:
        n, h, w = images.shape[:3]
        if h != w or h % self.factor:
            raise ConditionError(f"super-resolution needs square images whose side is a multiple of {self.factor}; "
                                 f"got {w}x{h}")
        try:
            lowres = np.stack([degrade(images[i], self.degradation, h // self.factor, rngs[i]) for i in range(n)])
        except DegradationError as exc:
            raise ConditionError(str(exc)) from None
        return {"image": _unit_range(images), "lowres": _unit_range(lowres), "lowres_uint8": lowres}

    def concat(self, inputs: dict[str, Any], encode: Callable[[torch.Tensor], torch.Tensor],
               device: torch.device) -> torch.Tensor:
        # the release's cond_stage for bsr_sr is the identity: the U-Net reads the low-resolution image itself
        lowres = inputs["lowres"].to(device)
        if self.upsample == 1:
            return lowres
        return F.interpolate(lowres, scale_factor=self.upsample, mode="bicubic", align_corners=False).clamp(-1, 1)

    def card(self) -> dict[str, Any]:
        return {"task": "superres", "degradation": self.degradation, "factor": self.factor,
                **({"input_upsampled": f"x{self.upsample} bicubic"} if self.upsample > 1 else {})}


@dataclass(frozen=True)
class Inpainting:
    """A mask per image (LaMa's configuration `mask_config`, scaled to the image size) and the masked image."""

    mask_config: str

    def __post_init__(self) -> None:
        if self.mask_config not in LAMA_CONFIGS:
            raise ConditionError(f"conditioning.mask_config {self.mask_config!r} is not one of "
                                 f"{', '.join(LAMA_CONFIGS)} (LaMa's configurations)")

    def make(self, images: np.ndarray, rngs: list[np.random.Generator]) -> dict[str, Any]:
        from replication.models.concat_conditioning import inpainting_inputs

        n, h, w = images.shape[:3]
        if h != w:
            raise ConditionError(f"inpainting masks are drawn on square images; got {w}x{h}")
        cfg = scaled_mask_config(mask_config(self.mask_config), h)
        masks = np.stack([square_mask(h, cfg, rngs[i]) for i in range(n)])
        parts = [inpainting_inputs(images[i], masks[i]) for i in range(n)]
        out: dict[str, Any] = {k: torch.cat([p[k] for p in parts]) for k in ("image", "mask", "masked_image")}
        out["area"] = masks.reshape(n, -1).mean(axis=1).astype(np.float64)
        return out

    def concat(self, inputs: dict[str, Any], encode: Callable[[torch.Tensor], torch.Tensor],
               device: torch.device) -> torch.Tensor:
        from replication.models.concat_conditioning import inpainting_condition

        return inpainting_condition(encode, inputs["masked_image"].to(device), inputs["mask"].to(device))

    def card(self) -> dict[str, Any]:
        return {"task": "inpainting", "mask_config": self.mask_config,
                "masks": f"LaMa random_{self.mask_config}_512 with pixel sizes scaled to the image size"}


TaskConditions = SuperResolution | Inpainting


def task_conditions(conditioning: Any, first_stage_f: int = 0) -> Optional[TaskConditions]:
    """The condition maker of a `conditioning` config section (None for the kinds that take no image);
    `first_stage_f`, the autoencoder's downsampling factor, decides how much a low-resolution input is upsampled to
    the latent's size (0: as large as the latent already)."""
    kind = getattr(conditioning.kind, "value", conditioning.kind)
    if kind == "lowres":
        factor = conditioning.sr_factor
        if first_stage_f and factor % first_stage_f:
            raise ConditionError(f"conditioning.sr_factor={factor}: the low-resolution image is joined to the latent, "
                                 f"so the factor must be a multiple of the autoencoder's downsampling factor "
                                 f"f={first_stage_f}")
        return SuperResolution(conditioning.degradation, factor, factor // first_stage_f if first_stage_f else 1)
    if kind == "masked_image":
        return Inpainting(conditioning.mask_config)
    return None


def training_rngs(generator: torch.Generator, n: int) -> list[np.random.Generator]:
    """One NumPy generator per image of a training batch, seeded from the training loop's torch generator."""
    seeds = torch.randint(0, 2**62, (n,), generator=generator, dtype=torch.int64)
    return [np.random.default_rng(int(s)) for s in seeds]


def evaluation_rngs(seed: int, split: str, indices: np.ndarray) -> list[np.random.Generator]:
    """The fixed generator of each evaluation image: (seed, split, image index)."""
    return [image_seed(seed, f"{split}:{int(i)}") for i in indices]


class EvaluationConditions:
    """Image i of a prepared evaluation split with its fixed condition: sample i of a concat task is made from it.

    `inputs(indices)` gives the condition tensors (and the originals) of those images; `concat(inputs)` the tensor
    the U-Net joins to z_t; `finish(inputs, decoded)` the task's output from the decoded sample (inpainting keeps
    the input outside the hole)."""

    def __init__(self, task: TaskConditions, images: Any, split: str, seed: int,
                 encode: Callable[[torch.Tensor], torch.Tensor], device: torch.device):
        self.task, self.images, self.split, self.seed = task, images, split, seed
        self.encode, self.device = encode, torch.device(device)

    def __len__(self) -> int:
        return len(self.images)

    def check_count(self, num_samples: int) -> None:
        if num_samples > len(self.images):
            raise ConditionError(f"{num_samples} samples asked for, but each sample of a {self.task.card()['task']} "
                                 f"model is made from one evaluation image and the {self.split} split has "
                                 f"{len(self.images)}; lower sampler.num_samples")

    def inputs(self, indices: np.ndarray) -> dict[str, Any]:
        idx = np.asarray(indices, dtype=np.int64)
        return self.task.make(self.images.get_batch(idx), evaluation_rngs(self.seed, self.split, idx))

    def concat(self, inputs: dict[str, Any]) -> torch.Tensor:
        return self.task.concat(inputs, self.encode, self.device)

    def finish(self, inputs: dict[str, Any], decoded: torch.Tensor) -> torch.Tensor:
        if isinstance(self.task, Inpainting):
            from replication.models.concat_conditioning import composite

            device = decoded.device
            return composite(inputs["image"].to(device), inputs["mask"].to(device), decoded) * 2.0 - 1.0
        return decoded
