"""LLaVA-UHD v1 compression resamplers (spec uhd.md §2.2, §2.3): any slice size in, grid^2 tokens out.

`SpatialResampler(windowed=True)` is the ECCV "spatially constrained resampler" (144 queries): keys are RoIAligned
from the query's own 12x12 window of the slice's feature map and each query attends only to them.
`windowed=False` is the March-2024 (arXiv) resampler: 64 queries, one full cross-attention over every patch of the
image. Both read the vision tower's *packed* output (`ViT.encode_packed`: several images per row, CLS and padding
slots included) through host-computed geometry (`ResamplerGeometry`), so one compiled program serves every mix of
slice sizes.

Parameters mirror torch's names: `query`, `pos_embed` (fixed sin-cos; freeze it in the stage rules, it also gets
no gradient here), `kv_proj` (no bias), the attention's q/k/v/out projections (torch packs q/k/v into
`attn.in_proj_*`), `ln_q`, `ln_kv`, `ln_post` (eps 1e-6) and `proj`, applied as `x @ proj`.
"""
from __future__ import annotations

from typing import Any, NamedTuple

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np

from uhd_jax.models import layers


class ResamplerGeometry(NamedTuple):
    """Host-built geometry of the images packed in each row (see `uhd_jax.data.uhd_images`).

    key_pos_index/weight: (B, N, 16) bicubic taps into the grid x grid `pos_embed` at each patch slot
    roi_index/weight:     (B, I, grid^2, 12, T) RoIAlign taps into the row's N slots (windowed only)
    key_valid:            (B, I, 12) which of the 12 key slots of a window the image's pooled size uses
    image_valid:          (B, I) which of the I image slots hold an image
    segment_ids, is_cls:  (B, N) the packing of the vision tower's rows (image k of a row has segment k + 1)
    """

    key_pos_index: Any
    key_pos_weight: Any
    roi_index: Any
    roi_weight: Any
    key_valid: Any
    image_valid: Any
    segment_ids: Any
    is_cls: Any


def sincos_2d(grid: int, dim: int) -> np.ndarray:
    """(grid*grid, dim) table; token i*grid + j is [E(j), E(i)] (column first), E(p) = [sin(p w), cos(p w)]."""
    omega = 1.0 / 10000 ** (np.arange(dim // 4, dtype=np.float64) / (dim // 4))

    def embed(p):
        out = np.einsum("m,d->md", p.reshape(-1).astype(np.float64), omega)
        return np.concatenate([np.sin(out), np.cos(out)], axis=1)

    rows, cols = np.meshgrid(np.arange(grid), np.arange(grid), indexing="ij")
    return np.concatenate([embed(cols), embed(rows)], axis=1).astype(np.float32)


def gather_taps(x, index, weight):
    """sum_t weight[..., t] * x[b, index[..., t]]: x (B or 1, N, D), index/weight (B, ..., T) -> (B, ..., D) float32.

    One gather per tap, accumulated: peak memory is the output, not T times it. The gradient is a custom VJP: JAX's
    transpose of `take_along_axis` is one scatter per tap into a fresh buffer plus a sum, ~16x slower on CPU (6.2 s
    vs 0.4 s for the 49-tap JBU neighbourhood of a 16-sample demo batch); here the taps scatter-add in place."""
    b, shape, taps = index.shape[0], index.shape[1:-1], index.shape[-1]
    index, weight = index.reshape(b, -1, taps), weight.reshape(b, -1, taps).astype(jnp.float32)
    if x.shape[0] == 1 and x.shape[1] <= taps:
        # A shared table with no more rows than taps (HiWin's position table at the demo's 2x2 grid): the taps'
        # weights summed per table row and one product cost less than T gathers of D-wide rows.
        rows = jnp.einsum("bmt,bmtr->bmr", weight, jax.nn.one_hot(index, x.shape[1], dtype=jnp.float32))
        out = jnp.einsum("bmr,rd->bmd", rows, x[0].astype(jnp.float32), precision=jax.lax.Precision.HIGHEST)
    else:
        out = _tap_sum(x, index, weight)
    return out.reshape(b, *shape, x.shape[-1])


def flat_rows(x, index):
    """(x as one (Bx * N, D) table, `index` (B, ...) into it): every sample's rows in one table (a broadcast x of
    batch 1 is one table for all samples). XLA's CPU gather of whole rows from a 2-D table can beat the batched gather
    `take_along_axis` lowers to: 49 random taps of 1300 rows x 64 for 16 samples 101 -> 66 ms, HiWin's RoIAlign
    gathers in the v2 demo's step 68 -> 48 ms (benchmarks/README.md)."""
    bx, n, d = x.shape
    if bx > 1:
        index = index + (jnp.arange(bx, dtype=index.dtype) * n).reshape(bx, *(1,) * (index.ndim - 1))
    return x.reshape(bx * n, d), index


def take_rows(table, index):
    """table[index] for host-built indices, in [0, rows): "clip" is XLA's own gather, where the default "fill" adds
    a bounds test and select over every gathered value (a third of the demo's JBU time on the CPU)."""
    return jnp.take(table, index, axis=0, mode="clip").astype(jnp.float32)


@jax.custom_vjp
def _tap_sum(x, index, weight):
    table, flat = flat_rows(x, index)
    out = jnp.zeros((index.shape[0], index.shape[1], x.shape[-1]), jnp.float32)
    for t in range(index.shape[-1]):
        out = out + weight[:, :, t, None] * take_rows(table, flat[:, :, t])
    return out


def _tap_sum_fwd(x, index, weight):
    return _tap_sum(x, index, weight), (x, index, weight)


def _tap_sum_bwd(res, g):
    x, index, weight = res
    (bx, n, d), taps = x.shape, index.shape[-1]
    table, flat = flat_rows(x, index)

    def scatter_tap(t, dx):
        rows = jax.lax.dynamic_index_in_dim(flat, t, axis=2, keepdims=False).reshape(-1)
        w = jax.lax.dynamic_index_in_dim(weight, t, axis=2, keepdims=False)
        return dx.at[rows].add((g * w[..., None]).reshape(-1, d))

    dx = jax.lax.fori_loop(0, taps, scatter_tap, jnp.zeros((bx * n, d), jnp.float32))
    dw = jnp.stack([jnp.sum(g * take_rows(table, flat[:, :, t]), axis=-1) for t in range(taps)], axis=-1)
    return dx.reshape(bx, n, d).astype(x.dtype), None, dw


_tap_sum.defvjp(_tap_sum_fwd, _tap_sum_bwd)


class PackedInProjection(nn.Module):
    """torch MultiheadAttention's packed q/k/v projection: kernel (D, 3, H, hd), bias (3, H, hd)."""

    num_heads: int
    head_dim: int
    dtype: Any = jnp.float32
    param_dtype: Any = jnp.float32

    @nn.compact
    def __call__(self, x, which: int):
        """x @ W_which + b_which (0 = q, 1 = k, 2 = v)."""
        shape = (3, self.num_heads, self.head_dim)
        kernel = self.param("kernel", nn.with_logical_partitioning(layers.default_kernel_init,
                                                                   ("embed", None, "heads", "head_dim")),
                            (x.shape[-1], *shape), self.param_dtype)
        bias = self.param("bias", nn.with_logical_partitioning(nn.initializers.zeros_init(),
                                                               (None, "heads", "head_dim")), shape, self.param_dtype)
        y = layers.dot_trailing(x.astype(self.dtype), jnp.asarray(kernel[:, which], self.dtype))
        return y + jnp.asarray(bias[which], self.dtype)


class SpatialResampler(nn.Module):
    embed_dim: int                   # LLM hidden size D
    num_heads: int                   # D // 128 for the ECCV resampler, 8 for the arXiv one
    grid: int = 12                   # grid^2 queries
    windowed: bool = True
    eps: float = 1e-6
    dtype: Any = jnp.float32
    param_dtype: Any = jnp.float32

    def setup(self):
        d, kw = self.embed_dim, dict(dtype=self.dtype, param_dtype=self.param_dtype)
        head_dim = d // self.num_heads
        self.query = self.param("query", nn.with_logical_partitioning(nn.initializers.truncated_normal(0.02),
                                                                      (None, "embed")),
                                (self.grid ** 2, d), self.param_dtype)
        table = sincos_2d(self.grid, d)
        self.pos_embed = self.param("pos_embed", nn.with_logical_partitioning(
            lambda *_: jnp.asarray(table, self.param_dtype), (None, "embed")), table.shape)
        self.kv_proj = layers.dense(d, axes=("embed", "mlp"), name="kv_proj", use_bias=False, **kw)
        # torch's MultiheadAttention packs q, k, v rows into one in_proj; so do we, as (D, 3, H, hd).
        self.in_proj = PackedInProjection(self.num_heads, head_dim, name="in_proj", **kw)
        self.out_proj = layers.dense(d, axes=("heads", "head_dim", "embed"), axis=(-2, -1), name="out_proj", **kw)
        self.ln_q = layers.layer_norm(eps=self.eps, name="ln_q", **kw)
        self.ln_kv = layers.layer_norm(eps=self.eps, name="ln_kv", **kw)
        self.ln_post = layers.layer_norm(eps=self.eps, name="ln_post", **kw)
        self.proj = self.param("proj", nn.with_logical_partitioning(
            lambda k, s, dt: jax.random.normal(k, s, dt) * d ** -0.5, ("embed", "mlp")), (d, d), self.param_dtype)

    def _project(self, x, which: int):
        return self.in_proj(x, which)

    def __call__(self, feats, geom: ResamplerGeometry):
        """feats (B, N, Dv) packed vision features -> (B, I, grid^2, D) tokens per image slot."""
        table = jax.lax.stop_gradient(jnp.asarray(self.pos_embed, jnp.float32))
        kv = self.ln_kv(self.kv_proj(feats))                                            # (B, N, D)
        key_pos = gather_taps(table[None], geom.key_pos_index, geom.key_pos_weight)     # (B, N, D)
        keys = (kv.astype(jnp.float32) + key_pos).astype(self.dtype)
        q = self.ln_q(jnp.asarray(self.query, self.dtype)) + table.astype(self.dtype)  # (Q, D), no interpolation
        qh = self._project(q, 0)                                                        # (Q, H, hd)
        scale = qh.shape[-1] ** -0.5
        if self.windowed:
            k = gather_taps(keys, geom.roi_index, geom.roi_weight).astype(self.dtype)   # (B, I, Q, P, D)
            v = gather_taps(kv, geom.roi_index, geom.roi_weight).astype(self.dtype)
            kh, vh = self._project(k, 1), self._project(v, 2)                          # (B, I, Q, P, H, hd)
            logits = jnp.einsum("qhd,biqphd->biqhp", qh, kh, preferred_element_type=jnp.float32) * scale
            mask = geom.key_valid[:, :, None, None, :]
            probs = jax.nn.softmax(jnp.where(mask, logits, -1e30), axis=-1).astype(self.dtype)
            out = jnp.einsum("biqhp,biqphd->biqhd", probs, vh)
        else:
            kh, vh = self._project(keys, 1), self._project(kv, 2)                      # (B, N, H, hd)
            logits = jnp.einsum("qhd,bnhd->bhqn", qh, kh, preferred_element_type=jnp.float32) * scale
            n_img = geom.image_valid.shape[1]
            own = geom.segment_ids[:, None, :] == jnp.arange(1, n_img + 1)[None, :, None]
            mask = (own & ~geom.is_cls[:, None, :])[:, :, None, None, :]                 # (B, I, 1, 1, N)
            probs = jax.nn.softmax(jnp.where(mask, logits[:, None], -1e30), axis=-1).astype(self.dtype)
            out = jnp.einsum("bihqn,bnhd->biqhd", probs, vh)
        y = self.ln_post(self.out_proj(out))
        return jnp.einsum("...d,de->...e", y, jnp.asarray(self.proj, self.dtype))
