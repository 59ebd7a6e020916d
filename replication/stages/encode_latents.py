"""Stage 3: encode the prepared training set once with the frozen first stage (both flips where training
flips), so the LDM trains without an encoder pass. KL models store moments: training draws a fresh
posterior sample each step, as the original does."""
from __future__ import annotations

from typing import Any

import torch
from omegaconf import DictConfig

from replication.stages.artifacts import AE_WEIGHTS, load_first_stage
from replication.stages.context import StageContext
from replication.stages.entry import hydra_entry
from replication.stages.execute import execute

STAGE = "encode_latents"


def _body(ctx: StageContext) -> dict[str, Any]:
    from replication.data.latents import encode_to_cache
    from replication.data.prepare import open_prepared

    dataset = ctx.typed.dataset
    if ctx.typed.trainer.pretrained:
        return {"mode": "not needed: trainer.pretrained imports the LDM instead of training it", "outputs": []}
    if not ctx.typed.trainer.use_latent_cache:
        return {"mode": "disabled (trainer.use_latent_cache=false): train_ldm encodes on the fly", "outputs": []}
    images = open_prepared(dataset, "train")
    ctx.record_input(images.card_path)
    if (ctx.run_dir / AE_WEIGHTS).exists():
        ctx.record_input(ctx.run_dir / AE_WEIGHTS)
    model = load_first_stage(ctx.run_dir, ctx.typed, ctx.device)
    out = ctx.stage_dir / "train.latents"

    from replication.utils.transfer import to_device

    pin = ctx.typed.trainer.pin_memory

    @torch.no_grad()
    def encode_fn(x: torch.Tensor) -> torch.Tensor:
        return model.encode_moments(to_device(x, ctx.device, pin)).cpu()

    # the encoder at full image resolution is far heavier than a U-Net step: cap its batch (memory only)
    card = encode_to_cache(encode_fn, images, out, batch_size=min(ctx.typed.trainer.batch_size, 64),
                           flips=dataset.flip_train, progress=ctx.progress,
                           extra_card={"autoencoder": ctx.typed.autoencoder.name,
                                       "autoencoder_sha256": ctx.inputs.get(str(ctx.run_dir / AE_WEIGHTS))})
    return {"latents": str(out), "card": card, "outputs": [out]}


def run(cfg: DictConfig) -> dict[str, Any]:
    return execute(STAGE, cfg, _body)


main = hydra_entry(run)

if __name__ == "__main__":
    main()
