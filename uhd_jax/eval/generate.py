"""Greedy decoding with a preallocated KV cache: one jitted prefill, then a `lax.while_loop` of one-token steps.

Prompts are left-padded (B, T) with `token_valid`; positions count real tokens, as HF `generate()` does, so a padded
batch decodes exactly like each prompt alone. Finished rows (EOS emitted) keep emitting `pad_id`.
"""
from __future__ import annotations

import functools

import jax
import jax.numpy as jnp

from uhd_jax.models.llama import Llama, LlamaConfig, init_cache, positions_from_mask


@functools.partial(jax.jit, static_argnames=("cfg", "max_new_tokens", "eos_id", "pad_id"))
def greedy_generate(params, cfg: LlamaConfig, inputs_embeds, token_valid, *, max_new_tokens: int,
                    eos_id: int | None = None, pad_id: int = 0):
    """params: the LLM's variables; inputs_embeds (B, T, E) (text and image embeddings already spliced).

    Returns (B, max_new_tokens) int32 new tokens.
    """
    model = Llama(cfg)
    b, t = token_valid.shape
    cache = init_cache(cfg, b, t + max_new_tokens)
    positions = positions_from_mask(token_valid)
    logits, cache = model.apply(params, inputs_embeds, positions, token_valid, cache=cache)
    first = jnp.argmax(logits[:, -1], axis=-1).astype(jnp.int32)
    out = jnp.full((b, max_new_tokens), pad_id, jnp.int32).at[:, 0].set(first)
    done = first == eos_id if eos_id is not None else jnp.zeros((b,), bool)
    last_pos = jnp.max(positions, axis=-1)

    def cond(state):
        step, _, _, _, done = state
        return (step < max_new_tokens) & ~jnp.all(done)

    def body(state):
        step, tokens, cache, pos, done = state
        prev = tokens[:, step - 1]
        embeds = model.apply(params, prev[:, None], method=Llama.embed)
        logits, cache = model.apply(params, embeds, (pos + 1)[:, None], jnp.ones((b, 1), bool), cache=cache)
        nxt = jnp.argmax(logits[:, -1], axis=-1).astype(jnp.int32)
        nxt = jnp.where(done, pad_id, nxt)
        if eos_id is not None:
            done = done | (nxt == eos_id)
        return step + 1, tokens.at[:, step].set(nxt), cache, pos + 1, done

    _, out, _, _, _ = jax.lax.while_loop(cond, body, (jnp.int32(1), out, cache, last_pos, done))
    return out
