"""EMA (replication/models/ema.py) against hand-computed LitEma arithmetic and the original key naming."""
from __future__ import annotations

from pathlib import Path

import pytest
import torch
from torch import nn

from replication.models.ema import EMA, EMAStateError


def _model() -> nn.Module:
    m = nn.Sequential(nn.Linear(2, 1), nn.LayerNorm(1))
    m[1].bias.requires_grad_(False)  # frozen parameters are not tracked, as LitEma
    return m


def _set(model: nn.Module, w: list[float], b: float) -> None:
    with torch.no_grad():
        model[0].weight.copy_(torch.tensor([w]))
        model[0].bias.fill_(b)


def _hand_ema(start: list[float], targets: list[list[float]], decay: float, warmup: bool) -> list[float]:
    """s <- s - (1 - d_n)(s - theta_n), d_n = min(decay, (1 + n)/(10 + n)), n = 1, 2, ... (float64)."""
    s = list(start)
    for n, theta in enumerate(targets, start=1):
        d = min(decay, (1 + n) / (10 + n)) if warmup else decay
        s = [si - (1 - d) * (si - ti) for si, ti in zip(s, theta)]
    return s


@pytest.mark.parametrize("decay,warmup", [(0.9999, True), (0.2, True), (0.5, False)])
def test_three_updates_match_hand_computation(decay, warmup):
    model = _model()
    _set(model, [1.0, -2.0], 0.5)
    ema = EMA(model, decay=decay, use_num_updates=warmup)
    targets = [[3.0, 1.0, -1.0], [0.0, 4.0, 2.0], [-5.0, 0.5, 1.5]]  # (w0, w1, b) at each step
    for w0, w1, b in targets:
        _set(model, [w0, w1], b)
        ema.update(model)
    expected = _hand_ema([1.0, -2.0, 0.5], targets, decay, warmup)
    got = ema.shadow_state()
    torch.testing.assert_close(got["0.weight"].double(), torch.tensor([expected[:2]], dtype=torch.float64), atol=1e-6, rtol=0)
    torch.testing.assert_close(got["0.bias"].double(), torch.tensor([expected[2]], dtype=torch.float64), atol=1e-6, rtol=0)
    assert int(ema.num_updates) == (3 if warmup else -1)


def test_warmup_decay_values():
    ema = EMA(_model())
    # first update uses (1+1)/(10+1); the 0.9999 cap is reached only after ~90k updates
    assert ema.current_decay() == pytest.approx(2 / 11, abs=1e-7)
    state = ema.state_dict()
    state["num_updates"] = torch.tensor(10**6, dtype=torch.int32)
    ema.load_state_dict(state)  # the count the update reads follows a loaded state
    assert ema.current_decay() == pytest.approx(0.9999, abs=1e-7)
    # bit for bit the float32 tensor arithmetic of LitEma: min(decay, (1 + n) / (10 + n)) with n a float32 tensor
    for n in (0, 1, 7, 12345, 89990, 10**6):
        state["num_updates"] = torch.tensor(n, dtype=torch.int32)
        ema.load_state_dict(state)
        t = torch.tensor(n, dtype=torch.int32).float() + 1
        assert ema.current_decay() == float(torch.minimum(torch.tensor(0.9999), (1 + t) / (10 + t)))


def test_update_reads_nothing_back_from_the_device():
    """The EMA step of the training loop makes no host-device sync: on the meta device (no data), any read of a
    buffer's value (.item(), int(), float()) raises, so a clean update proves the count and decay come from
    the host. The buffer still counts, for checkpoints."""
    model = _model().to("meta")
    ema = EMA(model).to("meta")
    ema.update(model)
    ema.update(model)
    assert ema.num_updates.device.type == "meta" and ema._host_updates == 2
    assert ema.current_decay() == pytest.approx(4 / 13, abs=1e-7)  # the third update: n = 3
    cpu = EMA(_model())
    cpu.update(_model())
    cpu.update(_model())
    assert int(cpu.num_updates) == 2  # the buffer follows the host count


def test_state_dict_uses_original_dotless_names():
    model = _model()
    ema = EMA(model)
    assert set(ema.state_dict()) == {"decay", "num_updates", "0weight", "0bias", "1weight"}
    assert ema.state_dict()["num_updates"].dtype == torch.int32


def test_state_dict_round_trip_and_copy_to():
    model = _model()
    ema = EMA(model)
    for step in range(4):
        _set(model, [float(step), -float(step)], 0.1 * step)
        ema.update(model)
    fresh = EMA(_model())
    fresh.load_state_dict(ema.state_dict())
    assert int(fresh.num_updates) == 4
    for k, v in ema.shadow_state().items():
        torch.testing.assert_close(fresh.shadow_state()[k], v)
    by_name = EMA(_model())
    by_name.load_shadow_state(ema.shadow_state())
    torch.testing.assert_close(by_name.shadow_state()["0.bias"], ema.shadow_state()["0.bias"])
    with pytest.raises(EMAStateError, match="missing"):
        by_name.load_shadow_state({"0.weight": torch.zeros(1, 2)})
    target = _model()
    fresh.copy_to(target)
    torch.testing.assert_close(target[0].weight, ema.shadow_state()["0.weight"])


def test_store_restore_and_context():
    model = _model()
    _set(model, [1.0, 2.0], 3.0)
    ema = EMA(model)
    _set(model, [10.0, 20.0], 30.0)
    ema.update(model)
    with ema.average_parameters(model):
        torch.testing.assert_close(model[0].weight, ema.shadow_state()["0.weight"])
    torch.testing.assert_close(model[0].weight, torch.tensor([[10.0, 20.0]]))
    with pytest.raises(EMAStateError):
        ema.restore(model)


def test_mismatched_model_is_an_error():
    ema = EMA(_model())
    with pytest.raises(EMAStateError, match="0.weight|1.weight"):
        ema.update(nn.Sequential(nn.Linear(2, 1)))


def test_shadow_module_state_is_a_full_state_dict():
    model = _model()
    ema = EMA(model)
    _set(model, [5.0, 6.0], 7.0)
    ema.update(model)
    state = ema.shadow_module_state(model)
    assert set(state) == set(model.state_dict())
    torch.testing.assert_close(state["0.weight"], ema.shadow_state()["0.weight"])
    torch.testing.assert_close(state["1.bias"], model[1].bias.detach())  # frozen: the model's own value
    fresh = _model()
    fresh.load_state_dict(state)


def test_class_conditional_ema_covers_the_unet_only_as_the_release():
    """LitEma wraps LatentDiffusion.model (DiffusionWrapper), not cond_stage_model: the class embedder of a cIN
    model is sampled with its raw weights, and the shadows carry the release's `diffusion_model...` names."""
    from omegaconf import OmegaConf

    from replication.models.conditioning import ClassConditionalUNet, ClassEmbedder, ema_scope
    from replication.models.unet import UNetModel

    kw = dict(OmegaConf.to_container(OmegaConf.load(Path(__file__).resolve().parents[1] / "experiments/unet/smoke.yaml")))
    kw.update(use_spatial_transformer=True, context_dim=6)
    torch.manual_seed(0)
    model = ClassConditionalUNet(UNetModel(**kw), ClassEmbedder(6, n_classes=4, null_class=3))
    assert ema_scope(model) == "diffusion_model." and ema_scope(model.diffusion_model) is None
    ema = EMA(model, decay=0.5, use_num_updates=False, scope=ema_scope(model))
    names = set(ema.shadow_state())
    assert names == {n for n, _ in model.diffusion_model.named_parameters(prefix="diffusion_model")}
    assert not any(n.startswith("cond_stage_model") for n in ema.state_dict())
    assert "diffusion_modelinput_blocks00weight" in ema.state_dict()  # LitEma's key, prefix model_ema. aside
    before = {n: p.detach().clone() for n, p in model.named_parameters()}
    with torch.no_grad():
        for p in model.parameters():
            p.add_(1.0)
    ema.update(model)
    state = ema.shadow_module_state(model)
    torch.testing.assert_close(state["cond_stage_model.embedding.weight"], model.cond_stage_model.embedding.weight.detach())
    key = "diffusion_model.input_blocks.0.0.weight"
    torch.testing.assert_close(state[key], before[key] + 0.5)  # d = 0.5: halfway to the new weights
    with pytest.raises(EMAStateError, match="no trainable parameter"):
        EMA(model, scope="no_such_prefix.")
