"""Causal self-attention on TPU through JAX's Pallas flash-attention kernel
(`jax.experimental.pallas.ops.tpu.flash_attention`), fed per-row lengths as segment ids: real tokens are segment 1,
padding segment 0, so a real query never sees padding and a padding query sees only padding (its own slot at least:
finite, and unused). No (T, S) mask exists; the kernel skips key blocks above the diagonal.
"""
from __future__ import annotations

import jax.numpy as jnp
from jax.experimental.pallas.ops.tpu import flash_attention as fa


def tpu_flash_attention(q, k, v, *, is_causal: bool, kv_lengths=None):
    """q (B, T, N, D), k/v (B, S, K, D) -> (B, T, N, D); T and S multiples of 128 (the kernel's blocks)."""
    b, t, n, d = q.shape
    s, kv_heads = k.shape[1], k.shape[2]
    segments = None
    if kv_lengths is not None:
        q_seg = (jnp.arange(t)[None] < kv_lengths[:, None]).astype(jnp.int32)
        kv_seg = (jnp.arange(s)[None] < kv_lengths[:, None]).astype(jnp.int32)
        segments = fa.SegmentIds(q=q_seg, kv=kv_seg)
    # the kernel wants one key head per query head
    k, v = (jnp.repeat(x, n // kv_heads, axis=2) for x in (k, v))
    heads_first = lambda x: jnp.swapaxes(x, 1, 2)  # noqa: E731
    out = fa.flash_attention(heads_first(q), heads_first(k), heads_first(v), segment_ids=segments, causal=is_causal,
                             sm_scale=1.0 / float(d) ** 0.5,
                             block_sizes=fa.BlockSizes.get_default(b, n, t, s, d))
    return heads_first(out)
