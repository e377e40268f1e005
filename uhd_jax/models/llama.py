"""Llama-family decoder (Llama-2/Vicuna, Llama-3; Qwen2 via `attention_bias`) with a KV cache.

HF `LlamaForCausalLM` semantics: RMSNorm (float32 inside), RoPE on halves (`rotate_half`), grouped-query attention,
SwiGLU MLP, untied `lm_head`, logits in float32. Positions come from the caller (the count of real tokens before
each one, `positions_from_mask`).

Attention never sees a (T, S) mask: it is causal with per-row lengths (`layers.dot_product_attention`), the form
cuDNN's and Pallas' flash kernels take. A row's real tokens must therefore be a prefix; any other validity pattern
(left padding, tokens dropped by SliME's router) is first made one by a stable gather that moves each row's real tokens
to its front, and the outputs are gathered back to the caller's layout. For a real token this computes exactly what
the masked form computed; outputs at padding are unspecified (finite).

KV cache: `KVCache(k, v, lengths)` with k/v (layers, B, S, kv_heads, head_dim) and lengths (B,) the tokens each row
holds. A multi-token call is a prefill into an empty cache (rows written from slot 0, compacted); a one-token call
writes each row at its own `lengths[b]` and reads slots [0, lengths[b]] (vLLM/MaxText style per-row positions).
"""
from __future__ import annotations

import dataclasses
from typing import Any, NamedTuple

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np

from uhd_jax.models import layers, lora as lora_lib


@dataclasses.dataclass(frozen=True)
class RopeScaling:
    """Llama-3 frequency scaling (HF `rope_type='llama3'`)."""

    factor: float = 8.0
    low_freq_factor: float = 1.0
    high_freq_factor: float = 4.0
    original_max_position_embeddings: int = 8192


@dataclasses.dataclass(frozen=True)
class LlamaConfig:
    vocab_size: int = 32000
    hidden_size: int = 4096
    intermediate_size: int = 11008
    num_layers: int = 32
    num_heads: int = 32
    num_kv_heads: int = 32
    head_dim: int | None = None
    rms_norm_eps: float = 1e-5
    rope_theta: float = 10000.0
    rope_scaling: RopeScaling | None = None
    attention_bias: bool = False  # Qwen2: biases on q/k/v
    max_position_embeddings: int = 4096
    dtype: Any = jnp.float32
    param_dtype: Any = jnp.float32
    attention_impl: str | None = "auto"   # see layers.resolve_attention_impl
    remat_policy: str = "none"
    scan_layers: bool = False
    lora: Any = None   # lora.LoraConfig: adapters on the linear layers it targets

    @property
    def dim_per_head(self) -> int:
        return self.head_dim or self.hidden_size // self.num_heads


class KVCache(NamedTuple):
    k: Any        # (L, B, S, K, D)
    v: Any
    lengths: Any  # (B,) int32: slots [0, lengths[b]) of row b hold its tokens; the next one goes at lengths[b]


def init_cache(cfg: LlamaConfig, batch: int, max_len: int, dtype=None) -> KVCache:
    shape = (cfg.num_layers, batch, max_len, cfg.num_kv_heads, cfg.dim_per_head)
    dtype = dtype or cfg.dtype
    return KVCache(jnp.zeros(shape, dtype), jnp.zeros(shape, dtype), jnp.zeros((batch,), jnp.int32))


def compaction_order(token_valid):
    """(B, T) bool -> (B, T) int: a stable order that puts each row's real tokens first (identity when they already
    are a prefix)."""
    return jnp.argsort(~token_valid, axis=-1, stable=True)


def gather_tokens(x, order):
    """x (B, T, ...) reordered along T by order (B, T)."""
    return jnp.take_along_axis(x, order.reshape(*order.shape, *(1,) * (x.ndim - 2)), axis=1)


def rope_inv_freq(cfg: LlamaConfig) -> np.ndarray:
    d = cfg.dim_per_head
    inv = 1.0 / (cfg.rope_theta ** (np.arange(0, d, 2, dtype=np.float32) / np.float32(d)))
    s = cfg.rope_scaling
    if s is not None:
        low_wavelen = s.original_max_position_embeddings / s.low_freq_factor
        high_wavelen = s.original_max_position_embeddings / s.high_freq_factor
        wavelen = 2 * np.pi / inv
        scaled = np.where(wavelen > low_wavelen, inv / s.factor, inv)
        smooth = (s.original_max_position_embeddings / wavelen - s.low_freq_factor) / (
            s.high_freq_factor - s.low_freq_factor)
        smoothed = (1 - smooth) * scaled / s.factor + smooth * scaled
        medium = ~(wavelen < high_wavelen) & ~(wavelen > low_wavelen)
        inv = np.where(medium, smoothed, scaled)
    return inv.astype(np.float32)


def apply_rope(x, cos, sin):
    """x (B, T, H, D); cos/sin (B, T, D/2) float32."""
    cos = jnp.concatenate([cos, cos], -1)[:, :, None, :].astype(x.dtype)
    sin = jnp.concatenate([sin, sin], -1)[:, :, None, :].astype(x.dtype)
    x1, x2 = jnp.split(x, 2, axis=-1)
    return x * cos + jnp.concatenate([-x2, x1], -1) * sin


class LlamaAttention(nn.Module):
    cfg: LlamaConfig

    @nn.compact
    def __call__(self, x, cos, sin, lengths, layer_cache, write):
        """lengths (B,): keys each row attends to (see `Llama.__call__`); write (B,) int: the cache slot of a
        one-token call's token, None otherwise."""
        c = self.cfg
        kw = dict(dtype=c.dtype, param_dtype=c.param_dtype, use_bias=c.attention_bias)
        q = lora_lib.dense(c.lora, (c.num_heads, c.dim_per_head), axes=("embed", "heads", "head_dim"), name="q",
                           **kw)(x)
        k = lora_lib.dense(c.lora, (c.num_kv_heads, c.dim_per_head), axes=("embed", "kv_heads", "head_dim"), name="k",
                           **kw)(x)
        v = lora_lib.dense(c.lora, (c.num_kv_heads, c.dim_per_head), axes=("embed", "kv_heads", "head_dim"), name="v",
                           **kw)(x)
        q = layers.checkpoint_name(apply_rope(q, cos, sin), "query")
        k = layers.checkpoint_name(apply_rope(k, cos, sin), "key")
        v = layers.checkpoint_name(v, "value")
        causal = True
        if layer_cache is not None:
            k_cache, v_cache = layer_cache
            if write is None:   # prefill: the rows start at slot 0 and attend among themselves
                k_cache = jax.lax.dynamic_update_slice(k_cache, k.astype(k_cache.dtype), (0, 0, 0, 0))
                v_cache = jax.lax.dynamic_update_slice(v_cache, v.astype(v_cache.dtype), (0, 0, 0, 0))
            else:               # one token per row, each at its own slot, attending to the row's cache
                rows = jnp.arange(x.shape[0])
                k_cache = k_cache.at[rows, write].set(k[:, 0].astype(k_cache.dtype))
                v_cache = v_cache.at[rows, write].set(v[:, 0].astype(v_cache.dtype))
                k, v, causal = k_cache.astype(c.dtype), v_cache.astype(c.dtype), False
            layer_cache = (k_cache, v_cache)
        out = layers.dot_product_attention(q, k, v, is_causal=causal, q_lengths=lengths if causal else None,
                                           kv_lengths=lengths, implementation=c.attention_impl)
        out = lora_lib.dense(c.lora, c.hidden_size, axes=("heads", "head_dim", "embed"), axis=(-2, -1), name="o",
                             dtype=c.dtype, param_dtype=c.param_dtype, use_bias=False)(out)
        return layers.checkpoint_name(out, "attn_out"), layer_cache


class LlamaBlock(nn.Module):
    cfg: LlamaConfig

    @nn.compact
    def __call__(self, x, cos, sin, lengths, layer_cache, write):
        c = self.cfg
        kw = dict(dtype=c.dtype, param_dtype=c.param_dtype)
        x = nn.with_logical_constraint(x, ("activation_batch", "activation_length", "activation_embed"))
        h = layers.RMSNorm(c.rms_norm_eps, name="input_norm", **kw)(x)
        h, layer_cache = LlamaAttention(c, name="attn")(h, cos, sin, lengths, layer_cache, write)
        x = x + h
        h = layers.RMSNorm(c.rms_norm_eps, name="post_attn_norm", **kw)(x)
        gate = lora_lib.dense(c.lora, c.intermediate_size, axes=("embed", "mlp"), name="gate", use_bias=False, **kw)(h)
        up = lora_lib.dense(c.lora, c.intermediate_size, axes=("embed", "mlp"), name="up", use_bias=False, **kw)(h)
        h = lora_lib.dense(c.lora, c.hidden_size, axes=("mlp", "embed"), name="down", use_bias=False, **kw)(
            jax.nn.silu(gate) * up)
        return x + layers.checkpoint_name(h, "mlp_out"), layer_cache


class Llama(nn.Module):
    cfg: LlamaConfig

    def setup(self):
        c = self.cfg
        kw = dict(dtype=c.dtype, param_dtype=c.param_dtype)
        self.embed_tokens = nn.Embed(
            c.vocab_size, c.hidden_size, name="embed_tokens", **kw,
            embedding_init=nn.with_logical_partitioning(layers.default_kernel_init, ("vocab", "embed")))
        block = layers.maybe_remat(LlamaBlock, c.remat_policy)
        if c.scan_layers:
            self.layers = nn.scan(
                block, variable_axes={"params": 0}, split_rngs={"params": True, "dropout": True}, length=c.num_layers,
                in_axes=(nn.broadcast, nn.broadcast, nn.broadcast, 0, nn.broadcast),
                metadata_params={nn.PARTITION_NAME: "layers"})(c, name="layers")
        else:
            self.layers = [block(c, name=f"layers_{i}") for i in range(c.num_layers)]
        self.norm = layers.RMSNorm(c.rms_norm_eps, name="norm", **kw)
        self.lm_head = self.param("lm_head", nn.with_logical_partitioning(layers.default_kernel_init,
                                                                          ("embed", "vocab")),
                                  (c.hidden_size, c.vocab_size), c.param_dtype)

    def embed(self, input_ids):
        return self.embed_tokens(input_ids)

    def __call__(self, inputs_embeds, positions, token_valid, cache: KVCache | None = None, return_hidden=False):
        """inputs_embeds (B, T, E); positions (B, T) int; token_valid (B, T) bool, any pattern (see the module doc)
        -> (logits f32 (B, T, V), cache) in the caller's token order. With a cache, T > 1 is a prefill into an empty
        cache, and T == 1 appends one token per row (a row whose token is not valid does not advance)."""
        c = self.cfg
        if self.is_initializing():  # callers may pass embeddings; the table must exist all the same
            self.embed_tokens(jnp.zeros((1, 1), jnp.int32))
        b, t = token_valid.shape
        order = None
        if t > 1:
            order = compaction_order(token_valid)
            inputs_embeds, positions, token_valid = (gather_tokens(a, order)
                                                     for a in (inputs_embeds, positions, token_valid))
        freqs = positions.astype(jnp.float32)[..., None] * jnp.asarray(rope_inv_freq(c))
        cos, sin = jnp.cos(freqs), jnp.sin(freqs)
        lengths = jnp.sum(token_valid, axis=-1, dtype=jnp.int32)
        write, layer_caches, new_lengths = None, None, None
        if cache is not None:
            layer_caches = (cache.k, cache.v)
            new_lengths = lengths
            if t == 1:
                write = cache.lengths
                new_lengths = cache.lengths + lengths
                lengths = cache.lengths + 1   # the own slot always: a padding token's output stays finite
        # a row with no real token still attends to its first slot (finite outputs, never read)
        lengths = jnp.maximum(lengths, 1)
        x = inputs_embeds.astype(c.dtype)
        if c.scan_layers:
            x, new_caches = self.layers(x, cos, sin, lengths, layer_caches, write)
        else:
            new = []
            for i, layer in enumerate(self.layers):
                lc = None if layer_caches is None else (layer_caches[0][i], layer_caches[1][i])
                x, lc = layer(x, cos, sin, lengths, lc, write)
                new.append(lc)
            new_caches = None if layer_caches is None else (jnp.stack([k for k, _ in new]),
                                                             jnp.stack([v for _, v in new]))
        x = self.norm(x)
        if order is not None:   # back to the caller's token order
            x = gather_tokens(x, jnp.argsort(order, axis=-1))
        new_cache = None if cache is None else KVCache(new_caches[0], new_caches[1], new_lengths)
        if return_hidden:
            return x, new_cache
        return self.logits(x), new_cache

    def logits(self, hidden):
        return layers.dot_trailing(hidden, jnp.asarray(self.lm_head, self.cfg.dtype),
                                   preferred_element_type=jnp.float32)


def positions_from_mask(token_valid):
    """Positions of a left- or right-padded batch: index among the real tokens (0 at padding), as HF generate()."""
    pos = jnp.cumsum(token_valid.astype(jnp.int32), axis=-1) - 1
    return jnp.where(token_valid, pos, 0)
