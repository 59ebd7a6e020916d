# Vector quantisation layer of the VQ-regularised first stage (paper Sec. 3.1 / App. G; original
# taming.modules.vqvae.quantize.VectorQuantizer2 with legacy=True, as used by ldm.models.autoencoder.VQModel).
from __future__ import annotations

import torch
from torch import nn

# Commitment weight of the original VQModel (`beta=0.25`, VQ-VAE value).
DEFAULT_BETA = 0.25


class VectorQuantizer(nn.Module):
    """Nearest-codebook quantiser with a straight-through gradient.

    Loss ("legacy" form of the original release, which puts beta on the codebook term rather than on the
    commitment term): mean((sg[z_q] - z)^2) + beta * mean((z_q - sg[z])^2).
    """

    def __init__(self, n_embed: int, embed_dim: int, beta: float = DEFAULT_BETA):
        super().__init__()
        if n_embed < 1 or embed_dim < 1:
            raise ValueError(f"n_embed and embed_dim must be positive; got n_embed={n_embed}, embed_dim={embed_dim}")
        self.n_embed = n_embed
        self.embed_dim = embed_dim
        self.beta = beta
        self.embedding = nn.Embedding(n_embed, embed_dim)
        # The original initialises the codebook uniformly in [-1/n_embed, 1/n_embed].
        nn.init.uniform_(self.embedding.weight, -1.0 / n_embed, 1.0 / n_embed)

    def nearest_indices(self, z: torch.Tensor) -> torch.Tensor:
        """Index of the nearest codebook entry (squared L2) for every position of z [B, C, H, W] -> [B, H, W]."""
        if z.dim() != 4 or z.shape[1] != self.embed_dim:
            raise ValueError(f"expected z of shape [B, {self.embed_dim}, H, W]; got {tuple(z.shape)}")
        b, c, h, w = z.shape
        flat = z.permute(0, 2, 3, 1).reshape(-1, c)
        codebook = self.embedding.weight
        # ||z||^2 + ||e||^2 - 2 z.e, computed with one matmul as in the original.
        dist = flat.pow(2).sum(1, keepdim=True) + codebook.pow(2).sum(1)[None, :] - 2.0 * flat @ codebook.t()
        return torch.argmin(dist, dim=1).reshape(b, h, w)

    def lookup(self, indices: torch.Tensor) -> torch.Tensor:
        """Codebook vectors for indices [B, H, W] -> [B, C, H, W]."""
        return self.embedding(indices).permute(0, 3, 1, 2).contiguous()

    def forward(self, z: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        """Return (z_q with straight-through gradient to z, codebook loss (scalar), indices [B, H, W])."""
        indices = self.nearest_indices(z.detach())
        z_q = self.lookup(indices)
        loss = torch.mean((z_q.detach() - z) ** 2) + self.beta * torch.mean((z_q - z.detach()) ** 2)
        # Forward value is exactly the codebook entry; the gradient w.r.t. the output passes to z unchanged.
        z_st = z_q.detach() + (z - z.detach())
        return z_st, loss, indices
