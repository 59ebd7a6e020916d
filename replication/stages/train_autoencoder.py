"""Stage 2: train the first stage (or import released / our own weights when `autoencoder.pretrained` is set)."""
from __future__ import annotations

from pathlib import Path
from typing import Any

import torch
from omegaconf import DictConfig

from replication.config import to_container
from replication.stages.artifacts import AE_META, AE_WEIGHTS, build_first_stage
from replication.stages.context import StageContext, StageError
from replication.stages.entry import hydra_entry
from replication.stages.execute import execute
from replication.utils.io import atomic_write_json, load_tensors, save_tensors

STAGE = "train_autoencoder"


def _import_pretrained(path: Path, model: torch.nn.Module) -> None:
    from replication.models.autoencoder import load_first_stage_state
    from replication.models.compvis import load_compvis_checkpoint

    # our safetensors export, a stand-alone released autoencoder, or the first stage inside a released LDM
    state = load_tensors(path) if path.suffix == ".safetensors" else load_compvis_checkpoint(path)
    prefix = "first_stage_model." if any(k.startswith("first_stage_model.") for k in state) else ""
    load_first_stage_state(model, state, prefix=prefix)


def _resume_key(ctx: StageContext) -> str:
    """Everything of the autoencoder config but the step count, logging and checkpoint cadence, the seed and the
    prepared data's run id: a checkpoint of another configuration is not resumed (see load_resumable_state)."""
    from replication.stages.fingerprint import resume_key

    cfg = to_container(ctx.typed.autoencoder)
    cfg["train"] = {k: v for k, v in cfg["train"].items() if k not in ("steps", "log_every", "ckpt_every")}
    return resume_key(STAGE, ctx.cfg, {"autoencoder": cfg, "seed": ctx.root.seed})


def _body(ctx: StageContext) -> dict[str, Any]:
    from replication.data.prepare import open_prepared

    ae_cfg = ctx.typed.autoencoder
    model = build_first_stage(ctx.typed)
    out = ctx.run_dir / AE_WEIGHTS
    has_params = any(True for _ in model.parameters())
    result: dict[str, Any] = {"autoencoder": ae_cfg.name, "kind": str(ae_cfg.kind.value)}
    if not has_params:
        result["mode"] = "identity (no parameters)"
    elif ae_cfg.pretrained:
        path = Path(ae_cfg.pretrained)
        if not path.exists():
            raise StageError(f"autoencoder.pretrained={path} does not exist. Download the released weights "
                             f"(reports/paper/autoencoders.csv, column link_filename) or unset it to train.")
        ctx.record_input(path)
        _import_pretrained(path, model)
        result["mode"] = f"imported {path}"
    else:
        from replication.data.prepared import to_model_input
        from replication.models.autoencoder_config import learning_rate
        from replication.models.losses import AutoencoderLoss
        from replication.training.ae_trainer import train_autoencoder_loop

        images = open_prepared(ctx.typed.dataset, "train")
        ctx.record_input(images.card_path)
        train = ae_cfg.train
        model = model.to(ctx.device)
        loss_fn = AutoencoderLoss.from_config(ae_cfg.kind, ae_cfg.loss).to(ctx.device)
        lr = learning_rate(train, 1)

        def images_fn(indices: torch.Tensor, generator: torch.Generator) -> torch.Tensor:
            batch = images.get_batch(indices.numpy())
            flip = ctx.typed.dataset.flip_train
            x = to_model_input(batch)
            if flip:
                mask = torch.rand(x.shape[0], generator=generator) < 0.5
                x[mask] = x[mask].flip(-1)
            return x

        summary = train_autoencoder_loop(
            model, loss_fn, images_fn, len(images), train.steps, train.batch_size, lr, tuple(train.adam_betas),
            ctx.root.seed, ctx.stage_dir / "state", ctx.stats, ctx.device, train.log_every, train.ckpt_every,
            progress=ctx.progress, train_logvar=train.train_logvar, accumulate=train.accumulate_grad_batches,
            disc_fresh_forward=train.disc_fresh_forward, resume_key=_resume_key(ctx),
            pin_memory=ctx.typed.trainer.pin_memory)  # the input-copy lever of all stages (trainer group)
        result.update(mode="trained", steps=summary["step"], last_loss=summary["last_loss"], lr=lr,
                      perceptual=getattr(loss_fn, "lpips_backbone", "n/a"))
    if has_params:
        save_tensors(out, model.state_dict(), metadata={"autoencoder": ae_cfg.name})
    # what the weights are, not how this run went (the last loss of a run resumed at its end is not a property of
    # the weights): a rerun that re-makes the same weights leaves this file, and so the stage's content id, as is
    atomic_write_json(ctx.run_dir / AE_META, {"config": to_container(ae_cfg),
                                             **{k: v for k, v in result.items() if k != "last_loss"}})
    result["outputs"] = [ctx.run_dir / AE_META] + ([out] if has_params else [])
    return result


def run(cfg: DictConfig) -> dict[str, Any]:
    return execute(STAGE, cfg, _body)


main = hydra_entry(run)

if __name__ == "__main__":
    main()
