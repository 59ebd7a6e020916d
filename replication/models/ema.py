"""Exponential moving average of weights, as the release's `LitEma` (ldm/modules/ema.py; not described in the paper).

shadow <- shadow - (1 - d) * (shadow - theta), with d = min(decay, (1 + n) / (10 + n)) and n the update count
after incrementing (warm-up), or d = decay when use_num_updates=False. Defaults: decay 0.9999, warm-up on
(PROTOCOL.md §3). Shadows are buffers named after the parameter with its dots removed, so
`state_dict()` has the keys of the original's `model_ema.*` entries (without the `model_ema.` prefix):
`decay`, `num_updates` and e.g. `input_blocks00weight` for `input_blocks.0.0.weight`.

`scope` limits the average to parameters whose name starts with it. The release's LitEma wraps
`LatentDiffusion.model` (the DiffusionWrapper around the U-Net) only, so a jointly trained class embedder
(`cond_stage_model`, cin256) is used with its raw weights even under `ema_scope()`; see
`replication.models.conditioning.ema_scope`.
"""
from __future__ import annotations

from contextlib import contextmanager
from typing import Any, Iterator, Mapping

import numpy as np
import torch
from torch import nn

# LitEma defaults [code: ldm/modules/ema.py, ldm/models/diffusion/ddpm.py].
DEFAULT_EMA_DECAY = 0.9999
# Warm-up constants of LitEma: d_n = min(decay, (1 + n) / (10 + n)).
WARMUP_OFFSET_NUM = 1
WARMUP_OFFSET_DEN = 10


def shadow_name(param_name: str) -> str:
    """LitEma buffer name for a parameter: the name with dots removed."""
    return param_name.replace(".", "")


class EMAStateError(RuntimeError):
    """EMA and model disagree on which parameters exist."""


class EMA(nn.Module):
    def __init__(self, model: nn.Module, decay: float = DEFAULT_EMA_DECAY, use_num_updates: bool = True,
                 scope: str | None = None):
        super().__init__()
        self.scope = scope
        if not 0.0 <= decay <= 1.0:
            raise ValueError(f"EMA decay must be in [0, 1], got {decay}")
        self.register_buffer("decay", torch.tensor(decay, dtype=torch.float32))
        # -1 switches the warm-up off, as LitEma(use_num_upates=False).
        self.register_buffer("num_updates", torch.tensor(0 if use_num_updates else -1, dtype=torch.int32))
        # Host copies of the two buffers: update() reads these, never the (device) buffers, so an EMA step on a GPU
        # makes no host-device sync (reading the buffers cost three syncs per training step). The buffers are
        # written from them (asynchronously) for checkpoints; load_state_dict() sets both.
        self._host_decay = np.float32(decay)
        self._host_updates = 0 if use_num_updates else -1
        self.param_to_shadow: dict[str, str] = {}
        for name, p in self._tracked(model):
            s_name = shadow_name(name)
            if s_name in self.param_to_shadow.values() or s_name in ("decay", "num_updates"):
                raise EMAStateError(f"parameter {name!r} collides with another shadow name {s_name!r} once dots are removed")
            self.param_to_shadow[name] = s_name
            self.register_buffer(s_name, p.detach().clone().float() if p.is_floating_point() else p.detach().clone())
        if not self.param_to_shadow:
            raise EMAStateError(f"no trainable parameter of the model is in the EMA's scope {scope!r}")
        self._stored: list[torch.Tensor] | None = None

    def _tracked(self, model: nn.Module) -> list[tuple[str, nn.Parameter]]:
        return [(n, p) for n, p in model.named_parameters()
                if p.requires_grad and (self.scope is None or n.startswith(self.scope))]

    def _pairs(self, model: nn.Module) -> tuple[list[torch.Tensor], list[torch.Tensor]]:
        params = dict(self._tracked(model))
        missing = sorted(set(self.param_to_shadow) - set(params))
        extra = sorted(set(params) - set(self.param_to_shadow))
        if missing or extra:
            raise EMAStateError(f"model does not match EMA: missing from model {missing[:10]}, not tracked by EMA {extra[:10]}")
        names = list(self.param_to_shadow)
        return [getattr(self, self.param_to_shadow[n]) for n in names], [params[n] for n in names]

    def current_decay(self) -> float:
        """Decay the next update will use (after its increment of num_updates), in float32 arithmetic as LitEma's
        tensors compute it; read from the host copies (no device access)."""
        if self._host_updates < 0:
            return float(self._host_decay)
        n = np.float32(self._host_updates) + np.float32(1)
        ratio = (np.float32(WARMUP_OFFSET_NUM) + n) / (np.float32(WARMUP_OFFSET_DEN) + n)
        return float(min(self._host_decay, np.float32(ratio)))

    def _load_from_state_dict(self, state_dict: Mapping[str, Any], prefix: str, *args: Any, **kwargs: Any) -> None:
        super()._load_from_state_dict(state_dict, prefix, *args, **kwargs)
        # the host copies follow the loaded values (read from the incoming tensors, usually on the CPU)
        if prefix + "num_updates" in state_dict:
            self._host_updates = int(state_dict[prefix + "num_updates"])
        if prefix + "decay" in state_dict:
            self._host_decay = np.float32(float(state_dict[prefix + "decay"]))

    @torch.no_grad()
    def update(self, model: nn.Module) -> None:
        decay = self.current_decay()
        if self._host_updates >= 0:
            self._host_updates += 1
            self.num_updates.fill_(self._host_updates)  # a fill kernel with the value as argument: no sync
        shadows, params = self._pairs(model)
        weight = float(np.float32(1.0) - np.float32(decay))
        src = [p.detach().to(device=s.device, dtype=s.dtype) for s, p in zip(shadows, params)]
        torch._foreach_lerp_(shadows, src, weight)  # s + w (p - s) = s - (1 - d)(s - p)

    forward = update

    @torch.no_grad()
    def copy_to(self, model: nn.Module) -> None:
        shadows, params = self._pairs(model)
        for s, p in zip(shadows, params):
            p.copy_(s)

    @torch.no_grad()
    def store(self, model: nn.Module) -> None:
        """Keep a copy of the model's current weights (e.g. before swapping in the EMA for evaluation)."""
        self._stored = [p.detach().clone() for p in self._pairs(model)[1]]

    @torch.no_grad()
    def restore(self, model: nn.Module) -> None:
        if self._stored is None:
            raise EMAStateError("restore() called without a preceding store()")
        for saved, p in zip(self._stored, self._pairs(model)[1]):
            p.copy_(saved)
        self._stored = None

    @contextmanager
    def average_parameters(self, model: nn.Module) -> Iterator[nn.Module]:
        """Within the block the model holds the EMA weights; its own weights come back afterwards."""
        self.store(model)
        self.copy_to(model)
        try:
            yield model
        finally:
            self.restore(model)

    @torch.no_grad()
    def load_shadow_state(self, named: Mapping[str, torch.Tensor]) -> None:
        """Set the shadows from weights under parameter names (e.g. `split_ldm_state(...)["ema_unet"]`)."""
        missing = sorted(set(self.param_to_shadow) - set(named))
        unexpected = sorted(set(named) - set(self.param_to_shadow))
        if missing or unexpected:
            raise EMAStateError(f"EMA weights do not fit: missing {missing[:10]}, unexpected {unexpected[:10]}")
        for n, s in self.param_to_shadow.items():
            shadow = getattr(self, s)
            if tuple(named[n].shape) != tuple(shadow.shape):
                raise EMAStateError(f"EMA weight {n}: shape {tuple(named[n].shape)} vs {tuple(shadow.shape)}")
            shadow.copy_(named[n])

    def shadow_module_state(self, model: nn.Module) -> dict[str, torch.Tensor]:
        """`model.state_dict()` with every tracked parameter replaced by its EMA (in the parameter's dtype)."""
        self._pairs(model)  # same parameter set, or a clear error
        state = {k: v.detach() for k, v in model.state_dict().items()}
        for n, s in self.param_to_shadow.items():
            state[n] = getattr(self, s).detach().to(state[n].dtype)
        return state

    def shadow_state(self) -> dict[str, torch.Tensor]:
        """EMA weights under the model's own parameter names (ready for model.load_state_dict)."""
        return {n: getattr(self, s).detach() for n, s in self.param_to_shadow.items()}
