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

import dataclasses
import math
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
VIEW_MODES = ("both", "global", "local")


@dataclasses.dataclass(frozen=True)
class SlimeConfig:
    """What the SliME projector computes and feeds the LLM (`config.model.slime`; stages override fields).

    views: 'both' (global + separator + routed local tokens: SFT and inference), 'global' (the global branch alone:
    runs 1a/1b, `use_global_only`), 'local' (routed local tokens alone: run 1c, `use_local_only`)."""

    views: str = "both"
    expert: int = -1              # mm_learnable_gated: -1 gated mixture, 0 MLP adapter only, 1 attention adapter only
    topp: float = 0.95            # router keep mass (1.0 keeps every token: run 1c)
    temperature: float = 1.0
    separator_id: int = 1919      # the ',' between global and local tokens ('\u2581,' in Vicuna; 11 in Llama-3)
    max_tiles: int = 7            # SliME grids have 2..7 tiles
    gate_noise: bool = True       # the original's training noise on the gate logits
    router_noise: bool = True     # the original's 0.1 N(0, 1) on the router scores in training
    global_grid: int = GLOBAL_GRID
    local_grid: int = LOCAL_GRID
    num_heads: int = 0            # resampler heads; 0 = Dv // 128
    # Views the vision tower encodes per batch, as an average per sample (batch B: ceil(B x this) views); 0: every
    # slot (B x views_per_image, tile slots past a grid included). Only the views whose features some position reads
    # are encoded; a batch holding more of them than its budget stops the step with an error (see `view_budget`).
    views_per_sample: float = 0.0

    def __post_init__(self):
        if self.views_per_sample < 0:
            raise ValueError(f"slime.views_per_sample must be >= 0 (0: every slot), got {self.views_per_sample}")
        if self.views not in VIEW_MODES:
            raise ValueError(f"slime.views must be one of {VIEW_MODES}, got {self.views!r}")
        if self.expert not in (-1, 0, 1):
            raise ValueError(f"slime.expert must be -1 (gated), 0 (MLP) or 1 (attention), got {self.expert}")

    @property
    def views_per_image(self) -> int:
        """Image slots per image: the global view, then `max_tiles` tiles (zeros where a grid has fewer)."""
        return 1 if self.views == "global" else 1 + self.max_tiles

    def view_budget(self, slots: int, batch: int) -> int:
        """Views through the vision tower for a batch of `batch` samples with `slots` view slots in all."""
        if not self.views_per_sample:
            return slots
        return max(1, min(slots, math.ceil(batch * self.views_per_sample)))

    @property
    def local_offset(self) -> int:
        return self.global_grid ** 2 + 1

    @property
    def rows_per_image(self) -> int:
        """Feature rows per image: global grid^2, the separator, then every tile's local_grid^2 tokens tile-major."""
        return self.local_offset + (0 if self.views == "global" else self.max_tiles * self.local_grid ** 2)


def slime_feature_rows(cfg: SlimeConfig, grid: tuple[int, int] | None, first_row: int = 0) -> np.ndarray:
    """The feature rows one image puts into the sequence, in the LLM's order (the original's assembly, §C.5):
    global tokens, the separator, then the local tokens of a (cols, rows) tile grid in the 'spatial' raster order.
    Which of them the LLM finally sees is the router's choice (a keep mask over these rows)."""
    glob = np.arange(cfg.global_grid ** 2)
    if cfg.views == "global":
        rows = glob
    else:
        local = cfg.local_offset + spatial_order(*grid, side=cfg.local_grid)
        rows = local if cfg.views == "local" else np.concatenate([glob, [cfg.global_grid ** 2], local])
    return (rows + first_row).astype(np.int32)


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
    grid: int = GLOBAL_GRID          # the global view's map is grid x grid tokens; any other count is MLP-only
    dtype: Any = jnp.float32
    param_dtype: Any = jnp.float32

    @nn.compact
    def __call__(self, x, deterministic: bool = True):
        """x (..., N, Dv) -> (..., N', H): N' = grid^2 for the global view's grid^2 tokens, else N."""
        kw = dict(dtype=self.dtype, param_dtype=self.param_dtype)
        dv = x.shape[-1]
        mlp = MLPProjector(self.hidden_size, depth=2, name="projection", **kw)
        attn = QueryResampler(self.grid, self.num_heads or max(dv // 128, 1), name="attn", **kw)
        gate_axes = nn.with_logical_partitioning(nn.initializers.zeros_init(), ("embed", None))
        w_gate = self.param("w_gate", gate_axes, (dv, 2), self.param_dtype)
        self.param("w_noise", gate_axes, (dv, 2), self.param_dtype)
        if self.is_initializing():   # every expert's parameters exist whatever the input and the expert choice
            attn(jnp.zeros((self.grid ** 2, dv), x.dtype))
        if x.shape[-2] != self.grid ** 2 or self.expert == 0:
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
    grid: int = LOCAL_GRID
    dtype: Any = jnp.float32
    param_dtype: Any = jnp.float32

    @nn.compact
    def __call__(self, tiles):
        """tiles (..., P, 576, Dv) -> (..., P, 144, Dv)."""
        return QueryResampler(self.grid, self.num_heads or max(tiles.shape[-1] // 128, 1), name="post_qformer",
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
    # a huge finite fill, not -inf: a sample without local tokens (text only) must not make NaNs
    probs = jax.nn.softmax(jnp.where(local_valid, scores / temperature, -1e30), axis=-1)
    order = jnp.argsort(-probs, axis=-1, stable=True)
    cumulative = jnp.cumsum(jnp.take_along_axis(probs, order, axis=-1), axis=-1)
    n_valid = jnp.sum(local_valid, axis=-1)
    k = jnp.minimum(jnp.sum((cumulative <= topp) & jnp.take_along_axis(local_valid, order, axis=-1), axis=-1) + 1,
                    n_valid)
    rank = jnp.argsort(order, axis=-1)                       # position of each token in the sorted order
    return (rank < k[:, None]) & local_valid


class SlimeProjector(nn.Module):
    """SliME's image features for the LLM: the gated adapters on the global view, the local compressor + MLP on the
    tiles, the separator embedding, and the router's keep mask over the local tokens. Parameters as the original:
    the adapters at this module's level (`mm_projector.*`), the compressor under `sampler/` (`sampler.*`)."""

    cfg: SlimeConfig
    hidden_size: int
    dtype: Any = jnp.float32
    param_dtype: Any = jnp.float32

    def setup(self):
        c, kw = self.cfg, dict(dtype=self.dtype, param_dtype=self.param_dtype)
        self.adapters = GatedAdapters(self.hidden_size, c.num_heads, c.expert, c.gate_noise, c.global_grid, **kw)
        nn.share_scope(self, self.adapters)
        self.sampler = LocalCompressor(c.num_heads, c.local_grid, name="sampler", **kw)

    def __call__(self, views, separator, text, text_valid, rows_used, deterministic: bool = True):
        """views (B, I, V, N, Dv) vision features of each image's global view and tiles (V = views_per_image; in
        'local' mode the global slot may hold anything, it is not read); separator (H,) its embedding; text (B, L, H)
        and text_valid (B, L) the router's text; rows_used (B, I * R) feature rows some position reads.

        Returns features (B, I * R, H) laid out as `SlimeConfig.rows_per_image` says, and keep (B, I * R): False
        for the local tokens the router drops (every other row True)."""
        c = self.cfg
        b, i = views.shape[:2]
        if self.is_initializing():   # every parameter exists whatever the stage's views and expert
            self.sampler(views[:1, :1, :1])
            self.adapters(jnp.zeros((1, c.global_grid ** 2, views.shape[-1]), views.dtype))
        parts = []
        if c.views == "local":
            parts.append(jnp.zeros((b, i, c.global_grid ** 2, self.hidden_size), self.dtype))
        else:
            parts.append(self.adapters(views[:, :, 0], deterministic).astype(self.dtype))
        parts.append(jnp.broadcast_to(separator.astype(self.dtype), (b, i, 1, self.hidden_size)))
        keep = jnp.ones((b, i, c.rows_per_image), bool)
        if c.views != "global":
            local = self.adapters(self.sampler(views[:, :, 1:]), deterministic)   # (B, I, T, q, H): the MLP path
            local = local.reshape(b, i, -1, self.hidden_size).astype(self.dtype)
            present = rows_used.reshape(b, i, c.rows_per_image)[..., c.local_offset:]
            noise = None
            if not deterministic and c.router_noise:
                noise = self.make_rng("dropout")
            routed = route_tokens(local.reshape(b * i, -1, self.hidden_size), present.reshape(b * i, -1),
                                  jnp.repeat(text, i, axis=0), jnp.repeat(text_valid, i, axis=0), topp=c.topp,
                                  temperature=c.temperature, noise_key=noise)
            keep = keep.at[..., c.local_offset:].set(routed.reshape(b, i, -1))
            parts.append(local)
        feats = jnp.concatenate(parts, axis=2)
        return feats.reshape(b, i * c.rows_per_image, self.hidden_size), keep.reshape(b, -1)
