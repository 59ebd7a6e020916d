# First-stage training objective (paper App. G, Eq. 25): L1 + LPIPS reconstruction, patch-GAN hinge loss
# with the adaptive weight of Esser et al. (taming), and a KL or VQ regulariser. Semantics of the
# original LPIPSWithDiscriminator (ldm/modules/losses/contperceptual.py) and VQLPIPSWithDiscriminator.
from __future__ import annotations

import re
import warnings
from pathlib import Path
from typing import Any, Mapping

import torch
import torch.nn.functional as F
from torch import nn

from replication.models.autoencoder import AUX_CODEBOOK_LOSS, AUX_KL
from replication.models.autoencoder_config import AEKind, AELossConfig
from replication.models.discriminator import NLayerDiscriminator
from replication.utils.io import ArtifactError, load_tensors, torch_load_safe

# Adaptive GAN weight of the original: ||grad nll|| / (||grad g|| + 1e-4), clamped to [0, 1e4].
ADAPTIVE_EPS = 1e-4
ADAPTIVE_MAX = 1e4

# MD5 of the LPIPS linear-layer file the original downloads (taming `MD5_MAP["vgg_lpips"]`); the lpips
# package's weights/v0.1/vgg.pth has the same digest, so its calibrated layers are the original's.
ORIGINAL_LPIPS_LIN_MD5 = "d507d7349b931f0638a25a48a722f98a"

# Values of AutoencoderLoss.lpips_backbone: which VGG16 the perceptual term used.
LPIPS_BACKBONE_FILE = "vgg16-file"
LPIPS_BACKBONE_STANDIN = "standin-random"
LPIPS_BACKBONE_NONE = "none"

# Log keys (named as in the original's logs, without the "train/" prefix).
LOG_TOTAL = "total_loss"
LOG_NLL = "nll_loss"
LOG_REC = "rec_loss"
LOG_P = "p_loss"
LOG_KL = "kl_loss"
LOG_LOGVAR = "logvar"
LOG_CODEBOOK = "quant_loss"
LOG_D_WEIGHT = "d_weight"
LOG_DISC_FACTOR = "disc_factor"
LOG_G = "g_loss"
LOG_DISC = "disc_loss"
LOG_LOGITS_REAL = "logits_real"
LOG_LOGITS_FAKE = "logits_fake"

LPIPS_HOWTO = (
    "LPIPS needs a VGG16 ImageNet backbone, which this project never downloads. On a machine with internet run\n"
    "  python -c \"import torch, torchvision; torch.save(torchvision.models.vgg16(weights='IMAGENET1K_V1')"
    ".state_dict(), 'vgg16_imagenet.pth')\"\n"
    "copy the file here and set autoencoder.loss.lpips_backbone_path=/path/to/vgg16_imagenet.pth (a .safetensors "
    "with the same keys works too, as does a state dict holding loss.perceptual_loss.net.* of an original "
    "first-stage checkpoint). To run without it, set autoencoder.loss.perceptual_weight=0, or "
    "autoencoder.loss.allow_standin=true for a seeded random VGG16 (results are labelled 'standin-random' and "
    "are not comparable with the paper)."
)


def adopt_weight(weight: float, step: int, threshold: int, value: float = 0.0) -> float:
    """`value` before step `threshold`, `weight` from then on (the original's discriminator warm start)."""
    return value if step < threshold else weight


def hinge_d_loss(logits_real: torch.Tensor, logits_fake: torch.Tensor) -> torch.Tensor:
    return 0.5 * (F.relu(1.0 - logits_real).mean() + F.relu(1.0 + logits_fake).mean())


def adaptive_weight(
    nll_loss: torch.Tensor, g_loss: torch.Tensor, last_layer: torch.Tensor, disc_weight: float
) -> torch.Tensor:
    """lambda = ||grad_L nll|| / (||grad_L g|| + eps), clamped and detached, times disc_weight (App. G)."""
    nll_grads = torch.autograd.grad(nll_loss, last_layer, retain_graph=True)[0]
    g_grads = torch.autograd.grad(g_loss, last_layer, retain_graph=True)[0]
    weight = torch.norm(nll_grads) / (torch.norm(g_grads) + ADAPTIVE_EPS)
    return torch.clamp(weight, 0.0, ADAPTIVE_MAX).detach() * disc_weight


def _read_state_file(path: Path) -> Mapping[str, torch.Tensor]:
    if not path.exists():
        raise FileNotFoundError(f"lpips_backbone_path {path} does not exist.\n{LPIPS_HOWTO}")
    state: Any = load_tensors(path) if path.suffix == ".safetensors" else torch_load_safe(path)
    if isinstance(state, Mapping) and isinstance(state.get("state_dict"), Mapping):
        state = state["state_dict"]
    if not isinstance(state, Mapping):
        raise ArtifactError(f"lpips_backbone_path {path} holds a {type(state).__name__}, not a state dict")
    return state


def _vgg_slices_from_state(state: Mapping[str, torch.Tensor], targets: Mapping[str, torch.Tensor], path: Path):
    """Map torchvision `features.I.*` (or lpips/original `[...]net.sliceK.I.*`) keys onto lpips' slices."""
    picked, missing = {}, []
    for key, ref in targets.items():
        m = re.fullmatch(r"slice\d+\.(\d+)\.(weight|bias)", key)
        candidates = [f"features.{m.group(1)}.{m.group(2)}"] if m else []
        candidates += [p + key for p in ("", "net.", "perceptual_loss.net.", "loss.perceptual_loss.net.")]
        found = next((c for c in candidates if c in state), None)
        if found is None:
            missing.append(candidates[0])
        elif tuple(state[found].shape) != tuple(ref.shape):
            raise ArtifactError(
                f"lpips_backbone_path {path}: '{found}' has shape {tuple(state[found].shape)}, VGG16 needs {tuple(ref.shape)}"
            )
        else:
            picked[key] = state[found]
    if missing:
        sample = sorted(state)[:5]
        raise ArtifactError(
            f"lpips_backbone_path {path} is not a VGG16 state dict: missing {missing[:6]} "
            f"({len(missing)} in all); its first keys are {sample}.\n{LPIPS_HOWTO}"
        )
    return picked


def build_lpips(backbone_path: str | None, allow_standin: bool, standin_seed: int = 0) -> tuple[nn.Module, str]:
    """LPIPS (Zhang et al. 2018, v0.1, VGG16 trunk) as the original's perceptual loss, built without network.

    The lpips package ships its calibrated linear layers; the VGG16 trunk comes from `backbone_path` or,
    when `allow_standin`, from a seeded random init. Returns (frozen module in eval mode, backbone label).
    """
    if backbone_path is None and not allow_standin:
        raise ArtifactError(f"perceptual_weight > 0 but no lpips_backbone_path is configured.\n{LPIPS_HOWTO}")
    import lpips

    state = _read_state_file(Path(backbone_path)) if backbone_path is not None else None
    # pnet_rand=True makes lpips build torchvision's vgg16 with weights=None (no download); the linear
    # layers are read from the package's own weights/v0.1/vgg.pth. fork_rng: seeded, global RNG untouched.
    with torch.random.fork_rng(devices=[]), warnings.catch_warnings():
        warnings.filterwarnings("ignore", category=UserWarning, module=r"torchvision\..*")
        torch.manual_seed(standin_seed)
        model = lpips.LPIPS(pretrained=True, net="vgg", pnet_rand=True, verbose=False)
    label = LPIPS_BACKBONE_STANDIN
    if state is not None:
        slices = _vgg_slices_from_state(state, model.net.state_dict(), Path(backbone_path))
        model.net.load_state_dict(slices, strict=True)
        label = LPIPS_BACKBONE_FILE
    model.eval()
    for p in model.parameters():
        p.requires_grad_(False)
    return model, label


class AutoencoderLoss(nn.Module):
    """Generator and discriminator losses of the first stage (App. G); `kind` picks the KL or VQ form.

    KL (LPIPSWithDiscriminator): nll = sum(|x-x'| + w_p*LPIPS) / exp(logvar) + logvar, per-sample sum averaged
    over the batch, plus kl_weight * KL. VQ (VQLPIPSWithDiscriminator): nll = mean(|x-x'| + w_p*LPIPS) plus
    codebook_weight * codebook loss. Both add d_weight * disc_factor * (-mean D(x')) with adaptive d_weight.
    """

    def __init__(
        self,
        kind: AEKind | str,
        disc_start: int,
        kl_weight: float = 1.0,
        codebook_weight: float = 1.0,
        disc_weight: float = 1.0,
        perceptual_weight: float = 1.0,
        disc_num_layers: int = 3,
        disc_in_channels: int = 3,
        disc_factor: float = 1.0,
        logvar_init: float = 0.0,
        lpips_backbone_path: str | None = None,
        allow_standin: bool = False,
        standin_seed: int = 0,
        perceptual_module: nn.Module | None = None,
    ):
        super().__init__()
        self.kind = AEKind(getattr(kind, "value", kind))
        if self.kind is AEKind.identity:
            raise ValueError("the identity first stage has no training loss")
        self.disc_start = disc_start
        self.kl_weight = kl_weight
        self.codebook_weight = codebook_weight
        self.disc_weight = disc_weight
        self.disc_factor = disc_factor
        self.perceptual_weight = perceptual_weight
        if perceptual_weight > 0:
            if perceptual_module is not None:
                self.perceptual_loss, self.lpips_backbone = perceptual_module, "injected"
            else:
                self.perceptual_loss, self.lpips_backbone = build_lpips(lpips_backbone_path, allow_standin, standin_seed)
        else:
            self.perceptual_loss, self.lpips_backbone = None, LPIPS_BACKBONE_NONE
        if self.kind is AEKind.kl:
            # Learned output log-variance of the original (init 0). Its optimiser does not train it.
            self.logvar = nn.Parameter(torch.full((), float(logvar_init)))
        self.discriminator = NLayerDiscriminator(input_nc=disc_in_channels, n_layers=disc_num_layers)

    @classmethod
    def from_config(cls, kind: AEKind | str, cfg: AELossConfig) -> "AutoencoderLoss":
        return cls(
            kind,
            disc_start=cfg.disc_start,
            kl_weight=cfg.kl_weight,
            codebook_weight=cfg.codebook_weight,
            disc_weight=cfg.disc_weight,
            perceptual_weight=cfg.perceptual_weight,
            disc_num_layers=cfg.disc_num_layers,
            disc_in_channels=cfg.disc_in_channels,
            disc_factor=cfg.disc_factor,
            logvar_init=cfg.logvar_init,
            lpips_backbone_path=cfg.lpips_backbone_path,
            allow_standin=cfg.allow_standin,
            standin_seed=cfg.standin_seed,
        )

    def train(self, mode: bool = True) -> "AutoencoderLoss":
        super().train(mode)
        if self.perceptual_loss is not None:
            self.perceptual_loss.eval()  # fixed metric network: no dropout in its linear layers
        return self

    def discriminator_parameters(self) -> list[nn.Parameter]:
        return list(self.discriminator.parameters())

    def disc_factor_at(self, step: int) -> float:
        return adopt_weight(self.disc_factor, step, threshold=self.disc_start)

    def _reconstruction(self, x: torch.Tensor, x_rec: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        rec = torch.abs(x.contiguous() - x_rec.contiguous())
        if self.perceptual_loss is None:
            return rec, torch.zeros((), device=x.device)
        p_loss = self.perceptual_loss(x.contiguous(), x_rec.contiguous())  # [B, 1, 1, 1]
        return rec + self.perceptual_weight * p_loss, p_loss

    def generator_loss(
        self,
        x: torch.Tensor,
        x_rec: torch.Tensor,
        aux: Mapping[str, torch.Tensor],
        step: int,
        last_layer: torch.Tensor | None,
    ) -> tuple[torch.Tensor, dict[str, torch.Tensor]]:
        """Autoencoder (generator) loss at global step `step`; `last_layer` = model.last_layer()."""
        if x.shape != x_rec.shape:
            raise ValueError(f"x {tuple(x.shape)} and x_rec {tuple(x_rec.shape)} differ in shape")
        rec, p_loss = self._reconstruction(x, x_rec)
        logs: dict[str, torch.Tensor] = {LOG_REC: torch.abs(x - x_rec).mean().detach(), LOG_P: p_loss.mean().detach()}
        batch = x.shape[0]
        if self.kind is AEKind.kl:
            if AUX_KL not in aux:
                raise KeyError(f"KL loss needs aux['{AUX_KL}'] (per-sample KL); got keys {sorted(aux)}")
            nll_loss = torch.sum(rec / torch.exp(self.logvar) + self.logvar) / batch
            kl_loss = torch.sum(aux[AUX_KL]) / batch
            reg = self.kl_weight * kl_loss
            logs.update({LOG_KL: kl_loss.detach(), LOG_LOGVAR: self.logvar.detach()})
        else:
            if AUX_CODEBOOK_LOSS not in aux:
                raise KeyError(f"VQ loss needs aux['{AUX_CODEBOOK_LOSS}']; got keys {sorted(aux)}")
            nll_loss = torch.mean(rec)
            codebook_loss = aux[AUX_CODEBOOK_LOSS].mean()
            reg = self.codebook_weight * codebook_loss
            logs[LOG_CODEBOOK] = codebook_loss.detach()

        factor = self.disc_factor_at(step)
        zero = torch.zeros((), device=x.device)
        if factor > 0:
            g_loss = -torch.mean(self.discriminator(x_rec.contiguous()))
            if torch.is_grad_enabled() and g_loss.requires_grad:
                if last_layer is None:
                    raise ValueError("generator_loss needs last_layer (model.last_layer()) once the discriminator is on")
                d_weight = adaptive_weight(nll_loss, g_loss, last_layer, self.disc_weight)
            else:
                d_weight = zero  # evaluation without gradients, as the original's RuntimeError branch
        else:
            # Before disc_start the GAN term is multiplied by 0 in the original; skip its forward pass.
            g_loss, d_weight = zero, zero
        loss = nll_loss + reg + d_weight * factor * g_loss
        logs.update(
            {
                LOG_TOTAL: loss.detach(),
                LOG_NLL: nll_loss.detach(),
                LOG_D_WEIGHT: d_weight.detach(),
                LOG_DISC_FACTOR: torch.tensor(factor),
                LOG_G: g_loss.detach(),
            }
        )
        return loss, logs

    def discriminator_loss(
        self, x: torch.Tensor, x_rec: torch.Tensor, step: int
    ) -> tuple[torch.Tensor, dict[str, torch.Tensor]]:
        """Hinge loss of D on real x and detached reconstructions, times the disc factor at `step`."""
        logits_real = self.discriminator(x.contiguous().detach())
        logits_fake = self.discriminator(x_rec.contiguous().detach())
        factor = self.disc_factor_at(step)
        d_loss = factor * hinge_d_loss(logits_real, logits_fake)
        logs = {
            LOG_DISC: d_loss.detach(),
            LOG_LOGITS_REAL: logits_real.detach().mean(),
            LOG_LOGITS_FAKE: logits_fake.detach().mean(),
            LOG_DISC_FACTOR: torch.tensor(factor),
        }
        return d_loss, logs
