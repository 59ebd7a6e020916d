"""Forward process, training loss, latent std rescaling and LR rules against hand computations."""
from __future__ import annotations

import math

import numpy as np
import pytest
import torch

from replication.diffusion.lr_schedule import effective_lr, make_lr_multiplier
from replication.diffusion.objective import (LossType, Parameterization, diffusion_loss, predict_eps_from_x0,
                                             predict_x0_from_eps, q_sample, sample_timesteps, scale_by_std_factor)
from replication.diffusion.schedule import Schedule

SCHED = Schedule.make("linear", 1000, 0.0015, 0.0195)
AC = SCHED.alphas_cumprod.numpy()


@pytest.mark.parametrize("t", [0, 250, 999])
def test_q_sample_moments(t):
    """z_t | z_0 ~ N(sqrt(a) z_0, 1 - a): check mean and variance on 2^18 draws (5 standard errors)."""
    g = torch.Generator().manual_seed(t)
    n = 1 << 18
    x0 = torch.full((n, 1), 0.7, dtype=torch.float64)
    noise = torch.randn(n, 1, generator=g, dtype=torch.float64)
    z = q_sample(SCHED, x0, torch.full((n,), t), noise).flatten()
    a = AC[t]
    mean, var = 0.7 * math.sqrt(a), 1.0 - a
    assert abs(z.mean().item() - mean) < 5 * math.sqrt(var / n)
    # var of the sample variance of a Gaussian: 2 var^2 / (n - 1)
    assert abs(z.var().item() - var) < 5 * var * math.sqrt(2.0 / (n - 1))


def test_q_sample_per_sample_timesteps_and_inverses():
    g = torch.Generator().manual_seed(0)
    x0 = torch.randn(3, 2, 4, 4, generator=g, dtype=torch.float64)
    eps = torch.randn(3, 2, 4, 4, generator=g, dtype=torch.float64)
    t = torch.tensor([5, 500, 990])
    z = q_sample(SCHED, x0, t, eps)
    for i, ti in enumerate(t.tolist()):
        ref = math.sqrt(AC[ti]) * x0[i] + math.sqrt(1 - AC[ti]) * eps[i]
        torch.testing.assert_close(z[i], ref, rtol=1e-12, atol=1e-12)
    torch.testing.assert_close(predict_x0_from_eps(SCHED, z, t, eps), x0, rtol=1e-10, atol=1e-10)
    torch.testing.assert_close(predict_eps_from_x0(SCHED, z, t, x0), eps, rtol=1e-10, atol=1e-10)
    with pytest.raises(ValueError, match="noise shape"):
        q_sample(SCHED, x0, t, eps[:, :1])


def _hand_loss(x0, noise, t, pred_fn, p, target="eps"):
    """Element-by-element in Python floats."""
    out = []
    for i in range(x0.shape[0]):
        a = AC[int(t[i])]
        total, count = 0.0, 0
        for x, e in zip(x0[i].flatten().tolist(), noise[i].flatten().tolist()):
            z = math.sqrt(a) * x + math.sqrt(1 - a) * e
            pred = pred_fn(z, int(t[i]))
            tgt = e if target == "eps" else x
            total += abs(tgt - pred) ** p
            count += 1
        out.append(total / count)
    return out


@pytest.mark.parametrize("loss_type,p", [(LossType.L1, 1), (LossType.L2, 2), ("l1", 1), ("l2", 2)])
@pytest.mark.parametrize("param", ["eps", Parameterization.X0])
def test_diffusion_loss_matches_hand_computation(loss_type, p, param):
    g = torch.Generator().manual_seed(1)
    x0 = torch.randn(4, 3, 2, 2, generator=g, dtype=torch.float64)
    noise = torch.randn(4, 3, 2, 2, generator=g, dtype=torch.float64)
    t = torch.tensor([0, 17, 400, 999])

    def denoiser(z, tt):  # a fixed, slightly nonlinear "network"
        return 0.5 * torch.tanh(z) + 1e-3 * tt.to(z.dtype).view(-1, 1, 1, 1)

    loss = diffusion_loss(denoiser, x0, SCHED, t, noise, loss_type, param)
    assert loss.shape == (4,)
    target = "eps" if param == "eps" else "x0"
    ref = _hand_loss(x0, noise, t, lambda z, tt: 0.5 * math.tanh(z) + 1e-3 * tt, p, target)
    np.testing.assert_allclose(loss.numpy(), ref, rtol=1e-12)


def test_diffusion_loss_is_zero_for_the_true_noise_and_rejects_bad_shapes():
    g = torch.Generator().manual_seed(2)
    x0 = torch.randn(2, 3, 4, 4, generator=g)
    noise = torch.randn(2, 3, 4, 4, generator=g)
    loss = diffusion_loss(lambda z, t: noise, x0, SCHED, torch.tensor([3, 700]), noise, "l2")
    assert torch.equal(loss, torch.zeros(2))
    with pytest.raises(ValueError, match="prediction shape"):
        diffusion_loss(lambda z, t: z[:, :1], x0, SCHED, torch.tensor([3, 700]), noise, "l2")
    with pytest.raises(ValueError, match="'l3'"):
        diffusion_loss(lambda z, t: z, x0, SCHED, torch.tensor([3, 700]), noise, "l3")


def test_sample_timesteps_uniform_and_seeded():
    t = sample_timesteps(100_000, 1000, torch.Generator().manual_seed(0))
    assert t.dtype == torch.int64 and int(t.min()) >= 0 and int(t.max()) <= 999
    counts = torch.bincount(t, minlength=1000).double()
    # chi-square with 999 dof: mean 999, sd ~ 44.7; 6 sd bound
    chi2 = float(((counts - 100.0) ** 2 / 100.0).sum())
    assert abs(chi2 - 999) < 6 * math.sqrt(2 * 999)
    assert torch.equal(t, sample_timesteps(100_000, 1000, torch.Generator().manual_seed(0)))


def test_scale_by_std_factor_is_one_over_unbiased_std():
    g = torch.Generator().manual_seed(3)
    z = 4.0 * torch.randn(8, 4, 8, 8, generator=g) + 1.0
    ref = 1.0 / np.std(z.numpy().astype(np.float64).ravel(), ddof=1)
    assert scale_by_std_factor(z) == pytest.approx(ref, rel=1e-12)
    with pytest.raises(ValueError):
        scale_by_std_factor(torch.zeros(4, 4))


@pytest.mark.parametrize("base,bs,expected", [(2e-6, 48, 9.6e-5), (2e-6, 42, 8.4e-5), (1e-6, 64, 6.4e-5),
                                              (2e-6, 24, 4.8e-5)])
def test_effective_lr_examples_from_protocol(base, bs, expected):
    """PROTOCOL §3: paper LRs are base_lr x batch (1 GPU, no accumulation) via --scale_lr."""
    assert effective_lr(base, bs, ngpu=1, accumulate=1, scale_lr=True) == pytest.approx(expected, rel=1e-12)


def test_effective_lr_scaling_and_no_scaling():
    assert effective_lr(2e-6, 12, ngpu=4, accumulate=2, scale_lr=True) == pytest.approx(2 * 4 * 12 * 2e-6)
    # Churches: 5e-5 used unscaled (--scale_lr False)
    assert effective_lr(5e-5, 96, ngpu=1, accumulate=1, scale_lr=False) == 5e-5
    with pytest.raises(ValueError, match="batch_size"):
        effective_lr(1e-4, 0)


def test_churches_linear_warmup_multiplier():
    f = make_lr_multiplier("linear", warmup_steps=10_000, f_start=1e-6, f_max=1.0, f_min=1.0, cycle_length=10**13)
    assert f(0) == pytest.approx(1e-6)
    assert f(5_000) == pytest.approx(1e-6 + 0.5 * (1.0 - 1e-6))
    assert f(9_999) == pytest.approx(1e-6 + 0.9999 * (1.0 - 1e-6))
    assert f(10_000) == 1.0 and f(2_000_000) == 1.0


def test_warmup_cosine_multiplier_inpainting_big_values():
    """inpainting_big config: warm_up 1000, max_decay 50000, lr_start 1e-3, lr_max 0.1, lr_min 1e-4."""
    f = make_lr_multiplier("cosine", warmup_steps=1000, f_start=1e-3, f_max=0.1, f_min=1e-4, cycle_length=50_000)
    assert f(0) == pytest.approx(1e-3)
    assert f(500) == pytest.approx(1e-3 + 0.5 * (0.1 - 1e-3))
    assert f(1000) == pytest.approx(0.1)
    assert f(25_500) == pytest.approx(1e-4 + 0.5 * (0.1 - 1e-4))
    assert f(50_000) == pytest.approx(1e-4) and f(90_000) == pytest.approx(1e-4)


def test_constant_multiplier_and_bad_kind():
    assert make_lr_multiplier("constant")(123456) == 1.0
    with pytest.raises(ValueError, match="'step'.*constant"):
        make_lr_multiplier("step")
    with torch.no_grad():
        p = torch.nn.Parameter(torch.zeros(1))
    opt = torch.optim.SGD([p], lr=5e-5)
    sched = torch.optim.lr_scheduler.LambdaLR(opt, lr_lambda=make_lr_multiplier(
        "linear", warmup_steps=10, f_start=0.0, f_max=1.0, f_min=1.0, cycle_length=10**13))
    lrs = []
    for _ in range(12):
        lrs.append(opt.param_groups[0]["lr"])
        opt.step()
        sched.step()
    np.testing.assert_allclose(lrs, [5e-5 * min(i / 10, 1.0) for i in range(12)], rtol=1e-12, atol=1e-20)
