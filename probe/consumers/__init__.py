"""Consumers of the tap: what is done with the attention the denoiser computes, while it computes it."""
