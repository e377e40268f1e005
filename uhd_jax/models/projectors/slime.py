"""SliME's projector (spec llava15_slime_llavar.md §C.2-C.5): a gated mixture of adapters on the global view, a local
compression layer on the tiles, the spatial merge of the tiles' tokens and the text-guided router.

Parameter names mirror the original (`mm_projector.projection.{0,2}` -> `projection/dense_{0,1}`,
`mm_projector.attn.*` -> `attn/*`, `mm_projector.w_gate`, `sampler.post_qformer.*` -> `post_qformer/*`); the dead
`w_noise` is kept so checkpoints round-trip. Both resamplers work at the vision width Dv (1024): they have no kv or
output projection, the MLP maps their output to the LLM.

Static shapes: tiles come as a fixed number of slots with a validity mask; the router returns a keep mask over a
fixed budget of local tokens instead of a variable-length selection (the LLM masks the dropped ones).
"""
from __future__ import annotations

from typing import Any

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np

from uhd_jax.models import layers
from uhd_jax.models.interpolate import torch_bicubic_matrix
from uhd_jax.models.projectors.mlp import MLPProjector
from uhd_jax.models.projectors.resampler import PackedInProjection, sincos_2d

GLOBAL_GRID, LOCAL_GRID = 24, 12     # 576 queries on the global view, 144 per tile


def interpolated_table(table, grid: int, size: int):
    """A (grid^2, D) position table resized to (size^2, D) by torch's bicubic (align_corners=False, a=-0.75)."""
    if size == grid:
        return table
    m = jnp.asarray(torch_bicubic_matrix(grid, size), jnp.float32)
    t = jnp.einsum("oh,hwd->owd", m, table.reshape(grid, grid, -1))
    return jnp.einsum("pw,owd->opd", m, t).reshape(size * size, -1)


class QueryResampler(nn.Module):
    """One cross-attention layer from grid^2 learned queries to a square map of vision features (SliME's R24 and
    R12): q = LN_q(query) + pos, k = LN_kv(x) + pos resized to the map, v = LN_kv(x); LN_post(MHA(q, k, v))."""

    grid: int
    num_heads: int
    eps: float = 1e-6
    dtype: Any = jnp.float32
    param_dtype: Any = jnp.float32

    @nn.compact
    def __call__(self, x):
        """x (..., S*S, Dv) -> (..., grid^2, Dv)."""
        d, kw = x.shape[-1], dict(dtype=self.dtype, param_dtype=self.param_dtype)
        size = int(round(x.shape[-2] ** 0.5))
        if size * size != x.shape[-2]:
            raise ValueError(f"QueryResampler needs a square feature map, got {x.shape[-2]} tokens")
        table = sincos_2d(self.grid, d)
        query = self.param("query", nn.with_logical_partitioning(nn.initializers.truncated_normal(0.02),
                                                                 (None, "embed")), table.shape, self.param_dtype)
        # the original stores the table as a parameter without gradient: freeze `pos_embed` in the stage rules
        pos_embed = self.param("pos_embed", nn.with_logical_partitioning(
            lambda *_: jnp.asarray(table, self.param_dtype), (None, "embed")), table.shape)
        pos = jax.lax.stop_gradient(jnp.asarray(pos_embed, jnp.float32))
        key_pos = interpolated_table(pos, self.grid, size)   # the stored table (fp16 in the original), resized
        head_dim = d // self.num_heads
        in_proj = PackedInProjection(self.num_heads, head_dim, name="in_proj", **kw)
        kv = layers.layer_norm(eps=self.eps, name="ln_kv", **kw)(x)
        q = layers.layer_norm(eps=self.eps, name="ln_q", **kw)(jnp.asarray(query, self.dtype)) + pos.astype(self.dtype)
        qh = in_proj(q, 0)                                                                # (Q, H, hd)
        kh = in_proj((kv.astype(jnp.float32) + key_pos).astype(self.dtype), 1)           # (..., N, H, hd)
        vh = in_proj(kv, 2)
        logits = jnp.einsum("qhd,...nhd->...hqn", qh, kh, preferred_element_type=jnp.float32) * head_dim ** -0.5
        probs = jax.nn.softmax(logits, axis=-1).astype(self.dtype)
        out = jnp.einsum("...hqn,...nhd->...qhd", probs, vh)
        out = layers.dense(d, axes=("heads", "head_dim", "embed"), axis=(-2, -1), name="out_proj", **kw)(out)
        return layers.layer_norm(eps=self.eps, name="ln_post", **kw)(out)


class GatedAdapters(nn.Module):
    """SliME's `GatedBlock` (the "mixture of adapters"): per global token, softmax gates over two experts, the MLP
    and the MLP after the 576-query resampler. A map of any other token count (the tiles' compressed tokens) goes
    through the MLP alone, as in the original.

    `expert`: -1 the gated mixture; 0 / 1 that expert alone (`mm_learnable_gated`, the pretraining runs 1a / 1b).
    `gate_noise`: the original's training noise, randn * (softplus(x @ w_gate) + 0.01) on the gate logits (it uses
    w_gate, not the dead w_noise); off, training and inference gate alike."""

    hidden_size: int
    num_heads: int = 0               # 0: Dv // 128 (8 for CLIP-L)
    expert: int = -1
    gate_noise: bool = True
    dtype: Any = jnp.float32
    param_dtype: Any = jnp.float32

    @nn.compact
    def __call__(self, x, deterministic: bool = True):
        """x (..., N, Dv) -> (..., N', H): N' = 576 for the global view's 576 tokens, else N."""
        kw = dict(dtype=self.dtype, param_dtype=self.param_dtype)
        dv = x.shape[-1]
        mlp = MLPProjector(self.hidden_size, depth=2, name="projection", **kw)
        attn = QueryResampler(GLOBAL_GRID, self.num_heads or max(dv // 128, 1), name="attn", **kw)
        gate_axes = nn.with_logical_partitioning(nn.initializers.zeros_init(), ("embed", None))
        w_gate = self.param("w_gate", gate_axes, (dv, 2), self.param_dtype)
        self.param("w_noise", gate_axes, (dv, 2), self.param_dtype)
        if self.is_initializing():   # every expert's parameters exist whatever the input and the expert choice
            attn(jnp.zeros((GLOBAL_GRID ** 2, dv), x.dtype))
        if x.shape[-2] != GLOBAL_GRID ** 2 or self.expert == 0:
            return mlp(x)
        if self.expert == 1:
            return mlp(attn(x))
        logits = jnp.einsum("...d,de->...e", x.astype(jnp.float32), jnp.asarray(w_gate, jnp.float32))
        if not deterministic and self.gate_noise:
            std = jax.nn.softplus(logits) + 0.01
            logits = logits + jax.random.normal(self.make_rng("dropout"), logits.shape) * std
        gates = jax.nn.softmax(logits, axis=-1)
        gates = gates / (jnp.sum(gates, axis=-1, keepdims=True) + 1e-6)  # the original's top-2-of-2 renormalisation
        e0, e1 = mlp(x).astype(jnp.float32), mlp(attn(x)).astype(jnp.float32)
        return (gates[..., 0:1] * e0 + gates[..., 1:2] * e1).astype(self.dtype)


class LocalCompressor(nn.Module):
    """`sampler.post_qformer`: every tile's 576 vision tokens -> 144 (one QueryResampler, grid 12)."""

    num_heads: int = 0
    dtype: Any = jnp.float32
    param_dtype: Any = jnp.float32

    @nn.compact
    def __call__(self, tiles):
        """tiles (..., P, 576, Dv) -> (..., P, 144, Dv)."""
        return QueryResampler(LOCAL_GRID, self.num_heads or max(tiles.shape[-1] // 128, 1), name="post_qformer",
                              dtype=self.dtype, param_dtype=self.param_dtype)(tiles)


def spatial_order(cols: int, rows: int, side: int = LOCAL_GRID) -> np.ndarray:
    """The 'spatial' merge as an index into the tiles' flattened (P * side^2) tokens: raster order over the whole
    (side * rows) x (side * cols) canvas (view (rows, cols, s, s) -> permute (rows, s, cols, s) -> flatten)."""
    return np.arange(rows * cols * side * side).reshape(rows, cols, side, side).transpose(0, 2, 1, 3).reshape(-1)


def cosine_normalize(x, eps: float = 1e-8):
    x = x.astype(jnp.float32)
    return x / jnp.maximum(jnp.linalg.norm(x, axis=-1, keepdims=True), eps)


def route_tokens(local, local_valid, text, text_valid, *, topp: float, temperature: float = 1.0, noise_key=None):
    """SliME's text-guided router -> keep mask (B, M) over the local tokens.

    score_i = sum_t cos(local_i, text_t) over the valid text tokens (+ 0.1 N(0, 1) in training, `noise_key`);
    p = softmax(score / temperature) over the valid local tokens; the tokens sorted by p whose cumulative sum stays
    <= topp are kept, plus one more (if any is left); the kept tokens keep their (spatial) order. topp >= 1 keeps every
    valid token (the original's float cumulative sum can exceed 1 before the last token and drop a few).

    local (B, M, H), local_valid (B, M), text (B, L, H) the LLM's input embeddings, text_valid (B, L) (False for image
    slots and padding)."""
    text_sum = jnp.sum(cosine_normalize(text) * text_valid[..., None], axis=1)          # (B, H)
    scores = jnp.einsum("bmh,bh->bm", cosine_normalize(local), text_sum)
    if noise_key is not None:
        scores = scores + 0.1 * jax.random.normal(noise_key, scores.shape)
    if topp >= 1.0:
        return local_valid
    probs = jax.nn.softmax(jnp.where(local_valid, scores / temperature, -jnp.inf), axis=-1)
    order = jnp.argsort(-probs, axis=-1, stable=True)
    cumulative = jnp.cumsum(jnp.take_along_axis(probs, order, axis=-1), axis=-1)
    n_valid = jnp.sum(local_valid, axis=-1)
    k = jnp.minimum(jnp.sum((cumulative <= topp) & jnp.take_along_axis(local_valid, order, axis=-1), axis=-1) + 1,
                    n_valid)
    rank = jnp.argsort(order, axis=-1)                       # position of each token in the sorted order
    return (rank < k[:, None]) & local_valid
