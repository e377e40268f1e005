"""LLaVA projectors: `mlpNx_gelu` (Linear, then N-1 x [exact GELU, Linear]) and `linear` (LLaVA v1 / LLaVAR)."""
from __future__ import annotations

import re
from typing import Any

import flax.linen as nn
import jax.numpy as jnp

from uhd_jax.models import layers

_MLP_NAME = re.compile(r"^mlp(\d+)x_gelu$")


def mlp_depth(projector_type: str) -> int:
    """Number of Linear layers of a projector name: 'linear' -> 1, 'mlp2x_gelu' -> 2."""
    if projector_type == "linear":
        return 1
    m = _MLP_NAME.match(projector_type)
    if not m or int(m.group(1)) < 1:
        raise ValueError(f"unknown projector type {projector_type!r}: expected 'linear' or 'mlp<N>x_gelu'")
    return int(m.group(1))


class MLPProjector(nn.Module):
    """Maps vision features (..., Dv) to the LLM width (..., H). Layers are named `dense_0 .. dense_{N-1}`."""

    out_features: int
    depth: int = 2
    dtype: Any = jnp.float32
    param_dtype: Any = jnp.float32

    @nn.compact
    def __call__(self, x):
        kw = dict(dtype=self.dtype, param_dtype=self.param_dtype)
        x = layers.dense(self.out_features, axes=("embed", "mlp"), name="dense_0", **kw)(x)
        for i in range(1, self.depth):
            x = layers.gelu_exact(x)
            # Alternate the sharded axis so consecutive kernels form a Megatron pair.
            axes = ("mlp", "embed") if i % 2 else ("embed", "mlp")
            x = layers.dense(self.out_features, axes=axes, name=f"dense_{i}", **kw)(x)
        return x
