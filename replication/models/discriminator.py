# Patch-based discriminator D_psi of the first-stage objective (paper App. G, Eq. 25; the pix2pix
# NLayerDiscriminator as shipped in taming-transformers and used by the original release).
from __future__ import annotations

from torch import nn

# pix2pix PatchGAN settings of the original: 4x4 kernels, padding 1, 64 base filters, width capped at 8x,
# LeakyReLU slope 0.2, DCGAN init N(0, 0.02) for convs and N(1, 0.02) for BatchNorm scales.
KERNEL = 4
PADDING = 1
BASE_FILTERS = 64
MAX_WIDTH_MULT = 8
LEAKY_SLOPE = 0.2
INIT_STD = 0.02


def weights_init(module: nn.Module) -> None:
    if isinstance(module, nn.Conv2d):
        nn.init.normal_(module.weight, 0.0, INIT_STD)
    elif isinstance(module, nn.BatchNorm2d):
        nn.init.normal_(module.weight, 1.0, INIT_STD)
        nn.init.constant_(module.bias, 0.0)


class NLayerDiscriminator(nn.Module):
    """Image [B, C, H, W] -> patch logits [B, 1, h, w]; `main.N` names match the original checkpoints."""

    def __init__(self, input_nc: int = 3, ndf: int = BASE_FILTERS, n_layers: int = 3):
        super().__init__()
        if n_layers < 1:
            raise ValueError(f"disc_num_layers must be >= 1; got {n_layers}")
        layers: list[nn.Module] = [
            nn.Conv2d(input_nc, ndf, kernel_size=KERNEL, stride=2, padding=PADDING),
            nn.LeakyReLU(LEAKY_SLOPE, True),
        ]
        mult = 1
        for n in range(1, n_layers):
            prev, mult = mult, min(2**n, MAX_WIDTH_MULT)
            layers += [
                # BatchNorm follows, so these convs carry no bias (as in the original).
                nn.Conv2d(ndf * prev, ndf * mult, kernel_size=KERNEL, stride=2, padding=PADDING, bias=False),
                nn.BatchNorm2d(ndf * mult),
                nn.LeakyReLU(LEAKY_SLOPE, True),
            ]
        prev, mult = mult, min(2**n_layers, MAX_WIDTH_MULT)
        layers += [
            nn.Conv2d(ndf * prev, ndf * mult, kernel_size=KERNEL, stride=1, padding=PADDING, bias=False),
            nn.BatchNorm2d(ndf * mult),
            nn.LeakyReLU(LEAKY_SLOPE, True),
            nn.Conv2d(ndf * mult, 1, kernel_size=KERNEL, stride=1, padding=PADDING),
        ]
        self.main = nn.Sequential(*layers)
        self.apply(weights_init)

    def forward(self, x):
        return self.main(x)
