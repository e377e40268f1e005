"""LLaVA-UHD v2's inverse feature pyramid (spec uhd.md §4.1-4.2): FeatUp joint bilateral upsampling (JBU) stages.

One stage doubles a feature map's resolution guided by the image: a 7x7 kernel per output pixel = a learned range
kernel (softmax over the neighbourhood of projected guidance pixels) times a spatial Gaussian, normalised, plus a
learned correction (`fixup_proj`, 0.1x), applied to the torch-bicubic upsampled source ("adaptive convolution", in
float32). `JBU4xStack` chains two stages and returns the 2x map (no fixup) and the 4x map (+0.1 x 1x1 conv).

Layout is channels-last (B, H, W, C). Parameter names mirror the torch keys (`range_proj.0` -> `range_proj_0`, ...).
Pooling and upsampling are separable matrices with torch's exact semantics, built at trace time from static shapes.
"""
from __future__ import annotations

import functools
from typing import Any, Callable, NamedTuple

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np

from uhd_jax.models import layers
from uhd_jax.models.interpolate import torch_bicubic_matrix

RADIUS = 3
DIAMETER = 2 * RADIUS + 1


@functools.lru_cache(maxsize=256)
def pool_windows(in_size: int, out_size: int) -> tuple[np.ndarray, np.ndarray, bool]:
    """torch adaptive_avg_pool's windows along one axis: output i averages [start[i], end[i]) = [floor(i * in / out),
    ceil((i + 1) * in / out)); `tiled`: the windows cover the axis without overlapping (in / out whole)."""
    i = np.arange(out_size)
    start, end = (i * in_size) // out_size, -((-(i + 1) * in_size) // out_size)
    return start, end, bool(np.array_equal(start[1:], end[:-1]))


@functools.lru_cache(maxsize=256)
def adaptive_avg_pool_matrix(in_size: int, out_size: int) -> np.ndarray:
    """(out, in) averaging matrix of torch's adaptive_avg_pool along one axis (`pool_windows`)."""
    start, end, _ = pool_windows(in_size, out_size)
    m = np.zeros((out_size, in_size), np.float64)
    for i, (a, b) in enumerate(zip(start, end)):
        m[i, a:b] = 1.0 / (b - a)
    m.setflags(write=False)
    return m


def resize_separable(x, rows: np.ndarray, cols: np.ndarray):
    """x (B, H, W, C) -> (B, H', W', C) with per-axis matrices (H', H) and (W', W), computed in float32."""
    x = jnp.einsum("oh,bhwc->bowc", jnp.asarray(rows, jnp.float32), x.astype(jnp.float32))
    return jnp.einsum("pw,bowc->bopc", jnp.asarray(cols, jnp.float32), x)


def adaptive_avg_pool(x, size: tuple[int, int]):
    return resize_separable(x, adaptive_avg_pool_matrix(x.shape[1], size[0]),
                            adaptive_avg_pool_matrix(x.shape[2], size[1]))


def bicubic_resize(x, size: tuple[int, int]):
    return resize_separable(x, torch_bicubic_matrix(x.shape[1], size[0]), torch_bicubic_matrix(x.shape[2], size[1]))


def reflect_pad(x, r: int = RADIUS):
    return jnp.pad(x, ((0, 0), (r, r), (r, r), (0, 0)), mode="reflect")


def neighbourhood_taps(x_padded, h: int, w: int):
    """The 49 shifted views of a reflect-padded map, tap p = a * 7 + b (a = row offset), as a generator."""
    for a in range(DIAMETER):
        for b in range(DIAMETER):
            yield a * DIAMETER + b, x_padded[:, a:a + h, b:b + w, :]


def conv1x1(features: int, name: str, **kw):
    """A 1x1 convolution over channels-last maps is a dense layer (torch weight (out, in, 1, 1))."""
    return layers.dense(features, axes=(None, None), name=name, **kw)


class JBUStage(nn.Module):
    """FeatUp's `JBULearnedRange(guidance_dim=3, feat_dim=C, key_dim=32, radius=3)`.

    Works on any layout given its `Neighbourhood` and the source already upsampled to the guidance's size: 2-D maps
    (`MAP_NEIGHBOURHOOD`, `bicubic_resize`) or packed rows of many maps (host-built gather indices, see `hiwin`)."""

    key_dim: int = 32
    dropout: float = 0.1
    spatial_axes: tuple = (1, 2)   # Dropout2d drops whole channels: broadcast over these (packed rows: (1,))
    dtype: Any = jnp.float32
    param_dtype: Any = jnp.float32

    @nn.compact
    def __call__(self, upsampled, guidance, neighbourhood: "Neighbourhood", deterministic: bool = True):
        """upsampled (..., C) bicubic-upsampled source, guidance (..., 3) pooled image -> (..., C) float32."""
        kw = dict(dtype=self.dtype, param_dtype=self.param_dtype)
        range_temp = self.param("range_temp", nn.initializers.zeros_init(), (), self.param_dtype)
        sigma = self.param("sigma_spatial", nn.initializers.ones_init(), (), self.param_dtype)
        drop = lambda rate, name: nn.Dropout(rate, broadcast_dims=self.spatial_axes, name=name)  # noqa: E731

        proj = conv1x1(self.key_dim, "range_proj_0", **kw)(guidance)
        proj = drop(self.dropout, "range_proj_2")(layers.gelu_exact(proj), deterministic=deterministic)
        proj = conv1x1(self.key_dim, "range_proj_3", **kw)(proj).astype(jnp.float32)
        temp = jnp.clip(jnp.exp(range_temp.astype(jnp.float32)), 1e-4, 1e4)
        logits = jnp.stack([jnp.sum(nb * proj, axis=-1) for nb in neighbourhood.views(proj)], axis=-1) * temp  # 49 taps
        range_kernel = jax.nn.softmax(logits, axis=-1)
        d = np.linspace(-1.0, 1.0, DIAMETER, dtype=np.float32)
        dist2 = jnp.asarray((d[:, None] ** 2 + d[None, :] ** 2).reshape(-1))
        spatial = jnp.exp(-dist2 / (2 * sigma.astype(jnp.float32) ** 2))
        kernel = range_kernel * spatial
        kernel = kernel / jnp.maximum(kernel.sum(-1, keepdims=True), 1e-7)
        fix = conv1x1(DIAMETER ** 2, "fixup_proj_0", **kw)(
            jnp.concatenate([kernel, guidance.astype(jnp.float32)], axis=-1))
        fix = drop(self.dropout, "fixup_proj_2")(layers.gelu_exact(fix), deterministic=deterministic)
        kernel = kernel + 0.1 * conv1x1(DIAMETER ** 2, "fixup_proj_3", **kw)(fix).astype(jnp.float32)

        return neighbourhood.weighted_sum(upsampled.astype(jnp.float32), kernel)


# Dropout2d zeroes whole channels of one image: broadcast over the spatial axes (2-D maps: (B, H, W, C)).
CHANNEL_DROPOUT = (1, 2)


class Neighbourhood(NamedTuple):
    """How one layout reaches every position's 7x7 reflect-padded neighbourhood (tap p = a * 7 + b)."""

    views: Callable          # x (..., C) -> the 49 neighbour views of x, each (..., C)
    weighted_sum: Callable   # (x (..., C), kernel (..., 49)) -> sum_p kernel[..., p] * views(x)[p], float32


def map_views(x):
    """The 49 shifted views of a (B, H, W, C) map reflect-padded by 3."""
    h, w = x.shape[1], x.shape[2]
    padded = reflect_pad(x)
    return [v for _, v in neighbourhood_taps(padded, h, w)]


def plain_adaptive_conv(x, kernel):
    """sum_p kernel[..., p] * view_p(x), as JAX differentiates it: the reference `adaptive_conv` is tested against."""
    out = jnp.zeros(x.shape, jnp.float32)
    for p, nb in enumerate(map_views(x)):
        out = out + nb * kernel[..., p, None]
    return out


@jax.custom_vjp
def adaptive_conv(x, kernel):
    """FeatUp's AdaptiveConv on (B, H, W, C) maps: out = sum_p kernel[..., p] * view_p(x), the 49 views of x
    reflect-padded by 3, float32.

    The gradient is hand-written because JAX's own keeps every view for the backward pass: 49 maps of the 4x level's
    size, ~1.8 GB per 336^2 image and jitter in float32 (the `jbu` stage at its recipe batch of 16 did not fit in
    80 GB). Here only x and the kernel are kept; the backward pass slices the views again, one at a time, and adds
    g * kernel back through the padding."""
    return plain_adaptive_conv(x, kernel)


def _adaptive_conv_fwd(x, kernel):
    return plain_adaptive_conv(x, kernel), (x, kernel)


def _adaptive_conv_bwd(res, g):
    x, kernel = res
    padded, unpad = jax.vjp(reflect_pad, x.astype(jnp.float32))
    g = g.astype(jnp.float32)

    # One tap per iteration, in place: unrolled, XLA (CPU at least) materialises all 49 views or all 49 padded
    # cotangents before summing them, which is the memory this gradient exists to save.
    def tap(p, carry):
        d_kernel, d_padded = carry
        corner = (0, p // DIAMETER, p % DIAMETER, 0)
        view = jax.lax.dynamic_slice(padded, corner, x.shape)
        d_kernel = jax.lax.dynamic_update_index_in_dim(d_kernel, jnp.sum(g * view, axis=-1), p, axis=3)
        k_p = jax.lax.dynamic_index_in_dim(kernel, p, axis=3).astype(jnp.float32)
        d_view = jax.lax.dynamic_slice(d_padded, corner, x.shape) + g * k_p
        return d_kernel, jax.lax.dynamic_update_slice(d_padded, d_view, corner)

    d_kernel, d_padded = jax.lax.fori_loop(0, DIAMETER ** 2, tap, (jnp.zeros(kernel.shape, jnp.float32),
                                                                 jnp.zeros(padded.shape, jnp.float32)))
    (d_x,) = unpad(d_padded)
    return d_x.astype(x.dtype), d_kernel.astype(kernel.dtype)


adaptive_conv.defvjp(_adaptive_conv_fwd, _adaptive_conv_bwd)


MAP_NEIGHBOURHOOD = Neighbourhood(map_views, adaptive_conv)


class JBU4xStack(nn.Module):
    """Two JBU stages; returns (2x map, 4x map + 0.1 x 1x1-conv fixup). `image` is the CLIP-normalised image of
    size (14h, 14w); each stage pools it to its own output size."""

    dropout: float = 0.2
    dtype: Any = jnp.float32
    param_dtype: Any = jnp.float32

    @nn.compact
    def __call__(self, source, image, deterministic: bool = True, stage_stop_gradient: bool = False):
        """`stage_stop_gradient`: the 4x stage sees the 2x map detached (JBU pretraining's per-stage loss)."""
        kw = dict(dtype=self.dtype, param_dtype=self.param_dtype)
        _, h, w, _ = source.shape
        s2 = JBUStage(name="up1", **kw)(bicubic_resize(source, (2 * h, 2 * w)),
                                        adaptive_avg_pool(image, (2 * h, 2 * w)), MAP_NEIGHBOURHOOD, deterministic)
        s2_in = jax.lax.stop_gradient(s2) if stage_stop_gradient else s2
        s4 = JBUStage(name="up2", **kw)(bicubic_resize(s2_in, (4 * h, 4 * w)),
                                        adaptive_avg_pool(image, (4 * h, 4 * w)), MAP_NEIGHBOURHOOD, deterministic)
        fix = nn.Dropout(self.dropout, broadcast_dims=CHANNEL_DROPOUT, name="fixup_proj_0")(
            s4, deterministic=deterministic)
        return s2, s4 + 0.1 * conv1x1(s4.shape[-1], "fixup_proj_1", **kw)(fix).astype(jnp.float32)
