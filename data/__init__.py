"""The built-in model and the prompt sets, installed with probe as ``probe.data``."""
