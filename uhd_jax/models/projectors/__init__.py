"""Vision-to-LLM projectors, built by name from config."""
from __future__ import annotations

from uhd_jax.models.projectors.hiwin import HiWinResampler
from uhd_jax.models.projectors.mlp import MLPProjector, mlp_depth
from uhd_jax.models.projectors.resampler import SpatialResampler

# UHD resamplers (spec uhd.md §2.2-2.3): the names the original repos use for --mm_projector_type where one exists.
RESAMPLER_TYPES = {
    "adapt_spatial_resampler": dict(grid=12, windowed=True),   # v1-ECCV, 144 queries in 12x12 windows
    "uhd_v1_query64": dict(grid=8, windowed=True),             # v2 repos' 64-query variant of the same
    "arxiv_resampler": dict(grid=8, windowed=False, heads=8),  # v1-arXiv: 64 queries, full cross-attention
    # v2: JBU inverse pyramid + hierarchical window attention (v2-head's name; v2-dec2024 is the same math)
    "adapt_spatial_resampler_v2": dict(grid=12, windowed=True, jbu=True),
    # the same with 8x8 windows / 64 queries per image (ours, for the CPU demo; no original checkpoint)
    "uhd_v2_query64": dict(grid=8, windowed=True, jbu=True),
    # 2x2 windows / 4 queries per image: the demo's v2 (4 slices + overview = 20 tokens beside LLaVA-1.5's 64)
    "uhd_v2_query4": dict(grid=2, windowed=True, jbu=True),
}


def build_projector(projector_type: str, out_features: int, dtype, param_dtype, heads: int = 0,
                    feature_scale_mask: int = 5):
    if RESAMPLER_TYPES.get(projector_type, {}).get("jbu"):
        return HiWinResampler(embed_dim=out_features, num_heads=heads or max(out_features // 128, 1),
                              grid=RESAMPLER_TYPES[projector_type]["grid"],
                              feature_scale_mask=feature_scale_mask, dtype=dtype, param_dtype=param_dtype,
                              name="projector")
    if projector_type in RESAMPLER_TYPES:
        spec = RESAMPLER_TYPES[projector_type]
        heads = heads or spec.get("heads") or max(out_features // 128, 1)
        return SpatialResampler(embed_dim=out_features, num_heads=heads, grid=spec["grid"], windowed=spec["windowed"],
                                dtype=dtype, param_dtype=param_dtype, name="projector")
    return MLPProjector(out_features=out_features, depth=mlp_depth(projector_type), dtype=dtype,
                        param_dtype=param_dtype, name="projector")
