"""LLaVA-UHD v2's hierarchical window (HiWin) projector (spec uhd.md §4.1, §4.3) over packed slices.

Per image: the vision features (1x) go through the JBU inverse pyramid (2x, 4x; `jbu.JBUStage`); each kept level
(mask bits 1 -> 1x, 2 -> 2x, 4 -> 4x) gets its own linear projection, one shared `ln_kv`, the 12x12 sin-cos table
interpolated to the level's size and a level embedding on the keys; 12x12 windows are RoIAligned on every level with
one pooled size per image; the keys of all kept levels form each window's key set; four query sets attend through
one shared attention, each followed by `ln_proj`; `cat_proj`, `ln_post`, `@ proj`. 144 tokens per image.

Static shapes: the 2x and 4x maps of all images of a sample live in packed rows (4x and 16x the patch budget) and
every spatial operation is a gather with host-built indices (`uhd_jax.data.uhd_images.fill_levels`): the bicubic
upsampling (16 taps into the previous level), the JBU's 7x7 reflect neighbourhood (49 taps), the windows (RoIAlign
taps). One compiled program serves every mix of slice sizes; no size bucketing.

Parameter names mirror the original (`features_1x_projector`, `feature_4x_embedding`, `query_1..4`, `upsampler/up1`,
...). The original's unused `query`, `kv_proj`, 8x level and the frozen CLIP copy inside its upsampler are not
parameters here (the importer reports them as skipped).
"""
from __future__ import annotations

from typing import Any

import flax.linen as nn
import jax
import jax.numpy as jnp

from uhd_jax.models import layers
from uhd_jax.models.projectors.jbu import DIAMETER, JBUStage, Neighbourhood, conv1x1
from uhd_jax.models.projectors.resampler import PackedInProjection, gather_taps, sincos_2d

LEVELS = (1, 2, 4)


def kept_levels(mask: int) -> tuple[int, ...]:
    levels = tuple(lv for lv in LEVELS if mask & lv)
    if not levels:
        raise ValueError(f"feature_scale_mask={mask} keeps no level; use 5 ({{1x, 4x}}, released) or 7")
    return levels


def top_jbu_level(mask: int) -> int:
    """The highest JBU level a model keeping `mask` computes, and its packed data holds: 4 if it keeps the 4x level,
    else 2 (the first JBU stage always runs)."""
    return max(kept_levels(mask) + (2,))


def packed_neighbourhood(index) -> Neighbourhood:
    """JBUStage's neighbourhood on packed rows: `index` (B, N, 49) holds the reflect-neighbour rows of every slot."""
    return Neighbourhood(
        views=lambda x: [jnp.take_along_axis(x, index[:, :, p, None], axis=1, mode="clip")   # in range: host-built
                         for p in range(index.shape[-1])],
        weighted_sum=lambda x, kernel: gather_taps(x, index, kernel))


class PackedJBU4x(nn.Module):
    """The JBU 4x stack (same parameters as `jbu.JBU4xStack`) over packed rows."""

    dropout: float = 0.2
    dtype: Any = jnp.float32
    param_dtype: Any = jnp.float32

    @nn.compact
    def __call__(self, feats, images: dict, deterministic: bool = True, up_to: int = 4):
        """feats (B, N, C) packed 1x features -> (2x rows (B, 4N, C), 4x rows (B, 16N, C)), float32. `up_to` 2
        stops after the first stage (4x rows None): a model that keeps no 4x level neither computes nor counts it (nor
        does its data hold the 4x rows), yet holds the 4x parameters, so its checkpoints keep the original's layout."""
        kw = dict(dtype=self.dtype, param_dtype=self.param_dtype)
        def stage(name, source, lv):
            up = gather_taps(source, images[f"l{lv}_src_index"], images[f"l{lv}_src_weight"])  # torch bicubic
            return JBUStage(spatial_axes=(1,), name=name, **kw)(
                up, images[f"l{lv}_guidance"], packed_neighbourhood(images[f"l{lv}_nbr_index"]), deterministic)

        s2 = stage("up1", feats, 2)
        if up_to == 2:
            if self.is_initializing():   # the 4x parameters, from one dummy row (their shapes depend on C only)
                row, taps = jnp.zeros((1, 1, feats.shape[-1]), jnp.float32), DIAMETER ** 2
                JBUStage(spatial_axes=(1,), name="up2", **kw)(
                    row, jnp.zeros((1, 1, 3), jnp.float32),
                    Neighbourhood(views=lambda x: [x] * taps, weighted_sum=lambda x, kernel: x), True)
                conv1x1(row.shape[-1], "fixup_proj_1", **kw)(row)
            return s2, None
        s4 = stage("up2", s2, 4)
        # Dropout2d over one image's channels; on packed rows it drops per row (all images of the sample).
        fix = nn.Dropout(self.dropout, broadcast_dims=(1,), name="fixup_proj_0")(s4, deterministic=deterministic)
        return s2, s4 + 0.1 * conv1x1(s4.shape[-1], "fixup_proj_1", **kw)(fix).astype(jnp.float32)


class HiWinResampler(nn.Module):
    embed_dim: int
    num_heads: int
    grid: int = 12
    feature_scale_mask: int = 5      # released v2-head setting {1x, 4x}; the code default is 7
    num_query_sets: int = 4
    eps: float = 1e-6
    dtype: Any = jnp.float32
    param_dtype: Any = jnp.float32

    @nn.compact
    def __call__(self, feats, images: dict, deterministic: bool = True):
        """feats (B, N, Dv) packed vision features (CLS and padding slots included) -> (B, I, grid^2, D)."""
        d, kw = self.embed_dim, dict(dtype=self.dtype, param_dtype=self.param_dtype)
        head_dim = d // self.num_heads
        table = sincos_2d(self.grid, d)
        pos_embed = self.param("pos_embed", nn.with_logical_partitioning(
            lambda *_: jnp.asarray(table, self.param_dtype), (None, "embed")), table.shape)
        pos = jax.lax.stop_gradient(jnp.asarray(pos_embed, jnp.float32))
        ln_kv = layers.layer_norm(eps=self.eps, name="ln_kv", **kw)
        levels = kept_levels(self.feature_scale_mask)
        s2, s4 = PackedJBU4x(name="upsampler", **kw)(feats, images, deterministic,
                                                     up_to=top_jbu_level(self.feature_scale_mask))
        maps = {1: feats, 2: s2, 4: s4}
        geometry = {1: ("key_pos", "roi"), 2: ("l2_key_pos", "l2_roi"), 4: ("l4_key_pos", "l4_roi")}
        keys, values = [], []
        for lv in levels:
            x = layers.dense(d, axes=("embed", "mlp"), name=f"features_{lv}x_projector", **kw)(maps[lv])
            x = ln_kv(x)
            emb = self.param(f"feature_{lv}x_embedding", nn.with_logical_partitioning(
                nn.initializers.zeros_init(), (None, None, "embed")), (1, 1, d), self.param_dtype)
            kp, roi = geometry[lv]
            roi_index, roi_weight = images[f"{roi}_index"], images[f"{roi}_weight"]
            key_pos = gather_taps(pos[None], images[f"{kp}_index"], images[f"{kp}_weight"])
            # RoIAlign is linear: keys = roi(x + key_pos + emb) = roi(x) + roi(key_pos) + emb * sum(taps), so the
            # features are gathered (and scattered back in the backward pass) once for keys and values.
            v_roi = gather_taps(x, roi_index, roi_weight)                                        # (B, I, Q, P, D)
            pos_roi = gather_taps(key_pos, roi_index, roi_weight)
            emb_roi = jnp.sum(roi_weight.astype(jnp.float32), -1, keepdims=True) * jnp.asarray(emb, jnp.float32)[0]
            keys.append(v_roi + pos_roi + emb_roi)
            values.append(v_roi)
        k = jnp.concatenate(keys, axis=3).astype(self.dtype)
        v = jnp.concatenate(values, axis=3).astype(self.dtype)
        key_valid = jnp.tile(images["key_valid"], (1, 1, len(keys)))                              # (B, I, L*P)

        in_proj = PackedInProjection(self.num_heads, head_dim, name="in_proj", **kw)
        out_proj = layers.dense(d, axes=("heads", "head_dim", "embed"), axis=(-2, -1), name="out_proj", **kw)
        ln_q = layers.layer_norm(eps=self.eps, name="ln_q", **kw)
        ln_proj = layers.layer_norm(eps=self.eps, name="ln_proj", **kw)
        kh, vh = in_proj(k, 1), in_proj(v, 2)                                                  # (B, I, Q, P, H, hd)
        mask = key_valid[:, :, None, None, :]
        outs = []
        for n in range(1, self.num_query_sets + 1):
            query = self.param(f"query_{n}", nn.with_logical_partitioning(nn.initializers.truncated_normal(0.02),
                                                                          (None, "embed")),
                               (self.grid ** 2, d), self.param_dtype)
            qh = in_proj(ln_q(jnp.asarray(query, self.dtype)) + pos.astype(self.dtype), 0)     # (Q, H, hd)
            logits = jnp.einsum("qhd,biqphd->biqhp", qh, kh, preferred_element_type=jnp.float32) * head_dim ** -0.5
            probs = jax.nn.softmax(jnp.where(mask, logits, -1e30), axis=-1).astype(self.dtype)
            outs.append(ln_proj(out_proj(jnp.einsum("biqhp,biqphd->biqhd", probs, vh))))
        y = layers.dense(d, axes=("mlp", "embed"), name="cat_proj", **kw)(jnp.concatenate(outs, axis=-1))
        y = layers.layer_norm(eps=self.eps, name="ln_post", **kw)(y)
        proj = self.param("proj", nn.with_logical_partitioning(
            lambda key, s, dt: jax.random.normal(key, s, dt) * d ** -0.5, ("embed", "mlp")), (d, d), self.param_dtype)
        return layers.dot_trailing(y, jnp.asarray(proj, self.dtype))
