"""CLIP vision transformer (HF `CLIPVisionModel` semantics) for slices of any size.

Two entry points share the encoder:
* `__call__(pixels)`: a batch of equally sized images (B, H, W, 3), H and W multiples of the patch size. The 24x24
  position table is resized to (H/p, W/p) with torch bicubic semantics (matrices built at trace time).
* `encode_packed(packed)`: several images of different sizes packed into one fixed-length token sequence per row
  (`PackedPatches`): every image contributes its CLS slot and its patches, and each patch carries 16 interpolation
  taps into the position table computed on the host. One compiled program then serves any mix of slice shapes.
  The per-token layers run on the packed row; attention runs one image at a time: each layer gathers the image's
  q/k/v into a row of its own (a fixed budget of `image_tokens` slots, MaxText/vLLM style) with its key length,
  and scatters the result back. No score between two images is computed and no (N, N) mask exists: attention costs
  I x image_tokens^2 per row instead of N^2 (a 13B UHD v1 forward on a 672x1088 image spent 1.8 TFLOP on the
  masked cross-image scores).

Only the layers up to `select_layer` are computed; the rest (and `post_layernorm`) still exist as parameters so that a
checkpoint converts both ways without loss.
"""
from __future__ import annotations

import dataclasses
from typing import Any, NamedTuple

import flax.linen as nn
import jax.numpy as jnp

from uhd_jax.models import layers
from uhd_jax.models.interpolate import torch_bicubic_matrix


@dataclasses.dataclass(frozen=True)
class ViTConfig:
    hidden_size: int = 1024
    intermediate_size: int = 4096
    num_layers: int = 24
    num_heads: int = 16
    patch_size: int = 14
    image_size: int = 336
    num_channels: int = 3
    layer_norm_eps: float = 1e-5
    hidden_act: str = "quick_gelu"
    select_layer: int = -2          # index into HF hidden_states (0 = embeddings after pre-LN, k = output of layer k)
    select_feature: str = "patch"   # 'patch' drops CLS, 'cls_patch' keeps it
    dtype: Any = jnp.float32
    param_dtype: Any = jnp.float32
    attention_impl: str | None = "xla"
    remat_policy: str = "none"
    # Packed rows: the most patches one image may have (0: grid^2, what the UHD slicer makes from any image of aspect
    # ratio below ~grid^2:1). Attention gives every image slot this many keys; the host refuses larger images.
    max_image_patches: int = 0

    @property
    def grid(self) -> int:
        return self.image_size // self.patch_size

    @property
    def image_tokens(self) -> int:
        """Token slots of one image's attention row in `encode_packed`: its CLS and at most max_image_patches."""
        return 1 + (self.max_image_patches or self.grid * self.grid)

    @property
    def num_computed_layers(self) -> int:
        n = self.select_layer if self.select_layer >= 0 else self.num_layers + 1 + self.select_layer
        if not 0 <= n <= self.num_layers:
            raise ValueError(f"select_layer {self.select_layer} is outside 0..{self.num_layers} (or its negative)")
        return n


class PackedPatches(NamedTuple):
    """Images of several sizes packed into rows of a fixed token budget N (host-built, see `data.uhd_images`).

    patches:    (B, N, p, p, C) normalised pixels of each patch slot (zeros at CLS and padding slots)
    segment_ids:(B, N) int32, k >= 1 for the k-th image of the row, 0 for padding; each image's slots are
                contiguous (CLS first) and hold at most `ViTConfig.image_tokens` of them
    is_cls:     (B, N) bool, the CLS slot of each image
    pos_index:  (B, N, 16) int32 flat indices into the (grid x grid) patch position table
    pos_weight: (B, N, 16) float32 bicubic weights (zero for CLS and padding slots)
    image_valid:(B, I) bool, the row's I image slots (its shape gives the static image count per row)
    """

    patches: Any
    segment_ids: Any
    is_cls: Any
    pos_index: Any
    pos_weight: Any
    image_valid: Any


class ImageRows(NamedTuple):
    """Where each image of a packed row sits, for attention one image at a time (built once per forward).

    gather:  (B, I * T) int32, the row slot of token t of image i at i * T + t (clamped past the image's end)
    lengths: (B, I) int32, tokens of image i (0 for an empty slot)
    scatter: (B, N) int32, for each slot of the row, its place in the (I * T) per-image layout
    real:    (B, N) bool, the slot belongs to an image
    """

    gather: Any
    lengths: Any
    scatter: Any
    real: Any


def image_rows(segment_ids, max_images: int, image_tokens: int) -> ImageRows:
    """The per-image layout of packed rows: image k (segment k + 1) starts at its first slot and spans its count."""
    b, n = segment_ids.shape
    t = min(image_tokens, n)
    member = segment_ids[:, None, :] == jnp.arange(1, max_images + 1, dtype=segment_ids.dtype)[None, :, None]
    lengths = jnp.sum(member, axis=-1, dtype=jnp.int32)                                     # (B, I)
    starts = jnp.argmax(member, axis=-1).astype(jnp.int32)                                # (B, I), 0 if empty
    gather = jnp.minimum(starts[..., None] + jnp.arange(t, dtype=jnp.int32), n - 1).reshape(b, -1)
    image = jnp.maximum(segment_ids - 1, 0)
    offset = jnp.arange(n, dtype=jnp.int32)[None] - jnp.take_along_axis(starts, image, axis=1)
    scatter = image * t + jnp.clip(offset, 0, t - 1)
    return ImageRows(gather, lengths, scatter, segment_ids > 0)


def attend_per_image(q, k, v, rows: ImageRows, implementation):
    """q/k/v (B, N, H, hd) of packed rows -> (B, N, H, hd): each image's tokens attend to that image's tokens only.

    Each image becomes a row of its own of T slots (B * I rows) with its length as the key length (no mask: cuDNN's
    flash kernel takes lengths); padding slots of the packed row get zeros (nothing reads them)."""
    b, n, h, hd = q.shape
    i = rows.lengths.shape[1]
    t = rows.gather.shape[1] // i

    def per_image(x):
        return jnp.take_along_axis(x, rows.gather[..., None, None], axis=1).reshape(b * i, t, h, hd)

    # an empty image slot keeps one key: its (discarded) output stays finite, and so does its gradient
    lengths = jnp.maximum(rows.lengths, 1).reshape(b * i)
    out = layers.dot_product_attention(per_image(q), per_image(k), per_image(v), kv_lengths=lengths,
                                       implementation=implementation)
    out = jnp.take_along_axis(out.reshape(b, i * t, h, hd), rows.scatter[..., None, None], axis=1)
    return jnp.where(rows.real[..., None, None], out, jnp.zeros((), out.dtype))


class ViTAttention(nn.Module):
    cfg: ViTConfig

    @nn.compact
    def __call__(self, x, rows: ImageRows | None):
        """rows None: every token of a row attends to every other (one image per row)."""
        c = self.cfg
        head_dim = c.hidden_size // c.num_heads
        kw = dict(dtype=c.dtype, param_dtype=c.param_dtype)
        q, k, v = (layers.dense((c.num_heads, head_dim), axes=("embed", "heads", "head_dim"), name=n, **kw)(x)
                   for n in ("q", "k", "v"))
        if rows is None:
            out = layers.dot_product_attention(q, k, v, implementation=c.attention_impl)
        else:
            out = attend_per_image(q, k, v, rows, c.attention_impl)
        out = layers.dense(c.hidden_size, axes=("heads", "head_dim", "embed"), axis=(-2, -1), name="o", **kw)(out)
        return layers.checkpoint_name(out, "attn_out")


class ViTBlock(nn.Module):
    cfg: ViTConfig

    @nn.compact
    def __call__(self, x, rows: ImageRows | None):
        c = self.cfg
        kw = dict(dtype=c.dtype, param_dtype=c.param_dtype)
        h = layers.layer_norm(eps=c.layer_norm_eps, name="ln1", **kw)(x)
        x = x + ViTAttention(c, name="attn")(h, rows)
        h = layers.layer_norm(eps=c.layer_norm_eps, name="ln2", **kw)(x)
        h = layers.dense(c.intermediate_size, axes=("embed", "mlp"), name="fc1", **kw)(h)
        h = layers.ACTIVATIONS[c.hidden_act](h)
        h = layers.dense(c.hidden_size, axes=("mlp", "embed"), name="fc2", **kw)(h)
        return x + layers.checkpoint_name(h, "mlp_out")


def patchify(pixels, patch: int):
    """(B, H, W, C) -> (B, H/p * W/p, p, p, C), patches row-major."""
    b, h, w, c = pixels.shape
    if h % patch or w % patch:
        raise ValueError(f"image size {h}x{w} is not a multiple of the patch size {patch}")
    x = pixels.reshape(b, h // patch, patch, w // patch, patch, c).transpose(0, 1, 3, 2, 4, 5)
    return x.reshape(b, (h // patch) * (w // patch), patch, patch, c)


class VisionTransformer(nn.Module):
    cfg: ViTConfig

    def setup(self):
        c = self.cfg
        self.patch_kernel = self.param(
            "patch_embedding", nn.with_logical_partitioning(layers.default_kernel_init, (None, None, None, "embed")),
            (c.patch_size, c.patch_size, c.num_channels, c.hidden_size), c.param_dtype)
        self.class_embedding = self.param(
            "class_embedding", nn.with_logical_partitioning(layers.default_kernel_init, ("embed",)),
            (c.hidden_size,), c.param_dtype)
        self.position_embedding = self.param(
            "position_embedding", nn.with_logical_partitioning(layers.default_kernel_init, (None, "embed")),
            (c.grid * c.grid + 1, c.hidden_size), c.param_dtype)
        kw = dict(dtype=c.dtype, param_dtype=c.param_dtype)
        self.pre_layrnorm = layers.layer_norm(eps=c.layer_norm_eps, name="pre_layrnorm", **kw)
        block = layers.maybe_remat(ViTBlock, c.remat_policy)
        self.blocks = [block(c, name=f"layers_{i}") for i in range(c.num_layers)]
        self.post_layernorm = layers.layer_norm(eps=c.layer_norm_eps, name="post_layernorm", **kw)

    def _embed_patches(self, patches):
        return jnp.einsum("...hwc,hwcd->...d", patches.astype(self.cfg.dtype),
                          jnp.asarray(self.patch_kernel, self.cfg.dtype))

    def _encode(self, x, rows: ImageRows | None):
        x = self.pre_layrnorm(x)
        n = self.cfg.num_computed_layers
        for block in self.blocks[:n]:
            x = block(x, rows)
        if self.is_initializing():
            # Create the parameters of the layers after the selected one so checkpoints round-trip losslessly.
            y = x
            for block in self.blocks[n:]:
                y = block(y, rows)
            self.post_layernorm(y[..., :1, :])
        return x

    def __call__(self, pixels):
        """pixels (B, H, W, C) normalised -> features (B, h*w (+1 with cls_patch), D) at `select_layer`."""
        c = self.cfg
        b, hh, ww, _ = pixels.shape
        h, w = hh // c.patch_size, ww // c.patch_size
        x = self._embed_patches(patchify(pixels, c.patch_size))
        table = jnp.asarray(self.position_embedding, jnp.float32)
        patch_pos = table[1:]
        if (h, w) != (c.grid, c.grid):
            rows = jnp.asarray(torch_bicubic_matrix(c.grid, h), jnp.float32)
            cols = jnp.asarray(torch_bicubic_matrix(c.grid, w), jnp.float32)
            grid = patch_pos.reshape(c.grid, c.grid, -1)
            patch_pos = jnp.einsum("yi,xj,ijd->yxd", rows, cols, grid).reshape(h * w, -1)
        x = x + patch_pos.astype(c.dtype)[None]
        cls = (jnp.asarray(self.class_embedding, jnp.float32) + table[0]).astype(c.dtype)
        x = jnp.concatenate([jnp.broadcast_to(cls, (b, 1, c.hidden_size)), x], axis=1)
        x = self._encode(x, rows=None)
        return x[:, 1:] if c.select_feature == "patch" else x

    def encode_packed(self, packed: PackedPatches):
        """Packed rows -> hidden states (B, N, D) at `select_layer`, CLS and padding slots included (padding holds
        values no one reads)."""
        c = self.cfg
        x = self._embed_patches(packed.patches)
        table = jnp.asarray(self.position_embedding, jnp.float32)
        patch_table = table[1:]
        pos = jnp.zeros(x.shape, jnp.float32)
        for t in range(packed.pos_index.shape[-1]):  # 16 taps, each a gather; XLA fuses the weighted sum
            pos = pos + packed.pos_weight[..., t, None] * jnp.take(patch_table, packed.pos_index[..., t], axis=0)
        cls = jnp.asarray(self.class_embedding, jnp.float32) + table[0]
        x = jnp.where(packed.is_cls[..., None], cls.astype(c.dtype), x + pos.astype(c.dtype))
        rows = image_rows(packed.segment_ids, packed.image_valid.shape[1], c.image_tokens)
        return self._encode(x, rows)

