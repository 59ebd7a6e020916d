"""training/step.py is the one LDM training step: the benchmark's train row and train_loop both run
`TrainStep.step`, and from the same weights and inputs one step of each gives the same loss and the same weights.
Real tiny U-Nets on the CPU; the step is observed through a counting wrapper around the real method."""
from __future__ import annotations

import copy

import pytest
import torch

from replication.bench.measurement import nonzero_init_
from replication.bench.networks import build_unet, compose_typed
from replication.bench.rows import measure_train, train_inputs
from replication.bench.settings import BenchSettings
from replication.models.conditioning import ema_scope
from replication.models.ema import EMA
from replication.perf import FastPath
from replication.training import step as train_step
from replication.training.ldm_trainer import LoopSettings, train_loop

BATCH = 2
pytestmark = pytest.mark.usefixtures("one_thread")  # tests/conftest.py


@pytest.fixture
def step_calls(monkeypatch):
    """Every call of TrainStep.step, wherever it comes from: its losses and the model's weights after it."""
    calls: list[dict] = []
    real = train_step.TrainStep.step

    def counted(self, next_micro_batch):
        losses = real(self, next_micro_batch)
        calls.append({"losses": losses.clone(),
                      "weights": {n: p.detach().clone() for n, p in self.model.named_parameters()}})
        return losses

    monkeypatch.setattr(train_step.TrainStep, "step", counted)
    return calls


def _bench_settings() -> BenchSettings:
    return BenchSettings(device=torch.device("cpu"), batch=BATCH, sample_batch=BATCH, ae_batch=1, feature_batch=1,
                         iters=1, warmup=0, sample_steps=1, fast=FastPath(), seed=5, repeats=1)


def _loop_one_step(typed, base, seed: int, tmp_path) -> list[dict]:
    """One step of the real train_loop from `base`'s weights. Its batch draws x0 from the loop generator (seeded
    with `seed` for one process) before the loop draws t and eps from it: the benchmark's fixed inputs."""
    trainer, diffusion, c = typed.trainer, typed.diffusion, typed.unet
    model = copy.deepcopy(base)
    ema = EMA(model, decay=trainer.ema_decay, scope=ema_scope(model)) if trainer.use_ema else None
    labels = train_inputs(typed, BATCH, torch.device("cpu"), seed)[3]
    records: list[dict] = []

    def batch_fn(indices, generator):
        return torch.randn(len(indices), c.in_channels, c.image_size, c.image_size, generator=generator), labels

    settings = LoopSettings(steps=1, batch_size=BATCH, lr=trainer.base_lr, lr_lambda=diffusion.lr_multiplier(),
                            weight_decay=trainer.weight_decay, adam_betas=tuple(trainer.adam_betas),
                            loss_type=diffusion.loss(), grad_clip=trainer.grad_clip, log_every=1, ckpt_every=10,
                            keep_last=1, seed=seed, progress=False)
    train_loop(model, ema, diffusion.make_schedule(), batch_fn, 4 * BATCH, settings, tmp_path / "state",
               lambda **r: records.append(r), torch.device("cpu"))
    return [r for r in records if r.get("event") == "train"]


@pytest.mark.parametrize("experiment", ["smoke", "smoke_cin"])
def test_the_benchmark_and_the_loop_run_the_same_training_step(experiment, step_calls, tmp_path):
    typed = compose_typed([f"experiment={experiment}"])
    s = _bench_settings()
    torch.manual_seed(0)
    base = nonzero_init_(build_unet(typed), seed=0)  # a fresh U-Net's zero output layer would hide the weights

    result, bench_loss = measure_train(typed, base, FastPath(), s, gflop=1.0, peak=1.0)
    assert result["error"] is None and len(step_calls) == 1  # the train row's one timed step went through it
    records = _loop_one_step(typed, base, s.seed, tmp_path)
    assert len(step_calls) == 2 and [r["step"] for r in records] == [1]

    bench, loop = step_calls
    assert bench_loss is not None and float(bench_loss[0]) == records[0]["loss"]
    assert torch.equal(bench["losses"], loop["losses"])
    assert bench["weights"].keys() == loop["weights"].keys()
    for name, value in bench["weights"].items():
        assert torch.equal(value, loop["weights"][name]), name
    # the step changed the weights: equal weights after it are not the untouched start
    start = dict(base.named_parameters())
    assert any(not torch.equal(value, start[name]) for name, value in bench["weights"].items())


def test_a_step_before_wrapping_is_refused():
    model = torch.nn.Conv2d(2, 2, 1)
    typed = compose_typed(["experiment=smoke"])
    stepper = train_step.TrainStep(model, None, typed.diffusion.make_schedule(), "l2", FastPath(),
                                   torch.device("cpu"), lr=1e-3, betas=(0.9, 0.999), weight_decay=0.0)
    batch = train_step.MicroBatch(torch.zeros(1, 2, 2, 2), torch.zeros(1, dtype=torch.long), torch.zeros(1, 2, 2, 2))
    with pytest.raises(RuntimeError, match="wrap"):
        stepper.step(lambda: batch)
