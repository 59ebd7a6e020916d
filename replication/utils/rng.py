"""Per-sample random streams: sample i always draws from seed base+i, whatever the batch (edm's
StackedRandomGenerator idea), so results do not depend on batch size or on how work was split."""
from __future__ import annotations

from typing import Sequence

import torch


class StackedRandomGenerator:
    """One torch.Generator per sample; randn/randn_like return a batch stacked from each stream."""

    def __init__(self, seeds: Sequence[int], device: str | torch.device = "cpu"):
        self.device = torch.device(device)
        self.seeds = [int(s) for s in seeds]
        # CPU generators keep results identical across devices; tensors are moved afterwards.
        self.generators = [torch.Generator(device="cpu").manual_seed(s % (1 << 63)) for s in self.seeds]
        # for a CUDA device the draws land in page-locked memory and are copied without the host waiting for the
        # GPU: a sampler drawing fresh noise every step (eta > 0, ancestral DDPM) never stalls the queued steps,
        # and the next step's noise is drawn while the GPU still computes the current one
        self.pin = self.device.type == "cuda"

    def __len__(self) -> int:
        return len(self.generators)

    def randn(self, size: Sequence[int], dtype: torch.dtype = torch.float32) -> torch.Tensor:
        size = tuple(size)
        if size[0] != len(self.generators):
            raise ValueError(f"batch dimension {size[0]} != number of per-sample seeds {len(self.generators)}")
        out = torch.empty(size, dtype=torch.float32, pin_memory=self.pin)
        for row, g in zip(out, self.generators):  # row i: the stream of sample i, as torch.randn(size[1:], g)
            torch.randn(size[1:], generator=g, out=row)
        return out.to(self.device, non_blocking=self.pin).to(dtype)

    def randn_like(self, x: torch.Tensor) -> torch.Tensor:
        return self.randn(x.shape, dtype=x.dtype).to(x.device)

    def randint(self, low: int, high: int, size: Sequence[int]) -> torch.Tensor:
        size = tuple(size)
        out = torch.stack([torch.randint(low, high, size[1:], generator=g) for g in self.generators])
        return out.to(self.device)
