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


def dense(features, *, axes: Sequence[str | None], name: str, dtype: Dtype, param_dtype: Dtype, use_bias: bool = True,
          axis: int | Sequence[int] = -1, kernel_init: Callable = default_kernel_init) -> nn.DenseGeneral:
    """A DenseGeneral whose kernel carries `axes` (input dims then output dims) and whose bias the output axes."""
    n_out = 1 if isinstance(features, int) else len(features)
    return nn.DenseGeneral(
        features=features, axis=axis, use_bias=use_bias, dtype=dtype, param_dtype=param_dtype, name=name,
        kernel_init=nn.with_logical_partitioning(kernel_init, tuple(axes)),
        bias_init=nn.with_logical_partitioning(nn.initializers.zeros_init(), tuple(axes[-n_out:])),
    )


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
