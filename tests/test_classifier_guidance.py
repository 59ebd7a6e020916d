"""Classifier guidance (LDM-8-G): the guided denoiser against the closed form of two-class Gaussian data, guided
DDIM sampling toward a class, the noisy-latent classifier and its training loss on a separable toy problem."""
from __future__ import annotations

import math
import time

import numpy as np
import pytest
import torch

from replication.diffusion.ddim import ddim_loop
from replication.diffusion.guidance import classifier_guided, classifier_log_prob_grad
from replication.diffusion.plms import plms_loop
from replication.diffusion.schedule import Schedule
from replication.models.noisy_classifier import (ClassifierPool, NoisyClassifierConfig, NoisyLatentClassifier,
                                                 build_noisy_classifier, validate_noisy_classifier_cfg)
from replication.training.classifier_trainer import classifier_loss, train_classifier
from replication.utils.schema import ConfigError

SCHED = Schedule.make("linear", 1000, 0.0015, 0.0195)  # the paper models' schedule (PROTOCOL §3)
AC = SCHED.alphas_cumprod.numpy()
SHAPE = (2, 2, 2)  # one toy "latent": 8 values
D = int(np.prod(SHAPE))
S = 0.5  # per-class standard deviation
MU = np.stack([-0.8 * np.ones(D), 0.8 * np.ones(D)]) + np.random.default_rng(0).normal(0.0, 0.3, (2, D))


def marginal(t: torch.Tensor) -> tuple[np.ndarray, np.ndarray]:
    """q(x_t | y) = N(sqrt(a) mu_y, v I), v = a S^2 + 1 - a: (a, v) per sample, float64."""
    a = AC[t.cpu().numpy()]
    return a, a * S * S + 1.0 - a


def analytic_logits(x: torch.Tensor, t: torch.Tensor) -> torch.Tensor:
    """log p(y | x_t) up to a per-sample constant (equal class priors): -|x - sqrt(a) mu_y|^2 / (2 v)."""
    a, v = marginal(t)
    means = torch.from_numpy(np.sqrt(a)[:, None, None] * MU[None])  # [B, K, D]
    d2 = (x.double().flatten(1)[:, None, :] - means).square().sum(-1)
    return -d2 / (2.0 * torch.from_numpy(v)[:, None])


def posterior(x: np.ndarray, t: torch.Tensor) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """Class posterior w [B, K], the class means at t [B, K, D] and v [B], all in numpy float64."""
    a, v = marginal(t)
    means = np.sqrt(a)[:, None, None] * MU[None]
    logw = -((x.reshape(len(x), 1, D) - means) ** 2).sum(-1) / (2.0 * v[:, None])
    w = np.exp(logw - logw.max(1, keepdims=True))
    return w / w.sum(1, keepdims=True), means, v


def analytic_grad(x: torch.Tensor, t: torch.Tensor, y: torch.Tensor) -> np.ndarray:
    """grad_x log p(y | x_t) = (m_y - sum_k p(k | x_t) m_k) / v, derived by hand from the marginals."""
    w, means, v = posterior(x.double().numpy(), t)
    mean_y = means[np.arange(len(x)), y.numpy()]
    return ((mean_y - (w[:, :, None] * means).sum(1)) / v[:, None]).reshape(x.shape)


def mixture_eps(x: torch.Tensor, t: torch.Tensor) -> torch.Tensor:
    """The exact unconditional eps of the two-class mixture: -sqrt(1 - a) grad log q(x_t)."""
    w, means, v = posterior(x.double().numpy(), t)
    a, _ = marginal(t)
    diff = x.double().numpy().reshape(len(x), 1, D) - means
    eps = np.sqrt(1.0 - a)[:, None] * (w[:, :, None] * diff).sum(1) / v[:, None]
    return torch.from_numpy(eps.reshape(x.shape)).float()


def class_eps(x: torch.Tensor, t: torch.Tensor, y: torch.Tensor) -> torch.Tensor:
    """The exact eps of class y alone: (x - sqrt(a) mu_y) sqrt(1 - a) / v."""
    a, v = marginal(t)
    mean_y = np.sqrt(a)[:, None] * MU[y.numpy()]
    eps = (x.double().numpy().reshape(len(x), D) - mean_y) * (np.sqrt(1.0 - a) / v)[:, None]
    return torch.from_numpy(eps.reshape(x.shape)).float()


def toy_batch(n: int, seed: int) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    g = torch.Generator().manual_seed(seed)
    x = 1.5 * torch.randn((n, *SHAPE), generator=g)
    t = torch.randint(0, 1000, (n,), generator=g)
    y = torch.randint(0, 2, (n,), generator=g)
    return x, t, y


@pytest.mark.parametrize("scale", [0.5, 3.0, 10.0])
def test_guided_eps_is_eps_minus_scaled_analytic_classifier_gradient(scale):
    x, t, y = toy_batch(64, 1)  # every sample at its own timestep: the alpha_bar factor is read per sample
    guided = classifier_guided(mixture_eps, analytic_logits, y, scale, SCHED)
    with torch.no_grad():
        got = guided(x, t)
    a, _ = marginal(t)
    correction = np.sqrt(1.0 - a).reshape(-1, 1, 1, 1) * scale * analytic_grad(x, t, y)
    expected = mixture_eps(x, t).double().numpy() - correction
    assert got.dtype == torch.float32 and not got.requires_grad
    np.testing.assert_allclose(got.double().numpy(), expected, rtol=0, atol=1e-5)
    # the correction is not negligible: the check above would catch a missing or mis-scaled term
    assert float((got - mixture_eps(x, t)).abs().max()) > 0.1 * scale


def test_input_gradient_matches_the_closed_form():
    x, t, y = toy_batch(32, 2)
    with torch.no_grad():
        grad = classifier_log_prob_grad(analytic_logits, x, t, y)
    np.testing.assert_allclose(grad.double().numpy(), analytic_grad(x, t, y), rtol=0, atol=1e-5)


def test_scale_one_on_the_exact_unconditional_model_gives_the_exact_class_model():
    """Bayes: grad log q(x_t) + grad log q(y | x_t) = grad log q(x_t | y), so guidance with scale 1 turns the
    exact mixture eps into the exact eps of the chosen class alone."""
    x, t, y = toy_batch(64, 3)
    with torch.no_grad():
        got = classifier_guided(mixture_eps, analytic_logits, y, 1.0, SCHED)(x, t)
    np.testing.assert_allclose(got.numpy(), class_eps(x, t, y).numpy(), rtol=0, atol=1e-5)


class BatchNoise:
    def __init__(self, seed: int):
        self.g = torch.Generator().manual_seed(seed)

    def randn_like(self, x):
        return torch.randn(x.shape, generator=self.g)


def mean_distance(samples: torch.Tensor, cls: int) -> float:
    return float(np.linalg.norm(samples.flatten(1).double().mean(0).numpy() - MU[cls]))


def class_one_share(samples: torch.Tensor) -> float:
    """Share of samples nearer to mu_1 than to mu_0."""
    flat = samples.flatten(1).double().numpy()
    return float(np.mean(np.linalg.norm(flat - MU[1], axis=1) < np.linalg.norm(flat - MU[0], axis=1)))


@pytest.mark.parametrize("eta", [0.0, 1.0])
def test_guided_ddim_samples_move_toward_the_class(eta):
    n = 1000
    x_T = torch.randn((n, *SHAPE), generator=torch.Generator().manual_seed(4))
    labels = torch.ones(n, dtype=torch.int64)
    runs = {}
    for scale in (0.0, 1.0, 10.0):
        den = classifier_guided(mixture_eps, analytic_logits, labels, scale, SCHED)
        runs[scale] = ddim_loop(den, x_T, SCHED, 50, eta=eta, rng=BatchNoise(5)).x
    unguided, exact, strong = runs[0.0], runs[1.0], runs[10.0]
    # scale 1 samples exactly what the sampler makes of class 1's own model N(mu_1, S^2), same noise
    class_model = ddim_loop(lambda x, t: class_eps(x, t, labels), x_T, SCHED, 50, eta=eta, rng=BatchNoise(5)).x
    torch.testing.assert_close(exact, class_model, rtol=0, atol=1e-4)
    # unguided: both classes, mean near the midpoint; scale 1: near mu_1
    assert mean_distance(unguided, 1) > 0.4 * np.linalg.norm(MU[1] - MU[0])
    assert mean_distance(exact, 1) < 0.1
    # any scale > 0 moves the samples toward the class: closer mean, and (almost) all of them in class 1
    assert mean_distance(strong, 1) < mean_distance(unguided, 1)
    assert 0.35 < class_one_share(unguided) < 0.65
    assert class_one_share(exact) > 0.99 and class_one_share(strong) > 0.99


def test_guidance_works_through_plms_too():
    n = 500
    x_T = torch.randn((n, *SHAPE), generator=torch.Generator().manual_seed(6))
    labels = torch.zeros(n, dtype=torch.int64)
    out = plms_loop(classifier_guided(mixture_eps, analytic_logits, labels, 1.0, SCHED), x_T, SCHED, 50).x
    assert mean_distance(out, 0) < 0.1


def test_scale_zero_is_the_denoiser_itself():
    y = torch.zeros(4, dtype=torch.int64)
    assert classifier_guided(mixture_eps, analytic_logits, y, 0.0, SCHED) is mixture_eps


def test_bad_scale_and_labels_are_refused():
    y = torch.zeros(4, dtype=torch.int64)
    for bad in (-1.0, -1e-9, float("nan"), float("inf")):
        with pytest.raises(ValueError, match="scale must be a finite number >= 0"):
            classifier_guided(mixture_eps, analytic_logits, y, bad, SCHED)
    with pytest.raises(ValueError, match="one integer class label per sample"):
        classifier_guided(mixture_eps, analytic_logits, y.float(), 1.0, SCHED)
    with pytest.raises(ValueError, match="one integer class label per sample"):
        classifier_guided(mixture_eps, analytic_logits, y.reshape(2, 2), 1.0, SCHED)
    with pytest.raises(ValueError, match="must be >= 0"):
        classifier_guided(mixture_eps, analytic_logits, torch.tensor([0, -1]), 1.0, SCHED)
    guided = classifier_guided(mixture_eps, analytic_logits, y, 2.0, SCHED)
    x = torch.randn(3, *SHAPE)
    with pytest.raises(ValueError, match=r"batch of x \(3\) != number of class labels \(4\)"):
        guided(x, torch.full((3,), 10))
    with pytest.raises(ValueError, match=r"batch of x \(3\) != number of class labels \(4\)"):
        ddim_loop(guided, x, SCHED, 10)
    out_of_range = classifier_guided(mixture_eps, analytic_logits, torch.tensor([0, 2, 1]), 2.0, SCHED)
    with pytest.raises(ValueError, match="class label 2 is outside the classifier's 2 classes"):
        out_of_range(x, torch.full((3,), 10))


def tiny_classifier(pool: str, seed: int = 0) -> NoisyLatentClassifier:
    torch.manual_seed(seed)
    return build_noisy_classifier(NoisyClassifierConfig.tiny(pool=pool)).eval()


@pytest.mark.parametrize("pool", ["attention", "average"])
def test_classifier_gives_logits_per_sample_and_timestep(pool):
    clf = tiny_classifier(pool)
    x = torch.randn(3, 4, 8, 8)
    logits = clf(x, torch.tensor([0, 500, 999]))
    assert logits.shape == (3, 2) and logits.dtype == torch.float32
    for bad in (torch.tensor([1, 2]), torch.tensor(7)):
        with pytest.raises(ValueError, match=r"timesteps must be one per sample, shape \(3,\)"):
            clf(x, bad)
    # the encoder is the U-Net's: same names as the denoiser's encoder half (and guided-diffusion's classifier)
    names = {n.split(".")[0] for n, _ in clf.named_parameters()}
    assert names == {"time_embed", "input_blocks", "middle_block", "out"}


def test_attention_pool_refuses_another_latent_size():
    clf = tiny_classifier("attention")
    with pytest.raises(ValueError, match="image_size must equal the latent size"):
        clf(torch.randn(2, 4, 16, 16), torch.tensor([1, 2]))


def test_classifier_config_is_checked():
    cfg = validate_noisy_classifier_cfg({"image_size": 16, "num_classes": 10, "pool": "average"})
    assert cfg.pool == ClassifierPool.AVERAGE.value and cfg.channel_mult == [1, 2, 3, 4]
    with pytest.raises(ConfigError, match="unknown key 'widht'"):
        validate_noisy_classifier_cfg({"widht": 3})
    with pytest.raises(ConfigError, match="channel_mult must start with 1"):
        validate_noisy_classifier_cfg({"channel_mult": [2, 4]})
    with pytest.raises(ConfigError, match="not divisible by the encoder's downsampling 8"):
        validate_noisy_classifier_cfg({"image_size": 12})
    with pytest.raises(ConfigError, match="num_classes must be >= 2"):
        validate_noisy_classifier_cfg({"num_classes": 1})
    with pytest.raises(ConfigError, match=r"classifier.pool must be one of \['attention', 'average'\], got 'max'"):
        validate_noisy_classifier_cfg({"pool": "max"})


def test_real_classifier_guides_ddim_without_touching_its_parameters():
    clf = tiny_classifier("attention")
    labels = torch.tensor([0, 1, 1])
    x_T = torch.randn((3, 4, 8, 8), generator=torch.Generator().manual_seed(7))

    def denoiser(x, t):
        return 0.1 * x

    plain = ddim_loop(denoiser, x_T, SCHED, 5).x
    guided_den = classifier_guided(denoiser, clf, labels, 10.0, SCHED)
    guided = ddim_loop(guided_den, x_T, SCHED, 5).x
    assert torch.isfinite(guided).all() and not guided.requires_grad
    assert float((guided - plain).abs().max()) > 1e-3
    assert all(p.grad is None for p in clf.parameters())
    # samples do not see each other: sample 1 guided alone gets the same eps as within the batch
    t = torch.full((3,), 500)
    with torch.no_grad():
        batch_eps = guided_den(x_T, t)
        alone = classifier_guided(denoiser, clf, labels[1:2], 10.0, SCHED)(x_T[1:2], t[1:2])
    torch.testing.assert_close(alone[0], batch_eps[1], rtol=1e-4, atol=1e-5)


def separable_latents(n: int, seed: int) -> tuple[torch.Tensor, torch.Tensor]:
    """Two classes, two latent means (-1 and +1 everywhere) with small spread."""
    g = torch.Generator().manual_seed(seed)
    y = torch.randint(0, 2, (n,), generator=g)
    z0 = (2.0 * y.float() - 1.0).reshape(n, 1, 1, 1) + 0.2 * torch.randn((n, 4, 8, 8), generator=g)
    return z0, y


def test_classifier_loss_is_seeded_and_checks_labels():
    clf = tiny_classifier("attention")
    z0, y = separable_latents(8, 0)
    with torch.no_grad():
        first = classifier_loss(clf, z0, y, SCHED, torch.Generator().manual_seed(3))
        again = classifier_loss(clf, z0, y, SCHED, torch.Generator().manual_seed(3))
        other = classifier_loss(clf, z0, y, SCHED, torch.Generator().manual_seed(4))
    assert float(first) == float(again) and float(first) != float(other)
    with pytest.raises(ValueError, match="one class index per latent"):
        classifier_loss(clf, z0, y[:5], SCHED)


def test_training_on_two_separable_classes_lowers_the_loss_clearly():
    torch.manual_seed(0)
    clf = build_noisy_classifier(NoisyClassifierConfig.tiny(pool="average"))
    held_out = separable_latents(256, 99)

    def held_out_loss() -> float:
        clf.eval()
        with torch.no_grad():
            return float(classifier_loss(clf, *held_out, SCHED, torch.Generator().manual_seed(1)))

    before = held_out_loss()
    assert before == pytest.approx(math.log(2.0), abs=1e-6)  # zero-initialised head: uniform over 2 classes
    seen: list[tuple[int, float]] = []
    start = time.perf_counter()
    steps = 60
    losses = train_classifier(clf, (separable_latents(32, s) for s in range(steps)), SCHED, steps=steps, lr=1e-3,
                              anneal_lr=False, seed=0, on_step=lambda step, loss: seen.append((step, loss)))
    elapsed = time.perf_counter() - start
    after = held_out_loss()
    assert len(losses) == steps and [s for s, _ in seen] == list(range(steps))
    assert after < 0.5 * before, (before, after)  # about 0.17 after 60 steps
    assert np.mean(losses[-15:]) < 0.6 * np.mean(losses[:15])
    assert not clf.training
    assert elapsed < 30.0  # about 3 s on one CPU thread


def test_training_refuses_batches_that_run_out():
    clf = tiny_classifier("average")
    with pytest.raises(ValueError, match="batches ran out after 2 of 5 steps"):
        train_classifier(clf, (separable_latents(4, s) for s in range(2)), SCHED, steps=5)
