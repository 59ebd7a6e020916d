# First-stage perceptual compression models (paper Sec. 3.1 and App. G): convolutional Encoder/Decoder of
# the original release (ldm/modules/diffusionmodules/model.py) with a KL or VQ regulariser, plus the
# identity "first stage" of the pixel-space LDM-1 (Tab. 13). Parameter names equal the original's.
from __future__ import annotations

from typing import Any, Mapping, Sequence

import torch
from torch import nn

from replication.models.ae_blocks import AttnType, Downsample, ResnetBlock, Upsample, group_norm, make_attn, swish
from replication.models.autoencoder_config import AEKind, AutoencoderConfig, DDConfig, validate_autoencoder_cfg
from replication.models.distributions import DiagonalGaussian
from replication.models.quantize import DEFAULT_BETA, VectorQuantizer
from replication.utils.state import check_fits

# Keys of the aux dict returned by FirstStage.forward.
AUX_KL = "kl"  # per-sample KL(q(z|x) || N(0, I)), shape [B]
AUX_CODEBOOK_LOSS = "codebook_loss"  # scalar
AUX_INDICES = "indices"  # LongTensor [B, h, w]

# Top-level submodules of the original AutoencoderKL / VQModel that hold first-stage weights.
FIRST_STAGE_PREFIXES = ("encoder.", "decoder.", "quant_conv.", "post_quant_conv.", "quantize.")


class Encoder(nn.Module):
    """x [B, in_channels, H, W] -> h [B, (2 if double_z else 1) * z_channels, H/f, W/f], f = 2^(len(ch_mult)-1)."""

    def __init__(
        self,
        *,
        ch: int,
        out_ch: int,
        ch_mult: Sequence[int],
        num_res_blocks: int,
        attn_resolutions: Sequence[int],
        in_channels: int,
        resolution: int,
        z_channels: int,
        double_z: bool,
        dropout: float = 0.0,
        attn_type: AttnType | str = AttnType.vanilla,
    ):
        super().__init__()
        del out_ch  # shared ddconfig key, used by the Decoder only
        self.num_resolutions = len(ch_mult)
        self.num_res_blocks = num_res_blocks
        self.conv_in = nn.Conv2d(in_channels, ch, kernel_size=3, stride=1, padding=1)

        in_ch_mult = (1,) + tuple(ch_mult)
        curr_res = resolution
        block_in = ch
        self.down = nn.ModuleList()
        for i_level in range(self.num_resolutions):
            block, attn = nn.ModuleList(), nn.ModuleList()
            block_in = ch * in_ch_mult[i_level]
            block_out = ch * ch_mult[i_level]
            for _ in range(num_res_blocks):
                block.append(ResnetBlock(block_in, block_out, dropout))
                block_in = block_out
                if curr_res in attn_resolutions:
                    attn.append(make_attn(block_in, attn_type))
            down = nn.Module()
            down.block = block
            down.attn = attn
            if i_level != self.num_resolutions - 1:
                down.downsample = Downsample(block_in)
                curr_res //= 2
            self.down.append(down)

        self.mid = nn.Module()
        self.mid.block_1 = ResnetBlock(block_in, block_in, dropout)
        self.mid.attn_1 = make_attn(block_in, attn_type)
        self.mid.block_2 = ResnetBlock(block_in, block_in, dropout)

        self.norm_out = group_norm(block_in)
        self.conv_out = nn.Conv2d(block_in, 2 * z_channels if double_z else z_channels, kernel_size=3, stride=1, padding=1)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        h = self.conv_in(x)
        for i_level, down in enumerate(self.down):
            for i_block in range(self.num_res_blocks):
                h = down.block[i_block](h)
                if len(down.attn) > 0:
                    h = down.attn[i_block](h)
            if i_level != self.num_resolutions - 1:
                h = down.downsample(h)
        h = self.mid.block_2(self.mid.attn_1(self.mid.block_1(h)))
        return self.conv_out(swish(self.norm_out(h)))


class Decoder(nn.Module):
    """z [B, z_channels, h, w] -> x [B, out_ch, h*f, w*f]; up blocks have num_res_blocks + 1 resnets."""

    def __init__(
        self,
        *,
        ch: int,
        out_ch: int,
        ch_mult: Sequence[int],
        num_res_blocks: int,
        attn_resolutions: Sequence[int],
        in_channels: int,
        resolution: int,
        z_channels: int,
        double_z: bool = False,
        dropout: float = 0.0,
        attn_type: AttnType | str = AttnType.vanilla,
    ):
        super().__init__()
        del in_channels, double_z  # shared ddconfig keys, used by the Encoder only
        self.num_resolutions = len(ch_mult)
        self.num_res_blocks = num_res_blocks

        block_in = ch * ch_mult[-1]
        curr_res = resolution // 2 ** (self.num_resolutions - 1)
        self.conv_in = nn.Conv2d(z_channels, block_in, kernel_size=3, stride=1, padding=1)

        self.mid = nn.Module()
        self.mid.block_1 = ResnetBlock(block_in, block_in, dropout)
        self.mid.attn_1 = make_attn(block_in, attn_type)
        self.mid.block_2 = ResnetBlock(block_in, block_in, dropout)

        # Built from the lowest resolution up, stored so that up[i_level] matches the encoder's down[i_level].
        ups: list[nn.Module] = []
        for i_level in reversed(range(self.num_resolutions)):
            block, attn = nn.ModuleList(), nn.ModuleList()
            block_out = ch * ch_mult[i_level]
            for _ in range(num_res_blocks + 1):
                block.append(ResnetBlock(block_in, block_out, dropout))
                block_in = block_out
                if curr_res in attn_resolutions:
                    attn.append(make_attn(block_in, attn_type))
            up = nn.Module()
            up.block = block
            up.attn = attn
            if i_level != 0:
                up.upsample = Upsample(block_in)
                curr_res *= 2
            ups.insert(0, up)
        self.up = nn.ModuleList(ups)

        self.norm_out = group_norm(block_in)
        self.conv_out = nn.Conv2d(block_in, out_ch, kernel_size=3, stride=1, padding=1)

    def forward(self, z: torch.Tensor) -> torch.Tensor:
        h = self.conv_in(z)
        h = self.mid.block_2(self.mid.attn_1(self.mid.block_1(h)))
        for i_level in reversed(range(self.num_resolutions)):
            up = self.up[i_level]
            for i_block in range(self.num_res_blocks + 1):
                h = up.block[i_block](h)
                if len(up.attn) > 0:
                    h = up.attn[i_block](h)
            if i_level != 0:
                h = up.upsample(h)
        return self.conv_out(swish(self.norm_out(h)))


def _ddconfig_kwargs(ddconfig: DDConfig | Mapping[str, Any]) -> dict[str, Any]:
    if isinstance(ddconfig, DDConfig):
        ddconfig = {k: getattr(ddconfig, k) for k in DDConfig.__dataclass_fields__}
    kwargs = dict(ddconfig)
    if "attn_type" in kwargs:
        kwargs["attn_type"] = AttnType(getattr(kwargs["attn_type"], "value", kwargs["attn_type"]))
    kwargs["ch_mult"] = list(kwargs["ch_mult"])
    kwargs["attn_resolutions"] = list(kwargs["attn_resolutions"])
    return kwargs


class FirstStage(nn.Module):
    """Common interface (replication/ARCHITECTURE.md): the LDM sees only these methods."""

    downsampling_factor: int = 1

    @property
    def latent_channels(self) -> int:
        raise NotImplementedError

    def encode_moments(self, x: torch.Tensor) -> torch.Tensor:
        raise NotImplementedError

    def latent_from_moments(self, m: torch.Tensor, noise: torch.Tensor | None = None) -> torch.Tensor:
        raise NotImplementedError

    def decode(self, z: torch.Tensor) -> torch.Tensor:
        raise NotImplementedError

    def encode(self, x: torch.Tensor, noise: torch.Tensor | None = None) -> torch.Tensor:
        """The latent the LDM is trained on (KL: posterior sample, or mean when noise is None)."""
        return self.latent_from_moments(self.encode_moments(x), noise)

    def last_layer(self) -> nn.Parameter | None:
        return None

    def _check_input(self, x: torch.Tensor) -> None:
        f = self.downsampling_factor
        if x.dim() != 4 or x.shape[-2] % f != 0 or x.shape[-1] % f != 0:
            raise ValueError(f"input must be [B, C, H, W] with H and W divisible by f={f}; got {tuple(x.shape)}")


class _ConvFirstStage(FirstStage):
    """Shared Encoder/Decoder plumbing of AutoencoderKL and VQModel."""

    def __init__(self, ddconfig: DDConfig | Mapping[str, Any], embed_dim: int):
        super().__init__()
        kwargs = _ddconfig_kwargs(ddconfig)
        self.encoder = Encoder(**kwargs)
        self.decoder = Decoder(**kwargs)
        self.embed_dim = embed_dim
        self.z_channels = kwargs["z_channels"]
        self.downsampling_factor = 2 ** (len(kwargs["ch_mult"]) - 1)

    @property
    def latent_channels(self) -> int:
        return self.embed_dim

    def last_layer(self) -> nn.Parameter:
        """Decoder output conv weight: the layer whose gradients set the adaptive GAN weight (App. G)."""
        return self.decoder.conv_out.weight


class AutoencoderKL(_ConvFirstStage):
    """KL-regularised autoencoder: z ~ N(mean, var) with a small KL penalty towards N(0, I) (App. G)."""

    def __init__(self, ddconfig: DDConfig | Mapping[str, Any], embed_dim: int):
        super().__init__(ddconfig, embed_dim)
        if not _ddconfig_kwargs(ddconfig)["double_z"]:
            raise ValueError("AutoencoderKL needs ddconfig double_z=True (mean and log-variance)")
        self.quant_conv = nn.Conv2d(2 * self.z_channels, 2 * embed_dim, kernel_size=1)
        self.post_quant_conv = nn.Conv2d(embed_dim, self.z_channels, kernel_size=1)

    def encode_moments(self, x: torch.Tensor) -> torch.Tensor:
        self._check_input(x)
        return self.quant_conv(self.encoder(x))

    def posterior(self, m: torch.Tensor) -> DiagonalGaussian:
        return DiagonalGaussian(m)

    def latent_from_moments(self, m: torch.Tensor, noise: torch.Tensor | None = None) -> torch.Tensor:
        post = DiagonalGaussian(m)
        return post.mode() if noise is None else post.sample(noise)

    def decode(self, z: torch.Tensor) -> torch.Tensor:
        return self.decoder(self.post_quant_conv(z))

    def forward(
        self, x: torch.Tensor, sample_posterior: bool = True, noise: torch.Tensor | None = None
    ) -> tuple[torch.Tensor, dict[str, torch.Tensor]]:
        post = DiagonalGaussian(self.encode_moments(x))
        z = post.sample(noise) if sample_posterior else post.mode()
        return self.decode(z), {AUX_KL: post.kl()}


class VQModel(_ConvFirstStage):
    """VQ-regularised autoencoder. The LDM runs on pre-quantisation latents and `decode` quantises first,
    so the quantiser is part of the decoder (paper App. G / Sec. 3.1)."""

    def __init__(self, ddconfig: DDConfig | Mapping[str, Any], embed_dim: int, n_embed: int, beta: float = DEFAULT_BETA):
        super().__init__(ddconfig, embed_dim)
        if _ddconfig_kwargs(ddconfig)["double_z"]:
            raise ValueError("VQModel needs ddconfig double_z=False")
        self.n_embed = n_embed
        self.quantize = VectorQuantizer(n_embed, embed_dim, beta=beta)
        self.quant_conv = nn.Conv2d(self.z_channels, embed_dim, kernel_size=1)
        self.post_quant_conv = nn.Conv2d(embed_dim, self.z_channels, kernel_size=1)

    def encode_moments(self, x: torch.Tensor) -> torch.Tensor:
        self._check_input(x)
        return self.quant_conv(self.encoder(x))

    def latent_from_moments(self, m: torch.Tensor, noise: torch.Tensor | None = None) -> torch.Tensor:
        return m  # pre-quantisation latent; nothing to sample

    def decode_quantized(self, z_q: torch.Tensor) -> torch.Tensor:
        return self.decoder(self.post_quant_conv(z_q))

    def decode(self, z: torch.Tensor) -> torch.Tensor:
        z_q, _, _ = self.quantize(z)
        return self.decode_quantized(z_q)

    def forward(
        self, x: torch.Tensor, sample_posterior: bool = True, noise: torch.Tensor | None = None
    ) -> tuple[torch.Tensor, dict[str, torch.Tensor]]:
        del sample_posterior, noise  # deterministic encoder
        z_q, codebook_loss, indices = self.quantize(self.encode_moments(x))
        return self.decode_quantized(z_q), {AUX_CODEBOOK_LOSS: codebook_loss, AUX_INDICES: indices}


class IdentityFirstStage(FirstStage):
    """f=1: the LDM works in pixel space (LDM-1 of Tab. 13); no parameters, nothing to train."""

    downsampling_factor = 1

    def __init__(self, channels: int = 3):
        super().__init__()
        self.channels = channels

    @property
    def latent_channels(self) -> int:
        return self.channels

    def encode_moments(self, x: torch.Tensor) -> torch.Tensor:
        if x.dim() != 4 or x.shape[1] != self.channels:
            raise ValueError(f"expected [B, {self.channels}, H, W]; got {tuple(x.shape)}")
        return x

    def latent_from_moments(self, m: torch.Tensor, noise: torch.Tensor | None = None) -> torch.Tensor:
        return m

    def decode(self, z: torch.Tensor) -> torch.Tensor:
        return z

    def forward(self, x: torch.Tensor, sample_posterior: bool = True, noise: torch.Tensor | None = None):
        return self.encode_moments(x), {}


def make_first_stage(
    kind: AEKind | str, ddconfig: DDConfig | Mapping[str, Any] | None, embed_dim: int, n_embed: int | None = None
) -> FirstStage:
    kind = AEKind(getattr(kind, "value", kind))
    if kind is AEKind.identity:
        return IdentityFirstStage(channels=embed_dim)
    if ddconfig is None:
        raise ValueError(f"first stage kind '{kind.value}' needs a ddconfig")
    if kind is AEKind.kl:
        return AutoencoderKL(ddconfig, embed_dim)
    if n_embed is None:
        raise ValueError("first stage kind 'vq' needs n_embed")
    return VQModel(ddconfig, embed_dim, n_embed)


def build_autoencoder(cfg: AutoencoderConfig | Mapping[str, Any]) -> FirstStage:
    """Build (untrained) from an AutoencoderConfig or a mapping that validates as one. Only the architecture is
    needed: `loss` and `train` may be absent (inference, imported weights); when present they are checked."""
    cfg = validate_autoencoder_cfg(cfg, inference_only=True)
    return make_first_stage(cfg.kind, cfg.ddconfig, cfg.embed_dim, cfg.n_embed)


def first_stage_state(state: Mapping[str, torch.Tensor], prefix: str = "") -> dict[str, torch.Tensor]:
    """Select first-stage weights from an original state dict (drops `loss.*` and everything else);
    `prefix` is e.g. "first_stage_model." for a full LDM checkpoint."""
    out = {}
    for key, value in state.items():
        if key.startswith(prefix):
            name = key[len(prefix):]
            if name.startswith(FIRST_STAGE_PREFIXES):
                out[name] = value
    return out


def load_first_stage_state(model: FirstStage, state: Mapping[str, torch.Tensor], prefix: str = "") -> None:
    """Load strictly; one error lists every missing, unexpected and shape-mismatched key."""
    picked = first_stage_state(state, prefix)
    check_fits(model.state_dict(), picked, f"first-stage state does not fit {type(model).__name__}")
    model.load_state_dict(picked, strict=True)
