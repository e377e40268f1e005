"""uhd-jax: LLaVA-UHD v1/v2, SliME, LLaVA-1.5 and LLaVAR in JAX/Flax."""
__version__ = "0.1.0"


def load(checkpoint: str, **kwargs):
    """`uhd_jax.serve.load`: a checkpoint ready to answer (imported here on first use, so `import uhd_jax` stays
    cheap)."""
    from uhd_jax.serve.api import load as _load

    return _load(checkpoint, **kwargs)
