"""Noise schedule tables against closed forms computed independently here (plain Python floats, float64),
plus the `diffusion` config group schema."""
from __future__ import annotations

import math
from pathlib import Path

import numpy as np
import pytest
import torch
from omegaconf import OmegaConf

from replication.diffusion.config import validate_diffusion_cfg
from replication.diffusion.schedule import Schedule, ScheduleKind, extract
from replication.utils.schema import ConfigError

ROOT = Path(__file__).resolve().parents[1]
T = 1000
# the paper models' values (PROTOCOL §3)
B0, B1 = 0.0015, 0.0195
REL = 1e-10  # float64 tables vs an independent float64 computation (1 - ratio loses ~4 digits for small beta)


def reference_betas(kind: str, n: int, b0: float, b1: float, s: float = 8e-3) -> list[float]:
    """Each beta from its own formula, one index at a time (no linspace, no vector ops)."""
    if kind == "linear":
        return [(math.sqrt(b0) + i * (math.sqrt(b1) - math.sqrt(b0)) / (n - 1)) ** 2 for i in range(n)]
    if kind == "sqrt_linear":
        return [b0 + i * (b1 - b0) / (n - 1) for i in range(n)]
    if kind == "sqrt":
        return [math.sqrt(b0 + i * (b1 - b0) / (n - 1)) for i in range(n)]
    if kind == "cosine":
        f = lambda t: math.cos((t / n + s) / (1 + s) * math.pi / 2) ** 2  # noqa: E731
        return [min(max(1 - f(i + 1) / f(i), 0.0), 0.999) for i in range(n)]
    raise AssertionError(kind)


def reference_tables(betas: list[float]) -> dict[str, list[float]]:
    ac, prod = [], 1.0
    for b in betas:
        prod *= 1.0 - b
        ac.append(prod)
    ac_prev = [1.0] + ac[:-1]
    post_var, coef1, coef2 = [], [], []
    for b, a, ap in zip(betas, ac, ac_prev):
        # Bayes' rule for q(x_{t-1} | x_t, x_0): precision = 1/(1 - a_prev) + alpha_t / beta_t (DDPM Eq. 6-7)
        precision = 1.0 / (1.0 - ap) + (1.0 - b) / b if ap < 1.0 else math.inf
        var = 1.0 / precision
        post_var.append(var)
        if ap < 1.0:
            coef1.append(var * math.sqrt(ap) / (1.0 - ap))
            coef2.append(var * math.sqrt(1.0 - b) / b)
        else:  # t = 0: the posterior is a point mass at x_0
            coef1.append(1.0)
            coef2.append(0.0)
    return dict(
        alphas_cumprod=ac, alphas_cumprod_prev=ac_prev,
        sqrt_alphas_cumprod=[math.sqrt(a) for a in ac],
        sqrt_one_minus_alphas_cumprod=[math.sqrt(1 - a) for a in ac],
        sqrt_recip_alphas_cumprod=[1 / math.sqrt(a) for a in ac],
        sqrt_recipm1_alphas_cumprod=[math.sqrt(1 / a - 1) for a in ac],
        posterior_variance=post_var, posterior_mean_coef1=coef1, posterior_mean_coef2=coef2,
    )


@pytest.mark.parametrize("kind", ["linear", "sqrt_linear", "sqrt", "cosine"])
def test_tables_match_closed_form(kind):
    sched = Schedule.make(kind, T, B0, B1)
    betas = reference_betas(kind, T, B0, B1)
    np.testing.assert_allclose(sched.betas.numpy(), betas, rtol=REL, atol=0)
    for name, ref in reference_tables(betas).items():
        got = getattr(sched, name)
        assert got.dtype == torch.float64, name
        assert got.shape == (T,), name
        np.testing.assert_allclose(got.numpy(), ref, rtol=1e-9, atol=1e-15, err_msg=name)


def test_linear_is_linear_in_sqrt_beta_and_hits_the_config_ends():
    betas = Schedule.make("linear", T, B0, B1).betas.numpy()
    assert betas[0] == pytest.approx(B0, rel=REL) and betas[-1] == pytest.approx(B1, rel=REL)
    d = np.diff(np.sqrt(betas))
    np.testing.assert_allclose(d, (math.sqrt(B1) - math.sqrt(B0)) / (T - 1), rtol=1e-9)
    # it is NOT linear in beta (that is "sqrt_linear" in the original's naming)
    assert np.ptp(np.diff(betas)) > 1e-7
    np.testing.assert_allclose(np.diff(Schedule.make("sqrt_linear", T, B0, B1).betas.numpy()), (B1 - B0) / (T - 1),
                               rtol=1e-7)


@pytest.mark.parametrize("kind,b0,b1", [("linear", B0, B1), ("linear", 0.0015, 0.0155), ("sqrt_linear", B0, B1),
                                        ("sqrt", B0, B1)])
def test_betas_and_alphas_cumprod_are_the_releases_float64_values(kind, b0, b1):
    """Bit for bit the original make_beta_schedule (torch.linspace in float64) and register_schedule (np.cumprod of
    1 - betas), so the float32 buffers the release's samplers read are the same numbers."""
    lin = (lambda a, b: torch.linspace(a, b, T, dtype=torch.float64))  # noqa: E731
    ref = {"linear": lin(b0 ** 0.5, b1 ** 0.5) ** 2, "sqrt_linear": lin(b0, b1), "sqrt": lin(b0, b1) ** 0.5}[kind]
    ref = ref.numpy()
    sched = Schedule.make(kind, T, b0, b1)
    assert np.array_equal(sched.betas.numpy(), ref)
    assert np.array_equal(sched.alphas_cumprod.numpy(), np.cumprod(1. - ref, axis=0))


def test_cosine_alpha_bar_is_the_squared_cosine():
    s = 8e-3
    sched = Schedule.make(ScheduleKind.COSINE, T, B0, B1, cosine_s=s)
    f = lambda t: math.cos((t / T + s) / (1 + s) * math.pi / 2) ** 2  # noqa: E731
    ac = sched.alphas_cumprod.numpy()
    # unclipped region: alpha_bar_t = f(t+1) / f(0)
    for t in (0, 10, 500, 900):
        assert ac[t] == pytest.approx(f(t + 1) / f(0), rel=1e-10)
    assert sched.betas.numpy().max() <= 0.999


def test_posterior_log_variance_clipped_at_t0():
    sched = Schedule.make("linear", T, B0, B1)
    assert sched.posterior_variance[0] == 0.0
    assert sched.posterior_log_variance_clipped[0] == pytest.approx(math.log(1e-20))
    np.testing.assert_allclose(sched.posterior_log_variance_clipped[1:].numpy(),
                               np.log(sched.posterior_variance[1:].numpy()), rtol=1e-12)


def test_extract_reads_per_sample_values_and_broadcasts():
    sched = Schedule.make("linear", T, B0, B1)
    t = torch.tensor([0, 999, 500])
    out = extract(sched.alphas_cumprod, t, (3, 4, 8, 8))
    assert out.shape == (3, 1, 1, 1) and out.dtype == torch.float32
    ref = reference_tables(reference_betas("linear", T, B0, B1))["alphas_cumprod"]
    np.testing.assert_allclose(out.flatten().numpy(), [ref[0], ref[999], ref[500]], rtol=1e-6)
    out64 = extract(sched.alphas_cumprod, t, (3, 2), dtype=torch.float64)
    assert out64.shape == (3, 1) and out64.dtype == torch.float64
    np.testing.assert_allclose(out64.flatten().numpy(), [ref[0], ref[999], ref[500]], rtol=1e-12)


@pytest.mark.parametrize("bad", [torch.tensor([1000]), torch.tensor([-1]), torch.tensor([[1]]), torch.tensor([0.5])])
def test_extract_rejects_bad_timesteps(bad):
    sched = Schedule.make("linear", T, B0, B1)
    with pytest.raises(ValueError):
        extract(sched.betas, bad, (1, 3))


def test_unknown_kind_and_bad_ends_are_named():
    with pytest.raises(ValueError, match=r"'quadratic'.*sqrt_linear"):
        Schedule.make("quadratic", T, B0, B1)
    with pytest.raises(ValueError, match="linear_start"):
        Schedule.make("linear", T, 0.02, 0.01)
    with pytest.raises(ValueError, match="timesteps"):
        Schedule.make("linear", 0, B0, B1)


def test_respace_keeps_alpha_bar_at_the_visited_steps():
    sched = Schedule.make("linear", T, B0, B1)
    idx = np.arange(0, T, 20)
    sub = sched.respace(idx)
    np.testing.assert_allclose(sub.alphas_cumprod.numpy(), sched.alphas_cumprod.numpy()[idx], rtol=1e-12)
    full = sched.respace(np.arange(T))
    np.testing.assert_allclose(full.betas.numpy(), sched.betas.numpy(), rtol=1e-10)
    with pytest.raises(ValueError, match="increasing"):
        sched.respace([5, 3])


# ---- the `diffusion` config group ------------------------------------------------------------------------------

DIFFUSION_YAMLS = sorted((ROOT / "experiments" / "diffusion").glob("*.yaml"))


def test_expected_diffusion_group_files_exist():
    names = {p.stem for p in DIFFUSION_YAMLS}
    assert {"linear_0015_0195", "churches", "smoke"} <= names


@pytest.mark.parametrize("path", DIFFUSION_YAMLS, ids=lambda p: p.stem)
def test_every_diffusion_config_validates_and_builds(path):
    text = path.read_text()
    assert text.startswith("#"), f"{path.name} must open with a comment naming its source"
    cfg = validate_diffusion_cfg(OmegaConf.load(path))
    sched = cfg.make_schedule()
    assert sched.num_timesteps == cfg.timesteps
    assert cfg.source
    cfg.lr_multiplier()(0)


def test_paper_values_in_group_files():
    lin = validate_diffusion_cfg(OmegaConf.load(ROOT / "experiments/diffusion/linear_0015_0195.yaml"))
    assert (lin.timesteps, lin.beta_schedule, lin.linear_start, lin.linear_end) == (1000, "linear", 0.0015, 0.0195)
    assert lin.loss_type == "l2" and lin.parameterization == "eps" and not lin.scale_by_std
    ch = validate_diffusion_cfg(OmegaConf.load(ROOT / "experiments/diffusion/churches.yaml"))
    assert (ch.linear_start, ch.linear_end, ch.loss_type, ch.scale_by_std) == (0.0015, 0.0155, "l1", True)
    lr = ch.lr_multiplier()
    assert lr(0) == pytest.approx(1e-6) and lr(10_000) == pytest.approx(1.0) and lr(400_000) == pytest.approx(1.0)


def _base() -> dict:
    return OmegaConf.to_container(OmegaConf.load(ROOT / "experiments/diffusion/linear_0015_0195.yaml"))


def test_unknown_key_is_named():
    cfg = _base()
    cfg["linear_ends"] = 0.02
    with pytest.raises(ConfigError, match=r"diffusion\.linear_ends"):
        validate_diffusion_cfg(cfg)
    cfg = _base()
    cfg["lr_warmup"]["warmup"] = 3
    with pytest.raises(ConfigError, match=r"diffusion\.lr_warmup\.warmup"):
        validate_diffusion_cfg(cfg)


@pytest.mark.parametrize("key,value,allowed", [("beta_schedule", "cosin", "sqrt_linear"), ("loss_type", "l3", "l1"),
                                               ("parameterization", "v", "x0")])
def test_bad_enum_value_lists_allowed_values(key, value, allowed):
    cfg = _base()
    cfg[key] = value
    with pytest.raises(ConfigError, match=rf"{value!r}.*{allowed}"):
        validate_diffusion_cfg(cfg)


def test_missing_and_inconsistent_values_are_errors():
    cfg = _base()
    del cfg["linear_end"]
    with pytest.raises(ConfigError, match=r"diffusion\.linear_end"):
        validate_diffusion_cfg(cfg)
    cfg = _base()
    cfg.update(scale_by_std=True, scale_factor=0.18215)
    with pytest.raises(ConfigError, match="scale_factor"):
        validate_diffusion_cfg(cfg)
    cfg = _base()
    cfg["cond_drop_prob"] = 1.5
    with pytest.raises(ConfigError, match="cond_drop_prob"):
        validate_diffusion_cfg(cfg)
    cfg = _base()
    cfg["lr_warmup"] = {"kind": "linear", "warmup_steps": 10}
    with pytest.raises(ConfigError, match="cycle_length"):
        validate_diffusion_cfg(cfg)
    cfg = _base()
    cfg["timesteps"] = "many"
    with pytest.raises(ConfigError, match=r"diffusion\.timesteps"):
        validate_diffusion_cfg(cfg)


@pytest.mark.skipif(not torch.cuda.is_available(), reason="the device path of extract() needs CUDA")
def test_extract_on_cuda_gathers_on_the_device_without_a_sync_and_equals_the_cpu_path():
    """The first call copies the table to the device (a pageable host-to-device copy, which synchronizes: once
    per table and device); every later call gathers on the device without a sync (seen failing on an H200 when
    the first call was inside the sync check)."""
    sched = Schedule.make("linear", T, B0, B1)
    t = torch.tensor([0, 999, 500, 17])
    cpu = extract(sched.sqrt_alphas_cumprod, t, (4, 3, 8, 8))
    t_dev = t.cuda()
    extract(sched.sqrt_alphas_cumprod, t_dev.flip(0), (4, 3, 8, 8))  # the one-time table copy
    torch.cuda.synchronize()
    torch.cuda.set_sync_debug_mode("error")  # any host-device sync inside raises
    try:
        dev = extract(sched.sqrt_alphas_cumprod, t_dev, (4, 3, 8, 8))
    finally:
        torch.cuda.set_sync_debug_mode("default")
    assert dev.device.type == "cuda" and torch.equal(dev.cpu(), cpu)


def test_extract_off_the_cpu_reads_a_cached_device_table():
    """The non-CPU path, exercised on the meta device (shapes only): one device copy per table, reused, and
    dropped once its schedule is gone."""
    import gc

    from replication.diffusion import schedule as S

    sched = Schedule.make("linear", T, B0, B1)
    t = torch.tensor([0, 999, 500], device="meta")
    out = extract(sched.alphas_cumprod, t, (3, 4, 8, 8))
    assert out.device.type == "meta" and out.shape == (3, 1, 1, 1) and out.dtype == torch.float32
    first = S._table_on(sched.alphas_cumprod, torch.device("meta"))
    assert S._table_on(sched.alphas_cumprod, torch.device("meta")) is first
    key = (id(sched.alphas_cumprod), "meta")
    assert key in S._DEVICE_TABLES
    del sched, first
    gc.collect()
    other = Schedule.make("linear", 10, B0, B1)
    S._table_on(other.betas, torch.device("meta"))  # a new table prunes the dead ones
    assert (id(other.betas), "meta") in S._DEVICE_TABLES
    assert all(ref() is not None for ref, _ in S._DEVICE_TABLES.values())
