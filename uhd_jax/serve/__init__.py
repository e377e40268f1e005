"""Answering from Python: `uhd_jax.load(checkpoint)` -> a `Model` with batched `generate` and multi-turn `chat`."""
from uhd_jax.serve.api import Chat, Model, load

__all__ = ["Chat", "Model", "load"]
