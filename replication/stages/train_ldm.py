"""Stage 4: train the latent diffusion U-Net on cached latents (paper Sec. 3.3, Eq. 2)."""
from __future__ import annotations

from pathlib import Path
from typing import Any, Optional

import numpy as np
import torch
from omegaconf import DictConfig

from replication.config import CONCAT_KINDS, ConditioningKind, Precision, conditioning_record, to_container
from replication.stages.artifacts import (LDM_EMA, LDM_META, LDM_RAW, LDM_SNAPSHOTS, LDM_STATE_DIR, build_unet,
                                          load_first_stage, num_label_classes)
from replication.stages.context import StageContext, StageError
from replication.stages.entry import hydra_entry
from replication.stages.execute import execute
from replication.utils.io import atomic_write_json, save_tensors

STAGE = "train_ldm"


def _latent_source(ctx: StageContext, first_stage: torch.nn.Module):
    """(num_items, moments_fn(indices, generator) -> moments, labels or None, flip)."""
    dataset = ctx.typed.dataset
    if ctx.typed.trainer.use_latent_cache:
        from replication.data.latents import LatentDataset, card_path

        path = ctx.run_dir / "encode_latents" / "train.latents"
        if not path.exists():
            raise StageError(f"latent cache {path} is missing: run the encode_latents stage first")
        ctx.record_input(card_path(path))
        cache = LatentDataset(path)

        def moments_fn(indices: torch.Tensor, generator: torch.Generator) -> torch.Tensor:
            flip = None
            if cache.has_flips:  # random h-flip p=0.5 as the original loaders, from the cached flipped copy
                flip = torch.rand(len(indices), generator=generator) < 0.5
            return cache.get(indices, flip=flip)

        return len(cache), moments_fn, cache.labels
    from replication.data.prepare import open_prepared
    from replication.data.prepared import to_model_input

    images = open_prepared(dataset, "train")
    ctx.record_input(images.card_path)

    @torch.no_grad()
    def encode_on_the_fly(indices: torch.Tensor, generator: torch.Generator) -> torch.Tensor:
        x = to_model_input(images.get_batch(indices.numpy()))
        if dataset.flip_train:
            mask = torch.rand(x.shape[0], generator=generator) < 0.5
            x[mask] = x[mask].flip(-1)
        return first_stage.encode_moments(x.to(ctx.device)).cpu()

    return len(images), encode_on_the_fly, images.labels


class _ConcatSource:
    """Training examples of a concat task: prepared images (flipped as the dataset says), their first-stage moments
    and a fresh condition per visit (data/conditions.py), all drawn from the training loop's generator."""

    def __init__(self, ctx: StageContext, first_stage: torch.nn.Module, device: torch.device):
        from replication.data.conditions import task_conditions
        from replication.data.prepare import open_prepared

        self.dataset, self.first_stage, self.device = ctx.typed.dataset, first_stage, device
        self.images = open_prepared(self.dataset, "train")
        ctx.record_input(self.images.card_path)
        self.task = task_conditions(ctx.root.conditioning, int(getattr(first_stage, "downsampling_factor", 1)))

    @torch.no_grad()
    def _images(self, indices: torch.Tensor, generator: torch.Generator) -> np.ndarray:
        raw = self.images.get_batch(indices.numpy())
        if self.dataset.flip_train:
            mask = (torch.rand(len(indices), generator=generator) < 0.5).numpy()
            raw = np.where(mask[:, None, None, None], raw[:, :, ::-1], raw)
        return np.ascontiguousarray(raw)

    @torch.no_grad()
    def moments(self, indices: torch.Tensor, generator: torch.Generator) -> torch.Tensor:
        from replication.data.prepared import to_model_input

        x = to_model_input(self._images(indices, generator)).to(self.device)
        return self.first_stage.encode_moments(x).cpu()

    @torch.no_grad()
    def batch(self, indices: torch.Tensor, generator: torch.Generator) -> tuple[torch.Tensor, torch.Tensor]:
        from replication.data.conditions import training_rngs
        from replication.data.prepared import to_model_input

        raw = self._images(indices, generator)
        moments = self.first_stage.encode_moments(to_model_input(raw).to(self.device)).cpu()
        inputs = self.task.make(raw, training_rngs(generator, len(raw)))
        return moments, self.task.concat(inputs, self.first_stage.encode, self.device).cpu()

    def latent_source(self):
        return len(self.images), self.moments, None


class _CaptionSource:
    """Token ids of the training captions (text-to-image): each visit first drops captions to the empty prompt ""
    with conditioning.caption_drop_prob, one draw per caption from the training loop's generator (so a resumed run
    drops the same ones), then tokenizes them as the release's BERTTokenizer (int64 (B, 77))."""

    def __init__(self, captions: list[str], tokenizer: Any, drop_prob: float):
        self.captions, self.tokenizer, self.drop_prob = captions, tokenizer, drop_prob

    def tokens(self, indices: torch.Tensor, generator: torch.Generator) -> torch.Tensor:
        from replication.data.tokenizer import drop_captions

        chosen = [self.captions[i] for i in indices.tolist()]
        return self.tokenizer(drop_captions(chosen, self.drop_prob, generator))


def _caption_source(ctx: StageContext) -> _CaptionSource:
    """The training split's captions, from the latent cache when training reads it (its card records their hash),
    otherwise from the prepared images, with the experiment's tokenizer."""
    from replication.stages.artifacts import caption_tokenizer

    if ctx.typed.trainer.use_latent_cache:
        from replication.data.latents import LatentDataset

        captions = LatentDataset(ctx.run_dir / "encode_latents" / "train.latents").captions
    else:
        from replication.data.prepare import open_prepared

        captions = open_prepared(ctx.typed.dataset, "train").captions
    if captions is None:
        raise StageError(f"conditioning.kind=text but dataset '{ctx.typed.dataset.name}' has no captions (a captioned "
                         "dataset: builtin.captions, or family captioned)")
    tokenizer = caption_tokenizer(ctx.typed)
    ctx.record_input(tokenizer.vocab_path)
    return _CaptionSource(captions, tokenizer, ctx.root.conditioning.caption_drop_prob)


def _import_pretrained(ctx: StageContext) -> dict[str, Any]:
    """Released weights through our pipeline (users re-evaluating the paper's checkpoints, latent-diffusion
    #138/#213): the (EMA) U-Net, the class embedder of cIN models and the stored scale_factor of an original
    .ckpt, checked against our config, including the noise schedule the checkpoint was trained with."""
    from replication.models.compvis import load_compvis_checkpoint, load_released_denoiser

    typed, trainer, diffusion = ctx.typed, ctx.typed.trainer, ctx.typed.diffusion
    path = Path(trainer.pretrained)
    if not path.exists():
        raise StageError(f"trainer.pretrained={path} does not exist")
    ctx.record_input(path)
    model = build_unet(typed)
    scale, used_ema = load_released_denoiser(load_compvis_checkpoint(path), model, diffusion.make_schedule().betas,
                                             diffusion.scale_factor, f"pretrained LDM {path}",
                                             use_ema=trainer.pretrained_use_ema)
    weights = model.state_dict()
    save_tensors(ctx.run_dir / LDM_RAW, weights, metadata={"source": str(path)})
    save_tensors(ctx.run_dir / LDM_EMA, weights, metadata={"source": str(path)})
    meta = {"scale_factor": scale, "steps": None, "imported": str(path), "ema": used_ema,
            "unet": to_container(typed.unet), "diffusion": to_container(diffusion),
            "num_params": sum(p.numel() for p in model.parameters())}
    atomic_write_json(ctx.run_dir / LDM_META, meta)
    return {"mode": f"imported {path}", "scale_factor": scale, "ema": meta["ema"],
            "outputs": [ctx.run_dir / LDM_EMA, ctx.run_dir / LDM_RAW, ctx.run_dir / LDM_META]}


# Trainer settings that may change between a checkpoint and its resume: they leave the trajectory alone (or,
# for batch_size/accumulate_grad_batches, only through the global batch, which is in the key itself).
RESUMABLE_TRAINER_CHANGES = frozenset({
    "steps", "log_every", "ckpt_every", "keep_last_ckpts", "precision", "compile", "compile_mode", "channels_last",
    "fused_adam", "gradient_checkpointing", "pin_memory", "use_latent_cache", "eval_every", "eval_num_samples",
    "allow_world_size_change", "batch_size", "accumulate_grad_batches", "pretrained", "pretrained_use_ema", "source"})


def _resume_key(ctx: StageContext, world_size: int) -> str:
    from replication.stages.fingerprint import resume_key

    trainer = to_container(ctx.typed.trainer)
    unet = {k: v for k, v in to_container(ctx.typed.unet).items() if k != "gradient_checkpointing"}
    trajectory = {"trainer": {k: v for k, v in trainer.items() if k not in RESUMABLE_TRAINER_CHANGES},
                  "global_batch": trainer["batch_size"] * trainer["accumulate_grad_batches"] * world_size,
                  "unet": unet, "diffusion": to_container(ctx.typed.diffusion), "seed": ctx.root.seed,
                  "conditioning": conditioning_record(ctx.root.conditioning)}
    return resume_key(STAGE, ctx.cfg, trajectory)


def _body(ctx: StageContext) -> dict[str, Any]:
    from replication.diffusion.guidance import drop_condition
    from replication.diffusion.lr_schedule import effective_lr
    from replication.models.conditioning import ema_scope
    from replication.models.ema import EMA
    from replication.training.distributed import init_distributed, local_device
    from replication.training.ldm_trainer import LoopSettings, train_loop

    typed, trainer, diffusion = ctx.typed, ctx.typed.trainer, ctx.typed.diffusion
    if trainer.pretrained:
        return _import_pretrained(ctx)
    from replication.config import ConfigError, check_concat_training

    try:
        check_concat_training(typed)
    except ConfigError as exc:
        raise StageError(str(exc)) from None
    dist = init_distributed(ctx.device)
    device = local_device(ctx.device, dist)
    first_stage = load_first_stage(ctx.run_dir, typed, device)
    concat = _ConcatSource(ctx, first_stage, device) if ctx.root.conditioning.kind in CONCAT_KINDS else None
    num_items, moments_fn, labels = _latent_source(ctx, first_stage) if concat is None else concat.latent_source()
    text = _caption_source(ctx) if ctx.root.conditioning.kind is ConditioningKind.text else None
    unet = build_unet(typed).to(device)
    num_classes = num_label_classes(typed)
    if num_classes and labels is None:
        raise StageError(f"unet.num_classes={num_classes} but dataset '{typed.dataset.name}' has no class labels")
    if num_classes:
        labels = torch.as_tensor(labels, dtype=torch.long)  # numpy from the latent cache or the prepared set
        if len(labels) and (int(labels.min()) < 0 or int(labels.max()) >= num_classes):
            raise StageError(f"dataset '{typed.dataset.name}' has labels in [{int(labels.min())}, {int(labels.max())}] "
                             f"but conditioning.num_classes={num_classes} (labels must lie in [0, {num_classes - 1}])")
    schedule = diffusion.make_schedule()  # float64 tables on the CPU; extract() moves what a step reads
    # the U-Net only, as the release's LitEma; a cIN class embedder is used with its raw weights
    ema = EMA(unet, decay=trainer.ema_decay, scope=ema_scope(unet)) if trainer.use_ema else None
    lr = effective_lr(trainer.base_lr, trainer.batch_size, dist.world_size, trainer.accumulate_grad_batches,
                      trainer.scale_lr)

    # scale_by_std (original ddpm.py on_train_batch_start): 1/std of the first batch's latents, computed once and
    # kept in the full-state checkpoint (filled by train_loop: from the checkpoint, or init_extra on a fresh start)
    extra: dict[str, Any] = {}

    from replication.utils.transfer import to_device

    def latents(moments: torch.Tensor, generator: torch.Generator) -> torch.Tensor:
        noise = torch.randn(moments.shape[0], first_stage.latent_channels, *moments.shape[2:], generator=generator)
        return first_stage.latent_from_moments(to_device(moments, device, trainer.pin_memory),
                                               noise=to_device(noise, device, trainer.pin_memory))

    def init_extra() -> dict[str, Any]:
        """Called on a fresh start only (no checkpoint to resume): also drops the Fig. 6 snapshots an earlier
        training of another configuration left, which would otherwise join this run's curve."""
        if dist.is_main and (ctx.run_dir / LDM_SNAPSHOTS).exists():
            import shutil

            shutil.rmtree(ctx.run_dir / LDM_SNAPSHOTS)
        if not diffusion.scale_by_std:
            return {"scale_factor": float(diffusion.scale_factor)}
        from replication.diffusion.objective import scale_by_std_factor

        g = torch.Generator().manual_seed(ctx.root.seed)
        first = torch.arange(min(trainer.batch_size, num_items))
        scale = float(scale_by_std_factor(latents(moments_fn(first, g), g)))
        ctx.stats(event="scale_by_std", scale_factor=scale)
        return {"scale_factor": scale}

    null_class = diffusion.null_class
    if num_classes and diffusion.cond_drop_prob > 0 and null_class is None:
        raise StageError(f"diffusion.cond_drop_prob={diffusion.cond_drop_prob} needs diffusion.null_class (the label "
                         "dropped conditions become; 1000 for class-conditional ImageNet)")
    if num_classes and null_class is not None and null_class < num_classes:
        raise StageError(f"diffusion.null_class={null_class} is one of the {num_classes} real classes; use an index "
                         f">= conditioning.num_classes (the original reserves 1000 for ImageNet's 1000 classes)")

    def batch_fn(indices: torch.Tensor, generator: torch.Generator) -> tuple[torch.Tensor, Optional[torch.Tensor]]:
        if concat is not None:  # the image's moments and its fresh condition, from the same (flipped) images
            moments, cond = concat.batch(indices, generator)
            return latents(moments, generator) * extra["scale_factor"], cond
        z = latents(moments_fn(indices, generator), generator) * extra["scale_factor"]
        if text is not None:  # the captions of these images, some dropped to "", as token ids
            return z, text.tokens(indices, generator)
        cond = None
        if num_classes:
            cond = labels[indices].long()
            if null_class is not None:  # drawn even at p = 0, so the random stream does not depend on p
                cond = drop_condition(cond, null_class, diffusion.cond_drop_prob, generator)
        return z, cond

    snapshots = ctx.run_dir / LDM_SNAPSHOTS

    def on_snapshot(step: int) -> None:
        weights = ema.shadow_module_state(unet) if ema is not None else unet.state_dict()
        save_tensors(snapshots / f"step_{step:09d}.safetensors", weights, metadata={"step": str(step)})

    settings = LoopSettings(
        steps=trainer.steps, batch_size=trainer.batch_size, lr=lr, lr_lambda=diffusion.lr_multiplier(),
        weight_decay=trainer.weight_decay, adam_betas=tuple(trainer.adam_betas), loss_type=diffusion.loss(),
        grad_clip=trainer.grad_clip, log_every=trainer.log_every, ckpt_every=trainer.ckpt_every,
        keep_last=trainer.keep_last_ckpts, seed=ctx.root.seed, bf16=trainer.precision == Precision.bf16,
        channels_last=trainer.channels_last, compile=trainer.compile, compile_mode=trainer.compile_mode,
        fused_adam=trainer.fused_adam, snapshot_every=trainer.eval_every, progress=ctx.progress,
        accumulate=trainer.accumulate_grad_batches,
        ema_every_micro_batch=trainer.ema_every_micro_batch, pin_memory=trainer.pin_memory,
        allow_world_size_change=trainer.allow_world_size_change)
    summary = train_loop(unet, ema, schedule, batch_fn, num_items, settings, ctx.run_dir / LDM_STATE_DIR, ctx.stats,
                         device, dist, extra_state=extra, init_extra=init_extra, on_snapshot=on_snapshot,
                         resume_key=_resume_key(ctx, dist.world_size))
    outputs: list[Path] = []
    if dist.is_main:
        save_tensors(ctx.run_dir / LDM_RAW, unet.state_dict())
        ema_weights = ema.shadow_module_state(unet) if ema is not None else unet.state_dict()
        save_tensors(ctx.run_dir / LDM_EMA, ema_weights)
        meta = {"scale_factor": extra["scale_factor"], "steps": summary["step"], "lr": lr, "world_size": dist.world_size,
                "precision": trainer.precision.value, "trainer": to_container(trainer),
                "ema": ema is not None, "unet": to_container(typed.unet), "diffusion": to_container(diffusion),
                "num_params": sum(p.numel() for p in unet.parameters())}
        if text is not None:  # the sample stage tokenizes its prompts with the same vocabulary, or stops
            from replication.utils.verify import file_sha256

            meta["text"] = {"vocab_sha256": file_sha256(text.tokenizer.vocab_path),
                            "caption_drop_prob": text.drop_prob, "captions": len(text.captions)}
        atomic_write_json(ctx.run_dir / LDM_META, meta)
        outputs = [ctx.run_dir / LDM_EMA, ctx.run_dir / LDM_RAW, ctx.run_dir / LDM_META]
    return {"steps": summary["step"], "resumed_from": summary["resumed_from"], "last_loss": summary["last_loss"],
            "scale_factor": extra["scale_factor"], "lr": lr, "outputs": outputs}


def run(cfg: DictConfig) -> dict[str, Any]:
    return execute(STAGE, cfg, _body)


main = hydra_entry(run)

if __name__ == "__main__":
    main()
