"""Stage: train the noisy-latent classifier of classifier guidance (LDM-8-G, paper Tab. 10; App. D.4: a classifier
"trained on noisy latents at every noise scale"), after the LDM: it reads the encode_latents cache (moments and
class labels) and the trained LDM's scale_factor, so the classifier sees z_t exactly as the sampler makes it.

With classifier=none the stage does nothing and records itself disabled. The weights and their settings are
written atomically (a killed run leaves no half file, and done.json, written last, makes the stage finished); a
killed run trains again from the start."""
from __future__ import annotations

import itertools
from typing import Any, Iterator

import numpy as np
import torch
from omegaconf import DictConfig

from replication.config import to_container
from replication.stages.artifacts import CLASSIFIER_META, CLASSIFIER_WEIGHTS, LDM_META, load_first_stage
from replication.stages.context import StageContext, StageError
from replication.stages.entry import hydra_entry
from replication.stages.execute import execute
from replication.utils.io import atomic_write_json, read_json, save_tensors

STAGE = "train_classifier"


def latent_batches(cache: Any, first_stage: torch.nn.Module, scale_factor: float, batch_size: int, seed: int,
                   device: torch.device) -> Iterator[tuple[torch.Tensor, torch.Tensor]]:
    """Endless (z0, labels) batches from a latent cache (`replication.data.latents.LatentDataset`), epoch after
    epoch: each epoch's order and flips fixed by (seed, epoch), a fresh posterior sample of each KL latent (as
    train_ldm draws them), times `scale_factor`: the latents the LDM was trained on and samples."""
    generator = torch.Generator().manual_seed(seed)
    for epoch in itertools.count():
        for batch in cache.iter_batches(batch_size, shuffle=True, flip=True, seed=seed, epoch=epoch):
            moments = batch["moments"]
            noise = torch.randn(moments.shape[0], first_stage.latent_channels, *moments.shape[2:], generator=generator)
            with torch.no_grad():
                z0 = first_stage.latent_from_moments(moments.to(device), noise=noise.to(device)) * scale_factor
            yield z0, torch.as_tensor(np.asarray(batch["labels"]), dtype=torch.long)


def _open_cache(ctx: StageContext):
    from replication.data.latents import LatentDataset, card_path

    path = ctx.run_dir / "encode_latents" / "train.latents"
    if not path.exists():
        raise StageError(f"latent cache {path} is missing: run the encode_latents stage first")
    ctx.record_input(card_path(path))
    cache = LatentDataset(path)
    num_classes = ctx.typed.classifier.model.num_classes
    if cache.labels is None:
        raise StageError(f"the classifier learns class labels, and dataset '{ctx.typed.dataset.name}' has none")
    if len(cache) == 0:
        raise StageError(f"latent cache {path} holds no latents")
    if int(cache.labels.min()) < 0 or int(cache.labels.max()) >= num_classes:
        raise StageError(f"dataset '{ctx.typed.dataset.name}' has labels in [{int(cache.labels.min())}, "
                         f"{int(cache.labels.max())}] but classifier.model.num_classes={num_classes}")
    return cache


def _body(ctx: StageContext) -> dict[str, Any]:
    from replication.models.noisy_classifier import build_noisy_classifier
    from replication.training.classifier_trainer import train_classifier
    from replication.utils.progress import ProgressLog

    group = ctx.typed.classifier
    if not group.enabled:
        return {"mode": "disabled (classifier=none): no classifier guidance", "outputs": []}
    cache = _open_cache(ctx)
    meta_path = ctx.run_dir / LDM_META
    if not meta_path.exists():
        raise StageError(f"{meta_path} is missing: the classifier takes the trained LDM's scale_factor; run the "
                         "train_ldm stage first")
    ctx.record_input(meta_path)
    scale_factor = float(read_json(meta_path)["scale_factor"])
    first_stage = load_first_stage(ctx.run_dir, ctx.typed, ctx.device)
    classifier = build_noisy_classifier(group.model)
    num_params = sum(p.numel() for p in classifier.parameters())
    seed = ctx.root.seed
    batches = latent_batches(cache, first_stage, scale_factor, group.batch_size, seed, ctx.device)
    progress = ProgressLog("train classifier", total=group.steps, bar=ctx.progress)

    def on_step(step: int, loss: float) -> None:
        progress.update(1, loss=loss)
        done = step + 1
        if done == 1 or done % group.log_every == 0 or done == group.steps:
            ctx.stats(event="train", step=done, loss=loss)

    with progress:
        losses = train_classifier(classifier, batches, ctx.typed.diffusion.make_schedule(), group.steps, lr=group.lr,
                                  weight_decay=group.weight_decay, anneal_lr=group.anneal_lr, seed=seed,
                                  device=ctx.device, on_step=on_step)
    weights, meta = ctx.run_dir / CLASSIFIER_WEIGHTS, ctx.run_dir / CLASSIFIER_META
    save_tensors(weights, classifier.state_dict(), metadata={"steps": str(len(losses))})
    tail = losses[-max(1, len(losses) // 10):]
    summary = {"steps": len(losses), "first_loss": losses[0], "last_loss": losses[-1],
               "mean_loss_last_tenth": float(np.mean(tail)), "scale_factor": scale_factor, "num_params": num_params,
               "latents": len(cache)}
    atomic_write_json(meta, {"classifier": to_container(group), **summary})
    return {**summary, "outputs": [weights, meta]}


def run(cfg: DictConfig) -> dict[str, Any]:
    return execute(STAGE, cfg, _body)


main = hydra_entry(run)

if __name__ == "__main__":
    main()
