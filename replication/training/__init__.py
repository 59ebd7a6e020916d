"""Training loops (autoencoder, LDM) with full-state checkpoints, exact resume and signal handling."""
