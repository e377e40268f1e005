"""uhd-jax: LLaVA-UHD v1/v2, SliME, LLaVA-1.5 and LLaVAR in JAX/Flax."""
__version__ = "0.1.0"
