"""Checks made before any stage runs: the output folders are writable, and the disk holds what the whole run will
write (prepared images, latent cache, checkpoints, samples, reference statistics), so a run does not fail hours
in, after the work, at its first checkpoint or its last write. `replication.run` calls `preflight` before its
first stage.
"""
from __future__ import annotations

import logging
import os
import shutil
import sys
import tempfile
from dataclasses import dataclass
from pathlib import Path
from typing import Iterable, Optional

from replication.config import ConfigError, ExperimentKind, TypedConfig
from replication.utils.io import ArtifactError

log = logging.getLogger("replication")

# Images per dataset (train + val) as published, for the prepared-images estimate when `max_images` is unset:
# LSUN church_outdoor 126,227 and bedroom 3,033,042 (LSUN LMDB exports), FFHQ 70,000, CelebA-HQ 30,000,
# ImageNet ILSVRC2012 1,281,167 train + 50,000 val.
DATASET_IMAGES = {"lsun_churches": 126_227, "lsun_bedrooms": 3_033_042, "ffhq": 70_000, "celebahq": 30_000,
                  "imagenet": 1_331_167}
FLOAT32 = 4
# full-state checkpoint: weights plus AdamW's two moment buffers (the optimizer state of torch.optim.Adam/AdamW)
ADAM_STATE_COPIES = 3
AE_KEEP_LAST = 2  # full states the autoencoder trainer keeps (train_autoencoder_loop's keep_last)
INCEPTION_DIM = 2048
MARGIN = 1.1  # file headers, logs, manifests, temporary files of atomic writes


@dataclass
class Need:
    what: str
    folder: Path  # where it is written (the filesystem whose free space counts)
    nbytes: int


def _gib(n: float) -> str:
    return f"{n / 2**30:.3f} GiB"


# ---------------------------------------------------------------------------------------------- writable roots

def output_roots(typed: TypedConfig) -> list[tuple[str, Path]]:
    """(config key, folder) of every folder the selected stages write into."""
    root = typed.root
    stages = set(root.stages)
    roots = [("runs_root", Path(root.runs_root))]
    if "report" in stages:
        roots.append(("reports_dir", Path(root.reports_dir)))
    if "prepare" in stages:
        dataset = typed.dataset
        roots.append(("dataset.prepared_dir", Path(dataset.prepared_dir)))
        if dataset.download.files:  # raw files are fetched into dataset.root, under data_root
            roots.append(("data_root", Path(root.data_root)))
    if "evaluate" in stages:
        roots.append(("metrics.reference_cache_dir", Path(typed.metrics.reference_cache_dir)))
    return roots


def check_writable(folder: str | os.PathLike, key: str) -> None:
    """Create `folder` (the run would) and write and remove a probe file in it; ConfigError naming `key` and the
    reason otherwise. A probe, not os.access: root passes every permission check, yet cannot write in /proc or
    on a read-only mount."""
    folder = Path(folder)
    blocker = next((p for p in (folder, *folder.parents) if p.exists() and not p.is_dir()), None)
    if blocker is not None:
        raise ConfigError(f"{key}={str(folder)!r} is not writable: {str(blocker)!r} is a file, not a folder")
    try:
        folder.mkdir(parents=True, exist_ok=True)
        fd, probe = tempfile.mkstemp(prefix=".write_probe_", dir=folder)
        os.close(fd)
        os.unlink(probe)
    except OSError as exc:
        reason = exc.strerror or type(exc).__name__
        raise ConfigError(f"{key}={str(folder)!r} is not writable: {reason}") from None


def check_output_roots(typed: TypedConfig) -> None:
    for key, folder in output_roots(typed):
        check_writable(folder, key)


# ------------------------------------------------------------------------------------------------ disk estimate

def _param_count(build) -> int:
    """Parameters of the module `build()` makes, built on the meta device (no memory, no initialisation)."""
    import torch

    with torch.device("meta"):
        module = build()
    return sum(p.numel() for p in module.parameters())


def autoencoder_params(ae_cfg) -> tuple[int, int]:
    """(autoencoder, discriminator) parameter counts."""
    from replication.models.autoencoder import make_first_stage
    from replication.models.discriminator import NLayerDiscriminator

    model = _param_count(lambda: make_first_stage(ae_cfg.kind, ae_cfg.ddconfig, ae_cfg.embed_dim, ae_cfg.n_embed))
    disc = 0
    if ae_cfg.loss is not None:  # a few million parameters: built on the CPU, since its normal_() initialisation
        # on the meta device would import torch._dynamo (seconds)
        module = NLayerDiscriminator(input_nc=ae_cfg.loss.disc_in_channels, n_layers=ae_cfg.loss.disc_num_layers)
        disc = sum(p.numel() for p in module.parameters())
    return model, disc


def unet_params(typed: TypedConfig) -> int:
    from replication.models.unet_config import build_unet

    return _param_count(lambda: build_unet(typed.unet))


def _prepared_images(dataset) -> Optional[int]:
    """Images the prepare stage writes (train + val), None when unknown."""
    if dataset.family.value == "builtin":
        n_train, n_val = dataset.builtin.num_train, dataset.builtin.num_val
        if dataset.max_images is not None:
            n_train, n_val = min(n_train, dataset.max_images), min(n_val, dataset.max_images)
        return n_train + n_val
    total = DATASET_IMAGES.get(dataset.name)
    if dataset.max_images is not None:
        return 2 * dataset.max_images if total is None else min(total, 2 * dataset.max_images)
    return total


def _train_images(dataset) -> Optional[int]:
    if dataset.family.value == "builtin":
        n = dataset.builtin.num_train
        return n if dataset.max_images is None else min(n, dataset.max_images)
    total = DATASET_IMAGES.get(dataset.name)  # train + val: an upper bound of the training split
    if dataset.max_images is not None:
        return dataset.max_images if total is None else min(total, dataset.max_images)
    return total


def _kept_states(steps: int, every: int, keep_last: int) -> int:
    """Full-state checkpoints left on disk: one every `every` steps and one at the end, the newest `keep_last`."""
    return max(1, min(keep_last, -(-steps // every)))


def _stage_done(root, stage: str) -> bool:
    return (Path(root.runs_root) / root.name / stage / "done.json").is_file()


def estimate_disk_needs(typed: TypedConfig) -> list[Need]:
    """What the stages still to run will write, part by part (bytes, before MARGIN). A stage whose done.json
    exists, or that reuses another run's folder, writes nothing new and is left out; prepared images already in
    `dataset.prepared_dir` too."""
    from replication.models.autoencoder_config import AEKind, downsampling_factor, needs_training

    root, dataset, ae = typed.root, typed.dataset, typed.autoencoder
    stages = set(root.stages)
    if root.kind == ExperimentKind.autoencoder:
        stages &= {"prepare", "train_autoencoder", "evaluate", "report"}
    run_dir = Path(root.runs_root) / root.name
    n_train = _train_images(dataset)
    reused = Path(root.runs_root) / root.reuse_from if root.reuse_from else None

    def todo(stage: str) -> bool:
        if stage not in stages or _stage_done(root, stage):
            return False
        return not (reused is not None and (reused / stage / "done.json").is_file())

    side = dataset.resolution
    image_bytes = side * side * 3
    needs: list[Need] = []
    n_prepared = _prepared_images(dataset)
    already_prepared = any(Path(dataset.prepared_dir).glob("*/images.npy"))
    if todo("prepare") and not already_prepared:
        if n_prepared is None:
            log.warning("preflight: the number of images of dataset %r is not known (set dataset.max_images to "
                        "include the prepared images in the disk estimate)", dataset.name)
        else:
            needs.append(Need(f"prepared images ({n_prepared} x {side}x{side}x3)", Path(dataset.prepared_dir),
                              n_prepared * image_bytes))
    if todo("train_autoencoder") and needs_training(ae):
        model, disc = autoencoder_params(ae)
        states = _kept_states(ae.train.steps, ae.train.ckpt_every, AE_KEEP_LAST)
        needs.append(Need(f"autoencoder weights and {states} checkpoint(s) ({model:,} + {disc:,} discriminator "
                          "parameters)", run_dir, (model + states * ADAM_STATE_COPIES * (model + disc)) * FLOAT32))
    elif todo("train_autoencoder") and ae.pretrained is not None:  # imported weights are saved as safetensors
        model, _ = autoencoder_params(ae)
        needs.append(Need(f"imported autoencoder weights ({model:,} parameters)", run_dir, model * FLOAT32))
    if root.kind == ExperimentKind.ldm:
        trainer, sampler = typed.trainer, typed.sampler
        f = downsampling_factor(ae)
        latent_side = side // f
        if todo("encode_latents") and trainer.use_latent_cache and n_train is not None:
            channels = 2 * ae.embed_dim if ae.kind is AEKind.kl else ae.embed_dim
            flips = 2 if dataset.flip_train else 1
            needs.append(Need(f"latent cache ({n_train} x {flips} flip(s) x {channels}x{latent_side}x{latent_side} "
                              "float32)", run_dir, n_train * flips * channels * latent_side ** 2 * FLOAT32))
        if todo("train_ldm") and trainer.pretrained is not None:  # imported U-Net saved as raw and EMA weights
            params = unet_params(typed)
            needs.append(Need(f"imported LDM weights ({params:,} parameters)", run_dir, 2 * params * FLOAT32))
        elif todo("train_ldm"):
            params = unet_params(typed)
            weights = params * FLOAT32
            state_copies = ADAM_STATE_COPIES + (1 if trainer.use_ema else 0)
            states = _kept_states(trainer.steps, trainer.ckpt_every, trainer.keep_last_ckpts)
            snapshots = trainer.steps // trainer.eval_every if trainer.eval_every > 0 else 0
            needs.append(Need(f"LDM weights, {states} checkpoint(s) and {snapshots} snapshot(s) "
                              f"({params:,} parameters)", run_dir, weights * (2 + states * state_copies + snapshots)))
        if todo("sample"):
            n = sampler.num_samples + len(root.curves.ddim_steps) * root.curves.num_samples
            if trainer.eval_every > 0:
                n += (trainer.steps // trainer.eval_every) * trainer.eval_num_samples
            needs.append(Need(f"samples ({n} x {side}x{side}x3)", run_dir, n * image_bytes))
    if todo("evaluate"):
        from replication.metrics.reference import stats_nbytes

        m = typed.metrics
        rows = m.pr_reference_images if n_train is None else min(m.pr_reference_images, n_train)
        needs.append(Need("reference statistics", Path(m.reference_cache_dir), stats_nbytes(INCEPTION_DIM, rows)))
    return needs


def _free_bytes(folder: Path) -> tuple[Path, int, int]:
    """(existing folder probed, its device id, free bytes) for `folder` or its nearest existing parent."""
    probe = next((p for p in (folder, *folder.parents) if p.exists()), Path("."))
    return probe, os.stat(probe).st_dev, shutil.disk_usage(probe).free


def check_disk(needs: Iterable[Need]) -> None:
    """ArtifactError (one line) when the needs that share a filesystem exceed its free space (times MARGIN)."""
    by_device: dict[int, tuple[Path, int, list[Need]]] = {}
    for need in needs:
        probe, dev, free = _free_bytes(need.folder)
        by_device.setdefault(dev, (probe, free, []))[2].append(need)
    for probe, free, group in by_device.values():
        total = int(sum(n.nbytes for n in group) * MARGIN)
        if total > free:
            parts = ", ".join(f"{n.what} {_gib(n.nbytes)}" for n in group)
            raise ArtifactError(f"not enough free disk space at {probe}: this run needs about {_gib(total)} "
                                f"({parts}, plus {MARGIN - 1:.0%}), {_gib(free)} is free")


def describe(needs: list[Need]) -> str:
    total = sum(n.nbytes for n in needs)
    lines = [f"disk estimate: {_gib(total)} in all (checked with a {MARGIN - 1:.0%} margin)"]
    lines += [f"  {n.what}: {_gib(n.nbytes)} under {n.folder}" for n in needs]
    return "\n".join(lines)


def preflight(typed: TypedConfig, out=None) -> list[Need]:
    """Settings the stages would refuse first, then writable output folders, then the disk estimate printed (to `out`,
    default stderr; by the first process only under torchrun) and checked."""
    from replication.config import check_concat_training

    if "train_ldm" in typed.root.stages:
        check_concat_training(typed)
    check_output_roots(typed)
    needs = estimate_disk_needs(typed)
    if needs and os.environ.get("RANK", "0") == "0":
        print(describe(needs), file=out or sys.stderr, flush=True)
    check_disk(needs)
    return needs


def check_cli_overrides(argv: list[str]) -> Optional[str]:
    """The one-line error `python -m replication.run <argv>` would end with for a bad config, before Hydra creates
    its run folder (`${runs_root}/${name}/hydra/...`) from `name` and `runs_root`; None when the config validates
    and its folders are writable, or when argv holds Hydra flags (multirun, --cfg, --help: Hydra handles those)."""
    if any(arg.startswith("-") for arg in argv):
        return None
    from replication.config import validate_config
    from replication.stages.entry import compose

    try:
        cfg = compose(argv)
    except Exception:  # noqa: BLE001 (an override Hydra cannot compose: Hydra reports it itself when it runs)
        return None
    try:
        typed = validate_config(cfg)
        check_output_roots(typed)
    except (ConfigError, ArtifactError) as exc:
        return f"error ({type(exc).__name__}): {exc}"
    return None
