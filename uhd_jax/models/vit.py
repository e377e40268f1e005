"""CLIP vision transformer (HF `CLIPVisionModel` semantics) for slices of any size.

Two entry points share the encoder:
* `__call__(pixels)`: a batch of equally sized images (B, H, W, 3), H and W multiples of the patch size. The 24x24
  position table is resized to (H/p, W/p) with torch bicubic semantics (matrices built at trace time).
* `encode_packed(packed)`: several images of different sizes packed into one fixed-length token sequence per row
  (`PackedPatches`): every image contributes its CLS slot and its patches, `segment_ids` keep attention inside each
  image, and each patch carries 16 interpolation taps into the position table computed on the host. One compiled
  program then serves any mix of slice shapes.

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

    @property
    def grid(self) -> int:
        return self.image_size // self.patch_size

    @property
    def num_computed_layers(self) -> int:
        n = self.select_layer if self.select_layer >= 0 else self.num_layers + 1 + self.select_layer
        if not 0 <= n <= self.num_layers:
            raise ValueError(f"select_layer {self.select_layer} is outside 0..{self.num_layers} (or its negative)")
        return n


class PackedPatches(NamedTuple):
    """Images of several sizes packed into rows of a fixed token budget N (host-built, see `data.packing`).

    patches:    (B, N, p, p, C) normalised pixels of each patch slot (zeros at CLS and padding slots)
    segment_ids:(B, N) int32, k >= 1 for the k-th image of the row, 0 for padding
    is_cls:     (B, N) bool, the CLS slot of each image
    pos_index:  (B, N, 16) int32 flat indices into the (grid x grid) patch position table
    pos_weight: (B, N, 16) float32 bicubic weights (zero for CLS and padding slots)
    """

    patches: Any
    segment_ids: Any
    is_cls: Any
    pos_index: Any
    pos_weight: Any


class ViTAttention(nn.Module):
    cfg: ViTConfig

    @nn.compact
    def __call__(self, x, mask):
        c = self.cfg
        head_dim = c.hidden_size // c.num_heads
        kw = dict(dtype=c.dtype, param_dtype=c.param_dtype)
        q, k, v = (layers.dense((c.num_heads, head_dim), axes=("embed", "heads", "head_dim"), name=n, **kw)(x)
                   for n in ("q", "k", "v"))
        out = layers.dot_product_attention(q, k, v, mask=mask, implementation=c.attention_impl)
        out = layers.dense(c.hidden_size, axes=("heads", "head_dim", "embed"), axis=(-2, -1), name="o", **kw)(out)
        return layers.checkpoint_name(out, "attn_out")


class ViTBlock(nn.Module):
    cfg: ViTConfig

    @nn.compact
    def __call__(self, x, mask):
        c = self.cfg
        kw = dict(dtype=c.dtype, param_dtype=c.param_dtype)
        h = layers.layer_norm(eps=c.layer_norm_eps, name="ln1", **kw)(x)
        x = x + ViTAttention(c, name="attn")(h, mask)
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

    def _encode(self, x, mask):
        x = self.pre_layrnorm(x)
        n = self.cfg.num_computed_layers
        for block in self.blocks[:n]:
            x = block(x, mask)
        if self.is_initializing():
            # Create the parameters of the layers after the selected one so checkpoints round-trip losslessly.
            y = x
            for block in self.blocks[n:]:
                y = block(y, mask)
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
        x = self._encode(x, mask=None)
        return x[:, 1:] if c.select_feature == "patch" else x

    def encode_packed(self, packed: PackedPatches):
        """Packed rows -> hidden states (B, N, D) at `select_layer`, CLS and padding slots included."""
        c = self.cfg
        x = self._embed_patches(packed.patches)
        table = jnp.asarray(self.position_embedding, jnp.float32)
        patch_table = table[1:]
        pos = jnp.zeros(x.shape, jnp.float32)
        for t in range(packed.pos_index.shape[-1]):  # 16 taps, each a gather; XLA fuses the weighted sum
            pos = pos + packed.pos_weight[..., t, None] * jnp.take(patch_table, packed.pos_index[..., t], axis=0)
        cls = jnp.asarray(self.class_embedding, jnp.float32) + table[0]
        x = jnp.where(packed.is_cls[..., None], cls.astype(c.dtype), x + pos.astype(c.dtype))
        seg = packed.segment_ids
        mask = (seg[:, :, None] == seg[:, None, :])[:, None]  # padding attends to padding: finite, then ignored
        return self._encode(x, mask)

