"""Decoding loops over the Llama KV cache: greedy, sampling (temperature, top-p) and beam search, each one jitted
program (prefill, then a `lax.while_loop` of one-token steps) with static shapes.

Prompts are (B, T) with `token_valid`, padded on either side (or with holes: SliME's routed-out tokens); positions
count real tokens, as HF `generate()` does, so a padded batch decodes exactly like each prompt alone. The prefill
stores each row's real tokens from slot 0 of the KV cache and every step appends at the row's own length, so
attention reads the cache by per-row lengths (no mask). A row stops at EOS or at one of `stop_sequences` (token ids) and then
emits `pad_id`. Sampling draws each row from its own key (`row_keys`), so a question's sampled answer does not depend
on which other questions share its batch.

Beam search is HF transformers' algorithm (`GenerationMixin._beam_search`, the default `early_stopping=False`): 2K
candidates per step, a candidate that ends (EOS, stop sequence or the length limit) among the top K joins the
finished set with score sum_logprob / generated_length ** length_penalty, the best K unfinished continue, and a row
stops once its best running beam cannot beat its worst finished one. Equal tokens to HF are tested.
"""
from __future__ import annotations

import dataclasses
import functools

import jax
import jax.numpy as jnp

from uhd_jax.models.llama import KVCache, Llama, LlamaConfig, init_cache, positions_from_mask

NEG = -1.0e9   # HF's "impossible" score


@dataclasses.dataclass(frozen=True)
class GenerationConfig:
    max_new_tokens: int = 128
    temperature: float = 0.0        # 0: greedy (the originals' `do_sample = temperature > 0`)
    top_p: float = 1.0              # nucleus sampling (HF TopPLogitsWarper); 1.0 keeps every token
    num_beams: int = 1
    length_penalty: float = 1.0     # beam search only (HF default)
    eos_id: int | None = None
    pad_id: int = 0
    stop_sequences: tuple[tuple[int, ...], ...] = ()

    def __post_init__(self):
        if self.max_new_tokens < 1 or self.num_beams < 1:
            raise ValueError(f"max_new_tokens and num_beams must be >= 1, got {self.max_new_tokens}, {self.num_beams}")
        if not 0.0 < self.top_p <= 1.0:
            raise ValueError(f"top_p must be in (0, 1], got {self.top_p}")
        if self.num_beams > 1 and self.temperature > 0:
            raise ValueError("beam search with sampling is not supported: set temperature=0 or num_beams=1")


def top_p_filter(logits, top_p: float):
    """HF TopPLogitsWarper: drop the least likely tokens whose total probability is at most 1 - top_p (the most
    likely token always stays)."""
    order = jnp.argsort(logits, axis=-1)   # ascending, as HF
    ascending = jnp.take_along_axis(logits, order, axis=-1)
    cum = jnp.cumsum(jax.nn.softmax(ascending, axis=-1), axis=-1)
    drop_sorted = (cum <= 1.0 - top_p).at[..., -1].set(False)
    drop = jnp.zeros_like(drop_sorted).at[jnp.arange(logits.shape[0])[:, None], order].set(drop_sorted)
    return jnp.where(drop, -jnp.inf, logits)


def next_tokens(logits, gen: GenerationConfig, row_keys, step):
    """(B, V) float32 logits -> (B,) int32: argmax, or a draw after temperature and top-p."""
    if gen.temperature <= 0:
        return jnp.argmax(logits, axis=-1).astype(jnp.int32)
    logits = logits / gen.temperature
    if gen.top_p < 1.0:
        logits = top_p_filter(logits, gen.top_p)
    keys = jax.vmap(jax.random.fold_in, (0, None))(row_keys, step)
    return jax.vmap(jax.random.categorical)(keys, logits).astype(jnp.int32)


def ends_with_stop(tokens, step, stop_sequences):
    """tokens (..., N) with slot `step` just written -> (...) bool: a stop sequence ends at `step`."""
    hit = jnp.zeros(tokens.shape[:-1], bool)
    for seq in stop_sequences:
        n = len(seq)
        window = jax.lax.dynamic_slice_in_dim(tokens, jnp.maximum(step - n + 1, 0), n, axis=tokens.ndim - 1)
        hit = hit | ((step + 1 >= n) & jnp.all(window == jnp.asarray(seq, jnp.int32), axis=-1))
    return hit


def _ends(tokens, new, step, gen):
    hit = ends_with_stop(tokens, step, gen.stop_sequences)
    return hit | (new == gen.eos_id) if gen.eos_id is not None else hit


def _prefill(model, params, inputs_embeds, token_valid, extra: int):
    b, t = token_valid.shape
    cache = init_cache(model.cfg, b, t + extra)
    positions = positions_from_mask(token_valid)
    hidden, cache = model.apply(params, inputs_embeds, positions, token_valid, cache=cache, return_hidden=True)
    last = jnp.max(jnp.where(token_valid, jnp.arange(t), 0), axis=-1)   # each row's last real token
    logits = model.apply(params, hidden[jnp.arange(b), last][:, None], method=Llama.logits)
    return logits[:, 0], cache, jnp.max(positions, axis=-1)


def _step(model, params, tokens, positions, cache: KVCache):
    """One token per row at `positions` -> ((B, V) logits, cache)."""
    embeds = model.apply(params, tokens[:, None], method=Llama.embed)
    logits, cache = model.apply(params, embeds, positions[:, None], jnp.ones((tokens.shape[0], 1), bool), cache=cache)
    return logits[:, -1], cache


@functools.partial(jax.jit, static_argnames=("cfg", "gen"))
def decode(params, cfg: LlamaConfig, inputs_embeds, token_valid, row_keys, gen: GenerationConfig):
    """params: the LLM's variables ({'params': ...}); inputs_embeds (B, T, E) with image features spliced in;
    row_keys (B,) PRNG keys (read only when sampling). -> (B, max_new_tokens) int32, `pad_id` after the end."""
    if gen.num_beams > 1:
        return beam_search(params, cfg, inputs_embeds, token_valid, gen)
    model = Llama(cfg)
    b = token_valid.shape[0]
    n = gen.max_new_tokens
    logits, cache, last_pos = _prefill(model, params, inputs_embeds, token_valid, n)
    first = next_tokens(logits, gen, row_keys, 0)
    out = jnp.full((b, n), gen.pad_id, jnp.int32).at[:, 0].set(first)
    done = _ends(out, first, 0, gen)

    def cond(state):
        step, _, _, _, done = state
        return (step < n) & ~jnp.all(done)

    def body(state):
        step, tokens, cache, pos, done = state
        logits, cache = _step(model, params, tokens[:, step - 1], pos + 1, cache)
        new = jnp.where(done, gen.pad_id, next_tokens(logits, gen, row_keys, step))
        tokens = tokens.at[:, step].set(new)
        return step + 1, tokens, cache, pos + 1, done | _ends(tokens, new, step, gen)

    return jax.lax.while_loop(cond, body, (jnp.int32(1), out, cache, last_pos, done))[1]


def _take(x, index):
    """x (B, C, ...) gathered along axis 1 by index (B, K)."""
    return jnp.take_along_axis(x, index.reshape(*index.shape, *(1,) * (x.ndim - 2)), axis=1)


@functools.partial(jax.jit, static_argnames=("cfg", "gen"))
def beam_search(params, cfg: LlamaConfig, inputs_embeds, token_valid, gen: GenerationConfig):
    """`gen.num_beams` beams per row (1 is allowed: it decodes as greedy when no hypothesis ends early) -> the best
    finished hypothesis per row, (B, max_new_tokens)."""
    model = Llama(cfg)
    b, k, n = token_valid.shape[0], gen.num_beams, gen.max_new_tokens
    cand = 2 * k   # HF keeps max(2, 1 + number of EOS ids) * K candidates; one EOS id here
    logits, cache, last_pos = _prefill(model, params, inputs_embeds, token_valid, n)
    # every beam starts as the prompt; only beam 0 may expand at the first step (the others score NEG)
    logits = jnp.repeat(logits, k, axis=0)
    cache = KVCache(jnp.repeat(cache.k, k, axis=1), jnp.repeat(cache.v, k, axis=1), jnp.repeat(cache.lengths, k))
    pos = jnp.repeat(last_pos, k)
    running = jnp.full((b, k, n), gen.pad_id, jnp.int32)
    running_scores = jnp.zeros((b, k), jnp.float32).at[:, 1:].set(NEG)
    finished = jnp.full((b, k, n), gen.pad_id, jnp.int32)
    finished_scores = jnp.full((b, k), NEG, jnp.float32)
    finished_real = jnp.zeros((b, k), bool)
    improvable = jnp.ones((b,), bool)
    top_k_slot = jnp.arange(cand) < k

    def body(state):
        step, logits, cache, pos, running, running_scores, finished, finished_scores, finished_real, improvable, _ = \
            state
        logp = jax.nn.log_softmax(logits.astype(jnp.float32), axis=-1).reshape(b, k, -1)
        vocab = logp.shape[-1]
        scores, flat = jax.lax.top_k((logp + running_scores[..., None]).reshape(b, k * vocab), cand)
        source, token = flat // vocab, (flat % vocab).astype(jnp.int32)
        seqs = _take(running, source).at[:, :, step].set(token)
        ends = _ends(seqs, token, step, gen) | (step + 1 >= n)
        # the best K candidates that go on
        alive = scores + jnp.where(ends, NEG, 0.0)
        _, keep = jax.lax.top_k(alive, k)
        running, running_scores, source = _take(seqs, keep), _take(alive, keep), _take(source, keep)
        # candidates that just ended among the top K join the finished set, if they can still matter
        length_norm = (step + 1).astype(jnp.float32) ** gen.length_penalty
        just_ended = ends & top_k_slot[None]
        ended_scores = (scores / length_norm + jnp.where(improvable[:, None], 0.0, NEG)
                        + jnp.where(just_ended, 0.0, NEG))
        merged_scores = jnp.concatenate([finished_scores, ended_scores], axis=1)
        _, best = jax.lax.top_k(merged_scores, k)
        finished = _take(jnp.concatenate([finished, seqs], axis=1), best)
        finished_real = _take(jnp.concatenate([finished_real, just_ended], axis=1), best)
        finished_scores = _take(merged_scores, best)
        best_running = running_scores[:, 0] / length_norm
        worst_finished = jnp.where(finished_real, jnp.min(finished_scores, axis=1, keepdims=True), NEG)
        improvable = improvable & jnp.any(best_running[:, None] > worst_finished, axis=1)
        go = jnp.any(improvable) & ~jnp.all(ends) & (step + 1 < n)
        rows = (jnp.arange(b)[:, None] * k + source).reshape(-1)
        cache = KVCache(cache.k[:, rows], cache.v[:, rows], cache.lengths[rows])
        logits, cache = _step(model, params, running[:, :, step].reshape(-1), pos + 1, cache)
        return (step + 1, logits, cache, pos + 1, running, running_scores, finished, finished_scores, finished_real,
                improvable, go)

    state = (jnp.int32(0), logits, cache, pos, running, running_scores, finished, finished_scores, finished_real,
             improvable, jnp.bool_(True))
    state = jax.lax.while_loop(lambda s: s[-1], body, state)
    return state[6][:, 0]
