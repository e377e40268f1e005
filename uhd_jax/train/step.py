"""The train step: one jit, gradient accumulation by `lax.scan`, frozen parameters outside differentiation, a
non-finite update never applied.

Loss = sum of token cross-entropies over every supervised token of the global batch (all micro-batches and devices)
divided by their count: each supervised token weighs the same, whatever its sample's length. (HF/LLaVA average per
device micro-batch first, which weighs tokens of short micro-batches more.)

The loss never holds the (B, L, V) float32 logits: the model returns its final hidden states and `chunked_sums`
computes logits, log-partition and argmax a chunk of tokens at a time under `jax.checkpoint`, so the backward pass
recomputes each chunk's logits instead of keeping them (MaxText's vocabulary tiling). At 16 x 2048 tokens and a
32000-word vocabulary the whole tensor is 4.2 GB, and autodiff kept several.
"""
from __future__ import annotations

import jax
import jax.numpy as jnp
import optax

from uhd_jax.data.batch import TEXT_KEYS
from uhd_jax.train.optimizer import merge
from uhd_jax.train.state import TrainState


def model_inputs(batch: dict) -> tuple:
    """The VLM's positional inputs from a batch: fixed square images, or the packed UHD slices and geometry."""
    if "pixel_values" in batch:
        images = batch["pixel_values"]
    else:
        images = {k: v for k, v in batch.items() if k not in TEXT_KEYS}
    return batch["input_ids"], batch["token_valid"], batch["positions"], images, batch["image_token_map"]


# A chunk's float32 logits stay under this many bytes (2097 tokens at a 32000-word vocabulary): small beside a
# device, large enough that each chunk's matmul stays efficient.
LOGITS_CHUNK_BYTES = 1 << 28


def loss_chunk_tokens(vocab_size: int, n_tokens: int, chunk: int | None = None) -> int:
    """Tokens per loss chunk: `chunk` if given, else as many as fit LOGITS_CHUNK_BYTES; never more than n_tokens
    (one chunk: the plain computation)."""
    if chunk is None:
        chunk = max(1, LOGITS_CHUNK_BYTES // (4 * vocab_size))
    return max(1, min(int(chunk), n_tokens))


def chunked_sums(logits_fn, hidden, targets, mask, chunk: int):
    """Summed masked cross-entropy, token count and correct-argmax count of hidden (B, L, E) under `logits_fn`
    ((n, E) -> (n, V) float32), `chunk` tokens at a time. The tokens are flattened and padded (mask 0) to a multiple
    of `chunk`; each chunk's logits exist only inside its (rematerialised) body."""
    e = hidden.shape[-1]
    h, tgt, m = hidden.reshape(-1, e), targets.reshape(-1), mask.reshape(-1).astype(jnp.float32)
    n = h.shape[0]
    pad = (-n) % chunk
    if pad:
        h = jnp.concatenate([h, jnp.zeros((pad, e), h.dtype)])
        tgt = jnp.concatenate([tgt, jnp.zeros((pad,), tgt.dtype)])
        m = jnp.concatenate([m, jnp.zeros((pad,), m.dtype)])

    def sums(h_c, tgt_c, m_c):
        logits = logits_fn(h_c)
        logz = jax.nn.logsumexp(logits, axis=-1)
        target_logit = jnp.take_along_axis(logits, tgt_c[:, None], axis=-1)[:, 0]
        correct = argmax_hits(logits, tgt_c).astype(jnp.float32)
        return jnp.sum((logz - target_logit) * m_c), jnp.sum(m_c), jnp.sum(correct * m_c)

    if h.shape[0] == chunk:
        return sums(h, tgt, m)
    body = jax.checkpoint(sums)

    def step(carry, xs):
        return tuple(a + b for a, b in zip(carry, body(*xs))), None

    k = h.shape[0] // chunk
    zero = jnp.float32(0)
    out, _ = jax.lax.scan(step, (zero, zero, zero),
                          (h.reshape(k, chunk, e), tgt.reshape(k, chunk), m.reshape(k, chunk)))
    return out


def argmax_hits(logits, targets):
    """`jnp.argmax(logits, axis=-1) == targets` for finite rows: the target holds the row's max and no earlier index
    does (argmax's tie rule), as one fused compare-and-count. XLA's CPU backend runs argmax's (value, index)
    reduction element by element: 9.7 ms of the llava15:demo SFT step at B8 L512 (4096 x 1024 logits); this form
    costs 2-3 ms there."""
    top = jnp.max(logits, axis=-1, keepdims=True)
    target_logit = jnp.take_along_axis(logits, targets[:, None], axis=-1)
    earlier = jnp.arange(logits.shape[-1], dtype=targets.dtype) < targets[:, None]
    ties_before = jnp.sum(((logits == top) & earlier).astype(jnp.float32), axis=-1)
    return (target_logit[:, 0] == top[:, 0]) & (ties_before == 0)


def loss_sums(model, params, micro, dropout_rng=None, chunk: int | None = None):
    """(summed masked cross-entropy, supervised tokens, correct argmax predictions) of a micro-batch, the logits
    computed `loss_chunk_tokens` at a time. With `dropout_rng` the model runs in training mode (dropout on)."""
    kwargs = {} if dropout_rng is None else dict(deterministic=False, rngs={"dropout": dropout_rng})
    hidden, _ = model.apply({"params": params}, *model_inputs(micro), return_hidden=True, **kwargs)
    logits_fn = lambda h: model.apply({"params": params}, h[None], method=_llm_logits)[0]  # noqa: E731
    chunk = loss_chunk_tokens(model.cfg.llm.vocab_size, hidden.shape[0] * hidden.shape[1], chunk)
    return chunked_sums(logits_fn, hidden, micro["targets"], micro["loss_mask"], chunk)


def _llm_logits(vlm, hidden):
    return vlm.llm.logits(hidden)


def apply_if_finite(state: TrainState, tx, grads, trainable, loss, full_params):
    """The optimizer update, applied only when the loss and the gradient norm are finite (else state unchanged, step
    not advanced). `full_params(trainable)` rebuilds the whole parameter tree. Returns (state, grad_norm, finite)."""
    grad_norm = optax.global_norm(grads)
    finite = jnp.isfinite(loss) & jnp.isfinite(grad_norm)
    updates, new_opt = tx.update(grads, state.opt_state, trainable)
    new_trainable = optax.apply_updates(trainable, updates)
    keep = lambda new, old: jax.tree_util.tree_map(lambda a, b: jnp.where(finite, a, b), new, old)  # noqa: E731
    new_state = TrainState(step=state.step + finite.astype(jnp.int32),
                           params=full_params(keep(new_trainable, trainable)),
                           opt_state=keep(new_opt, state.opt_state))
    return new_state, grad_norm, finite


def make_train_step(model, tx, labels_frozen_split, dropout_seed: int | None = None, loss_chunk: int | None = None):
    """labels_frozen_split(params) -> (trainable, frozen) trees (None where the other holds the leaf).

    `dropout_seed`: training-mode dropout with a key derived from (seed, step, micro-batch), so a resumed run draws
    the same masks as an uninterrupted one. `loss_chunk`: tokens per loss chunk (None: `loss_chunk_tokens`)."""

    def micro_sums(trainable, frozen, micro, rng):
        loss_sum, count, correct = loss_sums(model, merge(trainable, frozen), micro, rng, loss_chunk)
        return loss_sum, (count, correct)

    grad_fn = jax.value_and_grad(micro_sums, has_aux=True)

    def train_step(state: TrainState, batch):
        """batch: arrays with a leading accumulation axis (A, B_micro, ...)."""
        trainable, frozen = labels_frozen_split(state.params)

        step_key = None if dropout_seed is None else jax.random.fold_in(jax.random.PRNGKey(dropout_seed), state.step)

        def accumulate(carry, indexed):
            i, micro = indexed
            grads, loss_sum, count, correct = carry
            rng = None if step_key is None else jax.random.fold_in(step_key, i)
            (ls, (n, c)), g = grad_fn(trainable, frozen, micro, rng)
            grads = jax.tree_util.tree_map(jnp.add, grads, g)
            return (grads, loss_sum + ls, count + n, correct + c), None

        zeros = jax.tree_util.tree_map(jnp.zeros_like, trainable)
        init = (zeros, jnp.float32(0), jnp.float32(0), jnp.float32(0))
        n_micro = jax.tree_util.tree_leaves(batch)[0].shape[0]
        if n_micro == 1:   # no loop: XLA then fuses the gradient into the update instead of copying a loop carry
            (grads, loss_sum, count, correct), _ = accumulate(
                init, (jnp.int32(0), jax.tree_util.tree_map(lambda x: x[0], batch)))
        else:
            (grads, loss_sum, count, correct), _ = jax.lax.scan(accumulate, init, (jnp.arange(n_micro), batch))
        denom = jnp.maximum(count, 1.0)
        grads = jax.tree_util.tree_map(lambda g: g / denom, grads)
        loss = loss_sum / denom
        new_state, grad_norm, finite = apply_if_finite(state, tx, grads, trainable, loss,
                                                       lambda t: merge(t, frozen))
        metrics = {"loss": loss, "accuracy": correct / denom, "grad_norm": grad_norm, "tokens": count,
                   "finite": finite}
        return new_state, metrics

    return train_step
