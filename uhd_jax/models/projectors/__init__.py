"""Vision-to-LLM projectors, built by name from config."""
from __future__ import annotations

from uhd_jax.models.projectors.mlp import MLPProjector, mlp_depth


def build_projector(projector_type: str, out_features: int, dtype, param_dtype):
    return MLPProjector(out_features=out_features, depth=mlp_depth(projector_type), dtype=dtype,
                        param_dtype=param_dtype, name="projector")
