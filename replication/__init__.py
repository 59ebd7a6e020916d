"""Replication harness for Rombach et al., "High-Resolution Image Synthesis with Latent
Diffusion Models" (CVPR 2022): data -> autoencoder -> latents -> LDM -> samples -> metrics -> report.

`load_pretrained`, `sample` and `Pretrained` (replication.api) are imported on first use, so that
`import replication` stays light (no torch) for the command-line tools."""

from typing import Any

__version__ = "0.1.0"
__all__ = ["Pretrained", "load_pretrained", "sample"]


def __getattr__(name: str) -> Any:
    if name in __all__:
        from replication import api

        return getattr(api, name)
    raise AttributeError(f"module 'replication' has no attribute {name!r}")
