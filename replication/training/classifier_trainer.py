# Training the noisy-latent classifier of classifier guidance (paper App. D.4: "trained on noisy latents at every
# noise scale"; Dhariwal & Nichol 2021, Sec. 4: the classifier sees x_t = q(x_t | x_0) at t ~ U{0..T-1}).
"""The noisy-latent classifier's loss and a plain training loop.

`classifier_loss` is the one training objective: t uniform over all T training timesteps (the sampler may
guide at any of them), z_t from q(z_t | z_0) of the diffusion model's own schedule, cross-entropy of the
classifier's logits against the labels. `train_classifier` runs AdamW over it with guided-diffusion's
classifier_train.py defaults for its ImageNet classifiers (lr 3e-4, weight decay 0.05, learning rate annealed
linearly to zero); it keeps no checkpoints, so a caller that needs resume saves the module and optimizer itself.
"""
from __future__ import annotations

import math
from typing import Callable, Iterable, Optional

import torch
import torch.nn.functional as F
from torch import nn

from replication.diffusion.objective import q_sample, sample_timesteps
from replication.diffusion.schedule import Schedule
from replication.training.signals import TrainingDiverged

# logits = classifier(z_t, t): [B, num_classes]
NoisyClassifier = Callable[[torch.Tensor, torch.Tensor], torch.Tensor]

# guided-diffusion README, ImageNet classifier training flags: --lr 3e-4 --weight_decay 0.05 --anneal_lr True
CLASSIFIER_LR = 3e-4
CLASSIFIER_WEIGHT_DECAY = 0.05


def classifier_loss(classifier: NoisyClassifier, z0: torch.Tensor, labels: torch.Tensor, schedule: Schedule,
                    generator: Optional[torch.Generator] = None) -> torch.Tensor:
    """Mean cross-entropy of classifier(z_t, t) against `labels`, with t ~ U{0, ..., T-1} and eps ~ N(0, I)
    drawn from `generator` on the CPU (so a seed fixes them on any device) and z_t = q_sample(z0, t, eps)."""
    if labels.ndim != 1 or labels.shape[0] != z0.shape[0]:
        raise ValueError(f"labels must be one class index per latent: got shape {tuple(labels.shape)} for "
                         f"{z0.shape[0]} latents")
    t = sample_timesteps(z0.shape[0], schedule.num_timesteps, generator, device=z0.device)
    noise = torch.randn(z0.shape, generator=generator, dtype=torch.float32).to(device=z0.device, dtype=z0.dtype)
    z_t = q_sample(schedule, z0, t, noise)
    logits = classifier(z_t, t)
    if logits.ndim != 2 or logits.shape[0] != z0.shape[0]:
        raise ValueError(f"classifier returned shape {tuple(logits.shape)}; expected [batch, num_classes] logits")
    return F.cross_entropy(logits.float(), labels.to(device=logits.device, dtype=torch.int64))


def train_classifier(classifier: nn.Module, batches: Iterable[tuple[torch.Tensor, torch.Tensor]], schedule: Schedule,
                     steps: int, lr: float = CLASSIFIER_LR, weight_decay: float = CLASSIFIER_WEIGHT_DECAY,
                     anneal_lr: bool = True, seed: int = 0, device: str | torch.device = "cpu",
                     on_step: Optional[Callable[[int, float], None]] = None) -> list[float]:
    """`steps` AdamW steps of `classifier_loss` on (z0, labels) batches (latents already scaled as the diffusion
    model sees them); the learning rate falls linearly to 0 over the run when `anneal_lr`. t and the noise come
    from one generator seeded with `seed`. Returns each step's loss; `on_step(step, loss)` sees them as they come.
    A non-finite loss stops training with TrainingDiverged."""
    if int(steps) != steps or steps < 1:
        raise ValueError(f"steps must be a positive integer, got {steps!r}")
    device = torch.device(device)
    classifier.to(device).train()
    opt = torch.optim.AdamW(classifier.parameters(), lr=lr, weight_decay=weight_decay)
    generator = torch.Generator().manual_seed(int(seed))
    losses: list[float] = []
    it = iter(batches)
    for step in range(int(steps)):
        try:
            z0, labels = next(it)
        except StopIteration:
            raise ValueError(f"the batches ran out after {step} of {steps} steps; give an iterator that lasts "
                             f"the whole run (e.g. several epochs chained)") from None
        if anneal_lr:
            for group in opt.param_groups:
                group["lr"] = lr * (1.0 - step / steps)
        loss = classifier_loss(classifier, z0.to(device), labels.to(device), schedule, generator)
        opt.zero_grad(set_to_none=True)
        loss.backward()
        opt.step()
        value = float(loss.detach())
        if not math.isfinite(value):
            raise TrainingDiverged(f"classifier loss is {value} at step {step}")
        losses.append(value)
        if on_step is not None:
            on_step(step, value)
    classifier.eval()
    return losses
