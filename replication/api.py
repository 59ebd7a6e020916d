"""The Python API for the most common use: load a released (or this harness's own) latent diffusion model and
sample images from it, without a run folder or a stage.

    from replication import load_pretrained, sample
    model = load_pretrained("lsun_churches")            # a zoo name, a released .ckpt, or a run folder
    images = sample(model, num_samples=4, seed=0)       # uint8, (4, H, W, 3)

`load_pretrained` builds the networks an experiment config describes (experiments/experiment/<name>.yaml,
composed as the stages compose it) and fills them with the checkpoint's tensors through the tensors-only
importer (`replication.models.compvis`): every name and shape is checked, and so is the noise schedule the
checkpoint was trained with. `sample` is the sample stage's generator (`replication.stages.sample.Generator`):
sample i always starts from seed `seed + i`, so an image does not depend on the batch it was made in.
"""
from __future__ import annotations

import dataclasses
import os
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Any, Iterable, Optional, Sequence, Union

import numpy as np
import torch
from torch import nn

from replication.pretrained import CHECKPOINT_FILE, EXPERIMENT_DIR, PretrainedError, fetch, read_zoo, zoo_entry

if TYPE_CHECKING:
    from replication.config import TypedConfig

LDM_STAGES = ("train_autoencoder", "train_ldm")
RUN_CONFIG = "config.yaml"


@dataclass
class Pretrained:
    """Networks ready to sample, on `device`, in eval mode without gradients.

    autoencoder: the first stage (`FirstStage`: encode_moments / decode).
    denoiser:    eps(x, t[, y]): the U-Net, for class-conditional models wrapped with its class embedder
                 (`ClassConditionalUNet`); None for a first-stage-only experiment.
    schedule:    the diffusion schedule of the experiment (checked against the checkpoint's betas).
    scale_factor: latents are divided by it before decoding (the checkpoint's, else the config's).
    sampler:     the experiment's sampler settings, the defaults of `sample`.
    config:      the validated config, every group typed (`replication.config.validate_config`).
    experiment:  the experiment the networks were built from; source: the checkpoint or run folder loaded.
    ema:         whether the U-Net holds the EMA weights.
    """

    autoencoder: nn.Module = field(repr=False)
    denoiser: Optional[nn.Module] = field(repr=False)
    schedule: Any = field(repr=False)
    scale_factor: float
    sampler: Any
    config: TypedConfig = field(repr=False)
    experiment: str
    source: str
    ema: bool
    device: torch.device
    _generator: Any = field(default=None, init=False, repr=False, compare=False)

    @property
    def unet(self) -> Optional[nn.Module]:
        """The U-Net alone (`UNetModel`)."""
        return getattr(self.denoiser, "diffusion_model", self.denoiser)

    @property
    def cond_stage(self) -> Optional[nn.Module]:
        """The conditioning model (`ClassEmbedder` of class-conditional models), None for unconditional ones."""
        return getattr(self.denoiser, "cond_stage_model", None)

    @property
    def num_classes(self) -> Optional[int]:
        """How many classes `sample` takes as labels (None: unconditional)."""
        from replication.stages.artifacts import num_label_classes

        return num_label_classes(self.config) if self.denoiser is not None else None


def load_pretrained(checkpoint: Union[str, os.PathLike], experiment: Optional[str] = None, ema: bool = True,
                    device: Union[str, torch.device] = "cpu", overrides: Iterable[str] = (),
                    cache_dir: Union[str, os.PathLike, None] = None, zoo: Union[str, os.PathLike, None] = None,
                    progress: bool = True) -> Pretrained:
    """Networks ready to sample from one of:

    - the NAME of a zoo model (experiments/zoo.csv, or `zoo`): downloaded on first use into `cache_dir`, verified,
      and built by the experiment its row names (`experiment` overrides it);
    - a released checkpoint (a Lightning `.ckpt` with `model.diffusion_model.*`, `model_ema.*`,
      `first_stage_model.*`, `cond_stage_model.*`, `scale_factor`; for a first-stage experiment the release's
      autoencoder `.ckpt`), or the folder holding its `model.ckpt`: `experiment` names the config to build;
    - a run folder of this harness (`runs/<name>`, after train_ldm; after train_autoencoder for a first-stage
      experiment): its weights are verified against the stages' records and built from the run's own
      config.yaml, or from `experiment` when given.

    `ema`: the U-Net's EMA weights (the release's evaluation weights) or the raw ones; a checkpoint without the
    asked-for weights is refused. `overrides`: Hydra overrides applied to the experiment (`sampler.steps=50`);
    with a run folder's own config, `key=value` settings. `device`: "cpu", "cuda", "cuda:1" or "auto".
    """
    from replication.stages.context import resolve_device

    path, experiment = _locate(checkpoint, experiment, cache_dir, zoo, progress)
    run_dir = path if path.is_dir() else None
    typed = _config(experiment, list(overrides), run_dir)
    dev = resolve_device(str(device))
    if run_dir is not None:
        first_stage, denoiser, scale, ema_used = _from_run(run_dir, typed, ema, dev)
    else:
        first_stage, denoiser, scale, ema_used = _from_release(path, typed, ema)
    first_stage = first_stage.to(dev).eval().requires_grad_(False)
    if denoiser is not None:
        denoiser = denoiser.to(dev).eval().requires_grad_(False)
    is_ldm = denoiser is not None
    root = typed.root
    return Pretrained(autoencoder=first_stage, denoiser=denoiser,
                      schedule=typed.diffusion.make_schedule() if is_ldm else None, scale_factor=scale,
                      sampler=typed.sampler if is_ldm else None, config=typed,
                      experiment=experiment or root.choices.get("experiment", root.name), source=str(path),
                      ema=ema_used, device=dev)


def sample(pretrained: Pretrained, num_samples: int, seed: int = 0,
           class_labels: Union[int, Sequence[int], np.ndarray, None] = None, steps: Optional[int] = None,
           eta: Optional[float] = None, guidance_scale: Optional[float] = None, batch_size: Optional[int] = None,
           progress: bool = True) -> np.ndarray:
    """`num_samples` images as uint8 NHWC numpy, sample i from seed `seed + i` (as the sample stage: the same
    image whatever `batch_size`, up to float rounding of a grey level).

    `class_labels`: one class for all samples or one per sample; default for class-conditional models: sample
    i has class i % num_classes (the sample stage's balanced labels). `steps`, `eta`, `guidance_scale`,
    `batch_size` default to the experiment's sampler settings (`pretrained.sampler`) and are checked as those.
    """
    from replication.diffusion.config import validate_sampler_cfg
    from replication.stages.sample import Generator
    from replication.utils.progress import ProgressLog

    if pretrained.denoiser is None:
        raise PretrainedError(f"{pretrained.source} loaded as experiment {pretrained.experiment!r}, a first stage "
                              "alone: there is no U-Net to sample from (use pretrained.autoencoder to encode/decode)")
    from replication.config import CONCAT_KINDS

    kind = pretrained.config.root.conditioning.kind
    if kind in CONCAT_KINDS:
        raise PretrainedError(f"{pretrained.experiment!r} is conditioned on an image ({kind.value}): each result is made "
                              "from an input image; use replication.superres.upscale / replication.inpaint.inpaint_image, "
                              "or python -m replication.superres / python -m replication.inpaint")
    if num_samples < 1:
        raise ValueError(f"num_samples must be >= 1, got {num_samples}")
    asked = {"seed": seed, "steps": steps, "eta": eta, "guidance_scale": guidance_scale, "batch_size": batch_size}
    settings = {**dataclasses.asdict(pretrained.sampler), **{k: v for k, v in asked.items() if v is not None}}
    sampler = validate_sampler_cfg(settings, num_timesteps=pretrained.schedule.num_timesteps)
    labels = _labels(class_labels, num_samples, pretrained.num_classes)
    if pretrained._generator is None:
        pretrained._generator = Generator(pretrained.denoiser, pretrained.autoencoder, pretrained.scale_factor,
                                          pretrained.config, pretrained.device)
    gen = pretrained._generator
    gen.typed = dataclasses.replace(pretrained.config, sampler=sampler)  # read by the generator at each call
    parts = []
    with ProgressLog("sample", total=num_samples, unit="img", bar=progress) as bar:
        for start in range(0, num_samples, sampler.batch_size):
            idx = np.arange(start, min(num_samples, start + sampler.batch_size))
            parts.append(gen(idx, sampler.steps, labels=None if labels is None else labels[idx]))
            bar.update(len(idx))
    return np.concatenate(parts)


def _labels(class_labels: Union[int, Sequence[int], np.ndarray, None], num_samples: int,
            num_classes: Optional[int]) -> Optional[np.ndarray]:
    if class_labels is None:
        return None
    if not num_classes:
        raise ValueError("class_labels given, but this model is unconditional")
    labels = np.asarray(class_labels)
    if labels.ndim == 0:
        labels = np.full(num_samples, int(labels))
    if labels.shape != (num_samples,) or not np.issubdtype(labels.dtype, np.integer):
        raise ValueError(f"class_labels must be one integer or {num_samples} integers, got {class_labels!r}")
    if labels.min() < 0 or labels.max() >= num_classes:
        raise ValueError(f"class_labels must lie in [0, {num_classes}), got {labels.min()}..{labels.max()}")
    return labels.astype(np.int64)


def _locate(checkpoint: Union[str, os.PathLike], experiment: Optional[str], cache_dir, zoo,
            progress: bool) -> tuple[Path, Optional[str]]:
    """(checkpoint file or run folder, experiment): a zoo name is fetched and brings its row's experiment."""
    path = Path(checkpoint)
    if path.exists():
        if path.is_dir() and not (path / RUN_CONFIG).is_file():
            if not (path / CHECKPOINT_FILE).is_file():
                raise PretrainedError(f"{path} is neither a run folder ({RUN_CONFIG}, {', '.join(LDM_STAGES)}) nor "
                                      f"a folder with a released {CHECKPOINT_FILE}")
            path = path / CHECKPOINT_FILE
        if path.is_file() and experiment is None:
            raise PretrainedError(f"{path}: name the experiment that builds its networks (experiment=..., one of "
                                  f"experiments/experiment/); a checkpoint holds weights, not the architecture")
        return path, experiment
    names = read_zoo(zoo)
    if str(checkpoint) not in names:
        raise PretrainedError(f"{checkpoint} is neither an existing file or folder nor a model of the zoo "
                              f"(zoo models: {', '.join(names)})")
    entry = zoo_entry(str(checkpoint), zoo)
    experiment = experiment or entry.experiment
    if experiment is None:
        raise PretrainedError(f"zoo model {entry.name!r} has no experiment in this harness yet ({entry.notes}); "
                              "pass experiment=NAME of a config that builds its networks")
    return fetch(entry, cache_dir=cache_dir, progress=progress), experiment


def _config(experiment: Optional[str], overrides: list[str], run_dir: Optional[Path]) -> TypedConfig:
    from omegaconf import OmegaConf

    from replication.config import validate_config
    from replication.stages.entry import compose

    if experiment is not None:
        if not (EXPERIMENT_DIR / f"{experiment}.yaml").is_file():
            known = sorted(p.stem for p in EXPERIMENT_DIR.glob("*.yaml"))
            raise PretrainedError(f"experiment {experiment!r} is not in {EXPERIMENT_DIR}; known: {', '.join(known)}")
        return validate_config(compose([f"experiment={experiment}", *overrides]))
    cfg = OmegaConf.load(run_dir / RUN_CONFIG)
    return validate_config(OmegaConf.merge(cfg, OmegaConf.from_dotlist(overrides)) if overrides else cfg)


def _from_release(path: Path, typed: TypedConfig, ema: bool):
    """(first stage, denoiser or None, scale_factor, EMA weights used) from a released checkpoint's tensors."""
    from replication.config import ExperimentKind
    from replication.models.autoencoder import load_first_stage_state
    from replication.models.compvis import FIRST_STAGE_PREFIX, load_compvis_checkpoint, load_released_denoiser
    from replication.stages.artifacts import build_first_stage, build_unet

    sd = load_compvis_checkpoint(path)
    first_stage = build_first_stage(typed)
    if any(True for _ in first_stage.parameters()):
        prefix = FIRST_STAGE_PREFIX if any(k.startswith(FIRST_STAGE_PREFIX) for k in sd) else ""
        load_first_stage_state(first_stage, sd, prefix=prefix)
    if typed.root.kind is ExperimentKind.autoencoder:
        return first_stage, None, 1.0, False
    denoiser = build_unet(typed)
    scale, _ = load_released_denoiser(sd, denoiser, typed.diffusion.make_schedule().betas, typed.diffusion.scale_factor,
                                      str(path), use_ema=ema, require_ema=True)
    return first_stage, denoiser, scale, ema


def _from_run(run_dir: Path, typed: TypedConfig, ema: bool, device: torch.device):
    """(first stage, denoiser or None, scale_factor, EMA weights used) from a run folder, its files verified."""
    from replication.config import ExperimentKind
    from replication.stages.artifacts import load_first_stage, load_ldm
    from replication.utils.io import read_json
    from replication.utils.verify import verify_records

    is_ldm = typed.root.kind is not ExperimentKind.autoencoder
    for stage in LDM_STAGES if is_ldm else LDM_STAGES[:1]:
        done = run_dir / stage / "done.json"
        if not done.is_file():
            raise PretrainedError(f"{run_dir}: stage {stage} has not finished ({done} is missing)")
        problems = verify_records(read_json(done).get("files", {}), full=True, root=run_dir.parent)
        if problems:
            raise PretrainedError(f"{run_dir}: files of stage {stage} differ from what it wrote, not loaded: "
                                  + "; ".join(problems))
    first_stage = load_first_stage(run_dir, typed, device)
    if not is_ldm:
        return first_stage, None, 1.0, False
    denoiser, meta = load_ldm(run_dir, typed, device, use_ema=ema)
    holds_ema = bool(meta.get("ema"))
    if "imported" in meta and ema != holds_ema:  # an import writes the one set of weights it took to both files
        raise PretrainedError(f"{run_dir} imported the {'EMA' if holds_ema else 'raw'} weights of "
                              f"{meta['imported']} only: load it with ema={holds_ema}")
    if ema and not holds_ema:
        raise PretrainedError(f"{run_dir} was trained without an EMA (trainer.use_ema=false): load it with ema=False")
    return first_stage, denoiser, float(meta["scale_factor"]), ema
