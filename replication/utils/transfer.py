"""Host-to-device copies of training inputs (the pinned-memory lever)."""
from __future__ import annotations

import torch


def to_device(x: torch.Tensor, device: torch.device, pin_memory: bool = False) -> torch.Tensor:
    """`x` on `device`. With `pin_memory` on a CUDA device the host tensor is first copied to page-locked memory
    and sent with non_blocking=True, so the copy is a DMA queued on the current stream rather than a staged
    synchronous one; anywhere else (CPU runs, tensors already on the device) it is a plain `.to(device)`."""
    if pin_memory and device.type == "cuda" and x.device.type == "cpu":
        return x.pin_memory().to(device, non_blocking=True)
    return x.to(device)
