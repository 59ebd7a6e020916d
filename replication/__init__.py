"""Replication harness for Rombach et al., "High-Resolution Image Synthesis with Latent
Diffusion Models" (CVPR 2022): data -> autoencoder -> latents -> LDM -> samples -> metrics -> report."""

__version__ = "0.1.0"
