"""The train step: one jit, gradient accumulation by `lax.scan`, frozen parameters outside differentiation, a
non-finite update never applied.

Loss = sum of token cross-entropies over every supervised token of the global batch (all micro-batches and devices)
divided by their count: each supervised token weighs the same, whatever its sample's length. (HF/LLaVA average per
device micro-batch first, which weighs tokens of short micro-batches more.)
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


def token_losses(model, params, micro, dropout_rng=None):
    """Per-token cross-entropy (B, L) float32 and correctness of the argmax prediction. With `dropout_rng` the model
    runs in training mode (dropout on)."""
    if dropout_rng is None:
        logits, _ = model.apply({"params": params}, *model_inputs(micro))
    else:
        logits, _ = model.apply({"params": params}, *model_inputs(micro), deterministic=False,
                                rngs={"dropout": dropout_rng})
    logz = jax.nn.logsumexp(logits, axis=-1)
    target_logit = jnp.take_along_axis(logits, micro["targets"][..., None], axis=-1)[..., 0]
    correct = jnp.argmax(logits, axis=-1) == micro["targets"]
    return logz - target_logit, correct


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


def make_train_step(model, tx, labels_frozen_split, dropout_seed: int | None = None):
    """labels_frozen_split(params) -> (trainable, frozen) trees (None where the other holds the leaf).

    `dropout_seed`: training-mode dropout with a key derived from (seed, step, micro-batch), so a resumed run draws
    the same masks as an uninterrupted one."""

    def micro_sums(trainable, frozen, micro, rng):
        params = merge(trainable, frozen)
        losses, correct = token_losses(model, params, micro, rng)
        mask = micro["loss_mask"].astype(jnp.float32)
        return jnp.sum(losses * mask), (jnp.sum(mask), jnp.sum(correct * mask))

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
