"""Llama-family decoder (Llama-2/Vicuna, Llama-3; Qwen2 via `attention_bias`) with a KV cache.

HF `LlamaForCausalLM` semantics: RMSNorm (float32 inside), RoPE on halves (`rotate_half`), grouped-query attention,
SwiGLU MLP, untied `lm_head`, logits in float32. Masks are built from per-token validity, so left- and right-padded
batches both work; positions come from the caller (cumulative count of real tokens for left padding).

KV cache: `KVCache(k, v, valid, index)` with k/v (layers, B, S, kv_heads, head_dim). A call writes its T tokens at
slots [index, index + T) and attends to every valid slot at or before its own, so prefill and decode are the same code.
"""
from __future__ import annotations

import dataclasses
from typing import Any, NamedTuple

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np

from uhd_jax.models import layers


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
    attention_impl: str | None = "xla"
    remat_policy: str = "none"
    scan_layers: bool = False

    @property
    def dim_per_head(self) -> int:
        return self.head_dim or self.hidden_size // self.num_heads


class KVCache(NamedTuple):
    k: Any       # (L, B, S, K, D)
    v: Any
    valid: Any   # (B, S) bool: slot holds a real token
    index: Any   # () int32: next slot to write


def init_cache(cfg: LlamaConfig, batch: int, max_len: int, dtype=None) -> KVCache:
    shape = (cfg.num_layers, batch, max_len, cfg.num_kv_heads, cfg.dim_per_head)
    dtype = dtype or cfg.dtype
    return KVCache(jnp.zeros(shape, dtype), jnp.zeros(shape, dtype), jnp.zeros((batch, max_len), bool),
                   jnp.zeros((), jnp.int32))


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


def attention_mask(token_valid, cache_valid=None, index=None):
    """Boolean (B, 1, T, S) mask: causal over slots, only valid keys, and always the query's own slot.

    The own slot keeps rows of padding queries finite (their outputs are never used).
    """
    t = token_valid.shape[1]
    if cache_valid is None:
        key_valid, q_slot, s = token_valid, jnp.arange(t), t
    else:
        key_valid, q_slot, s = cache_valid, index + jnp.arange(t), cache_valid.shape[1]
    slots = jnp.arange(s)
    causal = slots[None, :] <= q_slot[:, None]
    own = slots[None, :] == q_slot[:, None]
    return ((causal[None] & key_valid[:, None, :]) | own[None])[:, None]


class LlamaAttention(nn.Module):
    cfg: LlamaConfig

    @nn.compact
    def __call__(self, x, cos, sin, mask, layer_cache, index):
        c = self.cfg
        kw = dict(dtype=c.dtype, param_dtype=c.param_dtype, use_bias=c.attention_bias)
        q = layers.dense((c.num_heads, c.dim_per_head), axes=("embed", "heads", "head_dim"), name="q", **kw)(x)
        k = layers.dense((c.num_kv_heads, c.dim_per_head), axes=("embed", "kv_heads", "head_dim"), name="k", **kw)(x)
        v = layers.dense((c.num_kv_heads, c.dim_per_head), axes=("embed", "kv_heads", "head_dim"), name="v", **kw)(x)
        q = layers.checkpoint_name(apply_rope(q, cos, sin), "query")
        k = layers.checkpoint_name(apply_rope(k, cos, sin), "key")
        v = layers.checkpoint_name(v, "value")
        if layer_cache is not None:
            k_cache, v_cache = layer_cache
            k_cache = jax.lax.dynamic_update_slice(k_cache, k.astype(k_cache.dtype), (0, index, 0, 0))
            v_cache = jax.lax.dynamic_update_slice(v_cache, v.astype(v_cache.dtype), (0, index, 0, 0))
            layer_cache = (k_cache, v_cache)
            k, v = k_cache.astype(c.dtype), v_cache.astype(c.dtype)
        out = layers.dot_product_attention(q, k, v, mask=mask, implementation=c.attention_impl)
        out = layers.dense(c.hidden_size, axes=("heads", "head_dim", "embed"), axis=(-2, -1), name="o",
                           dtype=c.dtype, param_dtype=c.param_dtype, use_bias=False)(out)
        return layers.checkpoint_name(out, "attn_out"), layer_cache


class LlamaBlock(nn.Module):
    cfg: LlamaConfig

    @nn.compact
    def __call__(self, x, cos, sin, mask, layer_cache, index):
        c = self.cfg
        kw = dict(dtype=c.dtype, param_dtype=c.param_dtype)
        x = nn.with_logical_constraint(x, ("activation_batch", "activation_length", "activation_embed"))
        h = layers.RMSNorm(c.rms_norm_eps, name="input_norm", **kw)(x)
        h, layer_cache = LlamaAttention(c, name="attn")(h, cos, sin, mask, layer_cache, index)
        x = x + h
        h = layers.RMSNorm(c.rms_norm_eps, name="post_attn_norm", **kw)(x)
        gate = layers.dense(c.intermediate_size, axes=("embed", "mlp"), name="gate", use_bias=False, **kw)(h)
        up = layers.dense(c.intermediate_size, axes=("embed", "mlp"), name="up", use_bias=False, **kw)(h)
        h = layers.dense(c.hidden_size, axes=("mlp", "embed"), name="down", use_bias=False, **kw)(
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
                block, variable_axes={"params": 0}, split_rngs={"params": True}, length=c.num_layers,
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
        """inputs_embeds (B, T, E); positions (B, T) int; token_valid (B, T) bool -> (logits f32 (B, T, V), cache)."""
        c = self.cfg
        if self.is_initializing():  # callers may pass embeddings; the table must exist all the same
            self.embed_tokens(jnp.zeros((1, 1), jnp.int32))
        freqs = positions.astype(jnp.float32)[..., None] * jnp.asarray(rope_inv_freq(c))
        cos, sin = jnp.cos(freqs), jnp.sin(freqs)
        if cache is None:
            mask, index, layer_caches = attention_mask(token_valid), None, None
        else:
            t = token_valid.shape[1]
            valid = jax.lax.dynamic_update_slice(cache.valid, token_valid, (0, cache.index))
            mask, index, layer_caches = attention_mask(token_valid, valid, cache.index), cache.index, (cache.k, cache.v)
        x = inputs_embeds.astype(c.dtype)
        if c.scan_layers:
            x, new_caches = self.layers(x, cos, sin, mask, layer_caches, index)
        else:
            new = []
            for i, layer in enumerate(self.layers):
                lc = None if layer_caches is None else (layer_caches[0][i], layer_caches[1][i])
                x, lc = layer(x, cos, sin, mask, lc, index)
                new.append(lc)
            new_caches = None if layer_caches is None else (jnp.stack([k for k, _ in new]),
                                                             jnp.stack([v for _, v in new]))
        x = self.norm(x)
        new_cache = None if cache is None else KVCache(new_caches[0], new_caches[1], valid, cache.index + t)
        if return_hidden:
            return x, new_cache
        return self.logits(x), new_cache

    def logits(self, hidden):
        return jnp.einsum("bte,ev->btv", hidden, jnp.asarray(self.lm_head, self.cfg.dtype),
                          preferred_element_type=jnp.float32)


def positions_from_mask(token_valid):
    """Positions of a left- or right-padded batch: index among the real tokens (0 at padding), as HF generate()."""
    pos = jnp.cumsum(token_valid.astype(jnp.int32), axis=-1) - 1
    return jnp.where(token_valid, pos, 0)
