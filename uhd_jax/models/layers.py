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


def dot_trailing(x, kernel, n: int = 1, preferred_element_type=None):
    """x (..., K1..Kn) . kernel (K1..Kn, F...) -> (..., F...), with x's leading dims folded into one first.

    With (batch, length, ...) kept apart, XLA's CPU backend writes the backward's (tokens, features) gradient
    transposed before the kernel's gradient product: a strided copy that made the demo LLM's MLP backward 2.1x slower
    (benchmarks/README.md). Folded, the product is the same and so are the values."""
    lead = x.shape[:x.ndim - n]
    y = jax.lax.dot_general(x.reshape((-1,) + x.shape[x.ndim - n:]), kernel,
                            ((tuple(range(1, n + 1)), tuple(range(n))), ((), ())),
                            preferred_element_type=preferred_element_type)
    return y.reshape(lead + kernel.shape[n:])


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
        y = dot_trailing(x.astype(self.dtype), jnp.asarray(kernel, self.dtype), len(axis))
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


ATTENTION_IMPLS = ("auto", "xla", "cudnn", "chunked", "pallas")


def resolve_attention_impl(implementation: str | None, *, dtype, head_dim: int, q_len: int, kv_len: int,
                           is_causal: bool, has_mask: bool, platform: str | None = None) -> str:
    """The kernel an attention call runs, decided at trace time. 'auto' picks per platform: cuDNN flash attention on
    GPU (it computes in bf16/fp16 only, head_dim a multiple of 8 up to 128), the Pallas TPU flash kernel for causal
    self-attention whose length fills its 128-token blocks, and on CPU the chunked causal einsum (XLA's dense one
    computes and exponentiates the whole (T, S) score matrix, half of which a causal mask throws away). Everything
    else falls back to XLA. None is JAX's own choice (XLA)."""
    if implementation is None:
        return "xla"
    if implementation not in ATTENTION_IMPLS:
        raise ValueError(f"unknown attention_impl {implementation!r}; choose one of {list(ATTENTION_IMPLS)}")
    if implementation != "auto":
        return implementation
    if has_mask:
        return "xla"
    platform = platform or jax.default_backend()
    if platform in ("gpu", "cuda"):
        # one-token decoding reads the cache with a matrix-vector product: nothing for a flash kernel to save
        fits = jnp.dtype(dtype) in (jnp.dtype(jnp.bfloat16), jnp.dtype(jnp.float16)) and head_dim % 8 == 0 \
            and head_dim <= 128 and q_len > 1
        return "cudnn" if fits else "xla"
    if platform == "tpu":
        return "pallas" if is_causal and q_len == kv_len and q_len % 128 == 0 else "xla"
    return "chunked" if is_causal and q_len == kv_len else "xla"


def dot_product_attention(q, k, v, *, mask=None, is_causal: bool = False, q_lengths=None, kv_lengths=None,
                          implementation: str | None = "auto"):
    """The one attention entry point: q (B, T, N, D), k/v (B, S, K, D) with N % K == 0.

    Which keys a query sees is said by `is_causal` (query t sees keys <= t; T == S) and per-row `kv_lengths` (B,)
    (keys at or past it are padding); `q_lengths` (B,) marks padding queries, whose outputs are unspecified (finite).
    `mask` (B|1, 1|N, T|1, S) bool is for callers whose validity is not a prefix (the vision tower's packed rows); a
    mask forces the XLA kernel. `implementation` (config `attention_impl`): see `resolve_attention_impl`.
    """
    impl = resolve_attention_impl(implementation, dtype=q.dtype, head_dim=q.shape[-1], q_len=q.shape[1],
                                  kv_len=k.shape[1], is_causal=is_causal, has_mask=mask is not None)
    if impl == "chunked" and mask is None:
        return chunked_attention(q, k, v, is_causal=is_causal, kv_lengths=kv_lengths)
    if impl == "pallas" and mask is None:
        from uhd_jax.models.pallas_attention import tpu_flash_attention  # TPU only: keeps Pallas off the CPU import
        return tpu_flash_attention(q, k, v, is_causal=is_causal, kv_lengths=kv_lengths)
    if impl in ("chunked", "pallas"):
        impl = "xla"
    return jax.nn.dot_product_attention(q, k, v, mask=mask, is_causal=is_causal, query_seq_lengths=q_lengths,
                                        key_value_seq_lengths=kv_lengths, implementation=impl)


# Batch rows per iteration of the chunked attention's loop, as measured on the 2-core machine (forward + backward at
# B=8, T=512, 4 query / 2 KV heads of 32, alternating runs, 2026-12-03): two rows 37-42 ms, one row 49-65 ms, four
# rows 49-51 ms. Each iteration is a few dozen small products, and two rows make each one twice as large.
CHUNKED_ROWS_PER_STEP = 2


def chunked_attention(q, k, v, *, is_causal: bool, kv_lengths=None, block: int = 64):
    """The CPU's attention: CHUNKED_ROWS_PER_STEP batch rows at a time (`lax.map`), causal queries in blocks of
    `block`, block i reading only keys [0, end of block i), so the keys a causal mask would zero out are never
    multiplied (about half the work at long T). Each iteration's body is rematerialised: its scores and
    probabilities live only inside it, small enough for the CPU's caches, where XLA's dense kernel (and this function
    over the whole batch at once) streams the (B, N, T, S) scores through memory several times in the forward and
    backward passes. Forward + backward at B=8, T=512, 4 query / 2 KV heads of 32, float32, 2 cores (2026-12-02):
    XLA's dense kernel 114-138 ms, the whole batch in query blocks 56-72 ms, this one row at a time 29-39 ms, torch's
    scaled_dot_product_attention(is_causal=True) 42 ms. (A FlashAttention-style custom gradient from the saved
    log-sum-exp measured 36-42 ms: slower here.) Masks come from iotas and the lengths, inside. Same inputs and outputs
    as `dot_product_attention`. A scan over the batch axis serialises a batch that a mesh shards: 'auto' picks this
    kernel only on the CPU."""
    b, t, n, d = q.shape
    s, kv_heads = k.shape[1], k.shape[2]
    scale = 1.0 / float(d) ** 0.5
    lengths = jnp.full((b,), s, jnp.int32) if kv_lengths is None else kv_lengths.astype(jnp.int32)
    if not is_causal or t <= block:
        ends = [(0, t, s)]
    else:
        ends = [(start, min(start + block, t), min(start + block, t)) for start in range(0, t, block)]
    # heads before positions, once, so each block's products are plain batched matmuls
    qt = q.reshape(b, t, kv_heads, n // kv_heads, d).transpose(0, 2, 3, 1, 4)    # (B, K, G, T, D)
    kt, vt = k.transpose(0, 2, 1, 3), v.transpose(0, 2, 1, 3)                      # (B, K, S, D)

    def row(xs):
        q1, k1, v1, length = xs
        outs = []
        for start, stop, keys in ends:
            key_slot = jnp.arange(keys)
            keep = key_slot[None, :] < length
            if is_causal:
                keep = keep & (key_slot[None, :] <= jnp.arange(start, stop)[:, None])
            logits = jnp.einsum("kgtd,ksd->kgts", q1[:, :, start:stop], k1[:, :keys],
                                preferred_element_type=jnp.float32) * scale
            logits = jnp.where(keep, logits, jnp.finfo(jnp.float32).min)
            probs = jax.nn.softmax(logits, axis=-1).astype(v.dtype)
            outs.append(jnp.einsum("kgts,ksd->kgtd", probs, v1[:, :keys]))
        return outs[0] if len(outs) == 1 else jnp.concatenate(outs, axis=2)

    out = jax.lax.map(jax.checkpoint(row), (qt, kt, vt, lengths),
                      batch_size=min(b, CHUNKED_ROWS_PER_STEP))                         # (B, K, G, T, D)
    return out.transpose(0, 3, 1, 2, 4).reshape(b, t, n, d)


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
