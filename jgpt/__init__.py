"""jgpt: the JAX port of modded-nanogpt record #26, checked against a PyTorch reference (ref/)."""
__version__ = "0.1.0"
