"""DDIM / PLMS / DDPM samplers and classifier-free guidance against hand derivations, oracle denoisers and
Gaussian data whose exact score is known; the `sampler` config group schema."""
from __future__ import annotations

import math
import warnings
from pathlib import Path

import numpy as np
import pytest
import torch
from omegaconf import OmegaConf

from replication.diffusion.config import run_sampler, validate_sampler_cfg
from replication.diffusion.ddim import (DDIMSpacing, FinalAlpha, TablePrecision, ddim_loop, ddim_parameters,
                                        ddim_sample, ddim_sigmas, ddim_timesteps, uniform_indices)
from replication.diffusion.ddpm import ddpm_loop, ddpm_sample, ddpm_tables
from replication.diffusion.guidance import classifier_free, drop_condition, null_class_labels
from replication.diffusion.plms import plms_loop, plms_sample
from replication.diffusion.schedule import Schedule
from replication.utils.rng import StackedRandomGenerator
from replication.utils.schema import ConfigError

try:
    from cuda_checks import SyncCheckedSteps
except ImportError:
    from tests.cuda_checks import SyncCheckedSteps

ROOT = Path(__file__).resolve().parents[1]
B0, B1 = 0.0015, 0.0195  # the paper models' linear_start / linear_end (PROTOCOL §3)
SCHED = Schedule.make("linear", 1000, B0, B1)
AC = SCHED.alphas_cumprod.numpy()


class BatchNoise:
    """One generator for a whole batch: fast for large moment tests (not per-sample)."""

    def __init__(self, seed: int):
        self.g = torch.Generator().manual_seed(seed)

    def randn_like(self, x):
        return torch.randn(x.shape, generator=self.g)


def oracle(x0: torch.Tensor):
    """eps that exactly explains x_t from a known x0 (float64 inside)."""
    def denoiser(x, t):
        a = torch.from_numpy(AC)[t.cpu()].view(-1, *([1] * (x.ndim - 1)))
        return ((x.double() - a.sqrt() * x0.double()) / (1 - a).sqrt()).to(x.dtype)
    return denoiser


MU, S = 0.3, 0.5  # 1-D Gaussian data N(MU, S^2)


def gaussian_eps(x, t):
    """E[eps | x_t] for Gaussian data (all samples share t): (x - sqrt(a) mu) sqrt(1-a) / (a s^2 + 1 - a)."""
    a = float(AC[int(t[0])])
    return (x - math.sqrt(a) * MU) * (math.sqrt(1 - a) / (a * S * S + 1 - a))


def marginal(a: float, z: torch.Tensor) -> torch.Tensor:
    """Point with z-score z under the marginal q(x_t) = N(sqrt(a) mu, a s^2 + 1 - a)."""
    return math.sqrt(a) * MU + math.sqrt(a * S * S + 1 - a) * z


# ---- step selection ---------------------------------------------------------------------------------------------

# (requested S, steps run, first, second, last) derived by hand from c = 1000 // S and range(0, 1000, c) + 1
ORIGINAL_CASES = [(10, 10, 1, 101, 901), (50, 50, 1, 21, 981), (100, 100, 1, 11, 991), (200, 200, 1, 6, 996),
                  (250, 250, 1, 5, 997), (400, 500, 1, 3, 999), (500, 500, 1, 3, 999)]


@pytest.mark.parametrize("S,count,first,second,last", ORIGINAL_CASES)
def test_ddim_timesteps_original(S, count, first, second, last):
    ts = ddim_timesteps(S, 1000, DDIMSpacing.ORIGINAL)
    assert len(ts) == count
    assert (ts[0], ts[1], ts[-1]) == (first, second, last)
    assert set(np.diff(ts).tolist()) == {second - first}


@pytest.mark.parametrize("S", [10, 50, 100, 200, 250, 500])
def test_ddim_timesteps_exact_equals_original_when_S_divides_T(S):
    np.testing.assert_array_equal(ddim_timesteps(S, 1000, "exact"), ddim_timesteps(S, 1000, "original"))
    assert len(ddim_timesteps(S, 1000, "exact")) == S


def test_ddim_timesteps_exact_400():
    ts = ddim_timesteps(400, 1000, DDIMSpacing.EXACT)
    # t_k = floor(2.5 k) + 1
    assert len(ts) == 400
    assert ts[:6].tolist() == [1, 3, 6, 8, 11, 13]
    assert ts[-1] == 998  # floor(2.5 * 399) + 1
    assert set(np.diff(ts).tolist()) == {2, 3}


def test_ddim_timesteps_errors():
    with pytest.raises(ValueError, match="1000"):  # c = 3: 999 + 1 = T (the original's IndexError)
        ddim_timesteps(300, 1000, "original")
    assert len(ddim_timesteps(300, 1000, "exact")) == 300
    for bad in (0, 1001, 2.5):
        with pytest.raises(ValueError):
            ddim_timesteps(bad, 1000)
    with pytest.raises(ValueError):
        ddim_timesteps(1000, 1000, "exact")
    with pytest.raises(ValueError, match="'uniform'.*original"):
        ddim_timesteps(10, 1000, "uniform")


def test_uniform_indices_without_offset():
    assert uniform_indices(4, 10, "original").tolist() == [0, 2, 4, 6, 8]  # 10 // 4 = 2 -> 5 steps
    assert uniform_indices(4, 10, "exact").tolist() == [0, 2, 5, 7]
    assert uniform_indices(10, 10, "original").tolist() == list(range(10))


# ---- DDIM parameters --------------------------------------------------------------------------------------------

@pytest.mark.parametrize("precision", ["float64", "float32"])
def test_ddim_sigmas_zero_at_eta0_and_closed_form_at_eta1(precision):
    ts = ddim_timesteps(50, 1000)
    assert np.all(ddim_sigmas(SCHED, ts, 0.0, precision=precision) == 0.0)
    p = ddim_parameters(SCHED, ts, 1.0, precision=precision)
    ac = AC if precision == "float64" else AC.astype(np.float32).astype(np.float64)
    # the original prepends alphas_cumprod[0] of the FULL table (make_ddim_sampling_parameters)
    assert p.alphas_prev[0] == ac[0]
    assert p.alphas_prev[1:].tolist() == ac[ts[:-1]].tolist()
    k = 7
    a, ap = ac[ts[k]], ac[ts[k - 1]]
    rel = 1e-12 if precision == "float64" else 1e-6  # float32: 1 - a is rounded to float32 first, as the release
    assert p.sigmas[k] == pytest.approx(math.sqrt((1 - ap) / (1 - a) * (1 - a / ap)), rel=rel)
    assert ddim_sigmas(SCHED, ts, 0.5, precision=precision)[k] == pytest.approx(0.5 * p.sigmas[k], rel=1e-12)
    one = ddim_parameters(SCHED, ts, 1.0, FinalAlpha.ONE, precision=precision)
    assert one.alphas_prev[0] == 1.0 and one.sigmas[0] == 0.0


def test_ddim_eta1_on_consecutive_steps_is_the_ddpm_posterior_variance():
    ts = np.arange(1, 1000)
    sig = ddim_sigmas(SCHED, ts, 1.0, precision="float64")
    np.testing.assert_allclose(sig[1:] ** 2, SCHED.posterior_variance.numpy()[2:], rtol=1e-9)


def release_ddim_tables(linear_start: float, linear_end: float, steps: int, eta: float) -> dict[str, np.ndarray]:
    """The release's DDIM tables, computed as its code does: `register_schedule` (ddpm.py) stores alphas_cumprod
    as a float32 buffer, `DDIMSampler.make_schedule` (ddim.py) passes that tensor to
    `make_ddim_sampling_parameters` (ldm/modules/diffusionmodules/util.py), mixing torch float32 and numpy
    float64 exactly as below."""
    betas = (torch.linspace(linear_start ** 0.5, linear_end ** 0.5, 1000, dtype=torch.float64) ** 2).numpy()
    alphacums = torch.tensor(np.cumprod(1. - betas, axis=0), dtype=torch.float32)
    ddim_ts = np.asarray(list(range(0, 1000, 1000 // steps))) + 1
    with warnings.catch_warnings():  # numpy 2 warns about torch's __array_wrap__ signature
        warnings.simplefilter("ignore", DeprecationWarning)
        alphas = alphacums[ddim_ts]
        alphas_prev = np.asarray([alphacums[0]] + alphacums[ddim_ts[:-1]].tolist())
        sigmas = eta * np.sqrt((1 - alphas_prev) / (1 - alphas) * (1 - alphas / alphas_prev))
        sqrt_one_minus = np.sqrt(1. - alphas)
    as_np = lambda v: v.numpy() if isinstance(v, torch.Tensor) else np.asarray(v)  # noqa: E731
    return dict(timesteps=ddim_ts, alphas=as_np(alphas), alphas_prev=as_np(alphas_prev), sigmas=as_np(sigmas),
                sqrt_one_minus_alphas=as_np(sqrt_one_minus))


@pytest.mark.parametrize("steps", [200, 500])
@pytest.mark.parametrize("eta", [0.0, 1.0])
def test_ddim_tables_are_the_releases_bit_for_bit_and_differ_from_float64(steps, eta):
    ref = release_ddim_tables(B0, B1, steps, eta)
    ts = ddim_timesteps(steps, 1000)
    assert ts.tolist() == ref["timesteps"].tolist()
    p = ddim_parameters(SCHED, ts, eta)  # the default is the release's float32 tables
    assert p.precision is TablePrecision.FLOAT32
    for name in ("alphas", "alphas_prev", "sigmas", "sqrt_one_minus_alphas"):
        ours, theirs = getattr(p, name), ref[name]
        assert ours.dtype == theirs.dtype, (name, ours.dtype, theirs.dtype)
        assert np.array_equal(ours, theirs), (name, np.max(np.abs(ours.astype(np.float64) - theirs)))
    # the step's eps coefficient, (1 - a_prev - sigma_t**2).sqrt() on float32 values (IEEE float32 arithmetic)
    ap, sg = ref["alphas_prev"].astype(np.float32), ref["sigmas"].astype(np.float32)
    assert np.array_equal(p.dir_coefs, np.sqrt(np.float32(1.0) - ap - sg * sg))

    p64 = ddim_parameters(SCHED, ts, eta, precision="float64")
    assert p64.alphas.dtype == np.float64 and not np.array_equal(p64.alphas, p.alphas)
    assert not np.array_equal(p64.sqrt_one_minus_alphas, p.sqrt_one_minus_alphas)
    if eta == 0.0:
        assert np.all(p.sigmas == 0.0) and np.all(p64.sigmas == 0.0)
    else:
        rel = np.abs(p64.sigmas / p.sigmas - 1.0)
        assert not np.array_equal(p64.sigmas, p.sigmas)
        # measured: 2.5e-6 (200 steps) and 7.0e-6 (500 steps) relative, where 1 - a_t / a_prev is small
        assert 1e-7 < rel.max() < 1e-5, rel.max()


def test_table_precision_reaches_every_sampler():
    """A sampler config's table_precision decides the tables of DDIM, PLMS and DDPM (release: float32 buffers)."""
    base = _sampler_base()
    x_T = torch.randn(2, 1, 4, 4, generator=torch.Generator().manual_seed(0))
    f = lambda x, t: torch.tanh(x) + 1e-3 * t.view(-1, 1, 1, 1).float()  # noqa: E731
    for kind, steps, eta in [("ddim", 100, 1.0), ("plms", 10, 0.0), ("ddpm", 20, 1.0)]:
        out = {}
        for precision in ("float32", "float64"):
            c = validate_sampler_cfg({**base, "kind": kind, "steps": steps, "eta": eta, "table_precision": precision})
            out[precision] = run_sampler(c, f, x_T, SCHED, rng=StackedRandomGenerator([3, 4])).x
        assert not torch.equal(out["float32"], out["float64"]), kind
        torch.testing.assert_close(out["float32"], out["float64"], rtol=0, atol=1e-3)


def test_ddpm_tables_are_the_releases_float32_buffers():
    """The release's p_sample_loop reads register_schedule's buffers: float64 tables rounded to float32."""
    tab = ddpm_tables(SCHED)
    for name in ("sqrt_recip_alphas_cumprod", "posterior_mean_coef1", "posterior_mean_coef2"):
        assert tab[name].dtype == np.float32
        assert np.array_equal(tab[name], torch.tensor(getattr(SCHED, name).numpy(), dtype=torch.float32).numpy())
    lv = tab["posterior_log_variance_clipped"]
    assert tab["std"].dtype == np.float32 and np.array_equal(tab["std"], np.exp(np.float32(0.5) * lv))
    assert ddpm_tables(SCHED, "float64")["std"].dtype == np.float64


# ---- DDIM sampling ----------------------------------------------------------------------------------------------

@pytest.mark.parametrize("steps", [1, 10, 50, 200, 250])
@pytest.mark.parametrize("eta", [0.0, 1.0])
def test_ddim_oracle_recovers_x0(steps, eta):
    g = torch.Generator().manual_seed(steps)
    x0 = torch.randn(3, 2, 4, 4, generator=g)
    x_T = torch.randn(3, 2, 4, 4, generator=g)
    rng = StackedRandomGenerator([7, 8, 9])
    res = ddim_loop(oracle(x0), x_T, SCHED, steps, eta, rng, final_alpha=FinalAlpha.ONE)
    torch.testing.assert_close(res.x, x0, rtol=0, atol=2e-5)
    torch.testing.assert_close(res.pred_x0, x0, rtol=0, atol=2e-5)
    assert res.num_steps == len(ddim_timesteps(steps)) == res.nfe


@pytest.mark.parametrize("steps", [1, 20, 400])
def test_ddim_oracle_original_final_step_lands_on_t0_noise_level(steps):
    """The original's last step uses a_prev = alphas_cumprod[0]; at eta=0 the oracle's eps stays the initial
    eps0, so x = sqrt(a0) x0 + sqrt(1 - a0) eps0 with eps0 from x_T at the first selected timestep."""
    g = torch.Generator().manual_seed(0)
    x0 = torch.randn(2, 3, 4, 4, generator=g, dtype=torch.float64)
    x_T = torch.randn(2, 3, 4, 4, generator=g, dtype=torch.float64)
    res = ddim_loop(oracle(x0), x_T.float(), SCHED, steps, 0.0)
    a_first = AC[ddim_timesteps(steps)[-1]]
    eps0 = (x_T - math.sqrt(a_first) * x0) / math.sqrt(1 - a_first)
    expected = math.sqrt(AC[0]) * x0 + math.sqrt(1 - AC[0]) * eps0
    torch.testing.assert_close(res.x.double(), expected, rtol=0, atol=2e-5)
    torch.testing.assert_close(res.pred_x0.double(), x0, rtol=0, atol=2e-5)
    assert res.num_steps == (500 if steps == 400 else steps)


def test_ddim_is_first_order_on_gaussian_data():
    """DDIM (eta=0) discretises the probability-flow ODE, whose flow keeps the z-score of a Gaussian: the
    exact map sends x_T = m_T + sd_T z to m_0 + sd_0 z. The error must shrink ~ 1/S (first order)."""
    z = torch.linspace(-3, 3, 61).view(-1, 1)
    errs = []
    for steps in (25, 50, 100):
        ts = ddim_timesteps(steps)
        out = ddim_sample(gaussian_eps, marginal(AC[ts[-1]], z), SCHED, steps, 0.0)
        errs.append((out - marginal(AC[0], z)).abs().max().item())
    assert errs[2] < 0.08
    for coarse, fine in zip(errs, errs[1:]):
        assert 1.6 < coarse / fine < 2.5


def test_ddim_determinism_and_batch_size_independence_eta1():
    def denoiser(x, t):  # per-sample, nonlinear
        return 0.5 * torch.tanh(x) + 1e-4 * t.view(-1, 1, 1, 1).float()

    seeds = [100, 101, 102, 103, 104]
    x_T = StackedRandomGenerator(seeds).randn((5, 3, 4, 4))
    full = ddim_sample(denoiser, x_T, SCHED, 20, eta=1.0, rng=StackedRandomGenerator([s + 1 for s in seeds]))
    again = ddim_sample(denoiser, x_T, SCHED, 20, eta=1.0, rng=StackedRandomGenerator([s + 1 for s in seeds]))
    assert torch.equal(full, again)
    parts = [ddim_sample(denoiser, x_T[i:j], SCHED, 20, eta=1.0,
                         rng=StackedRandomGenerator([s + 1 for s in seeds[i:j]])) for i, j in ((0, 2), (2, 3), (3, 5))]
    torch.testing.assert_close(torch.cat(parts), full, rtol=0, atol=1e-6)
    other = ddim_sample(denoiser, x_T, SCHED, 20, eta=1.0, rng=StackedRandomGenerator([s + 50 for s in seeds]))
    assert not torch.allclose(other, full)


def test_per_sample_noise_is_each_seeds_own_stream():
    """Row i of a draw is torch.randn(shape[1:]) from a CPU generator seeded with seed i, draw after draw, in any
    dtype asked for: values that do not depend on the batch, the device or the other samples."""
    seeds, shape = [5, 1 << 40, 5], (3, 2, 4, 4)
    rng = StackedRandomGenerator(seeds)
    own = [torch.Generator().manual_seed(s) for s in seeds]
    for _ in range(2):
        draw = rng.randn(shape)
        assert draw.dtype == torch.float32 and draw.shape == shape
        for row, g in zip(draw, own):
            assert torch.equal(row, torch.randn(shape[1:], generator=g))
    assert torch.equal(draw[0], draw[2]) and not torch.equal(draw[0], draw[1])
    like = rng.randn_like(torch.zeros(shape, dtype=torch.float64))
    assert like.dtype == torch.float64
    assert torch.equal(like[1], torch.randn(shape[1:], generator=own[1]).double())


@pytest.mark.skipif(not torch.cuda.is_available(), reason="host-device syncs exist on CUDA only")
def test_ddim_eta1_on_cuda_draws_per_sample_noise_without_a_host_device_sync():
    """The CPU-drawn per-sample noise of an eta = 1 chain reaches the GPU through page-locked memory without the
    host waiting: steps 2-8 run under torch.cuda's sync debug mode set to raise. The chain equals the same chain
    run on the CPU (the same draws), within float32 reordering."""
    torch.manual_seed(0)
    net = torch.nn.Sequential(torch.nn.Conv2d(2, 8, 3, padding=1), torch.nn.SiLU(), torch.nn.Conv2d(8, 2, 3, padding=1))
    net.cuda()
    seeds = [11, 12, 13]
    x_T = StackedRandomGenerator(seeds).randn((3, 2, 8, 8))

    # the sampler's callback runs after each step: checked from its first call (after step 1) to the chain's end
    with (SyncCheckedSteps(lambda *step: None, start=1, stop=9) as check_from_step_2,
          torch.backends.cudnn.flags(enabled=True, allow_tf32=False)):  # fp32 convolutions, as on the CPU
        on_gpu = ddim_loop(lambda x, t: net(x), x_T.cuda(), SCHED, 8, eta=1.0,
                           rng=StackedRandomGenerator([s + 1 for s in seeds], device="cuda"),
                           callback=check_from_step_2).x
    assert check_from_step_2.calls == 8
    net.cpu()
    on_cpu = ddim_loop(lambda x, t: net(x), x_T, SCHED, 8, eta=1.0,
                       rng=StackedRandomGenerator([s + 1 for s in seeds])).x
    torch.testing.assert_close(on_gpu.cpu(), on_cpu, rtol=1e-4, atol=1e-4)


def test_ddim_input_checks():
    x = torch.zeros(2, 1, 2, 2)
    with pytest.raises(ValueError, match="rng"):
        ddim_sample(lambda x, t: x, x, SCHED, 10, eta=1.0)
    with pytest.raises(ValueError, match="3 per-sample streams"):
        ddim_sample(lambda x, t: x, x, SCHED, 10, eta=1.0, rng=StackedRandomGenerator([1, 2, 3]))
    with pytest.raises(ValueError, match="denoiser returned"):
        ddim_sample(lambda x, t: x[:, :, :1], x, SCHED, 10)
    with pytest.raises(ValueError, match="eta"):
        ddim_sample(lambda x, t: x, x, SCHED, 10, eta=-1.0)


def test_ddim_callback_and_progress_flag():
    seen = []
    ddim_sample(lambda x, t: 0.1 * x, torch.ones(1, 1, 2, 2), SCHED, 5, progress=False,
                callback=lambda i, t, x, px0: seen.append((i, t)))
    assert seen == [(0, 801), (1, 601), (2, 401), (3, 201), (4, 1)]


# ---- PLMS -------------------------------------------------------------------------------------------------------

def _ddim_step(x, e, a, ap):
    x0 = (x - math.sqrt(1 - a) * e) / math.sqrt(a)
    return math.sqrt(ap) * x0 + math.sqrt(1 - ap) * e


def test_plms_matches_hand_derived_pndm_steps():
    """5 steps (t = 801, 601, 401, 201, 1) written out with PNDM's formulas: improved-Euler warm-up, then
    Adams-Bashforth 2, 3, 4, 4 on eps."""
    f = lambda x, t: 0.3 * x + 1e-3 * t  # noqa: E731  a deterministic "network" (float64)
    ts = [801, 601, 401, 201, 1]
    a = [AC[t] for t in ts] + [AC[0]]
    x = torch.linspace(-2, 2, 9, dtype=torch.float64).view(1, 1, 3, 3)
    e0 = f(x, 801)
    e0n = f(_ddim_step(x, e0, a[0], a[1]), 601)
    x1 = _ddim_step(x, (e0 + e0n) / 2, a[0], a[1])
    e1 = f(x1, 601)
    x2 = _ddim_step(x1, (3 * e1 - e0) / 2, a[1], a[2])
    e2 = f(x2, 401)
    x3 = _ddim_step(x2, (23 * e2 - 16 * e1 + 5 * e0) / 12, a[2], a[3])
    e3 = f(x3, 201)
    x4 = _ddim_step(x3, (55 * e3 - 59 * e2 + 37 * e1 - 9 * e0) / 24, a[3], a[4])
    e4 = f(x4, 1)
    x5 = _ddim_step(x4, (55 * e4 - 59 * e3 + 37 * e2 - 9 * e1) / 24, a[4], a[5])

    res = plms_loop(lambda xx, t: f(xx, t.view(-1, 1, 1, 1).float()), x.float(), SCHED, 5)
    torch.testing.assert_close(res.x.double(), x5, rtol=1e-5, atol=1e-5)
    assert res.nfe == 6  # one extra call in the warm-up step


@pytest.mark.parametrize("steps", [2, 10, 100])
def test_plms_oracle_recovers_x0(steps):
    g = torch.Generator().manual_seed(steps)
    x0 = torch.randn(2, 2, 4, 4, generator=g)
    x_T = torch.randn(2, 2, 4, 4, generator=g)
    res = plms_loop(oracle(x0), x_T, SCHED, steps, final_alpha="one")
    torch.testing.assert_close(res.x, x0, rtol=0, atol=2e-5)


def test_plms_single_step_evaluates_the_warmup_point_at_the_same_t():
    """Original quirk kept: with one step, t_next clamps to t, so the improved-Euler point is evaluated at t=1
    although it lies at the a_prev noise level; even an oracle then misses x0. Hand-derived expectation."""
    g = torch.Generator().manual_seed(0)
    x0 = torch.randn(1, 1, 3, 3, generator=g, dtype=torch.float64)
    x_T = torch.randn(1, 1, 3, 3, generator=g, dtype=torch.float64)
    a1 = AC[1]
    eps0 = (x_T - math.sqrt(a1) * x0) / math.sqrt(1 - a1)
    x_next = x0  # a_prev = 1 ("one"): the DDIM step with the oracle's eps lands on x0
    eps_next = (x_next - math.sqrt(a1) * x0) / math.sqrt(1 - a1)
    eps_prime = (eps0 + eps_next) / 2
    expected = (x_T - math.sqrt(1 - a1) * eps_prime) / math.sqrt(a1)
    res = plms_loop(oracle(x0), x_T.float(), SCHED, 1, final_alpha="one")
    torch.testing.assert_close(res.x.double(), expected, rtol=1e-5, atol=1e-5)
    assert res.nfe == 2


def test_plms_beats_ddim_on_gaussian_data():
    z = torch.linspace(-3, 3, 61).view(-1, 1)
    for steps in (50, 100):
        ts = ddim_timesteps(steps)
        x_T, target = marginal(AC[ts[-1]], z), marginal(AC[0], z)
        e_ddim = (ddim_sample(gaussian_eps, x_T, SCHED, steps) - target).abs().max().item()
        e_plms = (plms_sample(gaussian_eps, x_T, SCHED, steps) - target).abs().max().item()
        assert e_plms < e_ddim / 10
        assert e_plms < 1e-2


def test_plms_refuses_eta():
    with pytest.raises(ValueError, match="eta must be 0"):
        plms_sample(lambda x, t: x, torch.zeros(1, 1), SCHED, 10, eta=0.5)


# ---- DDPM -------------------------------------------------------------------------------------------------------

def test_ddpm_full_chain_oracle_recovers_x0():
    g = torch.Generator().manual_seed(3)
    x0 = torch.randn(2, 2, 4, 4, generator=g)
    res = ddpm_loop(oracle(x0), torch.randn(2, 2, 4, 4, generator=g), SCHED, None, StackedRandomGenerator([1, 2]))
    assert res.num_steps == 1000 and res.timesteps[0] == 0 and res.timesteps[-1] == 999
    torch.testing.assert_close(res.x, x0, rtol=0, atol=1e-4)


def _ddpm_exact_moments(chain: Schedule, indices: np.ndarray, m: float, v: float) -> tuple[float, float]:
    """Push N(m, v) through the affine-Gaussian DDPM steps driven by gaussian_eps, in float64."""
    for k in range(len(indices) - 1, -1, -1):
        a = AC[indices[k]]
        kappa = math.sqrt(1 - a) / (a * S * S + 1 - a)  # eps = kappa (x - sqrt(a) mu)
        r1, r2 = float(chain.sqrt_recip_alphas_cumprod[k]), float(chain.sqrt_recipm1_alphas_cumprod[k])
        c1, c2 = float(chain.posterior_mean_coef1[k]), float(chain.posterior_mean_coef2[k])
        # x0_hat = (r1 - r2 kappa) x + r2 kappa sqrt(a) mu ; mean = c1 x0_hat + c2 x
        A = c1 * (r1 - r2 * kappa) + c2
        b = c1 * r2 * kappa * math.sqrt(a) * MU
        var_noise = float(chain.posterior_variance[k]) if k > 0 else 0.0
        m, v = A * m + b, A * A * v + var_noise
    return m, v


@pytest.mark.parametrize("num_steps", [None, 50])
def test_ddpm_moments_match_exact_recursion(num_steps):
    n = 32_000  # stays under torch's intra-op parallel grain (32768): fast on a shared CPU
    chain_idx = np.arange(1000) if num_steps is None else uniform_indices(num_steps, 1000, "original")
    chain = SCHED if num_steps is None else SCHED.respace(chain_idx)
    aT = AC[chain_idx[-1]]
    z = torch.randn(n, 1, generator=torch.Generator().manual_seed(11))
    res = ddpm_loop(gaussian_eps, marginal(aT, z), SCHED, num_steps, BatchNoise(12))
    m, v = _ddpm_exact_moments(chain, chain_idx, math.sqrt(aT) * MU, aT * S * S + 1 - aT)
    x = res.x.double().flatten()
    assert abs(x.mean().item() - m) < 5 * math.sqrt(v / n)
    assert abs(x.var().item() - v) < 5 * v * math.sqrt(2.0 / (n - 1))
    # and the chain targets the data distribution (loosely: beta-tilde variance undershoots with few steps)
    assert abs(m - MU) < 0.01 and abs(math.sqrt(v) - S) < (0.02 if num_steps is None else 0.08)


def test_ddpm_equals_ddim_eta1_on_the_same_steps():
    """Ancestral DDPM on a respaced chain is DDIM with eta = 1 and a_prev = 1 at the last step (DDIM Sec. 4.1)."""
    def denoiser(x, t):
        return 0.5 * torch.tanh(x) + 1e-4 * t.view(-1, 1, 1, 1).float()

    seeds = [5, 6, 7]
    x_T = StackedRandomGenerator([0, 1, 2]).randn((3, 2, 4, 4))
    idx = uniform_indices(50, 1000, "original")
    a = ddpm_loop(denoiser, x_T, SCHED, 50, StackedRandomGenerator(seeds)).x
    b = ddim_loop(denoiser, x_T, SCHED, eta=1.0, rng=StackedRandomGenerator(seeds), final_alpha="one",
                  timesteps=idx).x
    torch.testing.assert_close(a, b, rtol=1e-4, atol=1e-4)


def test_ddpm_sample_checks():
    with pytest.raises(ValueError, match="eta"):
        ddpm_sample(lambda x, t: x, torch.zeros(1, 1), SCHED, 10, eta=0.0, rng=BatchNoise(0))
    with pytest.raises(ValueError, match="rng"):
        ddpm_sample(lambda x, t: x, torch.zeros(1, 1), SCHED, 10)


# ---- classifier-free guidance -----------------------------------------------------------------------------------

class CountingModel:
    """eps = x * w[c] + 0.001 t: depends on the class; records the batch size of each call."""

    def __init__(self):
        self.w = torch.linspace(0.1, 0.9, 11)
        self.calls: list[int] = []

    def __call__(self, x, t, c):
        self.calls.append(x.shape[0])
        return x * self.w[c].view(-1, 1, 1, 1) + 1e-3 * t.view(-1, 1, 1, 1).float()


def test_guidance_scale_one_is_the_conditional_model():
    model = CountingModel()
    cond = torch.tensor([1, 4, 7])
    uncond = null_class_labels(3, 10)
    x_T = StackedRandomGenerator([1, 2, 3]).randn((3, 2, 4, 4))
    guided = ddim_sample(classifier_free(model, cond, uncond, 1.0), x_T, SCHED, 10)
    assert set(model.calls) == {3}  # no unconditional pass
    plain = ddim_sample(lambda x, t: model(x, t, cond), x_T, SCHED, 10)
    assert torch.equal(guided, plain)


def test_guidance_arithmetic_at_scale_two():
    model = CountingModel()
    cond, uncond = torch.tensor([2, 9]), null_class_labels(1, 10)  # batch-1 null broadcasts
    x = torch.randn(2, 2, 3, 3, generator=torch.Generator().manual_seed(0))
    t = torch.tensor([500, 500])
    out = classifier_free(model, cond, uncond, 2.0)(x, t)
    assert model.calls == [4]  # one batched call over [uncond; cond]
    w_u, w_c = model.w[10].item(), model.w[cond].view(-1, 1, 1, 1)
    eps_u = x * w_u + 0.5
    eps_c = x * w_c + 0.5
    torch.testing.assert_close(out, eps_u + 2.0 * (eps_c - eps_u), rtol=1e-6, atol=1e-6)
    torch.testing.assert_close(out, 2 * eps_c - eps_u, rtol=1e-6, atol=1e-6)


def test_guidance_shape_checks_and_null_labels():
    model = CountingModel()
    with pytest.raises(ValueError, match="does not fit"):
        classifier_free(model, torch.tensor([1, 2]), torch.tensor([10, 10, 10]), 1.5)
    assert null_class_labels(4, 1000).tolist() == [1000] * 4
    assert null_class_labels(4, 1000).dtype == torch.int64


def test_drop_condition_labels_context_and_captions():
    labels = torch.arange(20_000) % 1000
    assert torch.equal(drop_condition(labels, 1000, 0.0, torch.Generator().manual_seed(0)), labels)
    assert torch.all(drop_condition(labels, 1000, 1.0, torch.Generator().manual_seed(0)) == 1000)
    out = drop_condition(labels, 1000, 0.2, torch.Generator().manual_seed(0))
    dropped = (out == 1000)
    frac = dropped.double().mean().item()
    assert abs(frac - 0.2) < 5 * math.sqrt(0.2 * 0.8 / 20_000)
    assert torch.equal(out[~dropped], labels[~dropped])
    assert torch.equal(out, drop_condition(labels, 1000, 0.2, torch.Generator().manual_seed(0)))

    ctx = torch.randn(6, 5, 8)
    null = torch.zeros(1, 5, 8)
    out = drop_condition(ctx, null, 0.5, torch.Generator().manual_seed(1))
    rows_null = (out == 0).flatten(1).all(dim=1)
    assert torch.equal(out[~rows_null], ctx[~rows_null]) and 0 < int(rows_null.sum()) < 6
    caps = drop_condition(["a", "b", "c", "d"], "", 1.0, torch.Generator().manual_seed(0))
    assert caps == ["", "", "", ""]
    with pytest.raises(ValueError, match="probability"):
        drop_condition(labels, 1000, 1.5)
    with pytest.raises(ValueError, match="shape"):
        drop_condition(ctx, torch.zeros(5, 7), 0.5)


# ---- the `sampler` config group ---------------------------------------------------------------------------------

SAMPLER_YAMLS = sorted((ROOT / "experiments" / "sampler").glob("*.yaml"))


def test_expected_sampler_group_files_exist():
    names = {p.stem for p in SAMPLER_YAMLS}
    assert {"ddim", "ddim200_eta0", "ddim200_eta1", "ddim500_eta0", "ddim250_cfg", "plms", "ddpm", "smoke"} <= names


@pytest.mark.parametrize("path", SAMPLER_YAMLS, ids=lambda p: p.stem)
def test_every_sampler_config_validates(path):
    assert path.read_text().startswith("#"), f"{path.name} must open with a comment naming its source"
    raw = OmegaConf.load(path)
    assert "table_precision" in raw, f"{path.name} must record the table precision"
    cfg = validate_sampler_cfg(raw)
    assert cfg.source and cfg.table_precision == "float32"  # the release's tables


def test_paper_sampler_values():
    load = lambda name: validate_sampler_cfg(OmegaConf.load(ROOT / f"experiments/sampler/{name}.yaml"))  # noqa: E731
    assert (load("ddim200_eta1").steps, load("ddim200_eta1").eta) == (200, 1.0)
    assert (load("ddim500_eta0").steps, load("ddim500_eta0").eta) == (500, 0.0)
    cfg = load("ddim250_cfg")
    assert (cfg.steps, cfg.guidance_scale) == (250, 1.5)
    smoke = load("smoke")
    assert (smoke.kind, smoke.steps) == ("ddim", 10)


def _sampler_base() -> dict:
    return OmegaConf.to_container(OmegaConf.load(ROOT / "experiments/sampler/smoke.yaml"))


@pytest.mark.parametrize("update,match", [
    ({"stepz": 3}, r"sampler\.stepz"),
    ({"kind": "euler"}, r"'euler'.*ddim.*plms.*ddpm"),
    ({"spacing": "quad"}, r"'quad'.*original.*exact"),
    ({"table_precision": "float16"}, r"sampler\.table_precision.*'float16'.*float32.*float64"),
    ({"kind": "plms", "eta": 1.0}, "plms"),
    ({"kind": "ddpm", "eta": 0.0, "steps": 1000}, "ddpm"),
    ({"steps": 300}, r"sampler\.steps"),
    ({"batch_size": 0}, r"sampler\.batch_size"),
    ({"eta": "high"}, r"sampler\.eta"),
])
def test_bad_sampler_configs_are_named(update, match):
    cfg = _sampler_base()
    cfg.update(update)
    with pytest.raises(ConfigError, match=match):
        validate_sampler_cfg(cfg)


def test_missing_sampler_key_is_named():
    cfg = _sampler_base()
    del cfg["steps"]
    with pytest.raises(ConfigError, match=r"sampler\.steps"):
        validate_sampler_cfg(cfg)


@pytest.mark.parametrize("kind,steps,eta", [("ddim", 10, 0.0), ("plms", 10, 0.0), ("ddpm", 20, 1.0)])
def test_run_sampler_dispatches(kind, steps, eta):
    cfg = _sampler_base()
    cfg.update(kind=kind, steps=steps, eta=eta)
    c = validate_sampler_cfg(cfg)
    x0 = torch.randn(2, 1, 2, 2, generator=torch.Generator().manual_seed(0))
    x_T = torch.randn(2, 1, 2, 2, generator=torch.Generator().manual_seed(1))
    res = run_sampler(c, oracle(x0), x_T, SCHED, rng=StackedRandomGenerator([0, 1]))
    torch.testing.assert_close(res.pred_x0, x0, rtol=0, atol=2e-5)
    assert res.num_steps == steps


def test_table_precision_is_in_the_sample_stage_fingerprint(tmp_path):
    from replication.config import validate_config
    from replication.stages.entry import compose
    from replication.stages.fingerprint import fingerprint

    cfgs = {p: compose(["experiment=smoke", f"runs_root={tmp_path}", f"sampler.table_precision={p}"])
            for p in ("float32", "float64")}
    assert validate_config(cfgs["float64"]).sampler.table_precision == "float64"
    assert fingerprint("sample", cfgs["float32"]) != fingerprint("sample", cfgs["float64"])
    assert fingerprint("train_ldm", cfgs["float32"]) == fingerprint("train_ldm", cfgs["float64"])
