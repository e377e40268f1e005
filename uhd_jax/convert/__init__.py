"""PyTorch <-> uhd-jax checkpoint conversion: `uhd-convert --help`."""
