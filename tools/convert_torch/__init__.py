"""PyTorch <-> uhd-jax checkpoint conversion: `python -m tools.convert_torch --help`."""
