"""Building blocks shared by the vision tower, the LLMs and the projectors.

Every parameter is created with logical axis names (`embed`, `mlp`, `heads`, `kv_heads`, `head_dim`, `vocab`, ...);
`uhd_jax.parallel.sharding` maps them onto mesh axes. Compute happens in `dtype`, storage in `param_dtype`.
"""
from __future__ import annotations

from typing import Any, Callable, Sequence

import flax.linen as nn
import jax
import jax.numpy as jnp

Dtype = Any
default_kernel_init = nn.initializers.normal(stddev=0.02)


class DenseGeneral(nn.Module):
    """y = x . kernel over the trailing `axis` dims, kernel created at its full shape with logical axis names.

    (flax's DenseGeneral initialises a flattened kernel and constrains it before reshaping, which fails under a mesh.)
    """

    features: int | Sequence[int]
    axes: Sequence[str | None]
    axis: int | Sequence[int] = -1
    use_bias: bool = True
    dtype: Dtype = jnp.float32
    param_dtype: Dtype = jnp.float32
    kernel_init: Callable = default_kernel_init

    @nn.compact
    def __call__(self, x):
        features = (self.features,) if isinstance(self.features, int) else tuple(self.features)
        axis = (self.axis,) if isinstance(self.axis, int) else tuple(self.axis)
        axis = tuple(sorted(a % x.ndim for a in axis))
        if axis != tuple(range(x.ndim - len(axis), x.ndim)):
            raise ValueError(f"DenseGeneral contracts trailing dims only, got axis={self.axis} for rank {x.ndim}")
        shape = tuple(x.shape[a] for a in axis) + features
        kernel = self.param("kernel", nn.with_logical_partitioning(self.kernel_init, tuple(self.axes)), shape,
                            self.param_dtype)
        y = jax.lax.dot_general(x.astype(self.dtype), jnp.asarray(kernel, self.dtype),
                                ((axis, tuple(range(len(axis)))), ((), ())))
        if self.use_bias:
            bias = self.param("bias", nn.with_logical_partitioning(nn.initializers.zeros_init(),
                                                                   tuple(self.axes[len(axis):])),
                              features, self.param_dtype)
            y = y + jnp.asarray(bias, self.dtype)
        return y


def dense(features, *, axes: Sequence[str | None], name: str, dtype: Dtype, param_dtype: Dtype, use_bias: bool = True,
          axis: int | Sequence[int] = -1, kernel_init: Callable = default_kernel_init) -> DenseGeneral:
    """A dense layer whose kernel carries `axes` (input dims then output dims) and whose bias the output axes."""
    return DenseGeneral(features=features, axes=tuple(axes), axis=axis, use_bias=use_bias, dtype=dtype,
                        param_dtype=param_dtype, kernel_init=kernel_init, name=name)


def layer_norm(*, eps: float, name: str, dtype: Dtype, param_dtype: Dtype, axis_name: str = "norm") -> nn.LayerNorm:
    return nn.LayerNorm(
        epsilon=eps, dtype=dtype, param_dtype=param_dtype, name=name,
        scale_init=nn.with_logical_partitioning(nn.initializers.ones_init(), (axis_name,)),
        bias_init=nn.with_logical_partitioning(nn.initializers.zeros_init(), (axis_name,)),
    )


class RMSNorm(nn.Module):
    """Llama RMSNorm: normalise in float32, cast back, then scale (HF order of operations)."""

    eps: float = 1e-6
    dtype: Dtype = jnp.float32
    param_dtype: Dtype = jnp.float32

    @nn.compact
    def __call__(self, x):
        scale = self.param("scale", nn.with_logical_partitioning(nn.initializers.ones_init(), ("norm",)),
                           (x.shape[-1],), self.param_dtype)
        x32 = x.astype(jnp.float32)
        normed = x32 * jax.lax.rsqrt(jnp.mean(x32 * x32, axis=-1, keepdims=True) + self.eps)
        return jnp.asarray(scale, self.dtype) * normed.astype(self.dtype)


def quick_gelu(x):
    return x * jax.nn.sigmoid(1.702 * x)


def gelu_exact(x):
    return jax.nn.gelu(x, approximate=False)


ACTIVATIONS = {"quick_gelu": quick_gelu, "gelu": gelu_exact, "silu": jax.nn.silu, "gelu_tanh": jax.nn.gelu}


def dot_product_attention(q, k, v, *, mask=None, is_causal: bool = False, implementation: str | None = None):
    """The one attention entry point: q (B, T, N, D), k/v (B, S, K, D) with N % K == 0; mask (B|1, 1|N, T, S) bool.

    `implementation` comes from config: 'cudnn' (flash attention on GPU), 'xla' (CPU/TPU and the reference), or None
    (JAX chooses). Softmax runs in float32 inside XLA's implementation for bf16 inputs.
    """
    return jax.nn.dot_product_attention(q, k, v, mask=mask, is_causal=is_causal, implementation=implementation)


# Remat policies by name, chosen in config. The named policy keeps the tensors tagged with `checkpoint_name` in the
# layers (attention output and MLP output), so the backward pass recomputes only the cheap parts in between.
REMAT_POLICIES = {
    "nothing_saveable": jax.checkpoint_policies.nothing_saveable,
    "dots_saveable": jax.checkpoint_policies.dots_saveable,
    "dots_with_no_batch_dims_saveable": jax.checkpoint_policies.dots_with_no_batch_dims_saveable,
    "save_attn_mlp_out": jax.checkpoint_policies.save_only_these_names("attn_out", "mlp_out"),
    "save_qkv_attn_mlp_out": jax.checkpoint_policies.save_only_these_names("query", "key", "value", "attn_out",
                                                                            "mlp_out"),
}


def maybe_remat(block_cls, policy: str, static_argnums=()):
    """Wrap a layer class with `nn.remat` under the named policy; 'none' keeps every activation."""
    if policy in (None, "none"):
        return block_cls
    if policy not in REMAT_POLICIES:
        raise ValueError(f"unknown remat policy {policy!r}; choose one of {['none', *REMAT_POLICIES]}")
    return nn.remat(block_cls, policy=REMAT_POLICIES[policy], prevent_cse=True, static_argnums=static_argnums)


def checkpoint_name(x, name: str):
    from jax.ad_checkpoint import checkpoint_name as _name
    return _name(x, name)
