"""The first-stage training loop (replication/training/ae_trainer.py): gradient accumulation with Lightning's
semantics (the original autoencoder configs accumulate 2 micro-batches), each loss reaching only its own
optimiser's parameters, and the discriminator start counted in optimizer steps. Tiny real models (smoke_vq layout,
no perceptual network), real loops."""
from __future__ import annotations

import copy
from pathlib import Path

import pytest
import torch
from omegaconf import OmegaConf

from replication.models.autoencoder import build_autoencoder
from replication.models.autoencoder_config import validate_autoencoder_cfg
from replication.utils.schema import ConfigError
from replication.models.losses import AutoencoderLoss
from replication.training.ae_trainer import train_autoencoder_loop
from replication.training.ldm_trainer import DataOrder

try:
    from cuda_checks import SyncCheckedSteps
except ImportError:
    from tests.cuda_checks import SyncCheckedSteps

ROOT = Path(__file__).resolve().parents[1]
ITEMS, BATCH = 12, 2
pytestmark = pytest.mark.usefixtures("one_thread")  # tests/conftest.py


def _cfg(disc_start: int):
    raw = OmegaConf.load(ROOT / "experiments/autoencoder/smoke_vq.yaml")
    raw.loss.disc_start = disc_start
    return validate_autoencoder_cfg(raw)


def _images() -> torch.Tensor:
    return torch.rand(ITEMS, 3, 32, 32, generator=torch.Generator().manual_seed(5)) * 2 - 1


def _build(cfg):
    torch.manual_seed(0)
    return build_autoencoder(cfg), AutoencoderLoss.from_config(cfg.kind, cfg.loss)


def _train(tmp, model, loss_fn, steps, accumulate, records=None, disc_fresh_forward=True, pin_memory=False):
    data = _images()
    return train_autoencoder_loop(model, loss_fn, lambda idx, g: data[idx], ITEMS, steps, BATCH, lr=1e-3,
                                  betas=(0.5, 0.9), seed=4, state_dir=tmp,
                                  stats=lambda **r: (records if records is not None else []).append(r),
                                  device=torch.device("cpu"), log_every=1, ckpt_every=1000, progress=False,
                                  accumulate=accumulate, disc_fresh_forward=disc_fresh_forward,
                                  pin_memory=pin_memory)


def _reference_grads(cfg, accumulate: int, fresh: bool, step: int = 0):
    """The loop replayed by hand: per micro-batch the data order's indices, the posterior noise, the generator
    pass; the generator's Adam step after the last micro-batch's backward; then the discriminator's inputs: a fresh
    no-grad pass with a new posterior sample (drawn right after the generator pass's), made with the weights of
    that moment (stepped only for the last micro-batch), or the generator pass's reconstruction."""
    model, loss_fn = _build(cfg)
    data = _images()
    order, gen = DataOrder(ITEMS, BATCH, seed=4), torch.Generator().manual_seed(4)
    params_g = list(model.parameters())
    shape = (BATCH, model.latent_channels, 32 // model.downsampling_factor, 32 // model.downsampling_factor)
    loss_g_total, pending = 0.0, []
    for _ in range(accumulate):
        x = data[order.next()]
        x_rec, aux = model(x, sample_posterior=True, noise=torch.randn(shape, generator=gen))
        loss_g, _ = loss_fn.generator_loss(x, x_rec, aux, step, model.last_layer())
        loss_g_total = loss_g_total + loss_g / accumulate
        pending.append((x, torch.randn(shape, generator=gen) if fresh else x_rec.detach()))
    g_grads = torch.autograd.grad(loss_g_total, params_g, allow_unused=True)
    fakes = []
    with torch.no_grad():
        for k, (x, item) in enumerate(pending):
            if k == accumulate - 1:  # the generator steps before the last micro-batch's discriminator pass
                opt = torch.optim.Adam(params_g, lr=1e-3, betas=(0.5, 0.9))
                for p, g in zip(params_g, g_grads):
                    p.grad = g
                opt.step()
            fakes.append(model(x, sample_posterior=True, noise=item)[0] if fresh else item)
    loss_d_total = sum(loss_fn.discriminator_loss(x, fake, step)[0] for (x, _), fake in zip(pending, fakes)) / accumulate
    d_grads = torch.autograd.grad(loss_d_total, list(loss_fn.discriminator_parameters()))
    return g_grads, d_grads


@pytest.mark.parametrize("accumulate, fresh", [(1, True), (3, True), (3, False)])
def test_generator_and_discriminator_gradients_are_the_mean_over_micro_batches(tmp_path, accumulate, fresh):
    cfg = _cfg(disc_start=0)  # GAN active from the first step: both optimisers step
    model, loss_fn = _build(cfg)
    summary = _train(tmp_path / "s", model, loss_fn, steps=1, accumulate=accumulate, disc_fresh_forward=fresh)
    assert summary["step"] == 1
    g_ref, d_ref = _reference_grads(cfg, accumulate, fresh)
    for p, ref in zip(model.parameters(), g_ref):
        if ref is None:
            assert p.grad is None or not p.grad.any()
        else:
            torch.testing.assert_close(p.grad, ref, rtol=1e-4, atol=1e-7)
    # the generator loss also flows through the discriminator; those gradients must not reach its optimiser
    # (atol 2e-6: the first Adam step is lr * g / (|g| + eps), so float noise in near-zero gradients moves the
    # stepped generator, and with it the last fresh pass, slightly; a wrong order moves these by ~1e-3)
    for p, ref in zip(loss_fn.discriminator_parameters(), d_ref):
        torch.testing.assert_close(p.grad, ref, rtol=1e-4, atol=2e-6)


def test_discriminator_start_counts_optimizer_steps(tmp_path):
    """disc_start 2 with 3 micro-batches per step: the discriminator first steps at optimizer step 2 (the third),
    not after two micro-batches."""
    cfg = _cfg(disc_start=2)
    model, loss_fn = _build(cfg)
    d_start = [p.detach().clone() for p in loss_fn.discriminator_parameters()]
    _train(tmp_path / "a", model, loss_fn, steps=2, accumulate=3)
    assert all(torch.equal(p, q) for p, q in zip(loss_fn.discriminator_parameters(), d_start))
    _train(tmp_path / "a", model, loss_fn, steps=3, accumulate=3)  # resumes at step 2, then one GAN step
    assert any(not torch.equal(p, q) for p, q in zip(loss_fn.discriminator_parameters(), d_start))


def test_before_disc_start_the_discriminator_never_runs_but_its_adam_counts_every_step(tmp_path):
    """Before disc_start the discriminator's loss is 0 * hinge: no pass of it runs, its weights stay, and its Adam
    has stepped once per optimizer step on zero gradients (the bias correction the GAN then starts with); from
    disc_start on it runs and learns."""
    from replication.training.checkpoint import load_resumable_state

    model, loss_fn = _build(_cfg(disc_start=3))
    d_start = [p.detach().clone() for p in loss_fn.discriminator_parameters()]
    calls = []
    loss_fn.discriminator.register_forward_hook(lambda *_: calls.append(1))
    _train(tmp_path / "a", model, loss_fn, steps=3, accumulate=2)
    assert calls == [] and all(torch.equal(p, q) for p, q in zip(loss_fn.discriminator_parameters(), d_start))
    adam = load_resumable_state(tmp_path / "a", None)["opt_d"]["state"]
    assert len(adam) == len(d_start) and {float(s["step"]) for s in adam.values()} == {3.0}
    assert all(float(s["exp_avg"].abs().max()) == 0.0 for s in adam.values())
    _train(tmp_path / "a", model, loss_fn, steps=4, accumulate=2)  # resumes at step 3: one GAN step
    assert len(calls) == 2 * 3  # per micro-batch: the generator's GAN term, then D's real and fake logits
    assert any(not torch.equal(p, q) for p, q in zip(loss_fn.discriminator_parameters(), d_start))


def test_logged_loss_is_the_micro_batch_mean_and_bad_values_are_refused(tmp_path):
    records: list[dict] = []
    cfg = _cfg(disc_start=1000)
    model, loss_fn = _build(cfg)
    summary = _train(tmp_path / "l", model, loss_fn, steps=1, accumulate=2, records=records)
    logged = [r for r in records if r.get("event") == "train_autoencoder"]
    assert len(logged) == 1 and logged[0]["loss"] == pytest.approx(summary["last_loss"])
    with pytest.raises(ValueError, match="accumulate"):
        _train(tmp_path / "bad", *_build(cfg), steps=1, accumulate=0)
    raw = OmegaConf.load(ROOT / "experiments/autoencoder/smoke_vq.yaml")
    raw.train.accumulate_grad_batches = 0
    with pytest.raises(ConfigError, match="accumulate_grad_batches must be >= 1"):
        validate_autoencoder_cfg(raw)


def test_a_copy_of_the_model_trains_identically_with_one_micro_batch(tmp_path):
    """accumulate 1 is the plain loop: two runs from the same start agree bit for bit."""
    cfg = _cfg(disc_start=0)
    m1, l1 = _build(cfg)
    m2, l2 = copy.deepcopy(m1), copy.deepcopy(l1)
    _train(tmp_path / "x", m1, l1, steps=2, accumulate=1)
    _train(tmp_path / "y", m2, l2, steps=2, accumulate=1)
    assert all(torch.equal(p, q) for p, q in zip(m1.parameters(), m2.parameters()))


def test_each_step_logs_its_own_losses_read_one_step_late(tmp_path):
    """Losses travel to the host one step late (loss_reader.py): every record still pairs its step's generator loss
    with that step's logs (the loss is the logged total_loss, both micro-batch means), discriminator terms included,
    and the host-side disc_factor with them."""
    records: list[dict] = []
    model, loss_fn = _build(_cfg(disc_start=2))
    summary = _train(tmp_path / "r", model, loss_fn, steps=4, accumulate=2, records=records)
    logged = [r for r in records if r.get("event") == "train_autoencoder"]
    assert [r["step"] for r in logged] == [1, 2, 3, 4]
    for r in logged:
        assert r["loss"] == pytest.approx(r["total_loss"], rel=1e-6, abs=1e-7)
        assert r["disc_factor"] == (1.0 if r["step"] > 2 else 0.0)  # optimizer steps 0, 1 before disc_start 2
        assert {"disc_loss", "rec_loss", "quant_loss"} <= set(r)
        assert ("logits_real" in r) == (r["step"] > 2)  # the discriminator runs from disc_start on
    assert len({r["loss"] for r in logged}) == 4 and summary["last_loss"] == logged[-1]["loss"]


@pytest.mark.parametrize("nan_at_step", [3, 4])
def test_a_nan_stops_the_autoencoder_at_its_own_step_before_the_next_checkpoint(tmp_path, nan_at_step):
    from replication.training.checkpoint import list_states
    from replication.training.signals import TrainingDiverged

    data, calls = _images(), {"n": 0}

    def images(idx, g):
        calls["n"] += 1
        x = data[idx].clone()
        if calls["n"] == nan_at_step:
            x[0, 0, 0, 0] = float("nan")
        return x

    model, loss_fn = _build(_cfg(disc_start=1000))
    with pytest.raises(TrainingDiverged, match=rf"autoencoder loss is nan at step {nan_at_step};"):
        train_autoencoder_loop(model, loss_fn, images, ITEMS, 8, BATCH, lr=1e-3, betas=(0.5, 0.9), seed=4,
                               state_dir=tmp_path / "s", stats=lambda **r: None, device=torch.device("cpu"),
                               log_every=1, ckpt_every=2, progress=False, accumulate=1)
    assert [step for step, _ in list_states(tmp_path / "s")] == [2]


def test_pinned_input_copies_are_plain_copies_off_cuda(tmp_path):
    """trainer.pin_memory reaches the autoencoder loop too; without CUDA it changes nothing (the CUDA path is
    tests/test_accumulation.py's pinned-copy test)."""
    runs = []
    for pin in (False, True):
        records: list[dict] = []
        model, loss_fn = _build(_cfg(disc_start=1))
        _train(tmp_path / f"p{pin}", model, loss_fn, steps=2, accumulate=1, records=records, pin_memory=pin)
        runs.append(([r["loss"] for r in records if r.get("event") == "train_autoencoder"], model))
    assert runs[0][0] == runs[1][0] and len(runs[0][0]) == 2
    assert all(torch.equal(a, b) for a, b in zip(runs[0][1].parameters(), runs[1][1].parameters()))


@pytest.mark.skipif(not torch.cuda.is_available(), reason="host-device syncs exist on CUDA only")
def test_autoencoder_steps_on_cuda_make_no_host_device_sync(tmp_path):
    """Steps 2-4 of the real autoencoder loop on CUDA (pinned input and noise copies, the generator pass with its
    adaptive GAN weight, both Adam steps, the discriminator's fresh pass, losses and logs in one tensor read one
    step late) run under torch.cuda's sync debug mode set to raise: no step waits for the GPU. Step 1 (first
    copies) and the final checkpoint are outside the checked window."""
    data = _images()
    model, loss_fn = _build(_cfg(disc_start=1))
    model, loss_fn = model.cuda(), loss_fn.cuda()
    with SyncCheckedSteps(lambda idx, g: data[idx]) as images:
        summary = train_autoencoder_loop(model, loss_fn, images, ITEMS, 6, BATCH, lr=1e-3, betas=(0.5, 0.9), seed=4,
                                         state_dir=tmp_path / "s", stats=lambda **r: None, device=torch.device("cuda"),
                                         log_every=1, ckpt_every=1000, progress=False, pin_memory=True)
    assert summary["step"] == 6 and images.calls == 6
